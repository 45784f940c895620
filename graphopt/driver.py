"""The optimize driver behind `graphopt.optimize(...)` and `graphopt optimize`: model in, artifact folder out."""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph
from graphopt.pass_manager import NearMiss, PassContext, PassManager, PipelineEntry, load_recipe, parse_pipeline
from graphopt.accuracy import perplexity
from graphopt.accuracy_guard import Budget, guard, held_out_sentences, held_out_tokens, seq_len_of, Measured
import graphopt.backends.onnxruntime as ort_backend  # the accuracy guard measures through ORT
from graphopt.artifact import BACKEND_ALIASES, KNOWN_BACKENDS, make_manifest
from graphopt.calibration import (default_calibration_source, has_default_calibration, load_calibration,
                                  read_texts, text_feeds)
from graphopt.fileutil import artifact_extras, atomic_dir, check_output_dir, json_text
from graphopt.generation_files import copy_hf_config, copy_tokenizer, generation_manifest, model_config
from graphopt.frontends.huggingface import POSITION_TABLE_ROWS
from graphopt.frontends.training import is_run_folder
from graphopt.passes.kvcache.rewrite import META_MAX_POSITIONS
from graphopt.genai import GENAI_LAYOUTS, genai_unsupported, write_genai_files
from graphopt.interpreter import check_feeds
from graphopt.models import load_graph
from graphopt.onnx_io import to_onnx_model
from graphopt.pruning import format_pruning, prune_pipeline, pruning_manifest, pruning_summary
from graphopt.passes.cleanup import CLEANUP_PIPELINE, POST_FUSION_CLEANUP
from graphopt.passes.fusion import FUSION_PIPELINE
from graphopt.passes.kvcache.last_token import SliceLogitsError
from graphopt.passes.kvcache.rewrite import KVCacheError, check_layout
from graphopt.sample_inputs import check_index_ranges
from graphopt.summary import summarize
from graphopt.train.checkpoint import resolve_checkpoint
from graphopt.verify import verify as verify_graph

TVM_TUNING = "graphopt.backends.tvm.tuning"  # imported when --tune-minutes asks for it (tvm is an extra)


def default_pipeline() -> str:
    """Cleanup, the transformer fusions, cleanup again: right for decoders and encoders
    alike (a fusion that finds nothing to fuse changes nothing)."""
    return f"{CLEANUP_PIPELINE},{FUSION_PIPELINE},{POST_FUSION_CLEANUP}"


QUANT_SCHEMES = {"int8": (8, 128), "int4": (4, 32)}  # weight-only scheme -> (bits, default block size)
QUANT_PASSES = ("quantize-weights", "quantize-dynamic", "quantize-static")
GENERATION_PASSES = ("rewrite-kv-cache", "slice-last-token-logits")  # they change the signature, not the numbers


def _pipeline(passes: str | None) -> list:
    """--passes parsed (the default recipe when not given; an empty one is the user's mistake)."""
    if passes is None:
        return parse_pipeline(default_pipeline())
    try:
        return parse_pipeline(passes)
    except UserError as e:
        raise UserError(f"--passes: {e}" if not str(e).startswith("--passes") else str(e)) from None


def quantize_pipeline(scheme: str, method: str = "rtn") -> str:
    """`--quantize int8|int4[:BLOCK]` as the passes it appends: "int4:64" ->
    "quantize-weights{bits=4,block-size=64,method=rtn}"."""
    if scheme == "int8-dynamic":  # int8 weights per channel, activations quantized per call
        if method != "rtn":
            raise UserError("--quant-method applies to int8 and int4 weight-only quantization, not int8-dynamic")
        return "quantize-dynamic{per-channel=true}"
    if scheme == "int8-static":  # int8 weights per channel and activations, ranges from calibration (QDQ)
        if method != "rtn":
            raise UserError("--quant-method applies to int8 and int4 weight-only quantization, not int8-static")
        return "quantize-static{calibration=percentile}"
    name, colon, block = scheme.partition(":")
    if name not in QUANT_SCHEMES:
        raise UserError(f"--quantize {scheme!r}: expected int8, int4 (optionally with a block size: int4:64), "
                        "int8-dynamic or int8-static")
    bits, block_size = QUANT_SCHEMES[name]
    if colon:
        if not (block.isascii() and block.isdigit()) or int(block) not in (16, 32, 64, 128, 256):
            raise UserError(f"--quantize {scheme!r}: the block size must be 32, 64 or 128 (or 16, 256)")
        block_size = int(block)
    if method not in ("rtn", "gptq", "awq"):
        raise UserError(f"--quant-method {method!r}: expected rtn, gptq or awq")
    return f"quantize-weights{{bits={bits},block-size={block_size},method={method}}}"



def is_decoder(graph: Graph) -> bool:
    """A causal LM as the frontends export one: `input_ids [batch, seq]` (and maybe an
    `attention_mask`, a `position_ids`) in, one `logits [batch, seq, vocab]` out, no cache yet;
    or one exported with a cache (Optimum's past_key_values.* inputs and present.* outputs besides)."""
    names = {v.name for v in graph.inputs if not v.is_initializer}
    cache = {n for n in names if n.startswith("past_key_values.")}
    outputs = [v for v in graph.outputs if not (cache and v.name.startswith("present."))]
    return ("input_ids" in names and names - cache <= {"input_ids", "attention_mask", "position_ids"} and len(outputs) == 1
            and graph.outputs[0].name == "logits" and graph.outputs[0].type is not None
            and graph.outputs[0].type.rank == 3)


