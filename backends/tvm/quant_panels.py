"""The CPU GEMV of graphopt.QuantLinear over a weight repacked at build time into column panels,
and QuantGather's lookup in the same layout (so a tied LM head and its embedding share one copy).

A decode step multiplies one row by every weight once: it is bound by the bytes it reads only if
the kernel unpacks them faster than memory delivers them. MatMulNBits' layout (each output's K
contiguous) makes a vector of nibbles feed one output, whose partial sums must then be reduced
across lanes. Here a vector of packed bytes feeds PANEL outputs at once:

    packed_panels  u8  [N / PANEL, n_blocks, block_size * bits / 8, PANEL]
                   byte p of block b of output j * PANEL + c is packed_panels[j, b, p, c]: the
                   same byte as MatMulNBits' packed[n, b, p] (low nibble: element 2p of the block)
    scales_panels  f32 [N / PANEL, n_blocks, PANEL]
    zero_panels    u8  [N / PANEL, n_blocks, PANEL]   one byte a block (MatMulNBits packs two);
                   absent for symmetric weights (2^(bits-1))

N is padded up to whole panels (the padding outputs are zero and sliced off). The inner loop, for
each byte offset p of a block: one 64-byte load of the panel's bytes, the nibbles split with a
mask and a shift, the zero point subtracted in 8-bit lanes (16-bit for 8 bits), widened and
converted to float, and a multiply-add with x[k] broadcast, into PANEL / 16 vector accumulators
(AVX-512); once a block, the block's sums times the scales into the outputs. Panels are
distributed over the cores (disjoint column panels, each streamed once); rows go in groups of
GROUP sharing each unpacked vector, the remainder one at a time, decided at run time (one build
serves decode and prefill, and a single row costs one row).

The kernel is written in TVMScript (scheduled by hand: loop kinds below), not in TE plus a
schedule: the run-time split of the rows into whole groups and a remainder is a loop structure
a TE schedule cannot express.
"""
from __future__ import annotations

import numpy as np

PANEL = 64  # outputs a panel: one 64-byte load of packed bytes feeds them; 4 AVX-512 accumulators
GROUP = 4  # rows that share each unpacked vector (prefill); the remainder runs a row at a time
ATTR = "graphopt.quant_panels"  # marks the kernel (already scheduled) in the Relax module


