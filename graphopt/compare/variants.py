"""The variants a compare report times: a small registry of builders.

A variant is a name (`fp32`, `ort-plain`, ...), the backends it exists on, and a builder
`build(ctx, backend) -> Runner`. Builders make what they time (an artifact folder, an ORT
session, the eager module) from the shared `BuildContext`, which exports the model once.
A graphopt variant is `graphopt optimize` with some options, one line:

    register_optimized("int8-b64", "graphopt int8, block 64", quantize="int8:64")

(its `optimize_kwargs` are also what `--generate` builds the generation-ready artifact from);
any other builder registers with `@register_variant(name, backends=..., summary=...)`.

A builder that raises makes its cell an error (shown in the report); the others still run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.artifact import bound_shapes, cache_aliases, shares_cache_buffer
from graphopt.artifact import load as load_artifact
from graphopt.backends.onnxruntime import BoundRunner
from graphopt.driver import default_pipeline, optimize
from graphopt.errors import UserError
from graphopt.manifest import artifact_file, read_manifest
from graphopt.models import load_graph
from graphopt.ir import GRAPHOPT_DOMAIN
from graphopt.lowering import prepare
from graphopt.onnx_io import save_onnx
from graphopt.pruning import format_pruning

BACKENDS = ("torch", "ort", "tvm")


@dataclasses.dataclass
class Runner:
    """What a builder returns: `run(feeds)` -> the model's first output."""

    run: Callable[[dict], np.ndarray]
    size_bytes: int | None = None          # artifact (or weights) on disk / in memory
    size_what: str = "files on disk"
    build_seconds: float | None = None     # optimize + lower + compile, export excluded
    path: str | None = None
    settings: dict = dataclasses.field(default_factory=dict)   # session settings it runs with
    close: Callable[[], None] = lambda: None
    # How a fresh process loads the same thing (graphopt.compare.memory), or None where it cannot.
    memory_spec: dict | None = None
    tuning_seconds: float | None = None    # TVM tuned: the time spent tuning its database


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    name: str
    backends: tuple[str, ...]
    summary: str
    build: Callable[["BuildContext", str], Runner]
    default: bool = True      # in the default --variants list
    anchor: bool = False      # a baseline that is not graphopt's own
    needs_export: bool = True  # built from the model (not from a given artifact)
    # `graphopt optimize` keyword arguments of a graphopt variant: `--generate` builds the
    # generation-ready artifact (with the KV cache) from the same ones. None: no such artifact.
    optimize_kwargs: dict | None = None


VARIANTS: dict[str, VariantSpec] = {}


def register_variant(name: str, *, backends: tuple[str, ...], summary: str, default: bool = True,
                     anchor: bool = False, needs_export: bool = True, optimize_kwargs: dict | None = None):
    def wrap(fn):
        VARIANTS[name] = VariantSpec(name, tuple(backends), summary, fn, default, anchor, needs_export,
                                     optimize_kwargs)
        return fn
    return wrap


def unregister_variant(name: str) -> None:
    VARIANTS.pop(name, None)


def default_variants() -> list[str]:
    return [n for n, v in VARIANTS.items() if v.default]


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# The last export, reused while its source files are unchanged (exports take seconds to
# minutes; a Python session that compares the same model twice exports it once). Builders
# only ever see copies of it.
_EXPORT_CACHE: dict = {}


def _source_key(source: str) -> tuple | None:
    path = Path(source).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    try:
        return (str(path),) + tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())
    except OSError:
        return None