def _make_generation_ready(graph: Graph, pm, logits: str, kv_layout: str, verify: bool, progress, ctx,
                           max_positions: int | None = None):
    """rewrite-kv-cache (and slice-last-token-logits) after the default pipeline; the
    graph as it was, and why, where the rewrite refuses it. The generation passes change the
    signature (the cache inputs), so check-numerics, which runs the graph on the same feeds
    before and after each pass, stops before them; their own tests check them."""
    options = ([] if kv_layout == "BNSH" else [f"layout={kv_layout}"]) + \
        ([f"max-positions={max_positions}"] if max_positions else [])
    rewrite = f"rewrite-kv-cache{{{','.join(options)}}}" if options else "rewrite-kv-cache"
    stages = [rewrite] + (["slice-last-token-logits"] if logits == "last" else [])
    for i, stage in enumerate(stages):
        gen = PassManager(stage, verify=verify, progress=progress, ctx=ctx)
        try:
            graph = gen.run(graph)
        except (KVCacheError, SliceLogitsError) as e:
            progress(f"{'not generation-ready' if i == 0 else 'logits at every position'}: {e}")
            return graph, {"ready": i > 0, "logits": "all", "reason": str(e)}
        pm.records += gen.records
        pm.entries += gen.entries
    return graph, {"ready": True, "logits": logits}


@dataclasses.dataclass
class OptimizeResult:
    graph: Graph
    report: dict
    manifest: dict
    output_dir: Path | None


