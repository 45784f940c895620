"""The block-quantized weight format (ONNX Runtime's `MatMulNBits` layout), in numpy and in core
ops: the one definition that the quantized ops, the quantization passes, the lowerings and the
tests use.

    W [N, K] (one row per output feature) is cut along K into blocks of `block_size`
    (K is padded up to a whole number of blocks); each block of each row has a scale and an
    unsigned zero point, and w = (q - zero_point) * scale with q in [0, 2**bits).

    packed       u8 [N, n_blocks, block_size * bits / 8]   two 4-bit values a byte for bits=4,
                                                            the even element in the low nibble
    scales       f32 [N, n_blocks]                          (X's element type)
    zero_points  u8 [N, ceil(n_blocks * bits / 8)]          packed the same way; absent means
                                                            2**(bits-1) (symmetric quantization)
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import Node

BITS = (4, 8)


def num_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def fit_block(k: int, bits: int, block_size: int, scale_bytes: int = 4, zero_points: bool = True) -> int:
    """The block size a layer of input width K is quantized with: `block_size`, or where K is
    not a multiple of it the power of two in [16, block_size] that stores the fewest bytes a
    row (padding against scales of `scale_bytes` and zero points): K=192 at block 128 pads
    every row to 256 values; at 64 it is three whole blocks."""
    best, best_bytes, b = block_size, None, block_size
    while b >= 16:
        nb = num_blocks(k, b)
        stored = nb * b * bits // 8 + scale_bytes * nb + (-(-nb * bits // 8) if zero_points else 0)
        if best_bytes is None or stored < best_bytes:
            best, best_bytes = b, stored
        if k % b == 0:  # no padding: a smaller block only adds scales
            break
        b //= 2
    return best


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


def quantize_stacked(w_enk: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """RTN of stacked weights W [E, N, K] (a mixture's experts), each as `quantize_blockwise`:
    (packed [E, N, n_blocks, blob], scales [E, N, n_blocks], zero points [E, N, ..] or None)."""
    parts = [quantize_blockwise(w, bits, block_size, symmetric) for w in w_enk]
    return (np.stack([p for p, _, _ in parts]), np.stack([s for _, s, _ in parts]),
            None if symmetric else np.stack([z for _, _, z in parts]))


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


def quant_parts(node: Node):
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    return ins[0], ins[1], ins[2], ins[3], ins[4]  # x, packed, scales, zero_points, bias


def unpack_graph(b: Builder, packed, bits: int, rank_shape: bool = False):
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
