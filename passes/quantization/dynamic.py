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

from graphopt.ops.activations import activate
from graphopt.ir import GRAPHOPT_DOMAIN, Graph
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Rewriter, remove_dead, replace_value

from graphopt.passes.quantization.weights import Site, find_site

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
        excluded = {s.strip() for s in self.exclude.split(";") if s.strip()}
        start = {name: v.const_value.nbytes for name, v in graph.initializers.items() if v.const_value is not None}
        for node in list(graph.nodes):
            site = find_site(node, self.tied)
            if not isinstance(site, Site):
                continue
            if node.name in excluded or site.x.type is None or site.x.type.dtype.short != "f32":
                result.details.append({"node": node.name, "op": node.op,
                                       "reason": "excluded" if node.name in excluded else "X is not f32"})
                continue
            read = {id(v): v for n in (site.node, *site.extra_nodes) for v in n.inputs if v is not None}.values()
            self._rewrite(graph, site)
            result.count(site.kind)
            result.details.append({"node": node.name, "op": node.op, "kind": site.kind,
                                   "K": int(site.w_nk.shape[1]), "N": int(site.w_nk.shape[0])})
            for w in read:  # the float weights and biases nothing reads any more
                if w.is_initializer and not w.uses() and not w.is_graph_output and not w.is_graph_input:
                    graph.remove_initializer(w.name)
        now = {name: v.const_value.nbytes for name, v in graph.initializers.items() if v.const_value is not None}
        result.count("float-weight-bytes", sum(n for name, n in start.items() if name not in now))
        result.count("quantized-weight-bytes", sum(n for name, n in now.items() if name not in start))
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
        if gated:
            gate, up = rw.Split(y, axis=-1, num_outputs=2)
            y = rw.Mul(activate(rw, gate, site.activation), up)
        replace_value(graph, node.outputs[0], y)
        remove_dead(graph, [node, *site.extra_nodes])


__all__ = ["QuantizeDynamic", "quantize_int8_symmetric"]