class BuildContext:
    """What every builder shares: the model source, its export (made once), the eager
    reference, the scratch folder and the thread count every runtime gets."""

    def __init__(self, source: str | None, workdir: Path, threads: int, reference=None):
        self.source = source
        self.workdir = Path(workdir)
        self.threads = threads
        self.reference = reference           # a reference.TorchModel, or None
        self._export_graph = None
        self._export_path: Path | None = None
        self.export_seconds: float | None = None

    # -- the export, shared by every variant built from the model ---------------------

    def export_graph(self):
        if self._export_graph is None:
            if self.source is None:
                raise UserError("this variant needs the source model; give MODEL (or --reference) too")
            key = _source_key(self.source)
            if key is not None and key == _EXPORT_CACHE.get("key"):
                self._export_graph, self.export_seconds = _EXPORT_CACHE["graph"], _EXPORT_CACHE["seconds"]
            else:
                t = time.perf_counter()
                self._export_graph = load_graph(self.source)
                self.export_seconds = time.perf_counter() - t
                _EXPORT_CACHE.update(key=key, graph=self._export_graph, seconds=self.export_seconds)
        return self._export_graph

    def export_onnx(self) -> Path:
        """The export as an .onnx file, untouched by graphopt's passes (the anchors' input); a
        graphopt-domain node the frontend exported (a mixture of experts' graphopt.MoE) is
        decomposed into core ops, so that any runtime loads it."""
        if self._export_path is None:
            path = self.workdir / "export" / "model.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            graph = self.export_graph()
            if any(n.domain == GRAPHOPT_DOMAIN for n in graph.nodes):  # then drop the weights it stopped reading
                graph = prepare(graph, lambda n: False, "eliminate-dead-code")
            save_onnx(graph.copy(), path)
            self._export_path = path
        return self._export_path

    # -- helpers for builders -----------------------------------------------------------

    def optimize(self, name: str, backend: str, **kwargs) -> tuple[Path, float]:
        """Run graphopt's optimize on a copy of the export into workdir/NAME-BACKEND."""
        graph = self.export_graph().copy()
        out = self.workdir / f"{name}-{backend}"
        t = time.perf_counter()
        # Full-sequence artifacts: every cell computes logits at every position of the same
        # inputs (a generation-ready artifact, with its cache and last-token logits, is timed
        # by `--generate`, not here).
        kwargs.setdefault("kv_cache", False)
        optimize(graph, out, backend={"ort": "onnxruntime"}.get(backend, backend), **kwargs)
        return out, time.perf_counter() - t

    def artifact_runner(self, path: Path, build_seconds: float | None) -> Runner:
        """An artifact folder as a cell. An ONNX Runtime artifact runs in a session with the
        settings every ORT cell shares (`ort_settings`, plus what its manifest asks for), so
        that it is timed like the anchors; other backends load through `graphopt.load`."""
        run_all, settings, spec = self.artifact_outputs(path)
        first = read_manifest(path)["signature"]["outputs"][0]["name"]
        return Runner(lambda feeds: run_all(feeds)[first], folder_bytes(path), "artifact folder on disk",
                      build_seconds, str(path), settings, memory_spec=spec)

    def artifact_outputs(self, path: Path) -> tuple[Callable[[dict], dict], dict, dict]:
        """(run(feeds) -> every output by name, the settings it runs with, its memory spec)."""
        manifest = read_manifest(path)
        if manifest.get("backend") == "onnxruntime" and manifest.get("target", "cpu") == "cpu":
            model = artifact_file(path, manifest.get("model", "model.onnx"), f"{path}: the manifest")
            settings = ort_settings(self.threads, disabled_optimizers=manifest.get("ort_session", {}).get(
                "disabled_optimizers"))
            sess = ort_session_from(model, settings)
            names = [o.name for o in sess.get_outputs()]
            return (lambda feeds: dict(zip(names, sess.run(names, feeds))), settings,
                    {"kind": "ort", "path": str(model), "settings": settings})
        art = load_artifact(path, threads=self.threads)
        return art.run, {"threads": self.threads}, {"kind": "artifact", "path": str(path), "threads": self.threads}

    def artifact_decode_run(self, path: Path) -> tuple[Callable[[dict], dict], bool]:
        """(run for a generation loop, whether its growing cache is fed as shared buffers): an
        ORT CPU artifact whose presents GroupQueryAttention computes runs as graphopt's
        Generator runs it, each present written into its past's buffer (IO binding), in a
        session with compare's settings; any other artifact as `artifact_outputs` runs it."""
        manifest = read_manifest(path)
        if shares_cache_buffer(manifest):
            model = artifact_file(path, manifest.get("model", "model.onnx"), f"{path}: the manifest")
            sess = ort_session_from(model, ort_settings(self.threads, disabled_optimizers=manifest.get(
                "ort_session", {}).get("disabled_optimizers")))
            shapes, inputs = bound_shapes(manifest["signature"])
            return BoundRunner(sess, shapes, inputs, cache_aliases(shapes)).run, True
        return self.artifact_outputs(path)[0], False

    def ort_runner(self, path: Path, build_seconds: float | None, *, level: str = "all") -> Runner:
        settings = ort_settings(self.threads, level)
        sess = ort_session_from(path, settings)
        name = sess.get_outputs()[0].name
        size = folder_bytes(path) + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
        return Runner(lambda feeds: sess.run([name], feeds)[0], size, "model file(s) on disk", build_seconds, str(path),
                      settings, memory_spec={"kind": "ort", "path": str(path), "settings": settings})


