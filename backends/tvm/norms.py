"""RMS normalization over the last axis as a hand-written CPU kernel.

Relax's `rms_norm`, scheduled by dlight's CPU reduction rule, copies its input into a buffer
of its own, squares it into another, then sums each row serially: one add after another,
each waiting for the last (a chain of `width` adds at 4 cycles each), and every row's sum
two full-size buffers away from the input. On the Llama-style model's 1 x 128 prefill its
17 norms took 1.35 ms on one thread against 1.18 ms for ORT's SkipSimplifiedLayerNormalization
(which adds the residual too), about 80 us a norm of 128 x 512.

This kernel reads each row twice (the sum of squares, then the scaled output) and nothing
else: the squares go into CHAINS independent vectors of LANES partial sums (the chains hide
the FMA latency), which are added up once per row. Rows run in parallel from `SERIAL_BELOW`
elements on (a decode step's one row runs on the calling thread, as the other small kernels
do: `schedules._serial_below`). CPU targets only (`Lowerer.pack_weights`); CUDA keeps
Relax's op and dlight's GPU rules.
"""
from __future__ import annotations

from graphopt.backends.tvm.quant_panels import prim_func
from graphopt.backends.tvm.schedules import SERIAL_BELOW

LANES = 16  # floats in one AVX-512 vector (two AVX2 vectors: LLVM splits it)
CHAINS = 4  # independent partial-sum vectors: an FMA's latency is 4 cycles, two issue a cycle


def fits(width) -> bool:
    """Whether the kernel takes rows of `width` values (static, a multiple of LANES)."""
    return isinstance(width, int) and width % LANES == 0


def rms_norm_source(width: int, eps: float) -> str:
    """TVMScript: Y [m, width] = X * rsqrt(mean(X * X, row) + eps) * W, m symbolic."""
    chains = CHAINS if width % (LANES * CHAINS) == 0 else 1
    row = f"""acc = T.alloc_buffer(({chains}, {LANES}), scope="local")
for u in T.unroll({chains}):
    for c in T.vectorized({LANES}):
        acc[u, c] = T.float32(0)
for kb in range({width // (LANES * chains)}):
    for u in T.unroll({chains}):
        for c in T.vectorized({LANES}):
            acc[u, c] = acc[u, c] + X[r, (kb * {chains} + u) * {LANES} + c] * X[r, (kb * {chains} + u) * {LANES} + c]
for u in range(1, {chains}):
    for c in T.vectorized({LANES}):
        acc[0, c] = acc[0, c] + acc[u, c]
total = T.alloc_buffer((1,), scope="local")
total[0] = T.float32(0)
for c in range({LANES}):
    total[0] = total[0] + acc[0, c]
inv = T.alloc_buffer((1,), scope="local")
inv[0] = T.rsqrt(total[0] / T.float32({width}) + T.float32({float(eps)!r}))
for kb in range({width // LANES}):
    for c in T.vectorized({LANES}):
        Y[r, kb * {LANES} + c] = X[r, kb * {LANES} + c] * inv[0] * W[kb * {LANES} + c]"""
    parallel_rows = -(-SERIAL_BELOW // width)
    body = "\n".join([f"    if m >= {parallel_rows}:", "        for r in T.parallel(m):"]
                     + ["            " + line for line in row.split("\n")]
                     + ["    else:", "        for r in range(m):"] + ["            " + line for line in row.split("\n")])
    return f'''
@T.prim_func(private=True, s_tir=True)
def rms_norm_rows(x: T.handle, W: T.Buffer(({width},), "float32"), y: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    m = T.int64()
    X = T.match_buffer(x, (m, {width}), "float32")
    Y = T.match_buffer(y, (m, {width}), "float32")
{body}
'''


def rms_norm_func(width: int, eps: float):
    return prim_func(rms_norm_source(width, eps))
