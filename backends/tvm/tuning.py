"""MetaSchedule tuning that is kept: static-shape buckets, a JSON database on disk, a wall-clock
budget, and the tuned kernels applied at build time.

The artifact's `main` is symbolic in `batch`, `seq` and `past_seq`; MetaSchedule tunes
static shapes only. So tuning works on *buckets* (`1x128`: batch 1, seq 128; `1x1+128`: one
token after 128 cached ones): `main` specialized to the bucket's shapes, fused as the build
fuses it (the "zero" pipeline), its kernels extracted as MetaSchedule tasks.

    tune(graph, spec, buckets, minutes, db_dir)   -> what was tuned (a JSON-able summary)
    save_tuned(graph, outdir, target, options, ...) -> tune, then save the artifact built with
                                                     `build.tuned(...)`: each bucket dispatched
                                                     to its tuned copy of `main`

The database (`JSONDatabase`: one line per workload, one per measured record, appended as
each is measured) lives in `<db_dir>/<target hash>/`; a workload is a kernel's structural
hash, so a second run on the same shapes finds its records and tunes nothing. A run stopped
by Ctrl-C, SIGTERM or its budget keeps every record already measured.

At build time `main` becomes a dispatcher: `if batch == 1 and seq == 128 and ...` calls
`main` specialized to that bucket (its kernels from the database where it has them, the
default schedules for the rest), otherwise the symbolic `main` with the default schedules.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from graphopt import progress as progress_lines
from graphopt.errors import UserError
from graphopt.passes.kvcache.rewrite import META_MAX_POSITIONS
from graphopt.ir import Graph
from graphopt.backends.tvm import build, runtime
from graphopt.backends.tvm.lowering import lower_graph, prepare

DEFAULT_SHAPES = "1x128,4x128,1x1+128"  # the workloads: prefill 1x128 and 4x128, one decode step
TRIALS_PER_KERNEL = 64  # a kernel with this many measured records is done; fewer, and a later run goes on
TRIALS_PER_ROUND = 16  # candidates built and measured per round: the budget is checked after each
BUILD_TIMEOUT_S, RUN_TIMEOUT_S = 120, 60  # per candidate: generous, for a machine busy with other work


@dataclass(frozen=True)
class Bucket:
    """A static shape to tune: batch x seq, after `past` cached tokens."""

    batch: int
    seq: int
    past: int = 0

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq}" + (f"+{self.past}" if self.past else "")

    def dims(self) -> dict[str, int]:
        return {"batch": self.batch, "seq": self.seq, "past_seq": self.past}


MAX_TUNED_SIZE = 1 << 20  # a batch or a sequence no model here reaches; past it, TVM's int64 dims overflow


def parse_shapes(text: str, option: str = "--tune-shapes") -> list[Bucket]:
    """`1x128,4x128,1x1+128` -> buckets (BATCHxSEQ[+PAST], PAST the cached tokens)."""
    out = []
    for item in (s.strip() for s in str(text).split(",")):
        head, plus, past = item.partition("+")
        parts = head.split("x")
        numeral = lambda p: p.isascii() and p.isdigit()  # noqa: E731
        if len(parts) != 2 or not all(numeral(p) and int(p) > 0 for p in parts) or (plus and not numeral(past)):
            raise UserError(f"{option} {item!r}: expected BATCHxSEQ or BATCHxSEQ+PAST, e.g. 1x128 or 1x1+128")
        bucket = Bucket(int(parts[0]), int(parts[1]), int(past or 0))
        if max(bucket.batch, bucket.seq + bucket.past) > MAX_TUNED_SIZE:
            raise UserError(f"{option} {item!r}: a size past {MAX_TUNED_SIZE:,} (batch, and positions seq + past)")
        if bucket not in out:
            out.append(bucket)
    return out


def check_minutes(minutes: float, option: str = "--tune-minutes") -> float:
    if not minutes > 0 or minutes != minutes or minutes == float("inf"):
        raise UserError(f"{option} {minutes}: expected a positive number of minutes")
    return float(minutes)


def target_key(spec: dict) -> str:
    """A short stable name for a target (its kind, CPU or arch, cores): the database's folder."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def default_db_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt" / "tvm-tuning"


def database_dir(root: str | os.PathLike | None, spec: dict, *, create: bool) -> Path:
    """`<root>/<target hash>/` (root: --tune-db, default the user's cache); made writable when
    `create`, else refused in one line."""
    root = Path(root) if root is not None else default_db_root()
    folder = root / target_key(spec)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".graphopt-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--tune-db {root}: cannot write the tuning database there ({e.strerror or e})") from None
        (folder / "target.json").write_text(json.dumps(spec, indent=2) + "\n")
    return folder


