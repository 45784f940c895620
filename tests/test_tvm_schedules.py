"""graphopt's CPU matmul schedule (backends/tvm/schedules.py) on the shapes it special-cases:
static and symbolic rows, columns the tile does not divide, one row (GEMV), a batched
matmul with a fused epilogue. Each kernel is checked against numpy in float64, and the
symbolic one is checked to have a multiply-add loop without a bounds check. Every kernel has
a parallel loop with a task for each of 2 threads at 1 x 1 and 1 x 128, and the VM runs them
on a pool with a thread per core."""
from __future__ import annotations

import os
import re
import threading
import types

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


@pytest.mark.parametrize("seq", [1, 5])
def test_rows_a_symbolic_multiple_of_the_tile(seq):
    # grouped-query attention with 4 query heads per KV head: the scores' rows are seq * 4,
    # which the row tile divides whatever seq is (nothing to pad: no copy-out block)
    s, total = tirx.Var("seq", "int64"), tirx.Var("total", "int64")
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType([s], "int64"))  # where `seq` is defined
    a = relax.Var("a", relax.TensorType([1, 2, s * 4, total], "float32"))
    b = relax.Var("b", relax.TensorType([1, 2, total, 64], "float32"))
    with bb.function("main", [ids, a, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(a, b)))
        bb.emit_func_output(out)
    x = RNG.standard_normal((1, 2, seq * 4, 9), np.float32)
    y = RNG.standard_normal((1, 2, 9, 64), np.float32)
    _check(_run(bb.get(), np.zeros(seq, np.int64), x, y)[1], x, y)


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


# --------------------------------------------------------------------------------------
# Both cores: parallel loops wide enough, and a thread pool that has the threads

THREADS = 2  # the measurements: 2 threads on a 2-core machine

# TIR shape expressions as Python: `batch * ((seq + T.int64(31)) // T.int64(32)) * T.int64(6)`
_T = types.SimpleNamespace(int64=int, int32=int, max=max, min=min, Cast=lambda _dtype, v: v)


def _parallel_extents(kernel, dims: dict) -> list[int]:
    """The extent of every `T.parallel` loop of a scheduled kernel, at `dims`."""
    # A kernel that chooses its row tiling at run time has a second copy of each symbolic dim
    # (`seq_1`, matched to `seq`).
    text, extents, start = re.sub(r"\b([a-z]+)_\d+\b", lambda d: d[1] if d[1] in dims else d[0], kernel.script()), [], 0
    while (start := text.find("T.parallel(", start)) >= 0:
        end, depth = start + len("T.parallel("), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        extents.append(int(eval(text[start + len("T.parallel("):end - 1], {"T": _T, **dims})))  # noqa: S307
        start = end
    return extents


def _softmax_module():
    seq, total = tirx.Var("seq", "int64"), tirx.Var("total", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 6, seq, total], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(x, axis=-1)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("what,mod", [
    ("projection 192 -> 192", _matmul_module((1, "seq", 192), (192, 192))),
    ("MLP up 192 -> 1024, bias", _matmul_module((1, "seq", 192), (192, 1024), bias=True)),
    ("static GEMV 192 -> 512", _matmul_module((1, 192), (192, 512))),
    ("softmax over 6 heads", _softmax_module()),
])
@pytest.mark.parametrize("seq", [1, 128])
def test_every_kernel_has_a_parallel_loop_for_each_thread(what, mod, seq):
    target = tvm.target.Target(cpu_target_spec())
    kernels = [f for f in optimize_module(mod, target).functions.values() if isinstance(f, tirx.PrimFunc)]
    assert kernels
    for kernel in kernels:
        extents = _parallel_extents(kernel, {"seq": seq, "total": seq})
        assert extents and max(extents) >= THREADS, f"{what} at 1 x {seq}: parallel extents {extents}\n{kernel.script()}"


def _vm_threads() -> int:
    return int(tvm.get_global_func("runtime.NumThreads")())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to spread over")
