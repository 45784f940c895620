"""quantize-weights: linear layers with constant weights -> graphopt.QuantLinear (int4 / int8).

    Before:  %y = graphopt.Linear(%x, @w) {activation="gelu"}         (@w: f32[K, N])
    After:   %y = graphopt.QuantLinear(%x, @w_q4, @w_scales, @w_zero_points) {K, N, bits=4, block_size=32, activation="gelu"}

Sites: graphopt.Linear, graphopt.GatedLinear (its gate and up weights quantized side by
side as one QuantLinear, then Split and the gate), MatMul by a constant matrix, Gemm by a
constant matrix (alpha = beta = 1), and MatMul by the transpose of a constant (a tied LM
head; option `tied`); with option `embeddings`, Gather from a constant table as well.

The weight is stored packed with its scales (and zero points), never as unpacked floats; the
fp32 weight is dropped when nothing else reads it.

Options:
  bits        4 or 8
  block-size  32, 64 or 128 (any power of two >= 16): elements per scale along K; a layer
              whose K is not a multiple of it takes the power of two in [16, block-size]
              that stores the fewest bytes (K=192 at 128 would pad each row to 256 values: 64;
              a mixture of experts' stacked experts keep block-size)
  symmetric   false: a zero point per block (asymmetric, the better int4 grid); true: none
  method      rtn (round to nearest, no data), gptq (second-order error compensation) or awq
              (activation-aware per-input-channel scaling, then GPTQ or RTN: awq-then; awq.py);
              gptq and awq need calibration inputs in the pass context:
              `ctx.hints["calibration"]`, a list of feed dicts
  tied        also quantize MatMul(X, Transpose(@w)) where @w is shared (a tied LM head)
  embeddings  also quantize Gather(@table, ids) into graphopt.QuantGather (round to nearest;
              a table tied to a quantized LM head shares the head's quantized copy)
  exclude     node names to leave in float, separated by ';'
  damp        GPTQ's diagonal dampening, as a fraction of the mean diagonal of H
  awq-then    with method=awq, how the scaled weights are rounded: gptq (on the scaled
              activations; the default: on the shipped model it beats GPTQ alone) or rtn (with
              AWQ's searched clipping; there it did not beat plain RTN, docs/quantization.md)
"""
from __future__ import annotations

import math

import numpy as np

from graphopt.errors import UserError
from graphopt.interpreter import run as interpret
from graphopt.ir import GRAPHOPT_DOMAIN, Graph
from graphopt.pass_manager import CALIBRATION_HINT, Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Rewriter, constant_value, remove_dead, replace_value
from graphopt.ops.moe import moe_form
from graphopt.ops.quant_format import fit_block, pack, pack_weight, quantize_rows, quantize_stacked

from graphopt.passes.quantization.awq import awq_quantize, awq_rescale
from graphopt.passes.quantization.sites import (
    Site,
    collect_sites,
    count_weight_bytes,
    split_names,
    drop_unread_weights,
    find_site,
    float_only,
    gated_epilogue,
    site_inputs,
    weight_bytes,
)
from graphopt.passes.quantization.gptq import Hessian, gptq_rows

G = GRAPHOPT_DOMAIN
METHODS = ("rtn", "gptq", "awq")