def optimize(model: str | os.PathLike | Graph, output_dir: str | os.PathLike | None = None, *,
             passes: str | None = None, recipe: str | os.PathLike | None = None, backend: str = "onnxruntime",
             backend_options: dict | None = None,
             target: str = "cpu", check_numerics: bool = False, inputs: dict[str, np.ndarray] | None = None,
             verify: bool = True, progress: Callable[[str], None] | None = None,
             overwrite: bool = False, logits: str | None = None, kv_cache: bool = True,
             kv_layout: str | None = None, max_positions: int | None = None, quantize: str | None = None,
             quant_method: str = "rtn",
             calibration: str | os.PathLike | None = None, accuracy_budget: str | None = None,
             accuracy_data: str | os.PathLike | None = None, prune: str | None = None,
             tune_minutes: float | None = None, tune_shapes: str | None = None,
             tune_db: str | os.PathLike | None = None) -> OptimizeResult:
    """Load `model`, run the pipeline (the default recipe, cleanup + fusion + cleanup, unless `passes` or
    `recipe` is given), lower it for `backend`/`target`, and write the artifact to
    `output_dir` atomically (nothing is left there if anything fails).

    `output_dir` may be missing, empty, or an artifact folder (replaced only once the new
    artifact is complete); a folder with other files in it is refused before any work
    unless `overwrite` (`graphopt.fileutil.check_output_dir` says what is never replaced).

    A decoder (`input_ids` in, `logits` out) gets a generation-ready artifact by default: the
    default pipeline ends with rewrite-kv-cache and, unless `logits="all"`, with
    slice-last-token-logits (`kv_layout`: the cache layout, BNSH by default, or static: one
    preallocated buffer per cache; `max_positions`: the longest sequence it holds, by default
    the model's context from its config); its tokenizer is copied beside the model. Where the rewrite
    refuses the model (it says why), or with `kv_cache=False`, the artifact recomputes the
    whole sequence as before.

    `quantize` ("int8", "int4", "int4:64") appends `quantize-weights` to the pipeline with
    `quant_method` (rtn, or gptq / awq on `calibration` data: see graphopt.calibration).
    `accuracy_budget` ("perplexity=+2%", "top1=0.99") keeps the most sensitive layers in
    float until the quantized model meets it on held-out text (`accuracy_data`, or a
    graphopt.train checkpoint's val.txt): see graphopt.accuracy_guard.

    `prune` ("heads=0.25,mlp=0.5[,importance=wanda][,scope=global][,min-keep=N]") adds
    prune-heads / prune-mlp after the pipeline's fusions, before the KV-cache rewrite and
    quantization (wanda reads `calibration`); report.json's "pruning" and manifest.json's
    "pruning" say what went (graphopt.pruning).

    `tune_minutes` (tvm, cpu) tunes the artifact's kernels with MetaSchedule for at most that
    long at the static shapes `tune_shapes` ("1x128,4x128,1x1+128" by default: BATCHxSEQ[+PAST])
    into the database under `tune_db` (default ~/.cache/graphopt/tvm-tuning), then builds with
    what the database holds: see graphopt.backends.tvm.tuning. manifest.json's "tuning" says
    what was tuned, for how long, and which kernels came from the database."""
    _check_types(locals())
    progress = progress or (lambda msg: None)
    t_start = time.perf_counter()
    for name, path in (("model", model), ("output_dir", output_dir)):
        if isinstance(path, (str, os.PathLike)):
            try:
                os.stat(path)
            except FileNotFoundError:
                pass  # said where it is read or written
            except (OSError, ValueError) as e:  # a name the file system refuses (too long, a NUL in it)
                shown = repr(str(path)) if len(str(path)) <= 80 else f"{str(path)[:77]!r}..."
                raise UserError(f"{shown}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(model, Graph) and is_run_folder(Path(model)):
        # its latest checkpoint, which the report names: the run may train on afterwards
        model = resolve_checkpoint(model)
    if output_dir is not None:
        inputs_paths = [] if isinstance(model, Graph) else [model]
        check_output_dir(output_dir, inputs_paths + [p for p in (recipe, calibration, accuracy_data) if p],
                         overwrite=overwrite)
    if passes is not None and recipe is not None:
        raise UserError("give either --passes or --recipe, not both")
    if backend not in BACKEND_ALIASES:
        raise UserError(f"unknown backend {backend!r} (available: {', '.join(sorted(BACKEND_ALIASES))})")
    backend = BACKEND_ALIASES[backend]
    import importlib

    be = importlib.import_module(KNOWN_BACKENDS[backend])
    be.check_target(target)
    try:  # before any work: a typo in an option would otherwise surface after the export
        be.check_options(backend_options)
    except UserError as e:
        raise UserError(f"--backend-option: {e}") from None
    if logits not in (None, "last", "all"):
        raise UserError(f"--logits {logits!r}: expected last or all")
    if logits is not None and not kv_cache:
        raise UserError("--logits chooses the logits of a generation-ready artifact; with --no-kv-cache every "
                        "position is computed")
    if logits is not None and (passes is not None or recipe is not None):
        raise UserError("--logits chooses the end of the default pipeline; with --passes or --recipe, add "
                        "(or leave out) slice-last-token-logits yourself")
    if kv_layout is not None:
        if not kv_cache or passes is not None or recipe is not None:
            raise UserError("--kv-layout chooses the cache of the default pipeline's rewrite-kv-cache; with "
                            "--no-kv-cache there is none, with --passes or --recipe give rewrite-kv-cache{layout=...}")
        check_layout(kv_layout, backend)  # its message names rewrite-kv-cache and the layout
    if max_positions is not None:
        if isinstance(max_positions, bool) or not isinstance(max_positions, (int, np.integer)) or max_positions < 1:
            raise UserError(f"--max-positions {max_positions!r}: a whole number of positions, at least 1")
        if not kv_cache or passes is not None or recipe is not None:
            raise UserError("--max-positions sizes the default pipeline's KV cache; with --no-kv-cache there is none, "
                            "with --passes or --recipe give rewrite-kv-cache{max-positions=N}")
    tune_spec = _check_tuning(backend, target, backend_options, tune_minutes, tune_shapes, tune_db)
    # Check the pipeline before the (possibly slow) model load.
    entries = load_recipe(recipe) if recipe is not None else _pipeline(passes)
    if prune is not None:
        pipeline = prune_pipeline(prune)  # (its own errors name --prune)
        try:
            entries += parse_pipeline(pipeline)
        except UserError as e:  # a pass's own check (prune-heads: ratio ...) said as the option given
            raise UserError(f"--prune {prune}: {e}") from None
    if quantize is not None:
        own = [e.name for e in entries if e.name in QUANT_PASSES]
        if own:  # two quantizations: the second finds nothing left to quantize, and the report would tell of it
            raise UserError(f"--quantize {quantize}: the {'--passes' if passes is not None else '--recipe'} pipeline "
                            f"quantizes already ({own[0]}); give one or the other")
        entries += parse_pipeline(quantize_pipeline(quantize, quant_method))
    elif quant_method != "rtn":
        raise UserError("--quant-method goes with --quantize int8|int4")
    needs_data = any((e.name == "quantize-weights" and e.instantiate().method in ("gptq", "awq"))
                     or e.name == "quantize-static"
                     or getattr(e.instantiate(), "needs_calibration", False) for e in entries)
    if calibration is not None and not needs_data:
        raise UserError("--calibration is used by --quant-method gptq and awq, --quantize int8-static and "
                        "pruning with importance=wanda only")
    if needs_data and calibration is None and not isinstance(model, Graph) and not has_default_calibration(model):
        raise UserError(f"{model}: has no default calibration data (only a graphopt.train checkpoint trained on "
                        "the default corpus has): give --calibration FILE (text, .jsonl of texts, or .npz of inputs)")
    budget = None
    if accuracy_budget is not None:
        budget = Budget.parse(accuracy_budget)
        if not any(e.name in QUANT_PASSES for e in entries):
            raise UserError("--accuracy-budget guards quantization: give --quantize too")
    elif accuracy_data is not None:
        raise UserError("--accuracy-data goes with --accuracy-budget")
    for option, path in (("--calibration", calibration), ("--accuracy-data", accuracy_data)):
        if path is not None and Path(path).suffix != ".npz":  # a bad text file fails now, not after the export
            if not Path(path).is_file():
                raise UserError(f"{option} {path}: " + ("is a folder; give a file" if Path(path).is_dir() else "no such file"))
            read_texts(Path(path), option)

    if isinstance(model, Graph):
        graph = model
    elif Path(model).is_dir() and artifact_extras(Path(model)) is not None:
        raise UserError(f"{model}: is an artifact graphopt optimize wrote (lowered for its backend); optimize the "
                        "model it came from instead (its report.json names it)")
    else:
        # No "loading" line: a file that does not load is then one line on stderr, its error;
        # the slow part (a PyTorch export) reports its own progress.
        graph = load_graph(model)

    if verify:
        try:
            verify_graph(graph)
        except Exception as e:
            raise UserError(f"{graph.metadata.source or 'model'}: the imported graph does not verify: {e}") from None
    if inputs is not None:
        # sample ids lie in [0, size) (a pass may index with them): before the run's own [-size, size)
        check_index_ranges(graph, {k: np.asarray(a) for k, a in inputs.items()})
        try:
            inputs = check_feeds(graph, inputs)
        except UserError as e:
            raise UserError(f"--inputs: {e}") from None
        for name, array in inputs.items():  # sample inputs that cannot tell a pass that changed results
            if array.size == 0:
                raise UserError(f"--inputs: input {name!r} is empty (shape {list(array.shape)}); give at least one sample")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise UserError(f"--inputs: input {name!r} holds NaN or infinity; --check-numerics compares finite results")
    before = summarize(graph)

    ctx = PassContext(target=target, hints={"backend": backend, "progress": progress})
    if needs_data:
        folder = graph.metadata.source if isinstance(model, Graph) else model  # a Graph loaded from a folder
        ctx.hints["calibration"] = load_calibration(calibration, folder, graph, progress=progress)
    # what the report says was calibrated on: the file, or the default data by name
    calibrated_on = (default_calibration_source(model) if calibration is None and needs_data
                     and not isinstance(model, Graph) else calibration)
    accuracy = None
    if budget is not None:
        # the guard measures through ORT at the accuracy_level the artifact will run (MatMulNBits'
        # int8 compute changes the numbers): the user's, else the one `auto` picks for the
        # artifact -- a generation-ready decoder's, although the guard measures before the cache
        # rewrite -- and an ORT artifact is then lowered at that level
        forced = _measured_level(be, target, backend_options, entries)
        will_generate = is_decoder(graph) and (
            (passes is None and recipe is None and kv_cache) or any(e.name == "rewrite-kv-cache" for e in entries))
        entries, accuracy = _guard_quantization(graph, model, entries, budget, accuracy_data, ctx, verify, progress,
                                                None if forced == "auto" else str(forced), will_generate)
        level = accuracy.get("quant_accuracy_level")
        if backend == "onnxruntime" and target == "cpu" and forced == "auto" and level is not None:
            backend_options = {**(backend_options or {}), "quant_accuracy_level": level}
    pm = PassManager(entries, verify=verify, check_numerics=check_numerics, sample_inputs=inputs, progress=progress,
                     ctx=ctx)
    optimized = pm.run(graph)
    generation_note = None
    if passes is None and recipe is None and kv_cache and is_decoder(optimized):
        optimized, generation_note = _make_generation_ready(optimized, pm, logits or "last", kv_layout or "BNSH",
                                                            verify, progress, ctx, max_positions)
        if logits == "last" and generation_note.get("logits") != "last":
            raise UserError(f"--logits last: {generation_note.get('reason', 'the logits cannot be sliced')}")
        if (kv_layout is not None or max_positions) and not generation_note["ready"]:  # asked for: no silent fallback
            option = f"--kv-layout {kv_layout}" if kv_layout is not None else f"--max-positions {max_positions}"
            raise UserError(f"{option}: {generation_note['reason']}")
    elif logits is not None or kv_layout is not None or max_positions is not None:
        option = "--logits" if logits is not None else "--kv-layout" if kv_layout is not None else "--max-positions"
        raise UserError(f"{option} applies to decoders (input_ids in, logits out) with the KV cache; "
                        f"{graph.metadata.source or 'this model'} is not one")
    after = summarize(optimized)
    report = {
        "model": _absolute(graph.metadata.source),
        "fusions": fusion_summary(pm.records),
        "frontend": {"exporter": graph.metadata.exporter or "onnx file", "seconds": round(graph.metadata.export_seconds, 3),
                     # whether total_seconds counts it: not where the caller loaded the graph (compare's shared export)
                     "in_total_seconds": not isinstance(model, Graph)},
        "pipeline": pm.pipeline_text,
        "verify": verify,
        "check_numerics": check_numerics,
        "passes": [r.to_json() for r in pm.records],
        "nodes_before": before["nodes"],
        "nodes_after": after["nodes"],
        "ops_before": before["ops"],
        "ops_after": after["ops"],
        "parameters_before": before["parameters"]["count"],
        "parameters_after": after["parameters"]["count"],
        "weight_bytes_before": before["parameters"]["bytes"],
        "weight_bytes_after": after["parameters"]["bytes"],
        "backend": backend,
        "backend_options": dict(backend_options or {}),
        **quantization_summary(pm.records, quantize, calibrated_on, ctx.hints.get("calibration")),
        **({"accuracy": accuracy} if accuracy is not None else {}),
        **pruning_summary(pm.records, before["parameters"]["count"], prune, calibrated_on, ctx.hints.get("calibration"),
                          graph.metadata.source if isinstance(model, Graph) else model),
        "target": target,
    }
    if generation_note is not None:
        report["generation"] = generation_note
    manifest: dict = {}
    out = None
    if output_dir is not None:
        out = Path(output_dir)
        progress(f"writing {out}")
        with atomic_dir(out) as tmp:
            if tune_spec is not None:
                fields, tuning = _tuning().save_tuned(optimized, tmp, target, backend_options, tune_spec,
                                                      tune_minutes, tune_shapes, tune_db, progress)
                report.setdefault("backend_seconds", {})["tuning"] = round(60 * tuning["minutes"], 3)
            else:
                fields, tuning = be.save(optimized, tmp, target, dict(backend_options or {})), None
            # a backend's word on the cache (the driver files it under "generation")
            share_buffer = bool(fields.pop("past_present_share_buffer", False))
            manifest = make_manifest(optimized, backend, target, fields, be.versions())
            if tuning is not None:
                manifest["tuning"] = report["tuning"] = tuning
            manifest.update(pruning_manifest(pm.records))

            # A Graph from graphopt.frontends remembers the folder it came from: its tokenizer.
            model_path = (graph.metadata.source or None) if isinstance(model, Graph) else model
            generation = generation_manifest(optimized, model_path)
            if generation is not None:
                copied = copy_tokenizer(model_path, tmp)
                if backend == "onnxruntime" and not manifest.get("pruning"):
                    # Optimum's ORTModelForCausalLM loads the folder by its config.json (sizing the cache by
                    # its head counts: a pruned model's differ, layer by layer with scope=global)
                    copied += copy_hf_config(model_path, tmp)
                elif backend == "onnxruntime":
                    generation["optimum"] = "no config.json: the pruned model's sizes differ from the checkpoint's"
                manifest["files"] = list(manifest.get("files", [])) + copied  # part of the artifact, not the user's
                generation["decode_graph_nodes"] = fields.get("nodes", len(optimized.nodes))
                if share_buffer and generation["kv_layout"] == "BNSH" and generation.get("max_positions"):
                    # the Generator (and onnxruntime-genai) bind each present to its past: written in place
                    generation["past_present_share_buffer"] = True
                manifest["generation"] = generation
                if backend == "onnxruntime" and generation["kv_layout"] in GENAI_LAYOUTS:
                    # the same folder runs in onnxruntime-genai, where its config can describe the model
                    why_not = genai_unsupported(optimized, manifest)
                    if why_not is None:
                        written = write_genai_files(optimized, manifest, tmp, model_config(model_path))
                        manifest["files"] = manifest["files"] + written
                    else:
                        generation["genai"] = f"no genai_config.json: {why_not}"
                        progress(f"note: {generation['genai']}")  # --help says an ORT decoder gets one
            else:  # an encoder (or a decoder without a cache): a position table bounds its inputs
                if generation_note is not None and not generation_note["ready"]:
                    manifest["not_generation_ready"] = generation_note["reason"]  # what generate says
                context = optimized.metadata.metadata_props.get(META_MAX_POSITIONS)
                rows = optimized.metadata.metadata_props.get(POSITION_TABLE_ROWS, "")
                if context and context.isdigit() and _position_table(optimized, int(context),
                                                                     int(rows) if rows.isdigit() else None):
                    manifest["max_positions"] = int(context)
            for key in ("lower_seconds", "compile_seconds", "tuning_seconds"):
                timing = fields.get(key)  # backends that compile report their build times
                if timing is not None:
                    report.setdefault("backend_seconds", {})[key.removesuffix("_seconds")] = timing
            # what a user ships: every file of the artifact but its manifest and this report
            report["artifact_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            report["total_seconds"] = round(time.perf_counter() - t_start, 3)
            (tmp / "manifest.json").write_text(json_text(manifest, indent=2) + "\n")
            (tmp / "report.json").write_text(json_text(report, indent=2) + "\n")
    else:
        report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    return OptimizeResult(optimized, report, manifest, out)


# optimize()'s arguments that are text on the command line, paths, and the rest: a wrong type
# is a UserError naming the argument, not an AttributeError inside a parser.
_TEXT_ARGS = ("passes", "backend", "target", "logits", "kv_layout", "quantize", "quant_method", "accuracy_budget",
              "prune", "tune_shapes")
_PATH_ARGS = ("output_dir", "recipe", "calibration", "accuracy_data", "tune_db")


def _check_types(args: dict) -> None:
    def wrong(name, want):
        value = args[name]  # a short repr: 12 MB of bytes made a message of 35 M characters
        if isinstance(value, (bytes, str)) and len(value) > 60:
            shown = f"<{type(value).__name__} of {len(value):,}> {value[:40]!r}..."
        elif hasattr(value, "shape"):
            shown = f"<{type(value).__name__} of shape {tuple(value.shape)}>"
        else:
            shown = repr(value)
            shown = shown if len(shown) <= 80 else f"<{type(value).__name__}> {shown[:60]}..."
        raise UserError(f"optimize({name}={shown}): expected {want}")
    if not isinstance(args["model"], (str, os.PathLike, Graph)):
        wrong("model", "a path or a graphopt.ir.Graph")
    for name in _TEXT_ARGS:
        if args[name] is not None and not isinstance(args[name], str):
            wrong(name, f"a string, as --{name.replace('_', '-')} takes it")
    for name in _PATH_ARGS:
        if args[name] is not None and not isinstance(args[name], (str, os.PathLike)):
            wrong(name, "a path")
    minutes = args["tune_minutes"]
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))):
        wrong("tune_minutes", "a number of minutes")
    options = args["backend_options"]
    if options is not None and not (isinstance(options, dict) and all(isinstance(k, str) for k in options)):
        wrong("backend_options", "a dict of option names to values, {'num_cores': '2'}")
    if args["inputs"] is not None and not isinstance(args["inputs"], dict):
        wrong("inputs", "a dict of input names to arrays (graphopt.sample_inputs.load_inputs reads an .npz)")


