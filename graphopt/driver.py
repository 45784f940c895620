"""The optimize driver behind `graphopt.optimize(...)` and `graphopt optimize`: model in, artifact folder out."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph
from graphopt.pass_manager import NearMiss


def default_pipeline() -> str:
    """Cleanup, the transformer fusions, cleanup again: right for decoders and encoders
    alike (a fusion that finds nothing to fuse changes nothing)."""
    from graphopt.passes.cleanup import CLEANUP_PIPELINE, POST_FUSION_CLEANUP
    from graphopt.passes.fusion import FUSION_PIPELINE

    return f"{CLEANUP_PIPELINE},{FUSION_PIPELINE},{POST_FUSION_CLEANUP}"



def is_decoder(graph: Graph) -> bool:
    """A causal LM as the frontends export one: `input_ids [batch, seq]` (and maybe an
    `attention_mask`) in, one `logits [batch, seq, vocab]` out, no cache yet."""
    names = {v.name for v in graph.inputs if not v.is_initializer}
    return ("input_ids" in names and names <= {"input_ids", "attention_mask"} and len(graph.outputs) == 1
            and graph.outputs[0].name == "logits" and graph.outputs[0].type is not None
            and graph.outputs[0].type.rank == 3)


def _make_generation_ready(graph: Graph, pm, logits: str, verify: bool, progress, ctx):
    """rewrite-kv-cache (and slice-last-token-logits) after the default pipeline; the
    graph as it was, and why, where the rewrite refuses it. The generation passes change the
    signature (the cache inputs), so check-numerics, which runs the graph on the same feeds
    before and after each pass, stops before them; their own tests check them."""
    from graphopt.pass_manager import PassManager
    from graphopt.passes.kvcache.last_token import SliceLogitsError
    from graphopt.passes.kvcache.rewrite import KVCacheError

    stages = ["rewrite-kv-cache"] + (["slice-last-token-logits"] if logits == "last" else [])
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
             overwrite: bool = False, logits: str | None = None, kv_cache: bool = True) -> OptimizeResult:
    """Load `model`, run the pipeline (the default recipe, cleanup + fusion + cleanup, unless `passes` or
    `recipe` is given), lower it for `backend`/`target`, and write the artifact to
    `output_dir` atomically (nothing is left there if anything fails).

    `output_dir` may be missing, empty, or an artifact folder (replaced only once the new
    artifact is complete); a folder with other files in it is refused before any work
    unless `overwrite` (`graphopt.fileutil.check_output_dir` says what is never replaced).

    A decoder (`input_ids` in, `logits` out) gets a generation-ready artifact by default: the
    default pipeline ends with rewrite-kv-cache and, unless `logits="all"`, with
    slice-last-token-logits; its tokenizer is copied beside the model. Where the rewrite
    refuses the model (it says why), or with `kv_cache=False`, the artifact recomputes the
    whole sequence as before."""
    from graphopt.artifact import BACKEND_ALIASES, KNOWN_BACKENDS, make_manifest
    from graphopt.pass_manager import PassManager, load_recipe, parse_pipeline
    from graphopt.summary import summarize

    from graphopt.fileutil import atomic_dir, check_output_dir

    progress = progress or (lambda msg: None)
    t_start = time.perf_counter()
    if output_dir is not None:
        check_output_dir(output_dir, [] if isinstance(model, Graph) else [model], overwrite=overwrite)
    if passes is not None and recipe is not None:
        raise UserError("give either --passes or --recipe, not both")
    if backend not in BACKEND_ALIASES:
        raise UserError(f"unknown backend {backend!r} (available: {', '.join(sorted(BACKEND_ALIASES))})")
    backend = BACKEND_ALIASES[backend]
    import importlib

    be = importlib.import_module(KNOWN_BACKENDS[backend])
    be.check_target(target)
    if logits not in (None, "last", "all"):
        raise UserError(f"--logits {logits!r}: expected last or all")
    if logits is not None and (passes is not None or recipe is not None):
        raise UserError("--logits chooses the end of the default pipeline; with --passes or --recipe, add "
                        "(or leave out) slice-last-token-logits yourself")
    # Check the pipeline before the (possibly slow) model load.
    entries = load_recipe(recipe) if recipe is not None else parse_pipeline(passes or default_pipeline())

    if isinstance(model, Graph):
        graph = model
    else:
        from graphopt.models import load_graph

        progress(f"loading {model}")
        graph = load_graph(model)
    from graphopt.verify import verify as verify_graph

    if verify:
        try:
            verify_graph(graph)
        except Exception as e:
            raise UserError(f"{graph.metadata.source or 'model'}: the imported graph does not verify: {e}") from None
    if inputs is not None:
        from graphopt.interpreter import check_feeds

        from graphopt.sample_inputs import check_index_ranges

        inputs = check_feeds(graph, inputs)
        check_index_ranges(graph, inputs)
    before = summarize(graph)
    from graphopt.pass_manager import PassContext

    ctx = PassContext(target=target, hints={"backend": backend})
    pm = PassManager(entries, verify=verify, check_numerics=check_numerics, sample_inputs=inputs, progress=progress,
                     ctx=ctx)
    optimized = pm.run(graph)
    generation_note = None
    if passes is None and recipe is None and kv_cache and is_decoder(optimized):
        optimized, generation_note = _make_generation_ready(optimized, pm, logits or "last", verify, progress, ctx)
    elif logits is not None:
        raise UserError(f"--logits applies to decoders (input_ids in, logits out) with the KV cache; "
                        f"{graph.metadata.source or 'this model'} is not one")
    after = summarize(optimized)
    report = {
        "model": graph.metadata.source,
        "fusions": fusion_summary(pm.records),
        "frontend": {"exporter": graph.metadata.exporter or "onnx file", "seconds": round(graph.metadata.export_seconds, 3)},
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
        "backend": backend,
        "backend_options": dict(backend_options or {}),
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
            fields = be.save(optimized, tmp, target, dict(backend_options or {}))
            manifest = make_manifest(optimized, backend, target, fields, be.versions())
            from graphopt.generation import copy_tokenizer, generation_manifest

            generation = generation_manifest(optimized, None if isinstance(model, Graph) else model)
            if generation is not None:
                copy_tokenizer(None if isinstance(model, Graph) else model, tmp)
                generation["decode_graph_nodes"] = fields.get("nodes", len(optimized.nodes))
                manifest["generation"] = generation
            for key in ("lower_seconds", "compile_seconds", "tuning_seconds"):
                timing = fields.get(key)  # backends that compile report their build times
                if timing is not None:
                    report.setdefault("backend_seconds", {})[key.removesuffix("_seconds")] = timing
            report["total_seconds"] = round(time.perf_counter() - t_start, 3)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    else:
        report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    return OptimizeResult(optimized, report, manifest, out)


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
    if report.get("backend_seconds"):
        lines.append(f"backend   {report['backend']}: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in report["backend_seconds"].items()))
    gone = collections.Counter(report["ops_before"]) - collections.Counter(report["ops_after"])
    if gone:
        lines.append("removed   " + ", ".join(f"{k} x{v}" for k, v in gone.most_common()))
    return "\n".join(lines)