# Every ORT session compare makes (graphopt's artifacts and the anchors alike) sets these.
# Idle intra-op threads that spin steal the cores of whichever session runs next: with
# several sessions alive, as interleaved timing needs, every cell was ~1.8x slower than the
# same model alone. Without spinning a cell's time is what one session of it takes alone
# with the same settings (benchmarks/check_compare_timing.py checks that).
ORT_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def ort_settings(threads: int, level: str = "all", disabled_optimizers: list[str] | None = None) -> dict:
    """The ORT CPU session settings of a compare cell, as recorded in the report: `threads`
    intra-op threads, one inter-op thread (sequential execution), the graph optimization
    level, ORT_CONFIG, and the optimizers an artifact's manifest disables."""
    return {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "execution_mode": "sequential",
            "graph_optimization_level": level, "config": dict(ORT_CONFIG),
            "disabled_optimizers": list(disabled_optimizers or [])}


def ort_session_from(path: Path, settings: dict):
    """An ORT CPU session over `path` with `settings` (from `ort_settings`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = settings["intra_op_num_threads"]
    so.inter_op_num_threads = settings["inter_op_num_threads"]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[settings["graph_optimization_level"]]
    for key, value in settings["config"].items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=settings["disabled_optimizers"] or None)


def ort_session(path: Path, threads: int, level: str = "all"):
    """An ORT CPU session with the settings every ORT cell shares (`ort_settings`)."""
    return ort_session_from(path, ort_settings(threads, level))


# --------------------------------------------------------------------------------------
# The built-in variants


@register_variant("fp32", backends=("torch", "ort", "tvm"), optimize_kwargs={},
                  summary="torch: eager PyTorch (the reference); ort/tvm: graphopt's optimized fp32 artifact")
def build_fp32(ctx: BuildContext, backend: str) -> Runner:
    if backend == "torch":
        ref = ctx.reference
        if ref is None:
            raise UserError("no PyTorch model for this source (an .onnx or .gir file has none)")
        import torch

        torch.set_num_threads(ctx.threads)
        return Runner(ref, ref.parameter_bytes(), "weights in memory", 0.0, ref.source,
                      {"threads": ctx.threads, "mode": "eval, inference_mode"},
                      memory_spec={"kind": "torch", "source": ref.source, "threads": ctx.threads})
    path, seconds = ctx.optimize("fp32", backend)
    return ctx.artifact_runner(path, seconds)


def register_optimized(name: str, summary: str, *, backends: tuple[str, ...] = ("ort", "tvm"), **optimize_kwargs):
    """A graphopt variant: `graphopt optimize` with these keyword arguments, on each backend."""
    def build(ctx: BuildContext, backend: str) -> Runner:
        path, seconds = ctx.optimize(name, backend, **optimize_kwargs)
        pruning = json.loads((path / "report.json").read_text()).get("pruning")
        if pruning is not None and not pruning.get("parameters_removed"):  # the fp32 model again, not a variant
            what = format_pruning({"pruning": pruning}).splitlines()[0].removeprefix("pruned    ")
            raise UserError(f"{name}: nothing pruned ({what})")
        return ctx.artifact_runner(path, seconds)
    register_variant(name, backends=backends, summary=summary, default=False, optimize_kwargs=optimize_kwargs)(build)


# The quantized variants are `--quantize`'s schemes; the pruned ones append a pass to the
# default pipeline (the fusions that make their sites come first).
register_optimized("int8", "graphopt int8 weight-only quantization (`--quantize int8`: block 128, RTN)", quantize="int8")
register_optimized("int4", "graphopt int4 weight-only quantization (`--quantize int4`: block 32, RTN)", quantize="int4")
register_optimized("int8-dynamic", "graphopt int8 weights per channel, activations quantized per call "
                   "(`--quantize int8-dynamic`)", quantize="int8-dynamic")
register_optimized("prune-heads", "graphopt default pipeline + prune-heads{ratio=0.5} (half the KV groups, by "
                   "weight magnitude; no recovery fine-tuning)", passes=default_pipeline() + ",prune-heads{ratio=0.5}")
register_optimized("prune-mlp", "graphopt default pipeline + prune-mlp{ratio=0.5} (half the MLP channels, by weight "
                   "magnitude; no recovery fine-tuning)", passes=default_pipeline() + ",prune-mlp{ratio=0.5}")


@register_variant("ort-plain", backends=("ort",), anchor=True,
                  summary="ONNX Runtime on the export itself, ORT_ENABLE_ALL (no graphopt passes)")
def build_ort_plain(ctx: BuildContext, backend: str) -> Runner:
    path = ctx.export_onnx()
    return ctx.ort_runner(path, 0.0)


@register_variant("ort-optimizer", backends=("ort",), anchor=True,
                  summary="onnxruntime.transformers.optimizer on the export (ORT's own transformer fusions)")
def build_ort_optimizer(ctx: BuildContext, backend: str) -> Runner:
    from onnxruntime.transformers import optimizer

    info = ctx.reference.config if ctx.reference is not None else {}
    family = info.get("family", "gpt2")
    model_type = family if family in ("bert", "gpt2", "bart", "t5") else ("bert" if _is_encoder(ctx) else "gpt2")
    out = ctx.workdir / "ort-optimizer" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        m = optimizer.optimize_model(str(ctx.export_onnx()), model_type=model_type,
                                     num_heads=int(info.get("num_heads") or 0),
                                     hidden_size=int(info.get("hidden_size") or 0), opt_level=1)
        m.save_model_to_file(str(out))
    return ctx.ort_runner(out, time.perf_counter() - t)


@register_variant("ort-int8", backends=("ort",), anchor=True,
                  summary="onnxruntime.quantization.quantize_dynamic (int8 weights, MatMul) on the export")
def build_ort_int8(ctx: BuildContext, backend: str) -> Runner:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = ctx.workdir / "ort-int8" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantize_dynamic(str(ctx.export_onnx()), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return ctx.ort_runner(out, time.perf_counter() - t)


TVM_TUNED = "fp32-tuned"  # the variant of the TVM tuned cell, there when a tuning database exists


def tvm_tuned_cell(batch: int, seqs: list[int]) -> tuple[str, str, Callable[[BuildContext, str], Runner]] | None:
    """(cell id, summary, builder) of TVM fp32 built with this machine's tuning database (the
    default one of `graphopt optimize --tune-minutes`), or None where it has no records. The
    cell applies the database at compare's shapes; it never tunes."""
    import importlib

    tuning = importlib.import_module("graphopt.backends.tvm.tuning")  # tvm is an extra: only with --backends tvm
    build = tuning.build
    spec = build.cpu_target_spec()
    folder = tuning.database_dir(None, spec, create=False)
    records = tuning.record_count(folder)
    if records == 0:
        return None

    def build_tuned(ctx: BuildContext, backend: str) -> Runner:
        graph = ctx.export_graph()
        record = build.Tuned(folder, {b.label: tuning.bindings(graph, b) for b in
                                      (tuning.Bucket(batch, s) for s in seqs)}, only_winning=True)
        with build.tuned(record):
            path, seconds = ctx.optimize(TVM_TUNED, "tvm")
        runner = ctx.artifact_runner(path, seconds)
        runner.tuning_seconds = round(60 * tuning.tuning_minutes(folder), 1)
        runner.settings = {**runner.settings, "tuning_database": str(folder), "records": records,
                           "kernels_from_database": len(record.kernels["from_database"]) if record.kernels else 0,
                           "shapes_dispatched": sorted(record.dispatched or [])}
        return runner

    return (f"tvm (tuned, {records} records)", f"graphopt fp32 on TVM with the tuning database {folder} "
            "(`graphopt optimize --backend tvm --tune-minutes`) applied at these shapes", build_tuned)


