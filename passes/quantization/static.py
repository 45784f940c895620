"""quantize-static: int8 activations and weights, their ranges from calibration data, as QDQ pairs.

    Before:  %y = graphopt.Linear(%x, @w, @b) {activation="gelu"}               (@w: f32[K, N])
    After:   %xq = QuantizeLinear(%x, @x_scale, @x_zero_point)                  u8, one scale per tensor
             %xd = DequantizeLinear(%xq, @x_scale, @x_zero_point)
             %wd = DequantizeLinear(@w_i8, @w_scale) {axis=1}                   i8, a scale per output feature
             %y  = Gelu(Add(MatMul(%xd, %wd), @b))

Core ONNX ops only (no new graphopt op): every backend runs them, and ONNX Runtime's QDQ
transformer fuses DequantizeLinear -> MatMul into its integer kernels (MatMulIntegerToFloat,
or QLinearMatMul); tests/test_quantization_static.py checks the optimized ORT graph.

The sites are those of quantize-weights (Linear, GatedLinear, MatMul, Gemm, a tied head). The
activation range of each site's X comes from the calibration feeds (`ctx.hints["calibration"]`):

  calibration  minmax      the smallest and largest value seen
               percentile  the `percentile` and 100 - `percentile` percentiles (outliers clipped)
               entropy     the |x| threshold whose 128-level quantized histogram is closest to
                           the float one in KL divergence (TensorRT's entropy calibration)
  percentile   for calibration=percentile (default 99.99)
  tied         also quantize a tied LM head (an int8 copy of the shared table)
  exclude      node names to leave in float, separated by ';'
"""
from __future__ import annotations

import numpy as np

from graphopt.errors import UserError
from graphopt.interpreter import run as interpret
from graphopt.ir import Graph, Value
from graphopt.ops.activations import activate
from graphopt.pass_manager import CALIBRATION_HINT, Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Rewriter, remove_dead, replace_value

from graphopt.passes.quantization.dynamic import quantize_int8_symmetric
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

CALIBRATIONS = ("minmax", "percentile", "entropy")
SAMPLE_ROWS = 4096  # rows of each activation kept for percentile / entropy


def activation_range(x: np.ndarray, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """(lo, hi) to quantize `x` over; it always contains 0 (so that 0 is exact)."""
    x = np.asarray(x, np.float32).ravel()
    lo, hi = float(x.min()), float(x.max())
    if method == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, [100 - percentile, percentile]))
    elif method == "entropy":
        t = entropy_threshold(np.abs(x))
        lo, hi = max(lo, -t), min(hi, t)
    return min(lo, 0.0), max(hi, 0.0)


def entropy_threshold(a: np.ndarray, bins: int = 2048, levels: int = 128) -> float:
    """The threshold T on |x| minimizing KL(P || Q): P the histogram of |x| cut at T (the mass
    above T added to its last bin), Q that histogram merged into `levels` levels and spread
    back over the bins that were non-zero."""
    hist, edges = np.histogram(a, bins=bins, range=(0.0, float(a.max()) or 1.0))
    hist = hist.astype(np.float64)
    best_kl, best_t = np.inf, float(edges[-1])
    for i in range(levels, bins + 1, 16):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        for chunk in np.array_split(np.arange(i), levels):
            nonzero = hist[chunk] > 0
            if nonzero.any():
                q[chunk[nonzero]] = hist[chunk].sum() / nonzero.sum()
        keep = p > 0
        if not (q[keep] > 0).all():
            continue
        p_n, q_n = p / p.sum(), q / q.sum()
        kl = float(np.sum(p_n[keep] * np.log(p_n[keep] / q_n[keep])))
        if kl < best_kl:
            best_kl, best_t = kl, float(edges[i])
    return best_t


