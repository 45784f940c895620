"""graphopt.QuantLinear: a projection whose weight is stored block-quantized (int4 or int8, see
quant_format), with optional bias and activation; ORT lowers it to MatMulNBits.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, TensorType
from graphopt.ops.activations import ACTIVATIONS, activate, activate_np
from graphopt.ops.common import unsupported
from graphopt.ops.quant_format import (
    BITS,
    dequantize_blockwise,
    num_blocks,
    quant_parts,
    unpack_graph,
)
from graphopt.registry import AttrSpec, OpDef, register_op


def _check(node: Node) -> tuple[int, int, int, int]:
    bits, bs = node.attr("bits", 4), node.attr("block_size", 32)
    k, n = node.attr("K"), node.attr("N")
    if bits not in BITS:
        raise unsupported(node, f"bits must be 4 or 8, not {bits}")
    if bs < 16 or bs & (bs - 1):
        raise unsupported(node, f"block_size must be a power of two >= 16, not {bs}")
    if not isinstance(k, int) or not isinstance(n, int) or k <= 0 or n <= 0:
        raise unsupported(node, "attributes K and N (the weight's shape) are required")
    if node.attr("activation", "") not in ACTIVATIONS:
        raise unsupported(node, f"unknown activation {node.attr('activation')!r}")
    return bits, bs, k, n


def _infer(node: Node):
    x, packed, scales, zp, bias = quant_parts(node)
    bits, bs, k, n = _check(node)
    nb = num_blocks(k, bs)
    want = {"packed": (packed, (n, nb, bs * bits // 8)), "scales": (scales, (n, nb)),
            "zero_points": (zp, (n, -(-nb * bits // 8))), "bias": (bias, (n,))}
    for name, (v, shape) in want.items():
        if v is None or v.type is None or v.type.shape is None:
            continue
        if tuple(v.type.shape) != shape:
            raise unsupported(node, f"{name} has shape {list(v.type.shape)}, expected {list(shape)}")
    for name, v in (("packed", packed), ("zero_points", zp)):
        if v is not None and v.type is not None and v.type.dtype.short != "u8":
            raise unsupported(node, f"{name} must be u8, not {v.type.dtype.short}")
    if x.type is None:
        return [None]
    if scales.type is not None and scales.type.dtype is not x.type.dtype:
        raise unsupported(node, f"scales are {scales.type.dtype.short} but X is {x.type.dtype.short}")
    shape = x.type.shape
    if shape is not None and isinstance(shape[-1], int) and shape[-1] != k:
        raise unsupported(node, f"X has {shape[-1]} features but the weight takes K={k}")
    return [TensorType(x.type.dtype, None if shape is None else tuple(shape[:-1]) + (n,))]


def _reference(node: Node, inputs):
    ins = list(inputs) + [None] * (5 - len(inputs))
    x, packed, scales, zp, bias = ins
    bits, bs, k, _ = _check(node)
    w = dequantize_blockwise(packed, scales, zp, bits, bs, k)
    y = np.matmul(x, w.T.astype(x.dtype))
    if bias is not None:
        y = y + bias
    return [activate_np(y.astype(x.dtype), node.attr("activation", ""))]


def _decompose(b: Builder, node: Node):
    """Unpack, subtract the zero point, scale, then MatMul: exact core arithmetic at opset 20
    (blocked DequantizeLinear needs opset 21)."""
    x, packed, scales, zp, bias = quant_parts(node)
    bits, bs, k, n = _check(node)
    nb = num_blocks(k, bs)
    dt = x.type.dtype
    q = b.Cast(unpack_graph(b, packed, bits), to=dt.onnx_type)  # [N, nb, bs]
    if zp is None:
        centered = b.Sub(q, b.const(np.array(2 ** (bits - 1), dt.np_dtype), "zero_point"))
    else:
        zq = unpack_graph(b, zp, bits)
        if zq.type.shape[-1] != nb:
            zq = b.Slice(zq, b.const(np.array([0], np.int64), "zp_start"), b.const(np.array([nb], np.int64), "zp_end"),
                         b.const(np.array([1], np.int64), "zp_axis"))
        zf = b.Unsqueeze(b.Cast(zq, to=dt.onnx_type), b.const(np.array([-1], np.int64), "last_axis"))
        centered = b.Sub(q, zf)
    w = b.Mul(centered, b.Unsqueeze(scales, b.const(np.array([-1], np.int64), "last_axis")))
    w = b.Reshape(w, b.const(np.array([n, nb * bs], np.int64), "weight_shape"))
    if nb * bs != k:
        w = b.Slice(w, b.const(np.array([0], np.int64), "k_start"), b.const(np.array([k], np.int64), "k_end"),
                    b.const(np.array([1], np.int64), "k_axis"))
    y = b.MatMul(x, b.Transpose(w, perm=[1, 0]))
    if bias is not None:
        y = b.Add(y, bias)
    return [activate(b, y, node.attr("activation", ""))]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "QuantLinear",
    attrs={"K": AttrSpec(AttrKind.INT, required=True), "N": AttrSpec(AttrKind.INT, required=True),
           "bits": AttrSpec(AttrKind.INT, default=4), "block_size": AttrSpec(AttrKind.INT, default=32),
           "activation": AttrSpec(AttrKind.STRING, default="")},
    min_inputs=3, max_inputs=5, min_outputs=1, max_outputs=1,
    infer=_infer, reference=_reference, decompose=_decompose,
    doc="Y = act(X @ dequantize(W)^T + B) with W [N, K] block-quantized to `bits` (4 or 8) in blocks of "
        "`block_size` along K (ONNX Runtime's MatMulNBits layout): inputs X [..., K], packed u8 "
        "[N, n_blocks, block_size*bits/8], scales [N, n_blocks], zero_points? u8 [N, ceil(n_blocks*bits/8)] "
        "(absent: 2**(bits-1)), bias? [N]; w = (q - zero_point) * scale.",
))
