"""graphopt.MoE on the CPU with only the chosen experts: a GEMV over each expert's weight stored in
column panels, indexed by the router's choice.

Every token has k chosen experts; the dense form runs all E of them (E / k times the weight bytes
a decode step needs). Here each projection is one kernel over the stacked weight repacked at
build time as

    panels  f32 [E, N / P, K, P]    panels[e, j, kk, c] = W[e][j * P + c, kk]

(P = `lowering.panel_width(N)`: one panel's K x P floats contiguous). Cores take disjoint column
panels; in its panel a core goes expert by expert over the (token, choice) pairs that chose the
expert, so an expert no token chose is never read, and one that several tokens chose (a prefill)
is read once into the caches for all of them. Per pair, P accumulators (4 AVX-512 vectors),
x[kk] broadcast against the panel's row kk.

    moe_gemv(X [m, S, K], index [m, k] int64, panels) -> Y [m, k, N]

X's S is 1 (the up projection: every choice of a token reads its one row) or k (the down
projection: choice s reads its own activation row). An index outside [0, E) selects nothing (its
row of Y is zero), as graphopt.MoE's reference weighs an expert it never meets.
"""
from __future__ import annotations

import numpy as np

from graphopt.backends.tvm import quant_panels


def panels(w: np.ndarray, p: int) -> np.ndarray:
    """Stacked [E, N, K] -> [E, N / p, K, p]."""
    e, n, k = w.shape
    return np.ascontiguousarray(w.reshape(e, n // p, p, k).transpose(0, 1, 3, 2))


def gemv_source(*, experts: int, n: int, k: int, p: int, choices: int, per_choice: bool) -> str:
    """TVMScript of the kernel above; m (tokens) is symbolic."""
    s_dim = choices if per_choice else 1
    x_row = "s" if per_choice else "0"
    row = [f"acc = T.alloc_buffer(({p},), scope='local')",
           f"for c in T.vectorized({p}):",
           "    acc[c] = T.float32(0)",
           f"for kk in range({k}):",
           f"    for c in T.vectorized({p}):",
           f"        acc[c] = acc[c] + X[r, {x_row}, kk] * w[e, j, kk, c]",
           f"for c in T.vectorized({p}):",
           f"    Y[r, s, j * {p} + c] = acc[c]"]
    return f'''
@T.prim_func(private=True, s_tir=True)
def moe_gemv_panels(x: T.handle, index: T.handle, w: T.Buffer(({experts}, {n // p}, {k}, {p}), "float32"), y: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    m = T.int64()
    X = T.match_buffer(x, (m, {s_dim}, {k}), "float32")
    I = T.match_buffer(index, (m, {choices}), "int64")
    Y = T.match_buffer(y, (m, {choices}, {n}), "float32")
{quant_panels.expert_loops(experts, choices, n // p, p, row)}
'''


def gemv_func(**kw):
    return quant_panels.prim_func(gemv_source(**kw))
