"""Where a TVM forward spends its time: every kernel the Relax VM calls, timed one at a time on
the shapes it is called with, grouped by kernel (numbered variants together), next to the
whole VM call. The difference is the VM's own work (shape arithmetic, allocation, calls).

    python benchmarks/tvm_kernels.py [MODEL] [--shapes 1x1,1x128] [--runs 20]
    python benchmarks/tvm_kernels.py [MODEL] --shapes 1x128+0,1x1+128     # with the KV cache
    python benchmarks/tvm_kernels.py [MODEL] --shapes 1x128+0,1x1+128 --ort   # and ORT per op class
    python benchmarks/tvm_kernels.py [MODEL] --shapes 1x128+0 --in-flow --ort  # kernels timed in the flow too
    python benchmarks/tvm_kernels.py [MODEL] --launches
    python benchmarks/tvm_kernels.py --vm-floor

`--launches` counts instead what one call of the generation-ready artifact (KV cache in and
out, what a decode step runs) launches: kernels by name, and the VM's own instructions
(allocations, shape checks, views), from the module as `tvm.compile` lowers it.

`--decode CACHED` breaks down one decode step instead (the generation-ready graph: one new
token over CACHED cached positions), `--quantize int4` after graphopt's int4 passes (block 32,
embeddings and the tied head too), grouped into classes of kernels (the quantized GEMVs, X's
int8 copy, attention, norms, ...):

    python benchmarks/tvm_kernels.py --model gpt2 --decode 128 --quantize int4

`--vm-floor` times the Relax VM's own work instead: a function of 50 chained kernels (each an
add on 8 floats, with its allocation) and one of 50 reshapes (views), against a function that
returns its input, calls interleaved; per launch and per view in microseconds.

MODEL defaults to the shipped checkpoint (examples/default); the graph is the one
`graphopt optimize` builds for full-sequence forwards (no KV cache), scheduled as
`--backend tvm` schedules it; a shape `BxS+P` (a prefill with P=0, a decode step with S=1)
takes the generation-ready graph instead (KV cache in and out, P cached tokens). Times are CPU time of one thread (`time.thread_time`, TVM's
pool set to one thread as `graphopt.load(..., threads=1)` sets it; each kernel's calls loop
in C++), so that other jobs on a shared machine change them little; they
are a breakdown, not a latency (see benchmarks/tvm_cpu.py for that). `--ort` adds ONNX
Runtime's kernel time per op class for the same graph and inputs at 1 thread, from its
profiler (wall time of each node; on one thread, close to its CPU time).
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# TIR shape expressions as Python: `seq * T.int64(6)`, `(seq + T.int64(3)) // T.int64(4)`
_T = types.SimpleNamespace(int64=int, int32=int, max=max, min=min, Cast=lambda _dtype, v: v)


def _size(expr, dims: dict) -> int:
    return int(eval(str(expr), {"T": _T, **dims}))  # noqa: S307  (our own TIR text, not input)


def cpu_ms(fn, runs: int) -> float:
    fn()
    start = time.thread_time()
    for _ in range(runs):
        fn()
    return (time.thread_time() - start) / runs * 1e3


def kernel_calls(main):
    """The `call_tir` sites of a Relax function, in order."""
    import tvm
    from tvm.relax.analysis import post_order_visit

    call_tir, calls = tvm.ir.Op.get("relax.call_tir"), []
    post_order_visit(main, lambda e: calls.append(e) if getattr(e, "op", None) == call_tir else None)
    return calls


def breakdown(mod, target, dims: dict, runs: int) -> tuple[dict, int]:
    """{kernel name: [CPU ms, calls]} for one forward at `dims`, and how many calls had
    non-tensor arguments (skipped)."""
    import tvm
    from tvm import relax

    dev, built, rows, skipped = tvm.cpu(), {}, collections.defaultdict(lambda: [0.0, 0]), 0

    def tensor(ty):
        shape = [_size(d, dims) for d in ty.shape.values]
        dtype = str(ty.dtype)
        data = np.asarray(np.random.rand(*shape)).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
        return tvm.runtime.tensor(data, device=dev)

    for call in kernel_calls(mod["main"]):
        gv, args = call.args[0], list(call.args[1].fields)
        outs = call.ty_args[0]
        outs = list(outs.fields) if isinstance(outs, relax.TupleType) else [outs]
        try:
            arrays = [tensor(a.ty) for a in args] + [tensor(o) for o in outs]
        except (AttributeError, TypeError):
            skipped += 1
            continue
        extra = [_size(v, dims) for v in call.args[2].values] if len(call.args) > 2 else []
        name = gv.name_hint
        if name not in built:
            built[name] = tvm.compile(mod[gv].with_attr("global_symbol", name), target=target).jit()
        # The calls loop in C++ (time_evaluator): from Python, each call of a kernel costs
        # 3-5 us of argument conversion, more than a decode step's small kernels themselves.
        loop = built[name].time_evaluator(name, dev, number=runs, repeat=1)
        key = re.sub(r"\d+$", "", name)
        rows[key][0] += cpu_ms(lambda: loop(*arrays, *extra), 1) / runs
        rows[key][1] += 1
    return rows, skipped


def in_flow(vm, args: list, runs: int) -> dict:
    """{kernel name: [CPU ms, calls]} per forward as the VM runs them, one after the other in
    one call (each kernel's caches as the kernels before it left them), timed by the VM's
    instrument hook around every call it makes (the VM's own builtins not counted). Each timed
    call also carries ~1 us of the hook's Python."""
    rows, state = collections.defaultdict(lambda: [0.0, 0]), {}

    def hook(_func, name, before, _ret, *_args):
        name = str(name)
        if name.startswith("vm.builtin") or name.startswith("relax."):
            return 0
        if before:
            state["t"] = time.thread_time()
        else:
            row = rows[re.sub(r"\d+$", "", name)]
            row[0] += time.thread_time() - state["t"]
            row[1] += 1
        return 0

    vm["main"](*args)
    vm.set_instrument(hook)
    for _ in range(runs):
        vm["main"](*args)
    vm.set_instrument(lambda *_: 0)
    return {k: [t / runs * 1e3, n // runs] for k, (t, n) in rows.items()}


def launches(mod, target) -> collections.Counter:
    """{"kernel NAME" | "vm OP": calls} in `main` of the module `tvm.compile` would build."""
    import tvm
    from tvm import relax
    from tvm.relax.analysis import post_order_visit

    with target:
        final = relax.pipeline.default_build_pipeline()(mod)
    counts = collections.Counter()

    def visit(e):
        op = getattr(e, "op", None) if isinstance(e, relax.Call) else None
        if isinstance(op, tvm.ir.GlobalVar):
            counts["kernel " + re.sub(r"\d+$", "", op.name_hint)] += 1
        elif isinstance(op, relax.ExternFunc):
            counts["vm " + op.global_symbol] += 1
        elif isinstance(op, tvm.ir.Op):
            counts["vm " + op.name] += 1

    post_order_visit(final["main"], visit)
    return counts


def print_launches(model: str) -> None:
    import graphopt
    import tvm

    from graphopt.backends.tvm.build import cpu_target_spec, optimize_module
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.backends.tvm.quant_panels import vnni_available

    with tempfile.TemporaryDirectory(prefix="tvm_kernels_") as tmp:
        graph = graphopt.optimize(model, Path(tmp) / "ort", backend="ort").graph  # generation-ready
    target = tvm.target.Target(cpu_target_spec())
    counts = launches(optimize_module(lower_graph(prepare(graph, pack_weights=True), pack_weights=True, int8_activations=vnni_available())[0], target), target)
    kernels = sum(n for name, n in counts.items() if name.startswith("kernel "))
    print(f"== one call of the generation-ready graph: {kernels} kernel launches")
    for name, n in counts.most_common():
        print(f"{n:5d}  {name[:90]}")


def print_table(title: str, rows: dict, skipped: int, whole: float, width: int = 70) -> None:
    """{name: [CPU ms, calls]}, heaviest first, then their sum and the whole VM call."""
    total = sum(ms for ms, _ in rows.values())
    print(title)
    for name, (ms, calls) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(f"{name[:width]:{width}s} {calls:4d} calls {ms:8.3f} ms {100 * ms / total:5.1f} %")
    print(f"{'sum of kernels':{width}s} {'':10s} {total:8.3f} ms ({skipped} calls with scalar arguments not timed)")
    print(f"{'whole VM call':{width}s} {'':10s} {whole:8.3f} ms")


KERNEL_CLASSES = (  # (class, pattern on the kernel's name), first match wins
    ("int4/int8 GEMV", r"quant_gemv|quant_linear"), ("X to int8", r"quantize_rows"),
    ("embedding lookup", r"quant_gather|take"), ("matmul (fp32)", r"matmul|dense"),
    ("attention", r"attention|softmax|score|rotary|cache|kv"), ("norm", r"norm|mean|variance|rsqrt"),
    ("layout copies", r"reshape|transpose|concatenate|split|expand_dims|strided_slice|arange"),
    ("element-wise", r"add|multiply|gelu|silu|where|cast|less|greater"),
)


def kernel_class(name: str) -> str:
    return next((c for c, pattern in KERNEL_CLASSES if re.search(pattern, name)), "other")


def decode_breakdown(model: str, cached: int, quantize: str | None, runs: int) -> None:
    """CPU ms of each kernel of one decode step (see the module docstring), by class."""
    import graphopt
    import tvm
    from tvm import relax

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generation import decode_step

    from graphopt.backends.tvm.build import cpu_target_spec, optimize_module
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.backends.tvm.quant_panels import vnni_available
    from graphopt.backends.tvm.runtime import use_cpu_threads

    passes = "quantize-weights{bits=4,block-size=32,embeddings=true}" if quantize == "int4" else None
    with tempfile.TemporaryDirectory(prefix="tvm_kernels_") as tmp:
        ort = graphopt.optimize(model, Path(tmp) / "ort", backend="ort")  # generation-ready
        graph = ort.graph if passes is None else graphopt.optimize(ort.graph, Path(tmp) / "q", passes=passes).graph
        step = decode_step(graphopt.load(Path(tmp) / "ort", threads=1), cached)["step"]
    graph = prepare(graph, pack_weights=True)
    dims = {}
    for v in graph.inputs:  # each symbolic dim's value in this step, from the feeds' shapes
        for axis, d in enumerate(v.type.shape):
            if isinstance(d, str) and d.isidentifier():
                dims[d] = step[v.name].shape[axis]
            elif not isinstance(d, int):  # a composite dim: the lowering names it after the input (Lowerer)
                dims[f"{v.name}_dim{axis}"] = step[v.name].shape[axis]
    mod, params = lower_graph(graph, pack_weights=True, int8_activations=vnni_available())
    target = tvm.target.Target(cpu_target_spec())
    mod = optimize_module(mod, target)
    use_cpu_threads(1)  # not config_threadpool(1, 1): its mode 1 adds ~6 us to every parallel launch
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(step[v.name]), device=dev) for v in graph.inputs]
    args += [tvm.runtime.tensor(np.ascontiguousarray(a), device=dev) for _, a in params]
    rows, skipped = breakdown(mod, target, dims, runs)
    whole = cpu_ms(lambda: vm["main"](*args), runs)
    classes = collections.defaultdict(lambda: [0.0, 0])
    for name, (ms, calls) in rows.items():
        classes[kernel_class(name)][0] += ms
        classes[kernel_class(name)][1] += calls
    print_table(f"== decode step over {cached} cached ({quantize or 'fp32'}): CPU ms, 1 thread", classes, skipped,
                whole, width=30)
    for name, (ms, calls) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"  {name[:70]:70s} {calls:4d} calls {ms:8.3f} ms")


def vm_floor(rounds: int = 2000, chain: int = 50) -> dict[str, float]:
    """{"launch": us, "view": us}: the VM's cost of one kernel launch (with its output's
    allocation) and of one reshape view, from `chain` of each against an empty function."""
    import statistics

    import tvm
    from tvm import relax, tirx

    from graphopt.backends.tvm.build import cpu_target_spec

    n, bb = tirx.Var("n", "int64"), relax.BlockBuilder()
    for name in ("empty", "launches", "views"):
        x = relax.Var("x", relax.TensorType([1, n], "float32"))
        with bb.function(name, [x]):
            with bb.dataflow():
                v = x
                for i in range(chain if name != "empty" else 0):
                    v = bb.emit(relax.op.add(v, relax.const(1.0, "float32")) if name == "launches"
                                else relax.op.reshape(v, [n, 1] if i % 2 == 0 else [1, n]))
                out = bb.emit_output(v)
            bb.emit_func_output(out)
    target = tvm.target.Target(cpu_target_spec())
    with target:  # legalized, not fused: one kernel per add
        mod = relax.transform.LegalizeOps()(bb.get())
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    x = tvm.runtime.tensor(np.ones((1, 8), "float32"))
    times = {name: [] for name in ("empty", "launches", "views")}
    for _ in range(rounds):
        for name, ts in times.items():
            start = time.perf_counter()
            vm[name](x)
            ts.append(time.perf_counter() - start)
    med = {name: statistics.median(ts) * 1e6 for name, ts in times.items()}
    return {"launch": (med["launches"] - med["empty"]) / chain, "view": (med["views"] - med["empty"]) / chain}


def _feed(value, dims: dict) -> np.ndarray:
    """An input for graph input `value` at `dims`: token ids 0, a mask of ones, random floats."""
    shape = [d if isinstance(d, int) else _size(d, dims) for d in value.type.shape]
    dtype = value.type.dtype.np_dtype
    if value.type.dtype.is_float:
        return np.random.default_rng(0).random(shape).astype(dtype)
    return (np.ones if value.name == "attention_mask" else np.zeros)(shape, dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "examples" / "default"))
    ap.add_argument("--shapes", default="1x1,1x128", help="batch x seq, comma-separated")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--launches", action="store_true", help="count what one call launches instead of timing")
    ap.add_argument("--decode", type=int, metavar="CACHED", help="break down one decode step over CACHED positions")
    ap.add_argument("--quantize", choices=["int4"], help="with --decode: after graphopt's int4 passes")
    ap.add_argument("--model", dest="model_option",
                    help="same as MODEL; with --decode also 'gpt2' (GPT-2 small, random weights) or 'gpt2-tiny'")
    ap.add_argument("--ort", action="store_true", help="also ONNX Runtime's time per op class (its profiler)")
    ap.add_argument("--vm-floor", action="store_true", help="time the VM's own cost per launch and per view")
    ap.add_argument("--in-flow", action="store_true",
                    help="also time every kernel as the VM calls it within a forward (cold caches as in use)")
    args = ap.parse_args(argv)
    model = args.model_option or args.model
    if args.vm_floor:
        floor = vm_floor()
        print(f"Relax VM: {floor['launch']:.2f} us per kernel launch (with its allocation), "
              f"{floor['view']:.2f} us per reshape view")
        return 0
    if args.decode is not None:
        with tempfile.TemporaryDirectory(prefix="tvm_kernels_") as tmp:
            if model in ("gpt2", "gpt2-tiny"):
                sys.path.insert(0, str(ROOT / "benchmarks"))
                from quantization import gpt2_folder

                model = str(gpt2_folder(Path(tmp), tiny=model == "gpt2-tiny"))
            decode_breakdown(model, args.decode, args.quantize, args.runs)
        return 0
    args.model = model
    if args.launches:
        print_launches(args.model)
        return 0

    import graphopt
    import tvm
    from tvm import relax

    from graphopt.backends.tvm.build import cpu_target_spec, optimize_module
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.backends.tvm.quant_panels import vnni_available
    from graphopt.backends.tvm.runtime import use_cpu_threads

    shapes = args.shapes.split(",")
    with_cache = any("+" in s for s in shapes)
    if with_cache and not all("+" in s for s in shapes):
        ap.error("--shapes: give every shape a cache length (BxS+P) or none")
    tmp = tempfile.TemporaryDirectory(prefix="tvm_kernels_")
    ort_model = Path(tmp.name) / "ort" / "model.onnx"
    graph = graphopt.optimize(args.model, ort_model.parent, backend="ort", kv_cache=with_cache).graph
    mod, params = lower_graph(prepare(graph, pack_weights=True), pack_weights=True, int8_activations=vnni_available())
    target = tvm.target.Target(cpu_target_spec())
    mod = optimize_module(mod, target)
    use_cpu_threads(1)  # not config_threadpool(1, 1): its mode 1 adds ~6 us to every parallel launch
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), dev)
    weights = [tvm.runtime.tensor(np.ascontiguousarray(a), device=dev) for _, a in params]
    for shape in shapes:
        batch, seq = (int(v) for v in shape.split("+")[0].split("x"))
        past = int(shape.split("+")[1]) if with_cache else 0
        dims = {"batch": batch, "seq": seq, "past_seq": past}
        for v in graph.inputs:  # an expression dim of an input (`past_seq + seq`) is a symbol of its own
            dims.update({f"{v.name}_dim{axis}": _size(d, dims) for axis, d in enumerate(v.type.shape)
                         if isinstance(d, str) and not d.isidentifier()})
        rows, skipped = breakdown(mod, target, dims, args.runs)
        feeds = [tvm.runtime.tensor(_feed(v, dims), device=dev) for v in graph.inputs]
        whole = cpu_ms(lambda: vm["main"](*feeds, *weights), args.runs)
        print_table(f"== {shape}: CPU ms per forward, 1 thread", rows, skipped, whole)
        if args.in_flow:
            rows = in_flow(vm, [*feeds, *weights], args.runs)
            print_table(f"-- {shape}: the same kernels timed in the flow (the VM's hook around each call)",
                        rows, 0, whole)
        if args.ort:
            print_ort_classes(ort_model, {v.name: _feed(v, dims) for v in graph.inputs}, args.runs, Path(tmp.name))
    tmp.cleanup()
    return 0


def print_ort_classes(model: Path, feeds: dict, runs: int, work: Path) -> None:
    """ONNX Runtime's kernel time per op class on the same graph and inputs, 1 thread, from
    its profiler (the median of each node over `runs` runs, benchmarks/decode_profile.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_profile import breakdown as ort_breakdown, profiled_session

    sess = profiled_session(model, 1, work / "ort_profile")
    for _ in range(2 + runs):
        sess.run(None, feeds)
    result = ort_breakdown(sess.end_profiling(), 2)
    total = result["kernel_sum_ms"]
    print("-- ONNX Runtime, same graph and inputs: kernel ms per run, 1 thread (profiler)")
    for name, c in result["op_classes"].items():
        print(f"{name[:70]:70s} {c['nodes']:4d} nodes {c['us'] / 1e3:8.3f} ms {100 * c['us'] / 1e3 / total:5.1f} %")
    print(f"{'sum of kernels':70s} {'':10s} {total:8.3f} ms")
    print(f"{'model_run (p50)':70s} {'':10s} {result['model_run_p50_ms']:8.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