def uint8_params(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    scale = np.float32((hi - lo) / 255 if hi > lo else 1.0)
    return np.asarray(scale, np.float32), np.asarray(np.clip(np.round(-lo / scale), 0, 255), np.uint8)


@register_pass("quantize-static")
class QuantizeStatic(Pass):
    """Quantize linear layers' activations (u8, ranges from calibration) and weights (i8 per
    channel) as QuantizeLinear/DequantizeLinear pairs around MatMul.

    Before:  %y = graphopt.Linear(%x, @w)       After:  %y = MatMul(DequantizeLinear(QuantizeLinear(%x, ..)), DequantizeLinear(@w_i8, @w_scale))
    """

    approximate = True  # it changes the numbers by design: --check-numerics measures, not compares

    calibration: str = "percentile"  # the best of the three on examples/default (docs/quantization.md)
    percentile: float = 99.99
    tied: bool = True
    exclude: str = ""

    def __post_init__(self) -> None:  # checked when the pipeline is parsed, before any model load
        self.check_options()

    def check_options(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise UserError(f"quantize-static: calibration must be minmax, percentile or entropy, "
                            f"not {self.calibration!r}")
        if not 50 < self.percentile <= 100:
            raise UserError(f"quantize-static: percentile must be in (50, 100], not {self.percentile}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.check_options()  # (again: a caller may have set an option since)
        feeds_list = ctx.hints.get("calibration")
        if not feeds_list:
            raise UserError("quantize-static needs calibration data: " + CALIBRATION_HINT)
        result = PassResult()
        sites = collect_sites(graph, self.tied, self.exclude, result, float32_only, "quantize-static")
        progress = ctx.hints.get("progress") or (lambda msg: None)
        ranges = self._ranges(graph, {id(s.x): s.x for s in sites}, feeds_list, progress)
        start = weight_bytes(graph)
        quantized_x: dict[int, Value] = {}  # sites reading one X share its QDQ pair
        for site in sites:
            read = site_inputs(site)
            lo, hi = ranges[id(site.x)]
            self._rewrite(graph, site, lo, hi, quantized_x)
            result.count(site.kind)
            result.details.append({"node": site.node.name, "op": site.node.op, "kind": site.kind,
                                   "K": int(site.w_nk.shape[1]), "N": int(site.w_nk.shape[0]),
                                   "x_range": [round(lo, 6), round(hi, 6)]})
            drop_unread_weights(graph, read)
        count_weight_bytes(result, start, graph)
        return result

    def _ranges(self, graph: Graph, xs: dict[int, Value], feeds_list: list[dict], progress) -> dict[int, tuple]:
        lo = {k: np.inf for k in xs}
        hi = {k: -np.inf for k in xs}
        rows: dict[int, list] = {k: [] for k in xs}
        for i, feeds in enumerate(feeds_list):
            progress(f"static calibration {i + 1}/{len(feeds_list)}")
            values = {**feeds, **interpret(graph, feeds, keep_all=True)}
            for k, x in xs.items():
                a = np.asarray(values[x.name], np.float32)
                lo[k], hi[k] = min(lo[k], float(a.min())), max(hi[k], float(a.max()))
                if self.calibration != "minmax":
                    rows[k].append(a.reshape(-1, a.shape[-1]))
        out = {}
        for k in xs:
            if self.calibration == "minmax":
                out[k] = (min(lo[k], 0.0), max(hi[k], 0.0))
                continue
            a = np.concatenate(rows[k])
            if len(a) > SAMPLE_ROWS:
                a = a[np.linspace(0, len(a) - 1, SAMPLE_ROWS).astype(int)]
            out[k] = activation_range(a, self.calibration, self.percentile)
        return out

    def _rewrite(self, graph: Graph, site: Site, lo: float, hi: float, quantized_x: dict) -> None:
        node = site.node
        rw = Rewriter(graph, node, "quantize-static")
        base = site.weights[0].name
        x = node.inputs[0]
        xd = quantized_x.get(id(site.x))
        if xd is None:
            scale, zp = uint8_params(lo, hi)
            s, z = rw.const(scale, f"{x.name}_scale"), rw.const(zp, f"{x.name}_zero_point")
            xd = quantized_x[id(site.x)] = rw.DequantizeLinear(rw.QuantizeLinear(x, s, z), s, z)
        q, w_scale = quantize_int8_symmetric(np.ascontiguousarray(site.w_nk.T), per_channel=True)
        wd = rw.DequantizeLinear(rw.const(q, f"{base}_i8"), rw.const(w_scale, f"{base}_scale"), axis=1)
        y = rw.MatMul(xd, wd)
        bias = site.bias
        if isinstance(bias, np.ndarray):
            bias = rw.const(bias.astype(np.float32), f"{base}_bias")
        if bias is not None:
            y = rw.Add(y, bias)
        y = gated_epilogue(rw, y, site) if site.kind == "gated-linear" else activate(rw, y, site.activation)
        replace_value(graph, node.outputs[0], y)
        remove_dead(graph, [node, *site.extra_nodes])


__all__ = ["QuantizeStatic", "activation_range", "entropy_threshold"]