def panel_count(n: int) -> int:
    return -(-n // PANEL)


def _panels(a: np.ndarray) -> np.ndarray:
    """[N, ...] -> [N / PANEL, ..., PANEL], N padded with zeros to whole panels."""
    pad = panel_count(a.shape[0]) * PANEL - a.shape[0]
    a = np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    a = a.reshape((-1, PANEL) + a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def packed_panels(packed: np.ndarray) -> np.ndarray:
    """MatMulNBits' packed [N, n_blocks, bytes] -> [N / PANEL, n_blocks, bytes, PANEL]."""
    return _panels(np.asarray(packed, np.uint8))


def scales_panels(scales: np.ndarray) -> np.ndarray:
    """scales [N, n_blocks] -> [N / PANEL, n_blocks, PANEL]."""
    return _panels(np.asarray(scales))


def zero_panels(zero_points: np.ndarray, bits: int, n_blocks: int) -> np.ndarray:
    """MatMulNBits' zero points (nibble-packed for 4 bits) -> u8 [N / PANEL, n_blocks, PANEL]."""
    from graphopt.ops.quant_format import unpack

    return _panels(unpack(zero_points, bits, n_blocks).astype(np.uint8))


def gemv_source(*, k: int, n_panels: int, n_blocks: int, bits: int, block_size: int, symmetric: bool,
                group: int) -> str:
    """TVMScript of Y [m, n_panels * PANEL] = X [m, K] @ dequantize(W)^T over the panel layout;
    m is symbolic. `group` 1: every row alone (a static single row); else whole groups of
    `group` rows, then the remaining rows one at a time."""
    per = 8 // bits
    nbytes = block_size // per
    lanes = "int8" if bits == 4 else "int16"  # q - zero point: -15..15 (4 bits), -255..255 (8 bits)

    def x_at(row: str, kk: str) -> str:
        if n_blocks * block_size == k:
            return f"X[{row}, {kk}]"
        return f"T.if_then_else({kk} < {k}, X[{row}, T.min({kk}, {k - 1})], T.float32(0))"  # K padded: x is 0 there

    def weight(h: int) -> str:
        byte = "packed[j, b, p, c]" if bits == 8 else f"(packed[j, b, p, c] >> T.uint8({4 * h}) & T.uint8(15))"
        zp = f"T.{lanes}({2 ** (bits - 1)})" if symmetric else f"T.Cast('{lanes}', zero_points[j, b, c])"
        return f"T.Cast('float32', T.Cast('{lanes}', {byte}) - {zp})"

    def rows(g: int, count: str, row_of) -> list[str]:
        """The loop nest over `count` groups of `g` rows; row_of(r) is the row of lane r."""
        body = [f"for rg in range({count}):",
                f"    acc = T.alloc_buffer(({g}, {PANEL}), scope='local')",
                f"    block = T.alloc_buffer(({g}, {PANEL}), scope='local')",
                f"    for r in T.unroll({g}):",
                f"        for c in T.vectorized({PANEL}):",
                "            acc[r, c] = T.float32(0)",
                f"    for b in range({n_blocks}):",
                f"        for r in T.unroll({g}):",
                f"            for c in T.vectorized({PANEL}):",
                "                block[r, c] = T.float32(0)",
                f"        for p in T.unroll({nbytes}):"]
        for h in range(per):
            body += [f"            for r in T.unroll({g}):",
                     f"                for c in T.vectorized({PANEL}):",
                     f"                    block[r, c] = block[r, c] + {x_at(row_of('r'), f'b * {block_size} + p * {per} + {h}')}"
                     f" * {weight(h)}"]
        body += [f"        for r in T.unroll({g}):",
                 f"            for c in T.vectorized({PANEL}):",
                 "                acc[r, c] = acc[r, c] + scales[j, b, c] * block[r, c]",
                 f"    for r in T.unroll({g}):",
                 f"        for c in T.vectorized({PANEL}):",
                 f"            Y[{row_of('r')}, j * {PANEL} + c] = acc[r, c]"]
        return body

    if group == 1:
        nest = rows(1, "m", lambda r: "rg")
    else:
        nest = rows(group, f"m // {group}", lambda r: f"rg * {group} + {r}")
        nest += rows(1, f"m % {group}", lambda r: f"m // {group} * {group} + rg")
    zp_arg = "" if symmetric else f', zero_points: T.Buffer(({n_panels}, {n_blocks}, {PANEL}), "uint8")'
    body = "\n".join("        " + line for line in nest)
    return f'''
@T.prim_func(private=True)
def quant_gemv_panels(x: T.handle, packed: T.Buffer(({n_panels}, {n_blocks}, {nbytes}, {PANEL}), "uint8"), scales: T.Buffer(({n_panels}, {n_blocks}, {PANEL}), "float32"){zp_arg}, y: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    m = T.int64()
    X = T.match_buffer(x, (m, {k}), "float32")
    Y = T.match_buffer(y, (m, {n_panels * PANEL}), "float32")
    for j in T.parallel({n_panels}):
{body}
'''


def gemv_func(**kw):
    """The PrimFunc of `gemv_source(**kw)`, marked scheduled (dlight leaves it alone) and opaque
    (Relax's FuseOps keeps it whole)."""
    import tvm

    func = tvm.script.from_source(gemv_source(**kw))
    return func.with_attrs({ATTR: 1, "tirx.is_scheduled": True, "op_pattern": 8})


def gather_te(packed, indices, scales, zp, *, bits: int, block_size: int, k: int, rows: int):
    """TE for rows [R, K] = dequantize(table)[indices] over the panel layout (the table's `rows`
    rows): only the gathered rows' bytes are read."""
    from tvm import te, tirx

    per = 8 // bits
    dt = scales.dtype

    def element(r, c):
        row = indices[r].astype("int64")
        row = tirx.if_then_else(row < 0, row + rows, row)  # ONNX Gather: negative counts from the end
        j, col, b, e = row // PANEL, row % PANEL, c // block_size, c % block_size
        q = packed[j, b, e // per, col]
        if bits == 4:
            q = (q >> ((e % per) * 4).astype("uint8")) & tirx.const(15, "uint8")
        q = q.astype(dt)
        zero = tirx.const(2 ** (bits - 1), dt) if zp is None else zp[j, b, col].astype(dt)
        return (q - zero) * scales[j, b, col]

    return te.compute((indices.shape[0], k), element, name="quant_gather")
