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

On CPUs with AVX-512 VNNI, 4-bit weights take an integer path instead (what MatMulNBits'
accuracy_level 4 does): each row of X is quantized to int8 per block of the weight (symmetric,
scale max|x| / 127; `quantize_rows_func`), and the GEMV multiplies the weight's nibbles (u8) by
those bytes (s8) with `vpdpbusd` (4 products a 32-bit lane, into int32), then once a block
y += scale * x_scale * (sum - zero_point * sum(x8)). Its layout puts 4 consecutive elements of
one output in one 32-bit lane:

    vnni_panels    u8  [N / PANEL, n_blocks, block_size / 8, PANEL, 4]
                   byte i of output c for the 8 elements 8g..8g+7 of block b holds element
                   8g + i in its low nibble and 8g + 4 + i in its high one

so one 64-byte load and a mask (a shift and a mask) give 16 outputs x 4 elements for two
`vpdpbusd`s. The error is the activations' rounding: at most max|x_block| / 254 an element.

The kernels are written in TVMScript (scheduled by hand: loop kinds below), not in TE plus a
schedule: the run-time split of the rows into whole groups and a remainder, and the VNNI
intrinsic on vectors of bytes, are more than a TE schedule expresses.
"""
from __future__ import annotations

import functools

import numpy as np

from graphopt.backends.tvm.build import cpu_target_spec
from graphopt.ops.quant_format import unpack

PANEL = 64  # outputs a panel: one 64-byte load of packed bytes feeds them; 4 AVX-512 accumulators
PARALLEL_ROWS = 16  # X's int8 copy: rows from which it is made in parallel
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
    return _panels(unpack(zero_points, bits, n_blocks).astype(np.uint8))


@functools.cache
def vnni_available() -> bool:
    """Whether this machine's CPU target (the one CPU builds are made for) has AVX-512 VNNI."""
    import tvm
    from tvm.target.codegen import target_has_features

    try:
        return bool(target_has_features("avx512vnni", tvm.target.Target(cpu_target_spec())))
    except Exception:  # noqa: BLE001  (an LLVM that does not know the feature: the fp32 path)
        return False


