"""graphopt.QuantLinear and graphopt.QuantGather: a projection, and an embedding lookup, whose
weight is stored block-quantized (int4 or int8).

The weight layout is ONNX Runtime's `MatMulNBits` layout, so the ORT lowering is a one-to-one
mapping and the IR holds exactly the bytes the artifact ships:

    W [N, K] (one row per output feature) is cut along K into blocks of `block_size`
    (K is padded up to a whole number of blocks); each block of each row has a scale and an
    unsigned zero point, and w = (q - zero_point) * scale with q in [0, 2**bits).

    packed       u8 [N, n_blocks, block_size * bits / 8]   two 4-bit values a byte for bits=4,
                                                            the even element in the low nibble
    scales       f32 [N, n_blocks]                          (X's element type)
    zero_points  u8 [N, ceil(n_blocks * bits / 8)]          packed the same way; absent means
                                                            2**(bits-1) (symmetric quantization)

The numpy helpers here (`quantize_blockwise`, `dequantize_blockwise`, `pack`, `unpack`) are
the one definition of the format; passes, lowerings and tests use them.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.errors import UserError
from graphopt.fused_ops import ACTIVATIONS, activate, activate_np
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, TensorType
from graphopt.registry import AttrSpec, OpDef, register_op

BITS = (4, 8)


def _unsupported(node: Node, why: str) -> UserError:
    return UserError(f"node {node.name!r} ({node.op}): {why}")


# --------------------------------------------------------------------------------------
# The format, in numpy


def num_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2**bits along the last axis -> bytes (4 bits: pairs, low nibble first;
    an odd count is padded with a zero nibble)."""
    q = np.asarray(q, np.uint8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """The inverse of `pack`: bytes -> values along the last axis (the first `count`)."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        q = packed
    else:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return q if count is None else q[..., :count]


def quantize_blockwise(w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """Round-to-nearest quantization of W [N, K] -> (packed, scales, zero_points or None)."""
    q, scales, zp = quantize_rows(w_nk, bits, block_size, symmetric)
    return pack_weight(q, bits, block_size), scales, None if zp is None else pack(zp, bits)


def block_params(w_blocks: np.ndarray, bits: int, symmetric: bool):
    """Scales and zero points for blocks along the last axis of `w_blocks` [..., block_size]."""
    qmax = 2 ** bits - 1
    if symmetric:
        # q - 2**(bits-1) lies in [-2**(bits-1), 2**(bits-1) - 1]: the value of largest
        # magnitude maps to -2**(bits-1) exactly (a negative scale where it is positive), so
        # the whole grid is used (as llama.cpp's Q4_0 does).
        idx = np.abs(w_blocks).argmax(axis=-1)[..., None]
        scale = np.take_along_axis(w_blocks, idx, axis=-1)[..., 0] / -(2 ** (bits - 1))
        zp = None
    else:
        lo = np.minimum(w_blocks.min(axis=-1), 0.0)
        hi = np.maximum(w_blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / qmax
        zp = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, qmax).astype(np.uint8)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return scale, zp


def quantize_values(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int) -> np.ndarray:
    """q = clip(round(w / scale) + zp) as uint8 (scale and zp broadcast against w)."""
    center = 2 ** (bits - 1) if zp is None else zp.astype(np.float32)
    return np.clip(np.round(w / scale) + center, 0, 2 ** bits - 1).astype(np.uint8)


def quantize_rows(w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """RTN: W [N, K] -> (q u8 [N, K], scales f32 [N, n_blocks], zero points u8 [N, n_blocks] or None)."""
    n, k = w_nk.shape
    nb = num_blocks(k, block_size)
    padded = np.zeros((n, nb * block_size), np.float32)
    padded[:, :k] = w_nk
    blocks = padded.reshape(n, nb, block_size)
    scale, zp = block_params(blocks, bits, symmetric)
    q = quantize_values(blocks, scale[..., None], None if zp is None else zp[..., None], bits)
    return q.reshape(n, nb * block_size)[:, :k], scale, zp


def pack_weight(q_nk: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """q u8 [N, K] -> packed [N, n_blocks, block_size * bits / 8]; padding holds the value of
    zero (2**(bits-1) for symmetric; it multiplies padded zeros of X in any case)."""
    n, k = q_nk.shape
    nb = num_blocks(k, block_size)
    full = np.full((n, nb * block_size), 2 ** (bits - 1), np.uint8)
    full[:, :k] = q_nk
    return pack(full.reshape(n, nb, block_size), bits)


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                         bits: int, block_size: int, k: int) -> np.ndarray:
    """W [N, K] in the scales' type: (q - zero_point) * scale, block by block."""
    n, nb = scales.shape
    q = unpack(packed, bits).reshape(n, nb, block_size).astype(scales.dtype)
    if zero_points is None:
        zp = np.asarray(2 ** (bits - 1), scales.dtype)
    else:
        zp = unpack(zero_points, bits, nb).astype(scales.dtype)[..., None]
    w = (q - zp) * scales[..., None]
    return w.reshape(n, nb * block_size)[:, :k]


# --------------------------------------------------------------------------------------
# The op


def _parts(node: Node):
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    return ins[0], ins[1], ins[2], ins[3], ins[4]  # x, packed, scales, zero_points, bias


def _check(node: Node) -> tuple[int, int, int, int]:
    bits, bs = node.attr("bits", 4), node.attr("block_size", 32)
    k, n = node.attr("K"), node.attr("N")
    if bits not in BITS:
        raise _unsupported(node, f"bits must be 4 or 8, not {bits}")
    if bs < 16 or bs & (bs - 1):
        raise _unsupported(node, f"block_size must be a power of two >= 16, not {bs}")
    if not isinstance(k, int) or not isinstance(n, int) or k <= 0 or n <= 0:
        raise _unsupported(node, "attributes K and N (the weight's shape) are required")
    if node.attr("activation", "") not in ACTIVATIONS:
        raise _unsupported(node, f"unknown activation {node.attr('activation')!r}")
    return bits, bs, k, n


def _infer(node: Node):
    x, packed, scales, zp, bias = _parts(node)
    bits, bs, k, n = _check(node)
    nb = num_blocks(k, bs)
    want = {"packed": (packed, (n, nb, bs * bits // 8)), "scales": (scales, (n, nb)),
            "zero_points": (zp, (n, -(-nb * bits // 8))), "bias": (bias, (n,))}
    for name, (v, shape) in want.items():
        if v is None or v.type is None or v.type.shape is None:
            continue
        if tuple(v.type.shape) != shape:
            raise _unsupported(node, f"{name} has shape {list(v.type.shape)}, expected {list(shape)}")
    for name, v in (("packed", packed), ("zero_points", zp)):
        if v is not None and v.type is not None and v.type.dtype.short != "u8":
            raise _unsupported(node, f"{name} must be u8, not {v.type.dtype.short}")
    if x.type is None:
        return [None]
    if scales.type is not None and scales.type.dtype is not x.type.dtype:
        raise _unsupported(node, f"scales are {scales.type.dtype.short} but X is {x.type.dtype.short}")
    shape = x.type.shape
    if shape is not None and isinstance(shape[-1], int) and shape[-1] != k:
        raise _unsupported(node, f"X has {shape[-1]} features but the weight takes K={k}")
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


def _unpack_graph(b: Builder, packed, bits: int, rank_shape: bool = False):
    """Core ops: u8 [..., m] -> u8 [..., 2m] for bits=4 (low nibble first); as is for 8.
    With `rank_shape`, the leading dims may be symbolic (they are kept with Reshape's 0)."""
    if bits == 8:
        return packed
    low = b.BitwiseAnd(packed, b.const(np.array(0x0F, np.uint8), "low_nibble"))
    high = b.BitShift(packed, b.const(np.array(4, np.uint8), "nibble_shift"), direction="RIGHT")
    last = b.const(np.array([-1], np.int64), "last_axis")
    pairs = b.Concat(b.Unsqueeze(low, last), b.Unsqueeze(high, last), axis=-1)  # [..., m, 2]
    lead = [0] * (packed.type.rank - 1) if rank_shape else list(packed.type.shape[:-1])
    shape = lead + [2 * packed.type.shape[-1]]
    return b.Reshape(pairs, b.const(np.array(shape, np.int64), "unpacked_shape"))


def _decompose(b: Builder, node: Node):
    """Unpack, subtract the zero point, scale, then MatMul: exact core arithmetic at opset 20
    (blocked DequantizeLinear needs opset 21)."""
    x, packed, scales, zp, bias = _parts(node)
    bits, bs, k, n = _check(node)
    nb = num_blocks(k, bs)
    dt = x.type.dtype
    q = b.Cast(_unpack_graph(b, packed, bits), to=dt.onnx_type)  # [N, nb, bs]
    if zp is None:
        centered = b.Sub(q, b.const(np.array(2 ** (bits - 1), dt.np_dtype), "zero_point"))
    else:
        zq = _unpack_graph(b, zp, bits)
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


# --------------------------------------------------------------------------------------
# QuantGather: rows of a block-quantized table (an embedding), in QuantLinear's layout, so
# that a tied embedding and LM head share one quantized copy.


def _gather_check(node: Node) -> tuple[int, int, int]:
    bits, bs, k = node.attr("bits", 4), node.attr("block_size", 32), node.attr("K")
    if bits not in BITS:
        raise _unsupported(node, f"bits must be 4 or 8, not {bits}")
    if bs < 16 or bs & (bs - 1):
        raise _unsupported(node, f"block_size must be a power of two >= 16, not {bs}")
    if not isinstance(k, int) or k <= 0:
        raise _unsupported(node, "attribute K (the row length) is required")
    return bits, bs, k


def _gather_infer(node: Node):
    packed, indices, scales = node.inputs[:3]
    bits, bs, k = _gather_check(node)
    if packed.type is None or indices.type is None or scales.type is None:
        return [None]
    if packed.type.dtype.short != "u8":
        raise _unsupported(node, f"packed must be u8, not {packed.type.dtype.short}")
    if indices.type.dtype.short not in ("i32", "i64"):
        raise _unsupported(node, f"indices must be i32 or i64, not {indices.type.dtype.short}")
    nb = num_blocks(k, bs)
    if packed.type.shape is not None and tuple(packed.type.shape[1:]) != (nb, bs * bits // 8):
        raise _unsupported(node, f"packed has shape {list(packed.type.shape)}, expected [rows, {nb}, {bs * bits // 8}]")
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
    q = b.Cast(_unpack_graph(b, rows, bits, rank_shape=True), to=dt.onnx_type)  # [..., nb, bs]
    if zp is None:
        centered = b.Sub(q, b.const(np.array(2 ** (bits - 1), dt.np_dtype), "zero_point"))
    else:
        zq = _unpack_graph(b, b.Gather(zp, indices, axis=0), bits, rank_shape=True)
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


# --------------------------------------------------------------------------------------
# DynamicQuantLinear: int8 weights, activations quantized at each call (ONNX's
# DynamicQuantizeLinear: uint8, one scale and zero point per tensor, from its min and max)


def dynamic_quantize_np(x: np.ndarray):
    """ONNX DynamicQuantizeLinear: (q u8, scale f32, zero point u8)."""
    x = x.astype(np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255) if hi > lo else np.float32(1.0)
    zp = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
    q = np.clip(np.round(x / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp


def _dyn_infer(node: Node):
    x, w = node.inputs[:2]
    if w.type is not None and (w.type.dtype.short != "i8" or w.type.rank != 2):
        raise _unsupported(node, f"the weight must be an i8 matrix [K, N], not {w.type}")
    if x.type is None or w.type is None:
        return [None]
    if x.type.dtype.short != "f32":
        raise _unsupported(node, f"X must be f32, not {x.type.dtype.short}")
    k, n = w.type.shape
    shape = x.type.shape
    if shape is not None and isinstance(shape[-1], int) and isinstance(k, int) and shape[-1] != k:
        raise _unsupported(node, f"X has {shape[-1]} features but the weight takes K={k}")
    return [TensorType(x.type.dtype, None if shape is None else tuple(shape[:-1]) + (n,))]


def _dyn_reference(node: Node, inputs):
    ins = list(inputs) + [None] * (5 - len(inputs))
    x, wq, w_scale, w_zp, bias = ins
    xq, xs, xzp = dynamic_quantize_np(x)
    wzp = np.zeros((), np.int32) if w_zp is None else w_zp.astype(np.int32)
    acc = np.matmul(xq.astype(np.int64) - int(xzp), wq.astype(np.int64) - wzp)  # exact
    y = (acc.astype(np.float32) * (xs * w_scale.astype(np.float32))).astype(np.float32)
    if bias is not None:
        y = y + bias
    return [activate_np(y.astype(np.float32), node.attr("activation", ""))]


def _dyn_decompose(b: Builder, node: Node):
    x, wq, w_scale, w_zp, bias = _parts(node)
    xq, xs, xzp = b.DynamicQuantizeLinear(x)
    # MatMulInteger takes u8 or i8 on each side with its zero point; the weight's defaults to 0
    acc = b.MatMulInteger(xq, wq, xzp, w_zp) if w_zp is not None else b.MatMulInteger(xq, wq, xzp)
    y = b.Mul(b.Cast(acc, to=1), b.Mul(xs, w_scale))
    if bias is not None:
        y = b.Add(y, bias)
    return [activate(b, y, node.attr("activation", ""))]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "DynamicQuantLinear",
    attrs={"activation": AttrSpec(AttrKind.STRING, default="")},
    min_inputs=3, max_inputs=5, min_outputs=1, max_outputs=1,
    infer=_dyn_infer, reference=_dyn_reference, decompose=_dyn_decompose,
    doc="Y = act((Xq - x_zp) @ (W - w_zp) * x_scale * w_scale + B): W is i8 [K, N] with w_scale [N] (per "
        "channel) or [] (per tensor) and w_zero_point? i8 of the same shape (absent: 0); X is quantized at each "
        "call as ONNX DynamicQuantizeLinear does (u8, one scale and zero point from its min and max); inputs X, "
        "W, w_scale, w_zero_point?, B?.",
))