def _is_encoder(ctx: BuildContext) -> bool:
    return ctx.reference is not None and ctx.reference.kind == "encoder"


def artifact_variant(path: Path) -> Callable[[BuildContext, str], Runner]:
    """A builder for an artifact folder the user gave (`graphopt compare out/a out/b`)."""
    def build(ctx: BuildContext, backend: str) -> Runner:
        import json

        try:
            report = json.loads((path / "report.json").read_text())
        except (OSError, ValueError):
            report = {}
        return ctx.artifact_runner(path, build_seconds(report))
    return build


def build_seconds(report) -> float | None:
    """An artifact's build time from its report.json as the build column counts it: optimize,
    lower and compile, the export (the frontend's seconds) left out, as for the cells compare
    builds itself from one shared export."""
    if not isinstance(report, dict) or not isinstance(report.get("total_seconds"), (int, float)):
        return None
    frontend = report.get("frontend")
    counted = isinstance(frontend, dict) and frontend.get("in_total_seconds", True) is True
    export = frontend.get("seconds") if counted else None
    return max(report["total_seconds"] - export, 0.0) if isinstance(export, (int, float)) else report["total_seconds"]


@register_variant("ort-genai", backends=("ort",), anchor=True, default=False,
                  summary="onnxruntime-genai's model builder on the Hugging Face folder (fp32, cpu; its KV-cache "
                          "graph run on the whole sequence with an empty cache, padding moved to the right)")