def _absolute(source: str | None) -> str | None:
    """The source as an absolute path where it is one: eval and compare read it from anywhere."""
    return str(Path(source).resolve()) if source and Path(source).exists() else source


def _check_tuning(backend: str, target: str, backend_options, minutes, shapes, db) -> dict | None:
    """The TVM target that --tune-minutes tunes for (graphopt.backends.tvm.tuning checks the
    rest), or None without tuning; a one-line error for options that do not go together."""
    if minutes is None:
        if shapes is not None or db is not None:
            raise UserError(f"{'--tune-shapes' if shapes is not None else '--tune-db'} goes with --tune-minutes")
        return None
    if backend != "tvm":
        raise UserError("--tune-minutes tunes the TVM backend's kernels: add --backend tvm")
    return _tuning().check(target, backend_options, minutes, shapes, db)


def _position_table(graph: Graph, rows: int, table_rows: int | None = None) -> bool:
    """Whether `graph` reads rows of a constant table `rows` long by position (a learned position
    embedding, precomputed rotary cos/sin): then a sequence past `rows` has no row to read. A
    model without one (ALiBi, relative positions, rotary computed in the graph) is not bounded
    by the context its config states. The table may hold more rows than the positions: OPT's two
    (its positions start at 2), RoBERTa's `table_rows` (they start past the padding id)."""
    for node in graph.nodes:
        if node.op_type in ("Gather", "Slice") and node.domain == "" and node.inputs and node.inputs[0] is not None:
            table = node.inputs[0]
            if table.is_initializer and table.type.shape and (rows <= table.type.shape[0] <= rows + 2
                                                              or table.type.shape[0] == table_rows):
                return True
    return False