@register_pass("quantize-weights")
class QuantizeWeights(Pass):
    """Store the weights of linear layers in 4 or 8 bits, block-wise (graphopt.QuantLinear).

    Before:  %y = graphopt.Linear(%x, @w)            After:  %y = graphopt.QuantLinear(%x, @w_q4, @w_scales, @w_zp) {K=192, N=512, bits=4, block_size=32}
    """

    approximate = True  # it changes the numbers by design: --check-numerics measures, not compares

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: str = "rtn"
    tied: bool = True
    embeddings: bool = False
    exclude: str = ""
    damp: float = 0.01
    awq_then: str = "gptq"

    def __post_init__(self) -> None:  # checked when the pipeline is parsed, before any model load
        self.check_options()

    def check_options(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"quantize-weights: bits must be 4 or 8, not {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"quantize-weights: block-size must be a power of two >= 16 (32, 64, 128), "
                            f"not {self.block_size}")
        if self.method not in METHODS:
            raise UserError(f"quantize-weights: method must be rtn, gptq or awq, not {self.method!r}")
        if not (math.isfinite(self.damp) and 0 < self.damp <= 1):
            raise UserError(f"quantize-weights: damp must be in (0, 1] (a fraction of the Hessian's mean diagonal; "
                            f"0.01 by default), not {self.damp}")
        if self.awq_then not in ("rtn", "gptq"):
            raise UserError(f"quantize-weights: awq-then must be rtn or gptq, not {self.awq_then!r}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.check_options()  # (again: a caller may have set an option since)
        known = {n.name for n in graph.nodes}  # the names an exclude may give (its mixtures of experts')
        self._tables: dict[str, tuple] = {}  # tied table name -> its quantized (packed, scales, zero points)
        result = PassResult()
        excluded = split_names(self.exclude)
        progress = ctx.hints.get("progress") or (lambda msg: None)
        # A caller that runs the pass repeatedly (the accuracy guard) passes a dict here: a
        # layer's quantized weights depend only on its float weight and the options.
        cache = ctx.hints.get("quantized_layers")
        cache = {} if cache is None else cache
        if self.method == "awq":  # scale every eligible layer (excluded ones too: exact in fp32)
            eligible = collect_sites(graph, self.tied, "", PassResult(), float_only)
            for record in awq_rescale(graph, eligible, self._calibration(ctx), self.bits, self.block_size,
                                      self.symmetric, progress, cache, clip=self.awq_then == "rtn"):
                result.count("awq-scaled" if record["inverse_scale"] else "awq-unscaled")
                result.details.append({"awq": record})
        start = weight_bytes(graph)  # (the experts' stacked weights count too)
        if self.method == "rtn":  # a mixture of experts whole, its experts still run sparse where they can
            for node in [n for n in graph.nodes if n.domain == G and n.op_type == "MoE" and n.name not in excluded]:
                self._quantize_experts(graph, node, result)
        sites = collect_sites(graph, self.tied, self.exclude, result, float_only, "quantize-weights", known)
        key = (self.bits, self.block_size, self.symmetric, self.method, self.awq_then, self.damp)
        todo = [s for s in sites if (s.node.name, key) not in cache]
        gptq = self.method == "gptq" or (self.method == "awq" and self.awq_then == "gptq")
        hessians = self._hessians(graph, todo, ctx, progress) if gptq and todo else {}
        for i, site in enumerate(sites):
            bs = self._fit(site.w_nk.shape[1], site.x.type.dtype.np_dtype)
            if (site.node.name, key) in cache:
                q, scales, zp = cache[site.node.name, key]
            elif gptq:
                progress(f"gptq {i + 1}/{len(sites)}: {site.node.name} [{site.w_nk.shape[0]}x{site.w_nk.shape[1]}]")
                q, scales, zp = gptq_rows(site.w_nk, hessians[id(site.x)].h, self.bits, bs,
                                          self.symmetric, self.damp)
            elif self.method == "awq":
                q, scales, zp = awq_quantize(site.node.name, site.w_nk, cache, self.bits, self.block_size,
                                             self.symmetric, bs)
            else:
                q, scales, zp = quantize_rows(site.w_nk, self.bits, bs, self.symmetric)
            cache[site.node.name, key] = (q, scales, zp)
            read = site_inputs(site)
            stored = self._rewrite(graph, site, q, scales, zp)
            result.count(site.kind)
            result.details.append({"node": site.node.name, "op": site.node.op, "kind": site.kind,
                                   "K": int(site.w_nk.shape[1]), "N": int(site.w_nk.shape[0]), "block_size": bs,
                                   "bytes": stored})
            drop_unread_weights(graph, read)
        if self.embeddings:
            self._quantize_embeddings(graph, excluded, result)
        count_weight_bytes(result, start, graph)
        return result

    def _fit(self, k: int, scale_dtype) -> int:
        """The block a layer of input width `k` takes (fit_block), its scales in `scale_dtype`."""
        return fit_block(k, self.bits, self.block_size, np.dtype(scale_dtype).itemsize, not self.symmetric)

    def _rewrite(self, graph: Graph, site: Site, q, scales, zp) -> int:
        node = site.node
        n, k = site.w_nk.shape
        dt = site.x.type.dtype.np_dtype
        x = node.inputs[0]  # not site.x: an earlier rewrite may have replaced it
        rw = Rewriter(graph, node, "quantize-weights")
        base = site.weights[0].name
        tag = f"q{self.bits}"
        bs = self._fit(int(k), dt)
        packed = rw.const(pack_weight(q, self.bits, bs), f"{base}_{tag}")
        sc = rw.const(scales.astype(dt), f"{base}_scales")
        args = [x, packed, sc]
        stored = packed.const_value.nbytes + sc.const_value.nbytes
        zv = None
        if zp is not None:
            zv = rw.const(pack(zp, self.bits), f"{base}_zero_points")
            stored += zv.const_value.nbytes
        bias = site.bias
        if isinstance(bias, np.ndarray):
            bias = rw.const(bias.astype(dt), f"{base}_bias")
        if bias is not None or zv is not None:
            args.append(zv)
        if bias is not None:
            args.append(bias)
        gated = site.kind == "gated-linear"
        y = rw.op("QuantLinear", *args, domain=G, K=int(k), N=int(n), bits=self.bits, block_size=bs,
                  activation=None if gated else (site.activation or None))
        y = gated_epilogue(rw, y, site)
        replace_value(graph, node.outputs[0], y)
        remove_dead(graph, [node, *site.extra_nodes])
        if site.kind == "tied":  # the table's Gather can share this copy
            self._tables[site.weights[0].name] = (packed, sc, zv)
        return stored

    def _quantize_experts(self, graph: Graph, node, result: PassResult) -> None:
        """graphopt.MoE -> graphopt.QuantMoE, every expert's projections quantized (RTN) in
        QuantLinear's layout and stacked; left as it is (collect_sites then decomposes it) where
        the expert weights are not float constants."""
        x, index, weights, up, down = node.inputs[:5]
        stacks = constant_value(up), constant_value(down)
        if any(w is None or w.dtype.kind != "f" or w.ndim != 3 for w in stacks) or float_only(x.type):
            return
        biases = list(node.inputs[5:7])
        if any(v is not None and constant_value(v) is None for v in biases):
            return
        dt = x.type.dtype.np_dtype
        rw = Rewriter(graph, node, "quantize-weights")
        args, stored = [], 0
        zero_points = []
        for value, w in zip((up, down), stacks):
            packed, scales, zp = quantize_stacked(w, self.bits, self.block_size, self.symmetric)
            for part, suffix in ((packed, f"q{self.bits}"), (scales.astype(dt), "scales")):
                args.append(rw.const(part, f"{value.name}_{suffix}"))
                stored += part.nbytes
            if zp is not None:
                zero_points.append(rw.const(zp, f"{value.name}_zero_points"))
                stored += zp.nbytes
        zero_points = zero_points or [None, None]
        alpha, beta, limit = moe_form(node)  # (GPT-OSS's clamped SwiGLU and biases go along as they are)
        y = rw.op("QuantMoE", x, index, weights, *args, *zero_points, *biases, domain=G, bits=self.bits,
                  block_size=self.block_size, hidden=int(stacks[1].shape[1]), inner=int(stacks[1].shape[2]),
                  gated=int(node.attr("gated", 1)), activation=node.attr("activation", "silu"),
                  alpha=alpha if alpha != 1.0 else None, beta=beta or None, limit=limit or None)
        replace_value(graph, node.outputs[0], y)
        remove_dead(graph, [node])
        drop_unread_weights(graph, [up, down])
        result.count("moe")
        result.details.append({"node": node.name, "op": node.op, "kind": "moe", "experts": int(stacks[0].shape[0]),
                               "K": int(stacks[0].shape[2]), "N": int(stacks[0].shape[1]), "bytes": stored})

    def _quantize_embeddings(self, graph: Graph, excluded: set, result: PassResult) -> None:
        for node in list(graph.nodes):
            if node.domain != "" or node.op_type != "Gather" or node.attr("axis", 0) != 0 or node.name in excluded:
                continue
            table, ids = node.inputs
            w = constant_value(table)
            if w is None or w.ndim != 2 or w.dtype.kind != "f" or ids.type is None or ids.type.dtype.short not in ("i32", "i64"):
                continue
            rw = Rewriter(graph, node, "quantize-weights")
            shared = self._tables.get(table.name)
            # a table tied to a quantized head takes the head's block (its packed copy's)
            bs = (shared[0].const_value.shape[-1] * 8 // self.bits if shared is not None
                  else self._fit(int(w.shape[1]), w.dtype))
            if shared is None:
                q, scales, zp = quantize_rows(w, self.bits, bs, self.symmetric)
                tag = f"q{self.bits}"
                shared = (rw.const(pack_weight(q, self.bits, bs), f"{table.name}_{tag}"),
                          rw.const(scales.astype(w.dtype), f"{table.name}_scales"),
                          None if zp is None else rw.const(pack(zp, self.bits), f"{table.name}_zero_points"))
            packed, sc, zv = shared
            args = [packed, ids, sc] + ([zv] if zv is not None else [])
            y = rw.op("QuantGather", *args, domain=G, K=int(w.shape[1]), bits=self.bits, block_size=bs)
            replace_value(graph, node.outputs[0], y)
            remove_dead(graph, [node])
            if not table.uses() and table.is_initializer and not table.is_graph_output:
                graph.remove_initializer(table.name)
            result.count("embedding")
            result.details.append({"node": node.name, "op": node.op, "kind": "embedding", "K": int(w.shape[1]),
                                   "N": int(w.shape[0]), "shared": table.name in self._tables})

    def _hessians(self, graph: Graph, sites: list[Site], ctx: PassContext, progress) -> dict[int, Hessian]:
        """X^T X of every site's input over the calibration feeds (fp32 activations)."""
        feeds_list = self._calibration(ctx)
        wanted = {id(s.x): s.x for s in sites}
        hessians = {key: Hessian(v.type.shape[-1]) for key, v in wanted.items()}
        for i, feeds in enumerate(feeds_list):
            progress(f"calibration {i + 1}/{len(feeds_list)}")
            values = {**feeds, **interpret(graph, feeds, keep_all=True)}  # keep_all omits the inputs
            for key, v in wanted.items():
                hessians[key].add(values[v.name])
        return hessians


    def _calibration(self, ctx: PassContext) -> list[dict]:
        feeds_list = ctx.hints.get("calibration")
        if not feeds_list:
            raise UserError(f"quantize-weights{{method={self.method}}} needs calibration data: " + CALIBRATION_HINT)
        return feeds_list


__all__ = ["METHODS", "QuantizeWeights", "find_site"]
