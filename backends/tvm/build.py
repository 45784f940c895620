"""Targets and the Relax -> machine code pipeline.

CPU: `{"kind": "llvm", "mcpu": <this machine's CPU>, "num-cores": N}` (TVM 0.27 rejects
`"llvm -mcpu=..."` strings). `tvm.compile` alone does not fuse, so the pipeline is the
"zero" pipeline (legalize, fold constants, fuse), then schedules -- dlight's CPU rules for
GEMV and reductions and graphopt's own CPU rules (`schedules.py`) -- then TVM's default
build.

CUDA: `{"kind": "cuda", "arch": "sm_XX"}` with an LLVM host; dlight's GPU rules (Matmul,
GEMV, Reduction, GeneralReduction, Fallback) schedule every kernel. The CUDA source goes
through NVRTC (`cuda-bindings`) when it is installed, else through `nvcc`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import shutil
from pathlib import Path

from graphopt.errors import UserError
from graphopt.backends.tvm import schedules, schedules_quant

DEFAULT_CUDA_ARCH = "sm_80"  # when no GPU is here to ask (cross-compiling)
DB_FILES = ("database_workload.json", "database_tuning_record.json")  # a MetaSchedule JSONDatabase


def system_cpu() -> str:
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def cpu_target_spec(num_cores: int | None = None) -> dict:
    return {"kind": "llvm", "mcpu": system_cpu(), "num-cores": int(num_cores or os.cpu_count() or 1)}


def cuda_target_spec(arch: str | None = None) -> dict:
    import tvm

    if arch is None:
        dev = tvm.cuda(0)
        arch = f"sm_{dev.compute_version.replace('.', '')}" if dev.exist else DEFAULT_CUDA_ARCH
    return {"kind": "cuda", "arch": arch, "host": cpu_target_spec()}


def target_spec(target: str, options: dict) -> dict:
    if target == "cpu":
        return cpu_target_spec(options.get("num_cores"))
    return cuda_target_spec(options.get("cuda_arch"))


def cuda_compiler() -> str | None:
    """How TVM will compile CUDA source here: "nvrtc", "nvcc", or None (neither)."""
    try:
        import cuda.bindings.nvrtc  # noqa: F401

        return "nvrtc"
    except ImportError:
        pass
    if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "nvcc"
    return None


@contextlib.contextmanager
def _cuda_compile_mode(mode: str):
    # TVM's CUDA callback reads the compiler from this variable at build time.
    old = os.environ.get("TVM_CUDA_COMPILE_MODE")
    os.environ["TVM_CUDA_COMPILE_MODE"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)
        else:
            os.environ["TVM_CUDA_COMPILE_MODE"] = old


_tuned: contextvars.ContextVar = contextvars.ContextVar("graphopt_tvm_tuned", default=None)


@contextlib.contextmanager
def tuned(record: "Tuned"):
    """Builds inside this block (CPU) apply the tuning database of `record`: its buckets get
    their own static copy of `main` whose kernels come from the database where it has them
    (graphopt.backends.tvm.tuning makes the records); `record.kernels` then says which did."""
    token = _tuned.set(record)
    try:
        yield record
    finally:
        _tuned.reset(token)


def optimize_module(mod, target):
    """Relax-level passes and schedules for `target`; returns the module ready to build."""
    from tvm import relax
    from tvm.s_tir import dlight as dl

    record = _tuned.get()
    with target:
        if record is not None and target.kind.name == "llvm":
            buckets = winning_buckets(mod, record.buckets, record.folder) if record.only_winning else record.buckets
            record.dispatched = sorted(buckets)
            mod = with_buckets(mod, buckets)
            hand = {gv.name_hint for gv, f in mod.functions.items() if _is_scheduled(f)}
            # The zero pipeline applies the current database: only the records that beat the
            # default schedule of their kernel, measured side by side (`kept_database`).
            with kept_database(record.folder):
                mod = relax.get_pipeline("zero")(mod)
            record.kernels = kernel_sources(mod, hand)
        else:
            mod = relax.get_pipeline("zero")(mod)
        if target.kind.name == "cuda":
            mod = dl.ApplyDefaultSchedule(*schedules_quant.rules())(mod)  # the dequantize-fused kernels
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        else:
            mod = default_schedules(mod)
    return mod


def default_schedules(mod):
    """`mod`'s kernels not yet scheduled, scheduled by the CPU rules (inside a target): the
    dequantize-fused kernels, then graphopt's and dlight's CPU rules."""
    from tvm.s_tir import dlight as dl

    mod = dl.ApplyDefaultSchedule(*schedules_quant.rules())(mod)
    return dl.ApplyDefaultSchedule(*schedules.cpu_rules())(mod)


def build(mod, spec: dict):
    """Compile a lowered Relax module for the target `spec`; returns the VM executable."""
    import tvm

    target = tvm.target.Target(spec)
    mod = optimize_module(mod, target)
    if target.kind.name == "cuda":
        mode = cuda_compiler()
        if mode is None:
            raise UserError("the cuda target needs nvcc (the CUDA toolkit) or NVRTC (pip install cuda-bindings)")
        with _cuda_compile_mode(mode):
            return tvm.compile(mod, target=target)
    return tvm.compile(mod, target=target)


# -- tuned builds: each bucket dispatched to its own static copy of main ------------------------


@dataclasses.dataclass
class Tuned:
    """What a build applies: the database folder and each bucket's static sizes; after the
    build, `kernels` says which came from the database and which from the default schedules."""

    folder: Path
    buckets: dict[str, dict[str, int]]  # label -> symbolic var -> size
    kernels: dict | None = None
    # Dispatch only the buckets where a record won (`winning_buckets`): for a caller that did
    # not tune these shapes itself (graphopt compare); tuning passes the buckets it settled.
    only_winning: bool = False
    dispatched: list[str] | None = None  # after the build: the labels of the buckets dispatched


def _deep_copy(func, mod):
    """`func` with every variable a new object (a Relax variable is defined in one function
    only). relax.utils.copy_with_new_vars fails on a KV-cache main ("no FInferType for
    prim.if_then_else"); a JSON round trip copies without re-inferring anything. The round
    trip also makes new global variables, so the kernels `func` calls (`call_tir` of the
    lowering's own PrimFuncs) are pointed back at `mod`'s."""
    import tvm
    from tvm import relax

    copy = tvm.ir.load_json(tvm.ir.save_json(func))
    gvs = {gv.name_hint: gv for gv in mod.get_global_vars()}

    @relax.expr_functor.mutator
    class _Rebind(relax.PyExprMutator):
        def visit_global_var_(self, op):
            return gvs.get(op.name_hint, op)

    return _Rebind(mod).visit_expr(copy)


def _static_kernels(func, mod, bb, suffix: str):
    """`func` (a copy of `main` whose shapes are now static) calling static copies of the
    lowering's own PrimFuncs (pre-packed matmuls, named `<kernel>_<suffix>`, added through
    `bb`): FuseTIR refuses to fuse a symbolic PrimFunc called with static tensors, and
    MetaSchedule tunes static kernels only. Hand-scheduled kernels (`tirx.is_scheduled`: the
    fused attention, the int4 panels) stay as they are: they read their sizes at run time."""
    import tvm
    from tvm import relax, tirx

    call_tir = tvm.ir.Op.get("relax.call_tir")
    made: dict = {}

    def static_shape(ty):
        shape = getattr(ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None or not all(isinstance(d, tirx.IntImm) for d in values):
            return None
        return [tirx.IntImm("int64", int(d)) for d in values]

    @relax.expr_functor.mutator
    class _Static(relax.PyExprMutator):
        def visit_call_(self, op):
            call = self.visit_expr_post_order(op)
            if not call.op.same_as(call_tir) or len(call.args) != 2:
                return call  # (a call with tir_vars passes sizes as scalars: left symbolic)
            gv = call.args[0]
            kernel = mod[gv] if gv in mod.get_global_vars() else None
            if not isinstance(kernel, tirx.PrimFunc) or _is_scheduled(kernel):
                return call
            out = call.ty_args[0]
            types = [a.ty for a in call.args[1].fields] + (list(out.fields) if isinstance(out, relax.TupleType) else [out])
            shapes = [static_shape(t) for t in types]
            if len(types) != len(kernel.params) or any(s is None for s in shapes):
                return call
            key = (gv.name_hint, tuple(tuple(int(d) for d in s) for s in shapes))
            if key not in made:
                buffers = {p: tirx.decl_buffer(s, p.dtype, p.name) for p, s in zip(kernel.params, shapes)}
                made[key] = bb.add_func(kernel.specialize(buffers), f"{gv.name_hint}_{suffix}")
            return relax.Call(call.op, [made[key], call.args[1]], call.attrs, call.ty_args, call.span)

    return _Static(mod).visit_expr(func)


def _is_scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def static_module(mod, binding: dict[str, int]):
    """An IRModule of `mod`'s `main` at the static sizes `binding` (symbolic var name -> size)
    with static copies of the lowering's PrimFuncs it calls: what tuning extracts its kernels
    from, the same kernels a bucket of `with_buckets` builds."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}))
    static = _static_kernels(_deep_copy(mod["main"].bind_symbolic_vars(binding), mod), mod, bb, "static")
    bb.add_func(static, "main")
    out = bb.get()
    return relax.transform.DeadCodeElimination(["main"])(out)


def with_buckets(mod, buckets: dict[str, dict[str, int]]):
    """`mod` whose `main` calls `main` specialized to a bucket when the inputs have its shapes
    (checked in order), else the symbolic `main` (now `main_any`)."""
    from tvm import relax, tirx

    if not buckets:  # (tuning dispatches no bucket where none of its records won: as untuned)
        return mod
    main = mod["main"]
    fresh = _deep_copy(main, mod)  # the dispatcher's parameters and symbolic vars are its own
    known = {v.name: v for v in relax.analysis.defined_symbolic_vars(fresh)}
    bb = relax.BlockBuilder(mod)
    any_gv = bb.add_func(main.without_attr("global_symbol"), "main_any")
    params, ret = [relax.Var(p.name, p.ty) for p in fresh.params], fresh.ret_ty

    def bound(var, value):  # `var = value; var` as a branch of an If
        return relax.SeqExpr([relax.BindingBlock([relax.VarBinding(var, value)])], var)

    body = bound(relax.Var("result", ret), relax.Call(any_gv, params))
    for label, binding in reversed(list(buckets.items())):
        if set(binding) - set(known):
            continue  # a bucket of another graph's symbols: nothing to dispatch to
        name = label.replace("+", "_past")
        static = _static_kernels(_deep_copy(main.bind_symbolic_vars(binding), mod), mod, bb, name)
        static = static.without_attr("global_symbol")
        gv = bb.add_func(static, f"main_{name}")
        cond = tirx.const(True, "bool")
        for name, size in binding.items():
            cond = tirx.all(cond, known[name] == size)
        casts = [relax.Var(p.name, q.ty) for p, q in zip(params, static.params)]
        result = relax.Var("result", ret)
        branch = relax.SeqExpr([relax.BindingBlock(
            [relax.MatchCast(c, p, c.ty) for c, p in zip(casts, params)]
            + [relax.MatchCast(result, relax.Call(gv, casts), ret)])], result)
        body = bound(relax.Var("result", ret), relax.If(relax.prim_value(cond), branch, body))
    dispatcher = bb.normalize(relax.Function(params, body, ret, main.is_pure, main.attrs))
    bb.update_func(mod.get_global_var("main"), dispatcher)
    out = bb.get()
    return out


def winning_buckets(mod, buckets: dict[str, dict[str, int]], folder: Path) -> dict[str, dict[str, int]]:
    """The buckets of `buckets` (inside a target) at least one of whose kernels has a record
    that beat its default schedule (KEPT). A bucket with none would run static copies of the
    default schedules instead of the symbolic `main`: no faster, and measured slower at the
    decode step."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    import tvm

    won = {k for k, v in read_kept(folder).items() if v.get("keep") == "tuned"}
    known = {v.name for v in relax.analysis.defined_symbolic_vars(mod["main"])}
    out = {}
    for label, binding in buckets.items() if won else ():
        if set(binding) - known:
            continue  # a bucket of another graph's symbols (as `with_buckets` skips it)
        static = relax.get_pipeline("zero")(static_module(mod, binding))
        tasks = ms.relax_integration.extract_tasks(static, tvm.target.Target.current())
        if any(workload_key(task.dispatched[0]) in won for task in tasks):
            out[label] = binding
    return out


def kernel_sources(mod, hand: set[str]) -> dict:
    """Which kernels of a built module the database scheduled, how many got the default
    schedules, and which came scheduled by hand from the lowering (`hand`: their names)."""
    from tvm import tirx

    tuned, default, kept = [], 0, []
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            if gv.name_hint in hand:
                kept.append(gv.name_hint)
            elif _is_scheduled(func):
                tuned.append(gv.name_hint)
            else:
                default += 1
    return {"from_database": sorted(tuned), "default_schedules": default, "hand_scheduled": sorted(kept)}


KEPT = "kept.json"  # per tuned kernel: its best record and its default schedule timed side by side
KEEP_MARGIN = 0.97  # a record is kept when it takes at most this fraction of the default's time


def workload_key(mod) -> str:
    """A kernel's key in KEPT: its structural hash, as the database matches workloads."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def read_kept(folder: Path) -> dict:
    path = Path(folder) / KEPT
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # cut short by a kill before its atomic replace existed: settle again
        return {}


def kept_database(folder: Path):
    """A database of the best record of each kernel in the database in `folder` that beat the
    kernel's default schedule (KEPT says which); the others build with the default schedules."""
    from tvm.s_tir import meta_schedule as ms

    kept = {k for k, v in read_kept(folder).items() if v.get("keep") == "tuned"}
    db, out, done = open_database(folder), ms.database.MemoryDatabase(), set()
    for rec in db.get_all_tuning_records():
        key = workload_key(rec.workload.mod)
        if key in kept and key not in done:
            done.add(key)
            best = db.get_top_k(rec.workload, 1)[0]
            out.commit_tuning_record(ms.database.TuningRecord(best.trace, out.commit_workload(rec.workload.mod),
                                                              best.run_secs, best.target, best.args_info))
    return out


def open_database(folder: Path):
    """The JSONDatabase in `folder`; a last line cut short by a kill is dropped first."""
    from tvm.s_tir import meta_schedule as ms

    for name in DB_FILES:
        path = folder / name
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                path.write_bytes(data[: data.rfind(b"\n") + 1])
    return ms.database.JSONDatabase(work_dir=str(folder))