def build_ort_genai(ctx: BuildContext, backend: str) -> Runner:
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise UserError("onnxruntime-genai is not installed (pip install onnxruntime-genai)")
    src = Path(ctx.source or "")
    if not (src / "config.json").is_file() or ctx.reference is None or ctx.reference.input_names != [
            "input_ids", "attention_mask"] or ctx.reference.kind != "decoder":
        raise UserError("the model builder takes Hugging Face decoder folders only")
    _check_model_builder_can_build(src)
    out = ctx.workdir / "ort-genai"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src),
                           "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(ctx.workdir / "ort-genai-cache")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raised = [ln for ln in lines if ln[:1].isalpha() and ln.split(":")[0].endswith(("Error", "Exception"))]
        raise RuntimeError(f"model builder failed: {(raised or lines or [proc.returncode])[-1]!s:.300}")
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    head, kv_heads = int(decoder["head_size"]), int(decoder["num_key_value_heads"])
    base = ctx.ort_runner(out / "model.onnx", seconds)
    sess_inputs = [i.name for i in ort_session(out / "model.onnx", 1).get_inputs()]
    past = [n for n in sess_inputs if n.startswith("past_key_values.")]
    run_session = base.run

    def run(feeds):
        # The builder's GroupQueryAttention reads a prompt's length from the mask and takes its
        # tokens to be the first ones (right padding): a left-padded row is moved to the left
        # edge for the run and its logits moved back to where the reference has them.
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        order = np.argsort(mask == 0, axis=1, kind="stable")  # each row's kept positions first
        empty = np.zeros((ids.shape[0], kv_heads, 0, head), np.float32)
        out = run_session({"input_ids": np.take_along_axis(ids, order, 1),
                           "attention_mask": np.take_along_axis(mask, order, 1), **{n: empty for n in past}})
        back = np.empty_like(out)
        np.put_along_axis(back, order[..., None], out, 1)
        return back

    base.run, base.path = run, str(out)
    base.memory_spec = None  # its run needs the empty-cache feeds made above
    return base


def _check_model_builder_can_build(folder: Path) -> None:
    """Refuse, with the reason, the configs onnxruntime-genai's model builder (0.18) turns into a
    wrong model or one its CPU attention rejects: it takes every Linear whose width is the
    vocabulary size for the LM head (an MLP as wide as the vocabulary becomes the head), and
    GroupQueryAttention on CPU takes head sizes that are multiples of 16 only."""
    import torch
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head % 16:
        raise UserError(f"{folder}: head size {head} is not a multiple of 16, which onnxruntime-genai's "
                        "GroupQueryAttention needs on CPU")
    head_layer = model.get_output_embeddings()
    clash = sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and m is not head_layer and m.out_features == config.vocab_size)
    if clash:
        raise UserError(f"{folder}: {clash[0]} is as wide as the vocabulary ({config.vocab_size}), which "
                        "onnxruntime-genai's model builder mistakes for the LM head")
