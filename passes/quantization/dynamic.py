"""quantize-dynamic: linear layers -> graphopt.DynamicQuantLinear: int8 weights, activations
quantized at each call (ONNX Runtime's DynamicQuantizeMatMul; MatMulInteger in core ops).

    Before:  %y = graphopt.Linear(%x, @w, @b)           (@w: f32[K, N])
    After:   %y = graphopt.DynamicQuantLinear(%x, @w_i8, @w_scale, _, @b)

The sites are those of quantize-weights (Linear, GatedLinear, MatMul, Gemm, a tied head).
Weights are symmetric int8 (zero point 0; ORT's kernel is fastest so).

Options:
  per-channel  one scale per output feature (true) or one for the whole weight (false)
  tied         also quantize a tied LM head (MatMul by the transpose of a shared table)
  exclude      node names to leave in float, separated by ';'
"""
from __future__ import annotations

import numpy as np

from graphopt.ir import GRAPHOPT_DOMAIN, Graph
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Rewriter, remove_dead, replace_value

from graphopt.passes.quantization.sites import (
    Site,
    collect_sites,
    count_weight_bytes,
    drop_unread_weights,
    float32_only,
    gated_epilogue,
    site_inputs,
    weight_bytes,
)

G = GRAPHOPT_DOMAIN


def quantize_int8_symmetric(w_kn: np.ndarray, per_channel: bool):
    """W [K, N] -> (i8 [K, N], scale f32 [N] or [])."""
    amax = np.abs(w_kn).max(axis=0) if per_channel else np.abs(w_kn).max()
    scale = np.where(amax == 0, 1.0, amax / 127).astype(np.float32)
    return np.clip(np.round(w_kn / scale), -127, 127).astype(np.int8), scale


@register_pass("quantize-dynamic")
class QuantizeDynamic(Pass):
    """Store linear weights in int8 and quantize the activations at run time (graphopt.DynamicQuantLinear).

    Before:  %y = graphopt.Linear(%x, @w)            After:  %y = graphopt.DynamicQuantLinear(%x, @w_i8, @w_scale)
    """

    approximate = True  # it changes the numbers by design: --check-numerics measures, not compares

    per_channel: bool = True
    tied: bool = True
    exclude: str = ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        start = weight_bytes(graph)
        for site in collect_sites(graph, self.tied, self.exclude, result, float32_only, "quantize-dynamic"):
            read = site_inputs(site)
            self._rewrite(graph, site)
            result.count(site.kind)
            result.details.append({"node": site.node.name, "op": site.node.op, "kind": site.kind,
                                   "K": int(site.w_nk.shape[1]), "N": int(site.w_nk.shape[0])})
            drop_unread_weights(graph, read)
        count_weight_bytes(result, start, graph)
        return result

    def _rewrite(self, graph: Graph, site: Site) -> None:
        node = site.node
        rw = Rewriter(graph, node, "quantize-dynamic")
        q, scale = quantize_int8_symmetric(np.ascontiguousarray(site.w_nk.T), self.per_channel)
        base = site.weights[0].name
        args = [node.inputs[0], rw.const(q, f"{base}_i8"), rw.const(scale, f"{base}_scale")]
        bias = site.bias
        if isinstance(bias, np.ndarray):
            bias = rw.const(bias.astype(np.float32), f"{base}_bias")
        if bias is not None:
            args += [None, bias]
        gated = site.kind == "gated-linear"
        y = rw.op("DynamicQuantLinear", *args, domain=G, activation=None if gated else (site.activation or None))
        y = gated_epilogue(rw, y, site)
        replace_value(graph, node.outputs[0], y)
        remove_dead(graph, [node, *site.extra_nodes])


__all__ = ["QuantizeDynamic", "quantize_int8_symmetric"]
