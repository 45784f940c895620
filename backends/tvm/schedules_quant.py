"""Dequantize-fused kernels for graphopt.QuantLinear and graphopt.QuantGather, and their
schedules (CPU and CUDA). The weight format is quant_format's (MatMulNBits' layout).

The computation is written in TE as three stages, so that a schedule can choose where the
dequantized weight lives; no schedule here gives it a buffer of the weight's shape:

    x_blocks[m, b, h, p]     x [M, K] cut into the weight's blocks, zero past K; for 4 bits
                             the even and odd elements of a block are split (h = 0, 1), so
                             that byte p of a block multiplies x_blocks[.., 0, p] (low nibble)
                             and x_blocks[.., 1, p] (high nibble): contiguous on both sides
    dequantize[n, b, h, p]   (nibble h of packed[n, b, p] - zero point) * scale
    quant_matmul[m, n]       sum over (b, h, p) of x_blocks * dequantize

Two forms, chosen when lowering by the row count M (rules_quant.py):

- GEMV (`quant_gemv_te`; M is 1, or symbolic: one build serves decode and prefill): rows in
  groups (1, or GEMV_GROUP), the reduction split into LANES partial sums. CPU: `dequantize`
  inlined, so a weight vector is loaded once, unpacked and scaled in registers and used by
  every row of the group; (group, output) pairs in parallel. CUDA: a thread per partial sum
  (consecutive threads read consecutive bytes), then a thread per output.
- matmul (`quant_linear_te`; M static and > 1). CPU: for each tile of TILE_COLUMNS outputs
  and each block, the dequantized tile (block_size x TILE_COLUMNS floats) in a local buffer
  that every row of x streams past (vectorized over the tile's columns). CUDA: `dequantize`
  inlined; outputs over thread blocks (CUDA_ROWS a block, threadIdx.y), the reduction over a
  warp (threadIdx.x; TVM lowers it to warp shuffles), rows over blockIdx.y.

The kernels are added to the Relax module as PrimFuncs carrying `KERNEL_ATTR`; `rules()`
returns the dlight-style rules that recognize them by it and schedule them for the target.
"""
from __future__ import annotations

from graphopt.backends.tvm.schedules import _extent, _parallelize, _vector_lanes

KERNEL_ATTR = "graphopt.quant_kernel"  # "gemv" or "matmul": which form a PrimFunc holds
TILE_COLUMNS = 16  # matmul form: output columns of a dequantized tile
GEMV_GROUP = 4  # GEMV form with a symbolic row count: rows that share each dequantized vector
LANES = 16  # GEMV form: partial sums per output (one AVX-512 vector; two AVX2 ones)
CUDA_ROWS = 4  # cuda: outputs per thread block (threadIdx.y)
CUDA_WARP = 32
CUDA_THREADS = 256  # threads a block for the element-wise stages


def _nibble(byte, h, bits: int):
    from tvm import tirx

    if bits == 8:
        return byte
    return (byte >> (h * 4).astype("uint8")) & tirx.const(15, "uint8")


