"""graphopt.QuantMoE: graphopt.MoE with every expert's weights block-quantized (int4 / int8) in
graphopt.QuantLinear's layout, stacked over the experts; what quantize-weights (rtn) makes of a
graphopt.MoE. ORT runs it as com.microsoft.QMoE (only the chosen experts); the decomposition is
one QuantLinear per expert projection, every expert on every token, weighted as MoE's.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, constant_value
from graphopt.ops.common import unsupported
from graphopt.ops.moe import gated_activation, moe_activation, moe_form, moe_np, router_weight
from graphopt.ops.quant_format import BITS, dequantize_blockwise, num_blocks
from graphopt.registry import AttrSpec, OpDef, register_op

# inputs: X, index, weights, then per projection (up, down) its packed weight and scales, then
# the zero points of each (both present or both absent), then the float biases (GPT-OSS's)
NAMES = ("X", "index", "weights", "up_packed", "up_scales", "down_packed", "down_scales", "up_zero_points",
         "down_zero_points", "up_bias", "down_bias")


def quant_moe_parts(node: Node) -> dict:
    ins = list(node.inputs) + [None] * (len(NAMES) - len(node.inputs))
    return dict(zip(NAMES, ins))


def quant_moe_dims(node: Node) -> tuple[int, int, int, int, int]:
    """(bits, block_size, hidden, inner, n_up) from the attributes, checked."""
    bits, bs = node.attr("bits", 4), node.attr("block_size", 32)
    hidden, inner = node.attr("hidden"), node.attr("inner")
    if bits not in BITS:
        raise unsupported(node, f"bits must be 4 or 8, not {bits}")
    if bs < 16 or bs & (bs - 1):
        raise unsupported(node, f"block_size must be a power of two >= 16, not {bs}")
    if not isinstance(hidden, int) or not isinstance(inner, int) or hidden <= 0 or inner <= 0:
        raise unsupported(node, "attributes hidden and inner (the experts' sizes) are required")
    return bits, bs, hidden, inner, (2 if node.attr("gated", 1) else 1) * inner


def _infer(node: Node):
    p = quant_moe_parts(node)
    bits, bs, hidden, inner, n_up = quant_moe_dims(node)
    moe_activation(node)
    if (p["up_zero_points"] is None) != (p["down_zero_points"] is None):
        raise unsupported(node, "zero points are given for one projection and not the other")
    experts = p["up_packed"].type.shape[0] if p["up_packed"].type is not None else None
    want = {}
    for proj, n, k in (("up", n_up, hidden), ("down", hidden, inner)):
        nb = num_blocks(k, bs)
        want[f"{proj}_packed"] = (experts, n, nb, bs * bits // 8)
        want[f"{proj}_scales"] = (experts, n, nb)
        want[f"{proj}_zero_points"] = (experts, n, -(-nb * bits // 8))
    want["up_bias"], want["down_bias"] = (experts, n_up), (experts, hidden)
    moe_form(node)
    for name, shape in want.items():
        v = p[name]
        if v is None or v.type is None or v.type.shape is None:
            continue
        if tuple(v.type.shape) != shape:
            raise unsupported(node, f"{name} has shape {list(v.type.shape)}, expected {list(shape)}")
    x = p["X"]
    if x.type is None:
        return [None]
    if x.type.shape is not None and isinstance(x.type.shape[-1], int) and x.type.shape[-1] != hidden:
        raise unsupported(node, f"X has {x.type.shape[-1]} features but the experts take hidden={hidden}")
    return [x.type]


def dequantized_experts(node: Node, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """The float expert weights (up [E, n_up, hidden], down [E, hidden, inner]) of arrays `p`."""
    bits, bs, hidden, inner, _ = quant_moe_dims(node)

    def one(proj, k):
        zp = p[f"{proj}_zero_points"]
        return np.stack([dequantize_blockwise(p[f"{proj}_packed"][e], p[f"{proj}_scales"][e],
                                              None if zp is None else zp[e], bits, bs, k)
                         for e in range(p[f"{proj}_packed"].shape[0])])
    return one("up", hidden), one("down", inner)


def _reference(node: Node, inputs):
    p = dict(zip(NAMES, list(inputs) + [None] * (len(NAMES) - len(inputs))))
    up, down = dequantized_experts(node, p)
    x = p["X"]
    return [moe_np(x, p["index"], p["weights"], up.astype(x.dtype), down.astype(x.dtype), moe_activation(node),
                   node.attr("gated", 1), p["up_bias"], p["down_bias"], moe_form(node))]


def _decompose(b: Builder, node: Node):
    """One graphopt.QuantLinear per expert projection (each expert's slices as constants of
    their own), every expert on every token, weighted by the router's weight for it."""
    p = quant_moe_parts(node)
    bits, bs, hidden, inner, n_up = quant_moe_dims(node)
    arrays = {name: constant_value(p[name]) if p[name] is not None else None for name in NAMES[3:]}
    if any(arrays[name] is None for name in NAMES[3:7]) or any(
            p[n] is not None and arrays[n] is None for n in NAMES[7:]):
        raise unsupported(node, "the expert weights must be constants to decompose")
    act, gated = moe_activation(node), node.attr("gated", 1)
    y = None
    for e in range(arrays["up_packed"].shape[0]):
        def linear(x, proj, k, n):
            ins = [x] + [b.const(arrays[f"{proj}_{part}"][e], f"expert_{proj}_{part}") for part in ("packed", "scales")]
            zp, bias = arrays[f"{proj}_zero_points"], arrays[f"{proj}_bias"]
            ins.append(None if zp is None else b.const(zp[e], f"expert_{proj}_zero_points"))
            if bias is not None:
                ins.append(b.const(np.ascontiguousarray(bias[e]), f"expert_{proj}_bias"))
            return b.op("QuantLinear", *(ins if ins[-1] is not None else ins[:-1]), domain=GRAPHOPT_DOMAIN, K=k, N=n,
                        bits=bits, block_size=bs)
        h = gated_activation(b, linear(p["X"], "up", hidden, n_up), act, gated, moe_form(node))
        h = b.Mul(linear(h, "down", inner, hidden), router_weight(b, p["index"], p["weights"], e))
        y = h if y is None else b.Add(y, h)
    return [y]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "QuantMoE",
    attrs={"activation": AttrSpec(AttrKind.STRING, default="silu"), "gated": AttrSpec(AttrKind.INT, default=1),
           "bits": AttrSpec(AttrKind.INT, default=4), "block_size": AttrSpec(AttrKind.INT, default=32),
           "hidden": AttrSpec(AttrKind.INT, required=True), "inner": AttrSpec(AttrKind.INT, required=True),
           "alpha": AttrSpec(AttrKind.FLOAT, default=1.0), "beta": AttrSpec(AttrKind.FLOAT, default=0.0),
           "limit": AttrSpec(AttrKind.FLOAT, default=0.0)},
    min_inputs=7, max_inputs=11, min_outputs=1, max_outputs=1,
    infer=_infer, reference=_reference, decompose=_decompose,
    doc="graphopt.MoE with block-quantized experts: inputs X [.., hidden], index [.., k], weights [.., k], "
        "up_packed u8 [experts, n_up, n_blocks, block_size*bits/8] and up_scales [experts, n_up, n_blocks] "
        "(n_up = 2 * inner, gate rows then up rows, when gated), down_packed / down_scales likewise "
        "([experts, hidden, ..] over inner), up_zero_points? / down_zero_points? u8 (both or neither; absent: "
        "2**(bits-1)); each expert's slices are graphopt.QuantLinear's weight inputs; up_bias? [experts, n_up] and "
        "down_bias? [experts, hidden] float, and alpha, beta, limit as graphopt.MoE's (GPT-OSS).",
))
