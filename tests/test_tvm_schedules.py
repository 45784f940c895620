"""graphopt's CPU matmul schedule (backends/tvm/schedules.py) on the shapes it special-cases:
static and symbolic rows, columns the tile does not divide, one row (GEMV), a batched
matmul with a fused epilogue. Each kernel is checked against numpy in float64, and the
symbolic one is checked to have a multiply-add loop without a bounds check."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.testing import require_installed

require_installed("tvm", "apache-tvm")

import tvm  # noqa: E402
from tvm import relax, tirx  # noqa: E402

from graphopt.backends.tvm.build import cpu_target_spec, optimize_module  # noqa: E402

RNG = np.random.default_rng(0)


def _matmul_module(a_shape, b_shape, bias: bool = False):
    """main(a, b[, c]) = a @ b (+ c), dims given as ints or names (symbolic)."""
    dims = {}

    def dim(d):
        return dims.setdefault(d, tirx.Var(d, "int64")) if isinstance(d, str) else d

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([dim(d) for d in a_shape], "float32"))
    b = relax.Var("b", relax.TensorType([dim(d) for d in b_shape], "float32"))
    params = [a, b]
    if bias:
        params.append(relax.Var("c", relax.TensorType([dim(b_shape[-1])], "float32")))
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(a, b))
            if bias:
                y = bb.emit(relax.op.add(y, params[2]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *arrays):
    target = tvm.target.Target(cpu_target_spec())
    scheduled = optimize_module(mod, target)
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=target), tvm.cpu())
    return scheduled, vm["main"](*[tvm.runtime.tensor(x) for x in arrays]).numpy()


def _check(got, a, b, c=None):
    want = a.astype(np.float64) @ b.astype(np.float64) + (0 if c is None else c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("m", [1, 3, 4, 130])
def test_symbolic_rows(m):
    mod = _matmul_module(("m", 96), (96, 160))
    a, b = RNG.standard_normal((m, 96), np.float32), RNG.standard_normal((96, 160), np.float32)
    _check(_run(mod, a, b)[1], a, b)


@pytest.mark.parametrize("m,n", [(8, 64), (1, 96), (1, 200), (5, 40)])
def test_static_shapes_gemv_and_ragged_columns(m, n):
    mod = _matmul_module((m, 72), (72, n))
    a, b = RNG.standard_normal((m, 72), np.float32), RNG.standard_normal((72, n), np.float32)
    _check(_run(mod, a, b)[1], a, b)


@pytest.mark.parametrize("seq,total", [(1, 9), (7, 7), (16, 33)])
def test_batched_symbolic_rows_and_columns(seq, total):
    # attention's scores: [batch, heads, seq, d] @ [batch, heads, d, total], both symbolic
    mod = _matmul_module((2, 3, "seq", 32), (2, 3, 32, "total"))
    a = RNG.standard_normal((2, 3, seq, 32), np.float32)
    b = RNG.standard_normal((2, 3, 32, total), np.float32)
    _check(_run(mod, a, b)[1], a, b)


def test_epilogue_is_fused_and_correct():
    mod = _matmul_module(("m", 64), (64, 128), bias=True)
    a, b = RNG.standard_normal((37, 64), np.float32), RNG.standard_normal((64, 128), np.float32)
    c = RNG.standard_normal(128, np.float32)
    scheduled, got = _run(mod, a, b, c)
    _check(got, a, b, c)
    kernels = [f for gv, f in scheduled.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == 1  # matmul and bias add in one kernel


def test_symbolic_tile_loop_has_no_bounds_check():
    scheduled, _ = _run(_matmul_module(("m", 64), (64, 128)), np.zeros((4, 64), np.float32),
                        np.zeros((64, 128), np.float32))
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    text = kernel.script()
    update = text[text.index('T.sblock("matmul_update")'):]
    update = update[:update.index("T.sblock(", 10)] if "T.sblock(" in update[10:] else update
    assert "T.where" not in update  # padded rows: the multiply-add is unconditional
    assert "T.parallel" in text and "T.vectorized" in text
    assert "_pad" in text and "_global" in text  # padded A rows, B's panel copied