def test_the_vm_runs_on_every_core_and_leaves_the_affinity_alone():
    # Left alone, TVM's pool has hardware_concurrency() / 2 threads on x86 (one on 2 cores)
    # and pins the calling thread to core 0, which later threads (an ORT session's) inherit.
    import graphopt.backends.tvm as tvm_backend
    from graphopt.interpreter import run
    from graphopt.sample_inputs import sample_inputs
    from graphopt.testing import assert_close, random_graph

    cores = os.sched_getaffinity(0)
    g = random_graph(0, n_nodes=8)
    compiled = tvm_backend.compile_graph(g)
    feeds = sample_inputs(g, dims={"batch": 3}, seed=0)
    want = run(g, feeds)
    seen = {}

    def run_and_look(where):
        got = compiled.run(feeds)
        for name in want:
            assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, what=name)
        seen[where] = (_vm_threads(), os.sched_getaffinity(0))

    run_and_look("main thread")
    worker = threading.Thread(target=run_and_look, args=("another thread",))  # a pool per thread
    worker.start()
    worker.join()
    assert seen == {w: (len(cores), cores) for w in ("main thread", "another thread")}


# --------------------------------------------------------------------------------------
# Weights pre-packed in column panels at build time


def _linear_graph(k: int, n: int, seq):
    from graphopt.builder import Builder
    from graphopt.dtypes import DType
    from graphopt.ir import Graph, TensorType

    g = Graph("linear")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.from_numpy(np.dtype(np.float32)), (1, seq, k)))
    w, bias = b.const(RNG.standard_normal((k, n), np.float32), "w"), b.const(RNG.standard_normal(n, np.float32), "b")
    g.outputs = [b.op("Linear", x, w, bias, domain="graphopt", activation="silu")]
    return g


@pytest.mark.parametrize("seq, n", [(1, 160), (3, 160), (4, 160), (5, 160), (17, 160), (128, 160), (1, 192), (5, 192)])
def test_weights_are_packed_once_and_read_in_place(seq, n):
    import graphopt.backends.tvm as tvm_backend
    from graphopt.backends.tvm import lowering
    from graphopt.backends.tvm.lowering import lower_graph, panel_width, prepare
    from graphopt.interpreter import run
    from graphopt.testing import assert_close

    PANEL = panel_width(n)  # 160 columns: panels of 32; 192: of 64 where vectors are 512 bits wide
    assert PANEL == (lowering.WIDE_PANEL if n == 192 and lowering._wide_vectors() else lowering.PANEL)
    g = _linear_graph(96, n, "seq")
    mod, params = lower_graph(prepare(g, pack_weights=True), pack_weights=True)
    (panels,) = [a for name, a in params if name.startswith("w")]  # stored packed, not twice
    assert panels.shape == (n // PANEL, 96, PANEL)
    scheduled = optimize_module(mod, tvm.target.Target(cpu_target_spec()))
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]  # bias, SiLU fused
    text = kernel.script()
    assert "_global" not in text  # no panel copied per call
    assert "T.parallel" in text and "T.vectorized" in text
    # Rows chosen at run time: tiles of 4 (the last padded) from 4 rows, else one row at a
    # time with nothing padded, each with one task per panel.
    tiled, rows = text.split('T.sblock("rows")')
    assert "if seq >= T.int64(4):" in tiled and "_pad" in tiled and "_pad" not in rows
    # A's rows padded once a call, a loop of its own before the panels' (not again per panel);
    # a panel count the cores do not divide has each panel's row tiles in two tasks
    pad_copy, tasks, *_epilogue = _parallel_extents(types.SimpleNamespace(script=lambda: tiled), {"seq": seq})
    # the tile writes the rows that exist straight to the output: A's rows are the only padded copy
    assert [b for b in re.findall(r"(\w+) = T.sblock_alloc_buffer", tiled) if b.endswith("_pad")] == ["x_pad"]
    cores = cpu_target_spec()["num-cores"]
    assert tasks == n // PANEL * (2 if (n // PANEL) % cores else 1)
    assert pad_copy * 16 == -(-seq // 4) * 4 * 96
    assert _parallel_extents(types.SimpleNamespace(script=lambda: rows), {"seq": seq})[0] == n // PANEL
    feeds = {"x": RNG.standard_normal((1, seq, 96), np.float32)}
    got, want = tvm_backend.compile_graph(g).run(feeds), run(g, feeds)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, what=name)