def vnni_panels(packed: np.ndarray, block_size: int) -> np.ndarray:
    """4-bit MatMulNBits packed [N, n_blocks, block_size / 2] -> [N / PANEL, n_blocks, block_size / 8, PANEL, 4]."""
    n, n_blocks = packed.shape[:2]
    q = _panels(unpack(packed, 4).reshape(n, n_blocks, block_size))  # [N/P, n_blocks, block_size, P]
    q = q.reshape(q.shape[0], n_blocks, block_size // 8, 2, 4, PANEL)  # [j, b, g, half, i, c]
    return np.ascontiguousarray((q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(0, 1, 2, 4, 3)).astype(np.uint8)


def gemv_source(*, k: int, n_panels: int, n_blocks: int, bits: int, block_size: int, symmetric: bool,
                group: int) -> str:
    """TVMScript of Y [m, n_panels * PANEL] = X [m, K] @ dequantize(W)^T over the panel layout;
    m is symbolic. `group` 1: every row alone (a static single row); else whole groups of
    `group` rows, then the remaining rows one at a time."""
    per = 8 // bits
    nbytes = block_size // per

    def x_at(row: str, kk: str) -> str:
        return _x_at(f"X[{row}, {{}}]", kk, k, n_blocks * block_size)

    def weight(h: int) -> str:
        return _weight_at("j, b", h, bits, symmetric)

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
@T.prim_func(private=True, s_tir=True)
def quant_gemv_panels(x: T.handle, packed: T.Buffer(({n_panels}, {n_blocks}, {nbytes}, {PANEL}), "uint8"), scales: T.Buffer(({n_panels}, {n_blocks}, {PANEL}), "float32"){zp_arg}, y: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    m = T.int64()
    X = T.match_buffer(x, (m, {k}), "float32")
    Y = T.match_buffer(y, (m, {n_panels * PANEL}), "float32")
    for j in T.parallel({n_panels}):
{body}
'''


def _x_at(x: str, kk: str, k: int, width: int) -> str:
    """Element kk of a row of X (`x` with {} for the index); past K (K padded to whole blocks) 0."""
    if width == k:
        return x.format(kk)
    return f"T.if_then_else({kk} < {k}, {x.format(f'T.min({kk}, {k - 1})')}, T.float32(0))"


def _weight_at(head: str, h: int, bits: int, symmetric: bool) -> str:
    """Element h of byte p of the panel layout at `head` (the indices before the block's byte
    and lane: "j, b", or "e, j, b" over experts), minus its zero point, as float32."""
    lanes = "int8" if bits == 4 else "int16"  # q - zero point: -15..15 (4 bits), -255..255 (8 bits)
    byte = f"packed[{head}, p, c]"
    if bits == 4:
        byte = f"({byte} >> T.uint8({4 * h}) & T.uint8(15))"
    zp = f"T.{lanes}({2 ** (bits - 1)})" if symmetric else f"T.Cast('{lanes}', zero_points[{head}, c])"
    return f"T.Cast('float32', T.Cast('{lanes}', {byte}) - {zp})"


def expert_loops(experts: int, choices: int, n_panels: int, panel: int, row: list[str]) -> str:
    """The loop nest of an indexed-experts GEMV (moe_panels.py's and the two below), at the
    function body's indentation: cores over the column panels; a zero row for a choice outside
    [0, experts); then expert by expert, `row` (statements at the innermost level, writing
    Y[r, s, panel j]) for each (token r, choice s) that chose it."""
    head = [f"for j in T.parallel({n_panels}):",
            "    for r in range(m):",
            f"        for s in range({choices}):",
            f"            if I[r, s] < T.int64(0) or I[r, s] >= T.int64({experts}):",
            f"                for c in T.vectorized({panel}):",
            f"                    Y[r, s, j * {panel} + c] = T.float32(0)",
            f"    for e in range({experts}):",
            "        for r in range(m):",
            f"            for s in range({choices}):",
            "                if I[r, s] == T.int64(e):"]
    return "\n".join(" " * 4 + line for line in head + [" " * 20 + line for line in row])


def moe_gemv_source(*, experts: int, k: int, n_panels: int, n_blocks: int, bits: int, block_size: int,
                    symmetric: bool, choices: int, per_choice: bool) -> str:
    """TVMScript of graphopt.QuantMoE's projection with only the chosen experts (moe_panels.py's
    kernel over this module's quantized panels, one more leading axis: the expert):

        Y [m, choices, n_panels * PANEL] from X [m, S, K] (S = choices where `per_choice`: choice s
        reads row s, else 1), index [m, choices] and the stacked panels [experts, n_panels, ...]

    Cores take disjoint column panels; in its panel a core goes expert by expert over the
    (token, choice) pairs that chose it, so an expert no token chose is never read. An index
    outside [0, experts) gives a zero row."""
    per = 8 // bits
    nbytes = block_size // per
    x_row = "s" if per_choice else "0"
    inner = []
    for h in range(per):
        x = _x_at(f"X[r, {x_row}, {{}}]", f"b * {block_size} + p * {per} + {h}", k, n_blocks * block_size)
        inner += [f"for c in T.vectorized({PANEL}):",
                  f"    block[c] = block[c] + {x} * {_weight_at('e, j, b', h, bits, symmetric)}"]
    row = ([f"acc = T.alloc_buffer(({PANEL},), scope='local')",
            f"block = T.alloc_buffer(({PANEL},), scope='local')",
            f"for c in T.vectorized({PANEL}):",
            "    acc[c] = T.float32(0)",
            f"for b in range({n_blocks}):",
            f"    for c in T.vectorized({PANEL}):",
            "        block[c] = T.float32(0)",
            f"    for p in T.unroll({nbytes}):"]
           + ["        " + line for line in inner]
           + [f"    for c in T.vectorized({PANEL}):",
              "        acc[c] = acc[c] + scales[e, j, b, c] * block[c]",
              f"for c in T.vectorized({PANEL}):",
              f"    Y[r, s, j * {PANEL} + c] = acc[c]"])
    zp_arg = "" if symmetric else f', zero_points: T.Buffer(({experts}, {n_panels}, {n_blocks}, {PANEL}), "uint8")'
    return f'''
@T.prim_func(private=True, s_tir=True)
def quant_moe_gemv_panels(x: T.handle, index: T.handle, packed: T.Buffer(({experts}, {n_panels}, {n_blocks}, {nbytes}, {PANEL}), "uint8"), scales: T.Buffer(({experts}, {n_panels}, {n_blocks}, {PANEL}), "float32"){zp_arg}, y: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    m = T.int64()
    X = T.match_buffer(x, (m, {choices if per_choice else 1}, {k}), "float32")
    I = T.match_buffer(index, (m, {choices}), "int64")
    Y = T.match_buffer(y, (m, {choices}, {n_panels * PANEL}), "float32")
{expert_loops(experts, choices, n_panels, PANEL, row)}
'''


def prim_func(source: str):
    """The PrimFunc of a TVMScript source above, marked scheduled (dlight leaves it alone) and
    opaque (Relax's FuseOps keeps it whole). Its loops go under a root block, which Relax's
    analyses expect of every PrimFunc a call_tir names."""
    import tvm

    lines = source.split("\n")
    start = max(i for i, line in enumerate(lines) if "T.match_buffer(" in line) + 1  # the body follows
    body = ["    " + line if line else line for line in lines[start:]]
    source = "\n".join(lines[:start] + ["    with T.sblock('root'):"] + body)
    return tvm.script.from_source(source).with_attrs({ATTR: 1, "tirx.is_scheduled": True, "op_pattern": 8})


def gemv_func(**kw):
    return prim_func(gemv_source(**kw))


def quantize_rows_source(*, k: int, n_blocks: int, block_size: int) -> str:
    """TVMScript: each row of X [m, K] as int8 per block (symmetric, round half to even), with
    the block's scale and the sum of its bytes (for the zero points); K padded with zeros."""
    width = n_blocks * block_size
    x = f"X[r, b * {block_size} + e]"
    row = f"""for b in range({n_blocks}):
    amax = T.alloc_buffer((1,), scope="local")
    total = T.alloc_buffer((1,), "int32", scope="local")
    amax[0] = T.float32(0)
    for e in range({block_size}):
        amax[0] = T.max(amax[0], T.fabs({{x}}))
    XS[r, b] = amax[0] / T.float32(127)
    total[0] = 0
    for e in range({block_size}):
        q = T.Cast("int32", T.round({{x}} * T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))))
        X8[r, b * {block_size} + e] = T.Cast("int8", q)
        total[0] = total[0] + q
    XSUM[r, b] = total[0]"""
    if width != k:
        x = f"T.if_then_else(b * {block_size} + e < {k}, X[r, T.min(b * {block_size} + e, {k - 1})], T.float32(0))"
    row = row.replace("{x}", x)
    # Many rows (prefill): in parallel. Few (decode): on the calling thread, since waking the
    # pool for a row of K values costs more than the row.
    body = "\n".join([f"    if m >= {PARALLEL_ROWS}:", "        for r in T.parallel(m):"]
                     + ["            " + line for line in row.split("\n")]
                     + ["    else:", "        for r in range(m):"] + ["            " + line for line in row.split("\n")])
    return f'''
@T.prim_func(private=True, s_tir=True)
def quantize_rows_int8(x: T.handle, x8: T.handle, x_scale: T.handle, x_sum: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    m = T.int64()
    X = T.match_buffer(x, (m, {k}), "float32")
    X8 = T.match_buffer(x8, (m, {width}), "int8")
    XS = T.match_buffer(x_scale, (m, {n_blocks}), "float32")
    XSUM = T.match_buffer(x_sum, (m, {n_blocks}), "int32")
{body}
'''


def _vnni_block(block_size: int, x8_at, w_at) -> list[str]:
    """The VNNI GEMV's statements for one block b of one row into `acc_i` (PANEL int32 lanes):
    `x8_at(offset)` indexes X8 at element b * block_size + offset of the row, `w_at(g, v)` the
    packed panel's 64 bytes for group g and outputs v * 16 .. v * 16 + 15."""
    vnni = 'T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")'
    nibbles = "T.broadcast(T.int32(0x0F0F0F0F), 16)"
    lines = []
    for g in range(block_size // 8):
        for half in range(2):  # elements 8g..8g+3 (low nibbles), 8g+4..8g+7 (high nibbles)
            lines.append(f"x{half} = T.reinterpret(T.broadcast(T.reinterpret(X8.vload([{x8_at(8 * g + 4 * half)}], "
                         "'int8x4'), dtype='int32'), 16), dtype='int8x64')")
        for v in range(PANEL // 16):  # 16 outputs a vector
            acc = f"acc_i[T.ramp({v * 16}, 1, 16)]"
            w = f"T.reinterpret(packed.vload([{w_at(g, v)}], 'uint8x64'), dtype='int32x16')"
            lo = f"T.reinterpret(T.bitwise_and({w}, {nibbles}), dtype='int8x64')"
            hi = f"T.reinterpret(T.bitwise_and(T.shift_right({w}, T.broadcast(T.int32(4), 16)), {nibbles}), dtype='int8x64')"
            lines.append(f"{acc} = T.call_llvm_pure_intrin({vnni}, T.call_llvm_pure_intrin({vnni}, {acc}, {lo}, x0, "
                         f"dtype='int32x16'), {hi}, x1, dtype='int32x16')")
    return lines


def _vnni_row(block_size: int, n_blocks: int, symmetric: bool, x8_at, w_at, head: str, xs: str, out: str) -> list[str]:
    """One row's panel of outputs by the VNNI GEMV: `head` indexes the weight's panel ("j" or
    "e, j"), `xs` the row's scales and sums ("r" or "r, s"), `out` the output element of lane c."""
    zp = "T.float32(8)" if symmetric else f"T.Cast('float32', zero_points[{head}, b, c])"
    return ([f"acc = T.alloc_buffer(({PANEL},), scope='local')",
             f"acc_i = T.alloc_buffer(({PANEL},), 'int32', scope='local')",
             f"for c in T.vectorized({PANEL}):",
             "    acc[c] = T.float32(0)",
             f"for b in range({n_blocks}):",
             f"    for c in T.vectorized({PANEL}):",
             "        acc_i[c] = 0"]
            + ["    " + line for line in _vnni_block(block_size, x8_at, w_at)]
            + [f"    for c in T.vectorized({PANEL}):",
               f"        acc[c] = acc[c] + scales[{head}, b, c] * XS[{xs}, b] * (T.Cast('float32', acc_i[c]) - {zp} * "
               f"T.Cast('float32', XSUM[{xs}, b]))",
               f"for c in T.vectorized({PANEL}):",
               f"    {out} = acc[c]"])


def gemv_vnni_source(*, k: int, n_panels: int, n_blocks: int, block_size: int, symmetric: bool) -> str:
    """TVMScript of the VNNI GEMV (4 bits): Y [m, n_panels * PANEL] from the int8 rows, their
    scales and sums (`quantize_rows_source`) and the weight in `vnni_panels` layout; one row at
    a time (each panel stays in cache while the rows pass)."""
    row = _vnni_row(block_size, n_blocks, symmetric, lambda o: f"r, b * {block_size} + {o}",
                    lambda g, v: f"j, b, {g}, {v * 16}, 0", "j", "r", f"Y[r, j * {PANEL} + c]")
    body = "\n".join(" " * 12 + line for line in row)
    zp_arg = "" if symmetric else f', zero_points: T.Buffer(({n_panels}, {n_blocks}, {PANEL}), "uint8")'
    width = n_blocks * block_size
    return f'''
@T.prim_func(private=True, s_tir=True)
def quant_gemv_vnni(x8: T.handle, x_scale: T.handle, x_sum: T.handle, packed: T.Buffer(({n_panels}, {n_blocks}, {block_size // 8}, {PANEL}, 4), "uint8"), scales: T.Buffer(({n_panels}, {n_blocks}, {PANEL}), "float32"){zp_arg}, y: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    m = T.int64()
    X8 = T.match_buffer(x8, (m, {width}), "int8")
    XS = T.match_buffer(x_scale, (m, {n_blocks}), "float32")
    XSUM = T.match_buffer(x_sum, (m, {n_blocks}), "int32")
    Y = T.match_buffer(y, (m, {n_panels * PANEL}), "float32")
    for j in T.parallel({n_panels}):
        for r in range(m):
{body}
'''


def moe_gemv_vnni_source(*, experts: int, n_panels: int, n_blocks: int, block_size: int, symmetric: bool,
                         choices: int, per_choice: bool) -> str:
    """`moe_gemv_source` on the VNNI path (4 bits): the rows of X as int8 per block
    (`quantize_rows_source`, [m, S, ...] with S as there), the experts' weights in `vnni_panels`
    layout stacked over the experts."""
    x_row = "s" if per_choice else "0"
    row = _vnni_row(block_size, n_blocks, symmetric, lambda o: f"r, {x_row}, b * {block_size} + {o}",
                    lambda g, v: f"e, j, b, {g}, {v * 16}, 0", "e, j", f"r, {x_row}", f"Y[r, s, j * {PANEL} + c]")
    zp_arg = "" if symmetric else f', zero_points: T.Buffer(({experts}, {n_panels}, {n_blocks}, {PANEL}), "uint8")'
    width, rows = n_blocks * block_size, choices if per_choice else 1
    return f'''
@T.prim_func(private=True, s_tir=True)
def quant_moe_gemv_vnni(x8: T.handle, x_scale: T.handle, x_sum: T.handle, index: T.handle, packed: T.Buffer(({experts}, {n_panels}, {n_blocks}, {block_size // 8}, {PANEL}, 4), "uint8"), scales: T.Buffer(({experts}, {n_panels}, {n_blocks}, {PANEL}), "float32"){zp_arg}, y: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    m = T.int64()
    X8 = T.match_buffer(x8, (m, {rows}, {width}), "int8")
    XS = T.match_buffer(x_scale, (m, {rows}, {n_blocks}), "float32")
    XSUM = T.match_buffer(x_sum, (m, {rows}, {n_blocks}), "int32")
    I = T.match_buffer(index, (m, {choices}), "int64")
    Y = T.match_buffer(y, (m, {choices}, {n_panels * PANEL}), "float32")
{expert_loops(experts, choices, n_panels, PANEL, row)}
'''


def gather_te(packed, indices, scales, zp, *, bits: int, block_size: int, k: int, rows: int, vnni: bool = False):
    """TE for rows [R, K] = dequantize(table)[indices] over the panel layout (the table's `rows`
    rows; `vnni`: the VNNI layout): only the gathered rows' bytes are read."""
    from tvm import te, tirx

    per = 8 // bits
    dt = scales.dtype

    def element(r, c):
        row = indices[r].astype("int64")
        row = tirx.if_then_else(row < 0, row + rows, row)  # ONNX Gather: negative counts from the end
        j, col, b, e = row // PANEL, row % PANEL, c // block_size, c % block_size
        if vnni:  # element e of the block: group e // 8, byte e % 4, high nibble for e % 8 >= 4
            q = (packed[j, b, e // 8, col, e % 4] >> ((e % 8 // 4) * 4).astype("uint8")) & tirx.const(15, "uint8")
        else:
            q = packed[j, b, e // per, col]
            if bits == 4:
                q = (q >> ((e % per) * 4).astype("uint8")) & tirx.const(15, "uint8")
        q = q.astype(dt)
        zero = tirx.const(2 ** (bits - 1), dt) if zp is None else zp[j, b, col].astype(dt)
        return (q - zero) * scales[j, b, col]

    return te.compute((indices.shape[0], k), element, name="quant_gather")