def _tuning():
    import importlib

    return importlib.import_module(TVM_TUNING)


def _measured_level(be, target: str, options: dict | None, entries: list) -> str:
    """The MatMulNBits accuracy_level at which the accuracy guard (which measures on ORT's CPU
    kernels) computes what the artifact will, as the backend `be` says for the last
    quantization's bits ("auto": chosen by timing)."""
    q = [e for e in entries if e.name in QUANT_PASSES][-1]
    bits = int(q.options.get("bits", "4")) if q.name == "quantize-weights" else None  # (options as written)
    return be.matmulnbits_level(target, options, bits)


def _guard_quantization(graph: Graph, model, entries: list, budget, accuracy_data, ctx, verify: bool, progress,
                        level: str | None = None, will_generate: bool = False):
    """The pipeline with the last quantize-weights told which layers to keep in float so
    that `budget` holds, and the report's "accuracy" entry (graphopt.accuracy_guard), whose
    "quant_accuracy_level" is the MatMulNBits level measured at: `level`, or the one
    `quant_accuracy_level=auto` picks for the fully quantized model (as a generation-ready
    decoder where `will_generate`)."""
    folder = graph.metadata.source if isinstance(model, Graph) else model
    qi = max(i for i, e in enumerate(entries) if e.name in QUANT_PASSES)
    decoder = is_decoder(graph)
    if budget.metric == "cosine" and decoder:
        raise UserError(f"--accuracy-budget {budget}: cosine measures an encoder's pooled output; for a decoder "
                        "give perplexity=+PCT% or top1=VALUE")
    # an encoder by its outputs (an ONNX decoder with other names keeps its first output as the logits)
    encoder = not decoder and (not graph.outputs or graph.outputs[0].name in ("last_hidden_state", "pooler_output")
                               or graph.outputs[0].type is None or graph.outputs[0].type.rank != 3)
    if budget.metric != "cosine" and encoder:
        raise UserError(f"--accuracy-budget {budget}: {budget.metric} measures a decoder's logits (input_ids in, "
                        f"logits out); {graph.metadata.source or 'this model'} is not one: give cosine=VALUE")
    if budget.metric == "cosine":
        feeds, source = held_out_sentences(folder, graph, accuracy_data)
        data = {"sentences": int(sum(len(f["input_ids"]) for f in feeds))}
    else:
        ids, source = held_out_tokens(folder, graph, accuracy_data)
        data = {"tokens": int(len(ids) - 1)}
    base = PassManager(entries[:qi], verify=verify, ctx=ctx).run(graph)
    if _signature(base) != _signature(graph):  # a cache (or sliced logits) before the quantization
        raise UserError(f"--accuracy-budget {budget}: the passes before {entries[qi].name} change the model's inputs "
                        "or outputs (rewrite-kv-cache, slice-last-token-logits?), so the budget cannot be measured; "
                        "put them after it")
    ctx.hints.setdefault("quantized_layers", {})
    # Measured: every position's logits without a cache. The generation passes are exact
    # rewrites of the same numbers (a cache, the last position's logits), so a --passes pipeline
    # that runs them after the quantization is measured without them; any other pass there must
    # keep the model's inputs and outputs.
    tail = [e for e in entries[qi + 1:] if e.name not in GENERATION_PASSES]

    own = str(entries[qi].options.get("exclude") or "")  # the user's own layers in float: the guard adds to them

    def joined(exclude: str) -> str:
        return ";".join(x for x in (own, exclude) if x)

    def quantize(exclude: str):
        opts = {k: v for k, v in entries[qi].options.items() if k != "exclude"}
        pm = PassManager([PipelineEntry(entries[qi].name, {**opts, **({"exclude": joined(exclude)} if joined(exclude) else {})})],
                         verify=False, ctx=ctx)
        g = PassManager(tail, verify=False, ctx=ctx).run(pm.run(base)) if tail else pm.run(base)
        if _signature(g) != _signature(base):
            raise UserError(f"--accuracy-budget {budget}: the passes after {entries[qi].name} "
                            f"({', '.join(e.name for e in tail)}) change the model's inputs or outputs, so the "
                            "budget cannot be measured on the quantized model; move them before it")
        return g, [d["node"] for d in pm.records[0].details if "kind" in d]

    if level is None:
        choice = ort_backend.choose_accuracy_level(quantize("")[0], generation=will_generate)
        level = None if choice is None else str(choice["level"])
    options = {} if level is None else {"quant_accuracy_level": level}
    measure = (ort_embedding_measure(feeds, options) if budget.metric == "cosine"
               else ort_measure(ids, seq_len_of(folder), options))
    exclude, accuracy = guard(base, quantize, budget, measure, progress)
    accuracy["data"] = {"file": source, **data}
    if level is not None:
        accuracy["quant_accuracy_level"] = level
    guarded = list(entries)
    if exclude:
        guarded[qi] = PipelineEntry(entries[qi].name, {**entries[qi].options, "exclude": joined(exclude)})
    return guarded, accuracy