@pytest.mark.parametrize("seq", [1, 2, 5])
def test_static_rows_of_a_packed_weight_get_one_schedule(seq):
    # A static row count (a tuning bucket) needs no run-time choice: one row at a time below
    # 4 rows (nothing padded), tiles of 4 from there.
    import graphopt.backends.tvm as tvm_backend
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.interpreter import run
    from graphopt.testing import assert_close

    g = _linear_graph(96, 160, seq)
    scheduled = optimize_module(lower_graph(prepare(g, pack_weights=True), pack_weights=True)[0], tvm.target.Target(cpu_target_spec()))
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    text = kernel.script()
    assert 'T.sblock("rows")' not in text and ("_pad" in text) == (seq >= 4)
    feeds = {"x": RNG.standard_normal((1, seq, 96), np.float32)}
    got, want = tvm_backend.compile_graph(g).run(feeds), run(g, feeds)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, what=name)


# --------------------------------------------------------------------------------------
# Kernels launched per call


def _kernel_calls(mod) -> dict[str, int]:
    """{kernel name without its number: calls} in `main`."""
    import collections
    import re

    call_tir, calls = tvm.ir.Op.get("relax.call_tir"), collections.Counter()
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.update(
        [re.sub(r"\d+$", "", e.args[0].name_hint)]) if getattr(e, "op", None) == call_tir else None)
    return calls


def test_rotary_tables_are_gathered_once_for_every_layer():
    import graphopt.backends.tvm as tvm_backend
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.builder import Builder
    from graphopt.dtypes import DType
    from graphopt.interpreter import run
    from graphopt.ir import Graph, TensorType
    from graphopt.testing import assert_close

    g = Graph("two_layers")
    b = Builder(g)
    f32, i64 = DType.from_numpy(np.dtype(np.float32)), DType.from_numpy(np.dtype(np.int64))
    pos = g.add_input("pos", TensorType(i64, ("batch", "seq")))
    cos, sin = (b.const(RNG.standard_normal((64, 4), np.float32), name) for name in ("cos", "sin"))
    x = g.add_input("x", TensorType(f32, ("batch", "seq", 16)))
    for layer in range(3):  # queries and keys of 3 layers: 6 rotations at the same positions
        q = b.op("RotaryEmbedding", x, cos, sin, pos, domain="graphopt", num_heads=2)
        k = b.op("RotaryEmbedding", b.op("Neg", x), cos, sin, pos, domain="graphopt", num_heads=2)
        x = b.op("Add", q, k)
    g.outputs = [x]
    mod, _ = lower_graph(prepare(g))
    calls = _kernel_calls(relax.get_pipeline("zero")(mod))
    assert calls["take"] == 2  # cos and sin, once
    assert "reshape" not in calls, calls  # to heads and back: VM views, not copy kernels
    feeds = {"x": RNG.standard_normal((2, 5, 16), np.float32), "pos": np.array([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])}
    got, want = tvm_backend.compile_graph(g).run(feeds), run(g, feeds)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, what=name)


def test_rms_skip_norm_is_one_kernel():
    import graphopt.backends.tvm as tvm_backend
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.builder import Builder
    from graphopt.dtypes import DType
    from graphopt.interpreter import run
    from graphopt.ir import Graph, TensorType
    from graphopt.testing import assert_close

    g = Graph("skip_norm")
    b = Builder(g)
    f32 = DType.from_numpy(np.dtype(np.float32))
    x, skip = (g.add_input(n, TensorType(f32, ("batch", "seq", 64))) for n in ("x", "skip"))
    gamma = b.const(RNG.standard_normal(64, np.float32), "gamma")
    g.outputs = list(b.op("SkipNorm", x, skip, gamma, domain="graphopt", n_out=2, norm="rms", epsilon=1e-6))
    mod, _ = lower_graph(prepare(g))
    calls = _kernel_calls(relax.get_pipeline("zero")(mod))
    assert calls["rms_norm"] == 1 and not any("mean" in name for name in calls), calls
    feeds = {"x": RNG.standard_normal((2, 5, 64), np.float32), "skip": RNG.standard_normal((2, 5, 64), np.float32)}
    got, want = tvm_backend.compile_graph(g).run(feeds), run(g, feeds)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, what=name)