def _zero_point(zp, n, b, bits: int, dtype: str):
    from tvm import tirx

    if zp is None:
        return tirx.const(2 ** (bits - 1), dtype)
    if bits == 8:
        return zp[n, b].astype(dtype)
    return _nibble(zp[n, b // 2], b % 2, 4).astype(dtype)


def dequantize_te(packed, scales, zp, n, b, h, p, bits: int):
    """The weight element for nibble `h` of packed[n, b, p] (h is 0 for 8 bits), in the scales' type."""
    dt = scales.dtype
    return (_nibble(packed[n, b, p], h, bits).astype(dt) - _zero_point(zp, n, b, bits, dt)) * scales[n, b]


def quant_linear_te(x, packed, scales, zp, *, bits: int, block_size: int, k: int):
    """TE for Y [M, N] = X [M, K] @ dequantize(W)^T (see the module docstring)."""
    from tvm import te, tirx

    per = 8 // bits  # weights a byte
    m, n, nb, nbytes = x.shape[0], packed.shape[0], packed.shape[1], packed.shape[2]
    dt = x.dtype

    def x_block(r, b, h, p):
        kk = b * block_size + p * per + h
        if nb * block_size == k:
            return x[r, kk]
        return tirx.if_then_else(kk < k, x[r, tirx.min(kk, k - 1)], tirx.const(0, dt))

    xb = te.compute((m, nb, per, nbytes), x_block, name="x_blocks")
    w = te.compute((n, nb, per, nbytes), lambda i, b, h, p: dequantize_te(packed, scales, zp, i, b, h, p, bits),
                   name="dequantize")
    rb, rh, rp = te.reduce_axis((0, nb), "b"), te.reduce_axis((0, per), "h"), te.reduce_axis((0, nbytes), "p")
    return te.compute((m, n), lambda r, i: te.sum(xb[r, rb, rh, rp] * w[i, rb, rh, rp], axis=[rb, rh, rp]),
                      name="quant_matmul")


def quant_gemv_te(x, packed, scales, zp, *, bits: int, block_size: int, k: int, group: int):
    """TE for the same Y, shaped for few rows (decode): the rows in groups of `group` (the
    last group padded with zero rows) and the reduction split into LANES partial sums, so
    that a schedule keeps a group's partial sums in registers, whatever the row count:

        partial[g, r, n, l] = sum over (b, h, po) of x_blocks[g, r, b, h, po*LANES + l] * dequantize[n, b, h, po*LANES + l]
        quant_matmul[g, r, n] = sum over l of partial[g, r, n, l]

    The result has whole groups, [ceil(M / group), group, N]: the caller drops the padding
    rows (indexing the result by m // group would break TIR's region analysis).
    """
    from tvm import te, tirx

    per = 8 // bits
    m, n, nb, nbytes = x.shape[0], packed.shape[0], packed.shape[1], packed.shape[2]
    lanes = min(LANES, int(nbytes))
    dt = x.dtype
    groups = (m + group - 1) // group if group > 1 else m

    def x_block(g, r, b, h, p):
        row, kk = g * group + r, b * block_size + p * per + h
        inside = row < m if group > 1 else None
        if nb * block_size != k:
            inside = kk < k if inside is None else tirx.all(inside, kk < k)
        if inside is None:
            return x[row, kk]
        return tirx.if_then_else(inside, x[tirx.min(row, m - 1), tirx.min(kk, k - 1)], tirx.const(0, dt))

    xb = te.compute((groups, group, nb, per, nbytes), x_block, name="x_blocks")
    w = te.compute((n, nb, per, nbytes), lambda i, b, h, p: dequantize_te(packed, scales, zp, i, b, h, p, bits),
                   name="dequantize")
    rb, rh, rp = te.reduce_axis((0, nb), "b"), te.reduce_axis((0, per), "h"), te.reduce_axis((0, nbytes // lanes), "po")
    partial = te.compute((groups, group, n, lanes), lambda g, r, i, l: te.sum(
        xb[g, r, rb, rh, rp * lanes + l] * w[i, rb, rh, rp * lanes + l], axis=[rb, rh, rp]), name="partial")
    rl = te.reduce_axis((0, lanes), "l")
    return te.compute((groups, group, n), lambda g, r, i: te.sum(partial[g, r, i, rl], axis=[rl]), name="quant_matmul")


def quant_linear_func(x, packed, scales, zp, *, bits: int, block_size: int, k: int, gemv_group: int | None = None):
    """The PrimFunc (unscheduled, tagged with KERNEL_ATTR) for the given TE placeholders:
    the GEMV form (`quant_gemv_te`) when `gemv_group` is given, else the matmul form."""
    from tvm import te

    if gemv_group is None:
        y, form = quant_linear_te(x, packed, scales, zp, bits=bits, block_size=block_size, k=k), "matmul"
    else:
        y = quant_gemv_te(x, packed, scales, zp, bits=bits, block_size=block_size, k=k, group=gemv_group)
        form = "gemv"
    args = [x, packed, scales] + ([zp] if zp is not None else []) + [y]
    # op_pattern 8 (opaque): Relax's FuseOps keeps the kernel whole, for the rules below.
    func = te.create_prim_func(args).without_attr("global_symbol")  # the module names it
    return func.with_attrs({KERNEL_ATTR: form, "op_pattern": 8})


def quant_gather_te(packed, indices, scales, zp, *, bits: int, block_size: int, k: int):
    """TE for rows [R, K] = dequantize(table)[indices]: only the gathered rows are read and
    dequantized, in one injective stage (Relax may fuse it with what consumes it)."""
    from tvm import te, tirx

    per = 8 // bits
    table_rows = packed.shape[0]

    def element(r, c):
        row = indices[r].astype("int64")
        row = tirx.if_then_else(row < 0, row + table_rows, row)  # ONNX Gather: negative counts from the end
        b, j = c // block_size, c % block_size
        return dequantize_te(packed, scales, zp, row, b, j % per, j // per, bits)

    return te.compute((indices.shape[0], k), element, name="quant_gather")


# --------------------------------------------------------------------------------------
# Schedules


def _blocks(sch):
    return sch.get_sblock("x_blocks"), sch.get_sblock("dequantize"), sch.get_sblock("quant_matmul")


def _static(sch, loop):
    e = _extent(sch, loop)
    return e if isinstance(e, int) else None


def schedule_gemv(func, target):
    """The GEMV form: dequantize inlined, (row group, output) pairs in parallel, the LANES
    partial sums of each row of the group in vector registers; each weight vector is
    loaded, unpacked and scaled once per group."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    xb, w, partial, y = (sch.get_sblock(name) for name in ("x_blocks", "dequantize", "partial", "quant_matmul"))
    lanes = _vector_lanes(target)
    sch.compute_inline(w)
    g, r, i, l, b, h, po = sch.get_loops(partial)
    sch.reorder(g, i, b, h, po, r, l)
    fused = sch.fuse(g, i)
    sch.parallel(fused)
    sch.reverse_compute_at(y, fused)  # the group's outputs, summed across the lanes
    sch.set_scope(partial, 0, "local")
    sch.unroll(h)
    sch.unroll(r)
    sch.vectorize(l)
    init = sch.decompose_reduction(partial, b)
    sch.vectorize(sch.get_loops(init)[-1])
    _parallelize(sch, xb, lanes)  # x_blocks: a small copy of x, in parallel
    return sch


def schedule_matmul(func, target):
    """Several rows: per tile of columns and block, a dequantized tile in a local buffer that
    every row reuses; vectorized over the tile's columns."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    xb, w, y = _blocks(sch)
    lanes = _vector_lanes(target)
    sch.transform_layout(w, ("write", 0), lambda i, b, h, p: (b, h, p, i))  # a tile's columns contiguous
    r, i, b, h, p = sch.get_loops(y)
    n = _static(sch, i)
    tile = next(t for t in (TILE_COLUMNS, lanes, 8, 4, 2, 1) if n is not None and n % t == 0)
    io, ii = sch.split(i, [None, tile])
    sch.reorder(io, b, r, h, p, ii)
    sch.parallel(io)
    sch.compute_at(w, b)
    sch.set_scope(w, 0, "local")
    sch.unroll(h)
    if tile > 1:
        sch.vectorize(ii)
    init = sch.decompose_reduction(y, b)
    if tile > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    _parallelize(sch, xb, lanes)  # x_blocks: a small copy of x, in parallel
    return sch


def schedule_cuda(func, target):
    """Outputs over thread blocks, the reduction over a warp, rows over blockIdx.y."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    xb, w, y = _blocks(sch)
    sch.compute_inline(w)
    r, i, b, h, p = sch.get_loops(y)
    k = sch.fuse(b, h, p)
    ko, kt = sch.split(k, [None, CUDA_WARP])
    io, it = sch.split(i, [None, CUDA_ROWS])
    sch.reorder(r, io, it, kt, ko)
    sch.bind(r, "blockIdx.y")
    sch.bind(io, "blockIdx.x")
    sch.bind(it, "threadIdx.y")
    sch.bind(kt, "threadIdx.x")  # a reduction bound to threads: TVM sums it across the warp
    loops = sch.get_loops(xb)
    bx, tx = sch.split(sch.fuse(*loops), [None, CUDA_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch


def schedule_cuda_gemv(func, target):
    """The GEMV form on a GPU: one thread per partial sum (consecutive threads read
    consecutive bytes of a weight row), then one per output to add a row's partial sums."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("dequantize"))
    for name, spatial in (("x_blocks", 5), ("partial", 4), ("quant_matmul", 3)):
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)[:spatial]
        bx, tx = sch.split(sch.fuse(*loops), [None, CUDA_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch


def rules() -> list:
    """dlight rules for the tagged kernels: GEMV and matmul forms, CPU and CUDA."""
    from tvm import tirx
    from tvm.s_tir.dlight.base import ScheduleRule

    class QuantLinear(ScheduleRule):
        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or func.attrs is None or KERNEL_ATTR not in func.attrs:
                return None
            gemv = func.attrs[KERNEL_ATTR] == "gemv"
            if target.kind.name == "cuda":
                return schedule_cuda_gemv(func, target) if gemv else schedule_cuda(func, target)
            return schedule_gemv(func, target) if gemv else schedule_matmul(func, target)

    return [QuantLinear()]