def _signature(graph: Graph) -> list:
    return [(v.name, None if v.type is None else (v.type.dtype, v.type.rank)) for v in (*graph.inputs, *graph.outputs)]


def ort_measure(ids: np.ndarray, seq_len: int, options: dict | None = None) -> Callable[[Graph], Measured]:
    """graph -> its perplexity and arg-max tokens on `ids`, run through ORT in memory (lowered
    with the backend `options`)."""
    def measure(graph: Graph) -> Measured:
        sess = _ort_session(graph, options)
        names, out = [i.name for i in sess.get_inputs()], sess.get_outputs()[0].name
        name = "input_ids" if "input_ids" in names else names[0]
        argmax = []

        def logits(x):
            y = sess.run([out], text_feeds(names, name, x))[0]
            argmax.append(y.argmax(-1).reshape(-1))
            return y
        ppl = perplexity(logits, ids, seq_len).perplexity
        return Measured(ppl, np.concatenate(argmax))
    return measure


def _ort_session(graph: Graph, options: dict | None = None):
    import onnxruntime as ort

    model = to_onnx_model(ort_backend.lower(graph, "cpu", options=dict(options or {})))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_embedding_measure(feeds_list: list[dict], options: dict | None = None) -> Callable[[Graph], Measured]:
    """graph -> its mean-pooled first output (over the attention mask) for each sentence, run through ORT."""
    def measure(graph: Graph) -> Measured:
        sess = _ort_session(graph, options)
        pooled = []
        for feeds in feeds_list:
            hidden = sess.run([sess.get_outputs()[0].name], feeds)[0]
            mask = feeds["attention_mask"][..., None].astype(hidden.dtype)
            pooled.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1))
        return Measured(None, None, np.concatenate(pooled))
    return measure