@pytest.mark.parametrize("width,seq", [(64, 1), (64, 70), (48, 3), (48, 90)])  # both sides of SERIAL_BELOW
def test_cpu_rms_norms_are_the_hand_written_kernel(width, seq):
    """On a CPU (pre-packed weights) RMSNorm and an rms SkipNorm over the last axis run
    norms.py's kernel over the input seen as rows (4 partial-sum chains at width 64, one at
    48): no other kernel, a parallel and a serial copy, and the interpreter's values in both."""
    import graphopt.backends.tvm as tvm_backend
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.builder import Builder
    from graphopt.dtypes import DType
    from graphopt.interpreter import run
    from graphopt.ir import Graph, TensorType
    from graphopt.testing import assert_close

    g = Graph("norms")
    b = Builder(g)
    f32 = DType.from_numpy(np.dtype(np.float32))
    x, skip = (g.add_input(n, TensorType(f32, ("batch", "seq", width))) for n in ("x", "skip"))
    gamma = b.const(RNG.standard_normal(width, np.float32), "gamma")
    y, s = b.op("SkipNorm", x, skip, gamma, domain="graphopt", n_out=2, norm="rms", epsilon=1e-6)
    g.outputs = [b.op("RMSNorm", y, gamma, domain="graphopt", epsilon=1e-5), s]
    mod, _ = lower_graph(prepare(g, pack_weights=True), pack_weights=True)
    calls = _kernel_calls(relax.get_pipeline("zero")(mod))
    assert calls["rms_norm_rows"] == 2 and "rms_norm" not in calls and not any("mean" in n for n in calls), calls
    kernel = next(f for gv, f in mod.functions.items() if gv.name_hint.startswith("rms_norm_rows"))
    text = kernel.script()
    assert text.count("T.parallel(") == 1 and text.count("acc[") > 0
    assert ("T.unroll(4)" in text) == (width % 64 == 0)
    feeds = {"x": RNG.standard_normal((2, seq, width), np.float32), "skip": RNG.standard_normal((2, seq, width), np.float32)}
    got, want = tvm_backend.compile_graph(g).run(feeds), run(g, feeds)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, what=name)


@pytest.mark.parametrize("n,seq", [(96, 1), (96, 7), (96, 130), (40, 7)])
def test_cpu_silu_gated_linear_is_one_kernel_over_paired_panels(n, seq):
    """GatedLinear (SiLU, constant weights, no bias) on a CPU: one kernel over panels that
    each hold half a panel of gate columns and the same up columns (N=96); where N does not
    split so (N=40) the matmul and the SiLU gate as before. The interpreter's values either way,
    at one row and at many."""
    import graphopt.backends.tvm as tvm_backend
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.builder import Builder
    from graphopt.dtypes import DType
    from graphopt.interpreter import run
    from graphopt.ir import Graph, TensorType
    from graphopt.testing import assert_close

    g = Graph("gated")
    b = Builder(g)
    f32 = DType.from_numpy(np.dtype(np.float32))
    x = g.add_input("x", TensorType(f32, ("batch", "seq", 64)))
    w_gate, w_up = (b.const(RNG.standard_normal((64, n), np.float32) / 8, name) for name in ("w_gate", "w_up"))
    g.outputs = [b.op("GatedLinear", x, w_gate, w_up, domain="graphopt", activation="silu")]
    mod, _ = lower_graph(prepare(g, pack_weights=True), pack_weights=True)
    calls = _kernel_calls(relax.get_pipeline("zero")(mod))
    paired = n % 32 == 0
    assert (calls == {"matmul_panels_silu_gate": 1}) == paired, calls
    feeds = {"x": RNG.standard_normal((2, seq, 64), np.float32)}
    got, want = tvm_backend.compile_graph(g).run(feeds), run(g, feeds)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, what=name)