RUNS = "runs.jsonl"  # one line per tuning run into the folder: what it tuned and for how long


def record_count(folder: Path) -> int:
    """Measured records in the database in `folder` (0 where there is none)."""
    path = folder / build.DB_FILES[1]
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def tuning_minutes(folder: Path) -> float:
    """Minutes spent tuning into the database in `folder`, over every run."""
    path = folder / RUNS
    if not path.is_file():
        return 0.0
    total = 0.0
    for line in path.read_text().splitlines():
        try:
            total += float(json.loads(line)["minutes"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return total


# -- buckets: symbolic dims -> static values ------------------------------------------------


def _eval_dim(dim, dims: dict[str, int], where: str) -> int:
    """A graph dim (an int, a symbol, or an expression such as "past_seq + seq") at `dims`."""
    if isinstance(dim, int):
        return dim
    text = str(dim)

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return _symbol(node.id, dims, where)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = value(node.left), value(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        raise UserError(f"{where}: cannot give its dim {text!r} a static size for tuning")

    try:
        return value(ast.parse(text, mode="eval"))
    except SyntaxError:
        raise UserError(f"{where}: cannot give its dim {text!r} a static size for tuning") from None


def _symbol(name: str, dims: dict[str, int], where: str) -> int:
    if name in dims:
        return dims[name]
    low = name.lower()  # other exporters' spellings: batch_size, sequence_length, past_sequence_length
    for key, words in (("past_seq", ("past",)), ("batch", ("batch",)), ("seq", ("seq", "len"))):
        if any(w in low for w in words):
            return dims[key]
    raise UserError(f"{where}: its dim {name!r} is not batch, seq or past_seq; tuning cannot size it")


def bindings(graph: Graph, bucket: Bucket) -> dict[str, int]:
    """The symbolic vars of `graph` lowered to Relax -> their sizes at `bucket`. The lowering
    names a dim that is a symbol by the symbol, and any other (an expression such as
    "past_seq + seq") `<input>_dim<i>` (lowering.Lowerer._input_var)."""
    out: dict[str, int] = {}
    for v in graph.inputs:
        if v.is_initializer or v.type is None or v.type.shape is None:
            continue
        for i, dim in enumerate(v.type.shape):
            if isinstance(dim, int):
                continue
            name = dim if isinstance(dim, str) and dim.isidentifier() else f"{v.name}_dim{i}"
            if name not in out:
                size = _eval_dim(dim, bucket.dims(), f"input {v.name!r}")
                if size < 0 or (size == 0 and i == 0):
                    raise UserError(f"bucket {bucket.label}: input {v.name!r} gets size {size} in dim {i}")
                out[name] = size
    return out


def specialize(mod, binding: dict[str, int]):
    """`mod` with `main` at static shapes (and static copies of the pre-packed matmuls),
    fused as the build fuses a bucket."""
    from tvm import relax

    return relax.get_pipeline("zero")(build.static_module(mod, binding))


# -- tuning ------------------------------------------------------------------------------------


def _import_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin (MetaSchedule's TuneContext does) with a cheap
    `inspect.stack`. Its ~100 TVMScript functions each call `inspect.stack()`, which looks up
    the module of every frame through every loaded module: with torch and onnx loaded that
    took over two minutes here. The parser reads only frames, line numbers and lines."""
    import inspect
    import linecache
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def stack(context: int = 1):
        frames, f = [], sys._getframe(1)
        while f is not None:
            line = linecache.getline(f.f_code.co_filename, f.f_lineno)
            frames.append(inspect.FrameInfo(f, f.f_code.co_filename, f.f_lineno, f.f_code.co_name,
                                            [line] if line else None, 0))
            f = f.f_back
        return frames

    slow, inspect.stack = inspect.stack, stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = slow


def _flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001  (a kernel the estimator does not know: last in line)
        return 0.0


def _hand_scheduled(task_mod) -> bool:
    attrs = task_mod["main"].attrs
    return attrs is not None and bool(attrs.get("tirx.is_scheduled", False))


def _measured(db, task_mod, most: int) -> int:
    """How many measured records (up to `most`) the database holds for a kernel."""
    if not db.has_workload(task_mod):
        return 0
    return len(db.get_top_k(db.commit_workload(task_mod), most))


def tune(graph: Graph, spec: dict, buckets: list[Bucket], minutes: float, db_root: str | os.PathLike | None,
         progress=None, *, trials_per_kernel: int = TRIALS_PER_KERNEL,
         options: dict | None = None) -> tuple[dict, "build.Tuned"]:
    """Tune `graph`'s kernels at `buckets` for the target `spec` for at most `minutes` (wall),
    into the database under `db_root`; returns what it did (for the manifest) and what a
    build applies (`build.tuned`)."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    progress = progress or (lambda msg: None)
    start = time.monotonic()
    _import_tensor_intrinsics()
    deadline = start + 60.0 * check_minutes(minutes)
    folder = database_dir(db_root, spec, create=True)
    target = tvm.target.Target(spec)
    cores = int(spec.get("num-cores") or os.cpu_count() or 1)
    # The build's own lowering (pre-packed weights, the hand-written kernels): the kernels tuned
    # are the kernels built. The hand-scheduled ones (fused attention, int4 panels) are kept as they are.
    flags = runtime.lowering_flags("cpu", runtime.check_options(options))
    graph = prepare(graph, flags["pack_weights"])
    mod, _ = lower_graph(graph, **flags)
    db = build.open_database(folder)

    tasks, seen, per_bucket, static, keys = [], set(), {}, {}, {}
    for bucket in buckets:
        binding = bindings(graph, bucket)
        if binding in static.values():
            continue  # the same static shapes as an earlier bucket (1x1+128 without a KV cache is 1x1)
        static[bucket.label] = binding
        progress_lines.status(f"tuning: extracting the kernels at {bucket.label}")
        with target:
            extracted = ms.relax_integration.extract_tasks(specialize(mod, binding), target)
        per_bucket[bucket.label] = len(extracted)
        keys[bucket.label] = set()
        for task in extracted:
            if _hand_scheduled(task.dispatched[0]):
                continue
            keys[bucket.label].add(build.workload_key(task.dispatched[0]))
            key = tvm_ffi.structural_hash(task.dispatched[0])
            if key not in seen:
                seen.add(key)
                tasks.append(task)
    before = {id(t): _measured(db, t.dispatched[0], trials_per_kernel) for t in tasks}
    todo = [t for t in tasks if before[id(t)] < trials_per_kernel]
    # The budget goes to the kernels that cost the most first, one kernel at a time: given all
    # at once, MetaSchedule builds a first round of every kernel before it measures (and
    # records) any, which on 2 cores took more than 8 minutes for the shipped model's 71
    # kernels and kept nothing.
    todo.sort(key=lambda t: -_flops(t.dispatched[0]) * t.weight)
    summary = {"database": str(folder), "target_key": folder.name, "buckets": static,
               "budget_minutes": minutes, "kernels": len(tasks), "kernels_per_bucket": per_bucket,
               "kernels_already_tuned": len(tasks) - len(todo), "kernels_tuned_now": 0, "trials": 0,
               "stopped": "nothing to tune" if not todo else "finished"}
    if todo and time.monotonic() >= deadline:  # the extraction alone spent the budget
        summary["stopped"] = "budget"
    elif todo:
        for i, task in enumerate(todo):
            if time.monotonic() >= deadline:
                summary["stopped"] = "budget"
                break
            progress_lines.status(f"tuning: kernel {i + 1} of {len(todo)}, {summary['trials']} trials so far")
            summary["trials"] += _run([task], target, cores, folder, db, deadline, summary, trials_per_kernel)
            if summary["stopped"] == "budget":
                break
        summary["kernels_tuned_now"] = sum(1 for t in todo if _measured(db, t.dispatched[0], trials_per_kernel)
                                           > before[id(t)])
    # Per kernel, the faster of its best record and its default schedule, timed side by side
    # (after the budget too: a record that is not settled is not built).
    kept = settle(tasks, db, target, folder, cores)
    won = {k for k, v in kept.items() if v.get("keep") == "tuned"}
    summary["kernels_kept_tuned"] = sum(1 for t in tasks if build.workload_key(t.dispatched[0]) in won)
    # A bucket none of whose records won is not dispatched at all: its shapes run the symbolic
    # `main`, exactly as untuned (its static copy with the default schedules gains nothing
    # measured, and was seen slower at the decode step).
    dispatched = {label: binding for label, binding in static.items() if keys[label] & won}
    summary["buckets_dispatched"] = sorted(dispatched)
    summary["minutes"] = round((time.monotonic() - start) / 60.0, 3)
    summary["records"] = len(db)
    with (folder / RUNS).open("a") as f:
        f.write(json.dumps({"minutes": summary["minutes"], "trials": summary["trials"], "buckets": static,
                            "stopped": summary["stopped"], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                + "\n")
    progress_lines.clear()
    progress(f"tuned {summary['kernels_tuned_now']} of {summary['kernels']} kernels ({summary['trials']} trials, "
             f"{summary['kernels_already_tuned']} found tuned) in {summary['minutes']:.1f} min; database {folder}")
    return summary, build.Tuned(folder, dispatched)


def settle(tasks, db, target, folder: Path, cores: int) -> dict:
    """For each kernel in `tasks` with a record: its best record and its default schedule
    (`build.default_schedules`: what an untuned build runs) built and timed side by side by
    MetaSchedule's own builder and runner, twice in the order default, tuned, tuned, default,
    the lower time of each kept; the record is kept (build.KEPT) only when it takes at most
    build.KEEP_MARGIN of the default's time. A kernel settled for its current best record is
    not timed again. Returns KEPT's content."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    kept = build.read_kept(folder)
    pairs = []
    for task in tasks:
        mod = task.dispatched[0]
        top = db.get_top_k(db.commit_workload(mod), 1) if db.has_workload(mod) else []
        if not top:
            continue
        key, record_s = build.workload_key(mod), _mean(top[0].run_secs)
        if kept.get(key, {}).get("record_s") == record_s:
            continue
        tuned = db.query_schedule(mod, task.target, "main")  # (query_ir_module answers None in TVM 0.27)
        if tuned is not None:
            with target:  # (on a copy: the rules changed `mod` in place, and the database then no longer knew it)
                default = build.default_schedules(tvm.ir.load_json(tvm.ir.save_json(mod)))
            pairs.append((task.task_name, key, record_s, default, tuned.mod))
    if not pairs:
        return kept
    progress_lines.status(f"tuning: timing {len(pairs)} tuned kernels against their default schedules")
    builder = ms.builder.LocalBuilder(max_workers=cores, timeout_sec=BUILD_TIMEOUT_S,
                                      initializer=_import_tensor_intrinsics)
    runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, initializer=_import_tensor_intrinsics)
    mods = [m for *_, default, tuned in pairs for m in (default, tuned)]
    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    for i, (name, key, record_s, default, tuned) in enumerate(pairs):
        d, t = built[2 * i], built[2 * i + 1]
        times = {"default": None, "tuned": None}
        if d.error_msg is None and t.error_msg is None:
            inputs = {which: ms.runner.RunnerInput(b.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(m["main"]))
                      for which, b, m in (("default", d, default), ("tuned", t, tuned))}
            results = [(which, runner.run([inputs[which]])[0].result())
                       for which in ("default", "tuned", "tuned", "default")]
            for which, r in results:
                if r.error_msg is None:
                    s = _mean(r.run_secs)
                    times[which] = s if times[which] is None else min(times[which], s)
        d_s, t_s = times["default"], times["tuned"]
        keep = "tuned" if d_s is not None and t_s is not None and t_s <= build.KEEP_MARGIN * d_s else "default"
        kept[key] = {"kernel": name, "record_s": record_s, "default_s": d_s, "tuned_s": t_s, "keep": keep}
    for b in built:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    tmp = folder / (build.KEPT + ".tmp")
    tmp.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / build.KEPT)  # whole or not at all: a kill leaves the old one
    return kept


def _mean(run_secs) -> float:
    values = [float(v) for v in run_secs or []]
    return sum(values) / len(values) if values else float("inf")


class _BudgetSpent(Exception):
    """Raised by the measure callback to end tuning when the budget is spent."""


def _run(todo, target, cores: int, folder: Path, db, deadline: float, summary: dict, trials_per_kernel: int) -> int:
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import fork_seed

    count = {"trials": 0}

    @derived_object
    class Budget(ms.measure_callback.PyMeasureCallback):
        """Progress after each measured round; tuning ends here too once the budget is spent."""

        def apply(self, scheduler, task_id, candidates, builder_results, runner_results):
            count["trials"] += len(candidates)
            left = (deadline - time.monotonic()) / 60.0
            progress_lines.status(f"tuning: {count['trials']} trials of this kernel, "
                                  f"{max(left, 0):.1f} min left")
            if left <= 0:  # this round's records are in the database already (AddToDatabase ran first)
                count["spent"] = True
                raise _BudgetSpent()

    @derived_object
    class BudgetBuilder(ms.builder.PyBuilder):
        """The local builder, refusing to start a round once the budget is spent: MetaSchedule
        builds the first round of every kernel before it measures any, so the callback above
        alone would let a model with many kernels run far past its budget."""

        def __init__(self):
            super().__init__()
            self.local = ms.builder.LocalBuilder(max_workers=cores, timeout_sec=BUILD_TIMEOUT_S,
                                                 initializer=_import_tensor_intrinsics)

        def build(self, build_inputs):
            if time.monotonic() >= deadline:
                count["spent"] = True
                raise _BudgetSpent()
            return self.local.build(build_inputs)

    # (not relax_integration.extracted_tasks_to_tune_contexts: it writes a log file per task into
    # the database's folder and rebuilds the logging config, which fails on a second call under
    # pytest's log capture)
    logger = logging.getLogger("graphopt.tvm.tuning")
    contexts = [ms.TuneContext(task.dispatched[0], target=task.target, space_generator="post-order-apply",
                               search_strategy="evolutionary", task_name=task.task_name, rand_state=seed,
                               num_threads=cores, logger=logger).clone()
                for task, seed in zip(todo, fork_seed(0, n=len(todo)))]
    weights = [float(task.weight) for task in todo]
    # Ctrl-C or SIGTERM inside a Python callback comes back out of TVM's C++ loop as a RuntimeError;
    # the handlers note which signal it was, to raise it again as itself (the records measured so
    # far are in the database: it appends each one as it is measured).
    caught: dict = {}

    def interrupt(signum, frame):
        caught["signum"] = signum
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(folder),
                      max_trials_global=trials_per_kernel * len(contexts), max_trials_per_task=trials_per_kernel,
                      num_trials_per_iter=min(TRIALS_PER_ROUND, trials_per_kernel), database=db,
                      # (the workers import the tensor intrinsics too: 90 s each on a busy machine without this)
                      builder=BudgetBuilder(),
                      runner=ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, initializer=_import_tensor_intrinsics),
                      cost_model=ms.cost_model.XGBModel(num_tuning_cores=cores),
                      measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), Budget()])
    except Exception:  # noqa: BLE001  (the budget's stop comes back through TVM's C++ loop too)
        if "signum" in caught:
            raise KeyboardInterrupt if caught["signum"] == signal.SIGINT else SystemExit(128 + caught["signum"])
        if not count.get("spent"):  # (it arrives as a RuntimeError: the flag says it was ours)
            raise
        summary["stopped"] = "budget"
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return count["trials"]


def check(target: str, backend_options, minutes, shapes, db) -> dict:
    """The TVM target spec that `--tune-minutes` tunes for, after checking the options (a
    one-line error each) and that the database folder is writable."""
    if target != "cpu":
        raise UserError("--tune-minutes tunes for the cpu target only (MetaSchedule on this machine's CPU)")
    check_minutes(minutes)
    parse_shapes(shapes or DEFAULT_SHAPES)
    # (runtime's own check of --backend-option: the same one-line errors as the build's)
    spec = build.target_spec(target, runtime.check_options(backend_options))
    database_dir(db, spec, create=True)
    return spec


def buckets_for(graph: Graph, shapes: str | None) -> list[Bucket]:
    """--tune-shapes (or the defaults) for `graph`: a given shape longer than a generation-ready
    decoder's context is refused; the defaults are kept within it (its decode bucket too)."""
    buckets = parse_shapes(shapes or DEFAULT_SHAPES)
    context = int(graph.metadata.metadata_props.get(META_MAX_POSITIONS, 0) or 0)
    if not context:
        return buckets
    long = next((b for b in buckets if b.seq + b.past > context), None)
    if long is not None and shapes:
        raise UserError(f"--tune-shapes {long.label}: {long.seq + long.past} positions, past the model's {context}")
    return list(dict.fromkeys(Bucket(b.batch, min(b.seq, context), min(b.past, context - min(b.seq, context)))
                              for b in buckets))


def save_tuned(graph: Graph, outdir: Path, target: str, backend_options, spec: dict, minutes: float,
               shapes: str | None, db, progress) -> tuple[dict, dict]:
    """Tune `graph` for `spec` within `minutes`, then save the TVM artifact built with the
    database: (the backend's manifest fields, the manifest's "tuning")."""
    summary, record = tune(graph, spec, buckets_for(graph, shapes), minutes, db, progress, options=backend_options)
    with build.tuned(record):
        fields = runtime.save(graph, outdir, target, dict(backend_options or {}))
    summary["kernels_built"] = record.kernels
    return fields, summary