def _fitted(fitted: dict | None) -> str:
    """' (64 in 19 layers whose K it does not divide)' for the summary line, or ''."""
    if not fitted:
        return ""
    return " (" + ", ".join(f"{b} in {n} layer{'s' * (n > 1)}" for b, n in fitted.items()) + " whose K it does not divide)"


def quantization_summary(records, scheme: str | None, calibration, feeds) -> dict:
    """The report's "quantization" entry: what was quantized and the weight bytes it saved. A
    pipeline of several quantizing passes (int4 for most layers, int8 for some) gets each
    one's entry under "passes", the layer counts and bytes summed over them at the top (the
    other fields the last pass's; "kept_float": what the last left in float)."""
    runs = [r for r in records if r.name in QUANT_PASSES]
    if not runs:
        return {}
    entries = [_quantization_entry(r) for r in runs]
    out = {"scheme": scheme, **entries[-1]}
    if len(entries) > 1:
        layers = collections.Counter()
        for e in entries:
            layers.update(e["layers"])
        out.update(layers=dict(layers), passes=entries,
                   float_weight_bytes=sum(e["float_weight_bytes"] for e in entries),
                   quantized_weight_bytes=sum(e["quantized_weight_bytes"] for e in entries))
    if feeds:
        out["calibration"] = {"file": None if calibration is None else str(calibration),
                              "batches": len(feeds), "sequences": int(sum(len(next(iter(f.values()))) for f in feeds))}
    return {"quantization": out}


def _quantization_entry(r) -> dict:
    int8 = r.name != "quantize-weights"  # dynamic or static: int8 weights per channel, no blocks
    method = {"quantize-dynamic": "dynamic", "quantize-static": f"static-{r.options.get('calibration')}"}
    out = {"bits": 8 if int8 else r.options["bits"],
           "block_size": None if int8 else r.options["block_size"],
           "symmetric": True if int8 else r.options["symmetric"],
           "method": method.get(r.name) or r.options["method"],
           "layers": {k: v for k, v in r.stats.items() if not k.endswith("-bytes") and not k.startswith("awq-")},
           "float_weight_bytes": r.stats.get("float-weight-bytes", 0),
           "quantized_weight_bytes": r.stats.get("quantized-weight-bytes", 0),
           "kept_float": [d["node"] for d in r.details if d.get("reason") == "excluded"]}
    if not int8:  # layers whose K the block size does not divide, with the block they took (fit_block)
        fitted = collections.Counter(d["block_size"] for d in r.details
                                     if d.get("block_size") not in (None, r.options["block_size"]))
        if fitted:
            out["fitted_block_sizes"] = {str(b): n for b, n in sorted(fitted.items(), reverse=True)}
    return out