# --------------------------------------------------------------------------------------
# Small elementwise kernels run on the calling thread (schedules.SERIAL_BELOW)


def _silu_gate_module(shape):
    """main(x) = x * sigmoid(x), one elementwise kernel (SiLU), dims ints or names."""
    x = relax.Var("x", relax.TensorType([tirx.Var(d, "int64") if isinstance(d, str) else d for d in shape], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.multiply(relax.op.sigmoid(x), x)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("seq", [1, 5, 7, 130])  # 700 to 91000 elements: both sides of SERIAL_BELOW (4096)
def test_small_elementwise_kernels_choose_serial_at_run_time(seq):
    from graphopt.backends.tvm.schedules import SERIAL_BELOW

    x = RNG.standard_normal((1, seq, 700)).astype(np.float32)
    scheduled, got = _run(_silu_gate_module((1, "seq", 700)), x)
    want = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    text = kernel.script()
    assert f"seq * T.int64(700) >= T.int64({SERIAL_BELOW})" in text.replace("T.int64(700) * seq", "seq * T.int64(700)")
    assert text.count("T.parallel(") == 1 and text.count('T.sblock("T_multiply"') == 2  # both copies, one parallel


@pytest.mark.parametrize("shape,parallel", [((3, 100), False), ((64, 100), True)])
def test_static_elementwise_kernels_are_parallel_only_when_large(shape, parallel):
    x = RNG.standard_normal(shape).astype(np.float32)
    scheduled, got = _run(_silu_gate_module(shape), x)
    np.testing.assert_allclose(got, x / (1 + np.exp(-x.astype(np.float64))), rtol=1e-5, atol=1e-6)
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert ("T.parallel(" in kernel.script()) == parallel


@pytest.mark.parametrize("seq", [1, 3, 33])  # 195 to 6435 elements: both sides of SERIAL_BELOW
def test_small_norms_choose_serial_at_run_time(seq):
    """dlight's reduction rule, as `Reduction` applies it: RMSNorm rows on the calling thread
    below SERIAL_BELOW, in parallel above, one kernel; both match numpy in float64."""
    rows, width = tirx.Var("seq", "int64"), 195  # not a multiple of the vector width
    x = relax.Var("x", relax.TensorType([1, rows, width], "float32"))
    w = relax.Var("w", relax.TensorType([width], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=1e-5)))
        bb.emit_func_output(out)
    xs = RNG.standard_normal((1, seq, width)).astype(np.float32)
    ws = RNG.standard_normal(width).astype(np.float32)
    scheduled, got = _run(bb.get(), xs, ws)
    x64 = xs.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * ws
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    text = kernel.script()
    assert text.count("T.parallel(") == 1 and " >= T.int64(" in text  # a parallel and a serial copy


def test_in_flow_breakdown_times_each_kernel_the_vm_calls():
    """benchmarks/tvm_kernels.py --in-flow: every kernel of a forward, by name without its
    number, with its calls per forward; the VM's own builtins (allocations, shapes) left out."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tvm_kernels import in_flow

    x = relax.Var("x", relax.TensorType([64, 700], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.multiply(relax.op.sigmoid(x), x))  # one fused kernel
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(y, axis=-1)))  # and a reduction
        bb.emit_func_output(out)
    target = tvm.target.Target(cpu_target_spec())
    vm = relax.VirtualMachine(tvm.compile(optimize_module(bb.get(), target), target=target), tvm.cpu())
    rows = in_flow(vm, [tvm.runtime.tensor(RNG.standard_normal((64, 700)).astype(np.float32))], runs=3)
    assert sum(calls for _, calls in rows.values()) == 2, rows
    assert not any(name.startswith(("vm.", "relax.")) for name in rows), rows
    assert all(ms > 0 for ms, _ in rows.values()), rows
