"""graphopt.QuantGather: an embedding lookup from a block-quantized table (see quant_format); ORT
lowers it to GatherBlockQuantized.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, TensorType
from graphopt.ops.common import unsupported
from graphopt.ops.quant_format import (
    BITS,
    dequantize_blockwise,
    num_blocks,
    unpack_graph,
)
from graphopt.registry import AttrSpec, OpDef, register_op


def _gather_check(node: Node) -> tuple[int, int, int]:
    bits, bs, k = node.attr("bits", 4), node.attr("block_size", 32), node.attr("K")
    if bits not in BITS:
        raise unsupported(node, f"bits must be 4 or 8, not {bits}")
    if bs < 16 or bs & (bs - 1):
        raise unsupported(node, f"block_size must be a power of two >= 16, not {bs}")
    if not isinstance(k, int) or k <= 0:
        raise unsupported(node, "attribute K (the row length) is required")
    return bits, bs, k


def _gather_infer(node: Node):
    packed, indices, scales = node.inputs[:3]
    bits, bs, k = _gather_check(node)
    if packed.type is None or indices.type is None or scales.type is None:
        return [None]
    if packed.type.dtype.short != "u8":
        raise unsupported(node, f"packed must be u8, not {packed.type.dtype.short}")
    if indices.type.dtype.short not in ("i32", "i64"):
        raise unsupported(node, f"indices must be i32 or i64, not {indices.type.dtype.short}")
    nb = num_blocks(k, bs)
    if packed.type.shape is not None and tuple(packed.type.shape[1:]) != (nb, bs * bits // 8):
        raise unsupported(node, f"packed has shape {list(packed.type.shape)}, expected [rows, {nb}, {bs * bits // 8}]")
    ishape = indices.type.shape
    return [TensorType(scales.type.dtype, None if ishape is None else tuple(ishape) + (k,))]


def _gather_reference(node: Node, inputs):
    packed, indices, scales = inputs[:3]
    zp = inputs[3] if len(inputs) > 3 else None
    bits, bs, k = _gather_check(node)
    rows = np.asarray(indices).reshape(-1)
    w = dequantize_blockwise(packed[rows], scales[rows], None if zp is None else zp[rows], bits, bs, k)
    return [w.reshape(tuple(np.shape(indices)) + (k,))]


def _gather_decompose(b: Builder, node: Node):
    """Gather the packed rows, their scales and zero points, then dequantize (exact)."""
    packed, indices, scales = node.inputs[:3]
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    bits, bs, k = _gather_check(node)
    nb = num_blocks(k, bs)
    dt = scales.type.dtype
    last = b.const(np.array([-1], np.int64), "last_axis")
    rows = b.Gather(packed, indices, axis=0)  # [..., nb, bs*bits/8]
    q = b.Cast(unpack_graph(b, rows, bits, rank_shape=True), to=dt.onnx_type)  # [..., nb, bs]
    if zp is None:
        centered = b.Sub(q, b.const(np.array(2 ** (bits - 1), dt.np_dtype), "zero_point"))
    else:
        zq = unpack_graph(b, b.Gather(zp, indices, axis=0), bits, rank_shape=True)
        zq = b.Slice(zq, b.const(np.array([0], np.int64), "zp_start"), b.const(np.array([nb], np.int64), "zp_end"),
                     last)
        centered = b.Sub(q, b.Unsqueeze(b.Cast(zq, to=dt.onnx_type), last))
    w = b.Mul(centered, b.Unsqueeze(b.Gather(scales, indices, axis=0), last))
    flat = b.Reshape(w, b.const(np.array([0] * (indices.type.rank or 0) + [nb * bs], np.int64), "row_shape"))
    if nb * bs != k:
        flat = b.Slice(flat, b.const(np.array([0], np.int64), "k_start"), b.const(np.array([k], np.int64), "k_end"),
                       last)
    return [flat]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "QuantGather",
    attrs={"K": AttrSpec(AttrKind.INT, required=True), "bits": AttrSpec(AttrKind.INT, default=4),
           "block_size": AttrSpec(AttrKind.INT, default=32)},
    min_inputs=3, max_inputs=4, min_outputs=1, max_outputs=1,
    infer=_gather_infer, reference=_gather_reference, decompose=_gather_decompose,
    doc="Y[..., :] = dequantize(table)[indices[...], :] for a table [rows, K] block-quantized along K as "
        "QuantLinear's weight: inputs packed u8 [rows, n_blocks, block_size*bits/8], indices (i32/i64), scales "
        "[rows, n_blocks], zero_points? u8 [rows, ceil(n_blocks*bits/8)]; Y has the scales' type.",
))