def fusion_summary(records) -> dict:
    """Per fusion pass (`Pass.category == "fusion"`): how many sites it fused (by rule) and
    its near misses -- sites whose root op matched but a later constraint failed (NearMiss:
    rule, node, op, reason)."""
    out: dict = {}
    for r in records:
        if r.category != "fusion":
            continue
        entry = out.setdefault(r.name, {"matched": {}, "near_misses": []})
        for k, v in r.stats.items():
            entry["matched"][k] = entry["matched"].get(k, 0) + v
        entry["near_misses"] += [d for d in r.details if set(d) == _NEAR_MISS_FIELDS]
    return out


_NEAR_MISS_FIELDS = {f.name for f in dataclasses.fields(NearMiss)}


def format_fusions(report: dict, *, full: bool = False) -> str:
    """Per fusion: the sites fused, then its near misses grouped by rule and reason (names
    in the reason do not split a group), each group with its count and one example node.
    `full` lists every near miss instead, as report.json does."""
    lines = ["fusions"]
    for name, entry in report.get("fusions", {}).items():
        matched = ", ".join(f"{k} x{v}" for k, v in entry["matched"].items()) or "nothing"
        lines.append(f"  {name}: {matched}")
        if full:
            for nm in entry["near_misses"]:
                rule = f"[{nm['rule']}] " if nm.get("rule") else ""
                lines.append(f"    near miss {rule}at {nm.get('node')} ({nm.get('op')}): {nm.get('reason')}")
            continue
        groups: dict[tuple, list[dict]] = {}
        for nm in {(d.get("node"), d.get("rule"), d.get("reason")): d for d in entry["near_misses"]}.values():
            key = (nm.get("rule") or "", _QUOTED.sub("'...'", str(nm.get("reason"))))
            groups.setdefault(key, []).append(nm)
        for (rule, _), sites in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            first = sites[0]
            tag = f"[{rule}] " if rule else ""
            lines.append(f"    {len(sites):>3} near miss{'es' if len(sites) > 1 else ''} {tag}{first.get('reason')}"
                         f"  (e.g. {first.get('node')}, {first.get('op')})")
    if not full and any(e["near_misses"] for e in report.get("fusions", {}).values()):
        lines.append("  (every near miss: --explain-fusions=all, or report.json's \"fusions\")")
    return "\n".join(lines)


_QUOTED = re.compile(r"'[^']*'")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def format_report(report: dict) -> str:
    lines = [f"pipeline  {report['pipeline']}"]
    changed = [p for p in report["passes"] if p["stats"] or p["nodes_before"] != p["nodes_after"]]
    w = max((len(p["name"]) for p in changed), default=0)
    for p in changed:
        stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items())
        lines.append(f"  {p['name']:<{w}}  {p['seconds'] * 1000:8.1f} ms  {p['nodes_before']:>5} -> {p['nodes_after']:<5} {stats}")
    unchanged = collections.Counter(p["name"] for p in report["passes"] if p not in changed)
    if unchanged:  # one line for the passes that found nothing to do (report.json has them all)
        lines.append("  no change: " + ", ".join(f"{k} x{n}" if n > 1 else k for k, n in unchanged.items()))
    lines.append(f"nodes     {report['nodes_before']} -> {report['nodes_after']}")
    if "weight_bytes_after" in report:
        before, after = _size(report["weight_bytes_before"]), _size(report["weight_bytes_after"])
        disk = f"; artifact {_size(report['artifact_bytes'])} on disk" if "artifact_bytes" in report else ""
        lines.append(f"size      weights {before} -> {after}{disk}")
    t = report.get("tuning")
    if t:
        lines.append(f"tuning    {t.get('trials', 0)} trials, {t.get('kernels_tuned_now', 0)} kernels tuned now, "
                     f"{t.get('kernels_already_tuned', 0)} from earlier runs (stopped: {t.get('stopped', '?')})"
                     + ("; nothing was tuned: give --tune-minutes more time" if not t.get("trials")
                        and t.get("stopped") == "budget" else ""))
    if report.get("backend_seconds"):
        lines.append(f"backend   {report['backend']}: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in report["backend_seconds"].items()))
    q = report.get("quantization")
    for q in (q.get("passes") or [q]) if q else []:
        layers = sum(q["layers"].values())
        how = ("activations per call" if q["method"] == "dynamic" else
               f"activations {q['method']}" if q["method"].startswith("static") else
               f"block {q['block_size']}{_fitted(q.get('fitted_block_sizes'))}, {q['method']}")

        lines.append(f"quantized {layers} layers to int{q['bits']} ({how}): weights "
                     f"{_size(q['float_weight_bytes'])} -> {_size(q['quantized_weight_bytes'])}")
    a = report.get("accuracy")
    if a:
        kept = ", ".join(a["kept_float"]) or "none"
        base = "float, pruned" if report.get("pruning") else "fp32"  # the guard measures against the pruned float model
        reached = (f"perplexity {a['fp32_perplexity']:.4g} ({base}) -> {a['perplexity']:.4g}" if a["metric"] == "perplexity"
                   else f"top-1 agreement {a['score']:.7f}, perplexity {a['fp32_perplexity']:.4g} ({base}) -> "
                   f"{a['perplexity']:.4g}" if a["metric"] == "top1" else f"least cosine {a['score']:.7f}")
        lines.append(f"accuracy  {a['budget']}: {reached}; kept in float: {kept}")
    pruned = format_pruning(report)
    if pruned:
        lines.append(pruned)
    gone = collections.Counter(report["ops_before"]) - collections.Counter(report["ops_after"])
    if gone:
        lines.append("removed   " + ", ".join(f"{k} x{v}" for k, v in gone.most_common()))
    return "\n".join(lines)
