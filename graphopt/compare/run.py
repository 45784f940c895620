"""`compare(...)`: build every backend x variant cell, measure each on the same feeds, and
return the report (a JSON-ready dict; `report.py` documents its fields)."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from graphopt.compare import variants as V
from graphopt.compare import decoding, memory
from graphopt.compare.timing import TimingSettings, describe, percentiles, time_interleaved
from graphopt.errors import UserError
from graphopt.frontends.training import is_run_folder
from graphopt.manifest import read_manifest
from graphopt.calibration import model_tokenizer as text_tokenizer
from graphopt.compare.accuracy import compare_outputs, perplexity, text_windows
from graphopt.compare.machine import library_versions, machine_record, physical_cores
from graphopt.compare.reference import artifact_source, load_reference
from graphopt.dtypes import DType
from graphopt.ir import Graph, TensorType
from graphopt.sample_inputs import index_bound, sample_inputs
from graphopt.train.checkpoint import resolve_checkpoint

REPORT_FORMAT = "graphopt-compare"
REPORT_VERSION = 1
BACKEND_OF_ARTIFACT = {"onnxruntime": "ort", "tvm": "tvm"}


class Progress:
    """Where `compare` says what it is doing; the CLI shows it with rich."""

    def phase(self, title: str, total: int) -> None: ...
    def advance(self, detail: str = "") -> None: ...
    def done(self) -> None: ...
    def close(self) -> None: ...


@dataclasses.dataclass
class Cell:
    id: str
    backend: str
    variant: str
    summary: str
    anchor: bool
    build: object
    runner: V.Runner | None = None
    error: str | None = None
    record: dict = dataclasses.field(default_factory=dict)


def is_artifact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def compare(models: list[str], *, backends: list[str] | None = None, variants: list[str] | None = None,
            batch: int = 1, seqs: list[int] | None = None, threads: int | None = None,
            timing: TimingSettings | None = None, data: str | None = None, data_tokens: int = 4096,
            reference: str | None = None, workdir: str | None = None, progress: Progress | None = None,
            measure_bandwidth: bool = True, measure_memory: bool = True, generate: int | None = None,
            generate_rounds: int = 3) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin while others run
    progress = progress or Progress()
    timing = timing or TimingSettings()
    seqs = list(seqs or [32])

    threads = int(threads or physical_cores() or os.cpu_count() or 1)  # ORT's own default: the physical cores
    if batch < 1 or any(s < 1 for s in seqs) or threads < 1:
        raise UserError("--batch, --seq and --threads must be positive")
    if not models:
        raise UserError("give a MODEL (anything `graphopt optimize` takes) or artifact folders")
    for m in models:
        if not Path(m).exists():
            raise UserError(f"{m}: no such file or folder")
    artifacts = [Path(m) for m in models if is_artifact(m)]
    if artifacts and len(artifacts) != len(models):
        raise UserError("give one model, or only artifact folders (`graphopt optimize` outputs), not a mix")
    if not artifacts and len(models) > 1:
        raise UserError(f"give one model, not {len(models)}; several arguments must all be artifact folders")
    if reference is not None and not Path(reference).exists():
        raise UserError(f"--reference {reference}: no such file or folder")
    source = reference or (artifact_source(artifacts[0]) if artifacts else models[0])
    if source is not None and is_run_folder(Path(source)):
        source = str(resolve_checkpoint(source))  # its latest checkpoint: what optimize reads and names
    if source is not None:  # accuracy is against one model: artifacts of another would be compared with it silently
        other = next(((a, s) for a in artifacts for s in [artifact_source(a)]
                      if s is not None and Path(s).resolve() != Path(source).resolve()), None)
        if other is not None:
            raise UserError(f"{other[0]} was optimized from {other[1]}, not {source}: compare artifacts of one model "
                            "(accuracy is measured against it)")
    if source is None:
        raise UserError(f"{artifacts[0]}: its report.json names no model that exists here; give --reference MODEL "
                        "(the PyTorch model accuracy is measured against)")

    if data is not None:
        if Path(data).is_dir():
            raise UserError(f"--data {data}: is a folder; give one text file")
        if not Path(data).is_file():
            raise UserError(f"--data {data}: no such text file")
        try:  # not text: said now, as eval says it (read with replacement characters, it got a perplexity)
            Path(data).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--data {data}: not a UTF-8 text file ({e})") from None
        except OSError as e:
            raise UserError(f"--data {data}: cannot be read ({e.strerror or e})") from None
        if not (Path(source) / "tokenizer.json").is_file():
            raise UserError(f"--data needs the model's tokenizer.json to score text; there is none in {source}")
        text_tokenizer(Path(source), data, option="--data")  # a corrupt tokenizer.json fails now, not after the timing

    backends = list(backends or (["torch", "ort"] if not artifacts else ["torch"]))
    unknown = [b for b in backends if b not in V.BACKENDS]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r} (available: {', '.join(V.BACKENDS)})")
    if variants is None:
        variants = V.default_variants() if not artifacts else (["fp32"] if "torch" in backends else [])
    unknown = [v for v in variants if v not in V.VARIANTS]
    if unknown:
        raise UserError(f"unknown variant {unknown[0]!r} (available: {', '.join(V.VARIANTS)})")

    cells: list[Cell] = []
    skipped = []
    for v in variants:
        spec = V.VARIANTS[v]
        on = [b for b in backends if b in spec.backends]
        if artifacts and v == "fp32":
            on = [b for b in on if b == "torch"]  # the artifacts themselves are the other fp32 columns
        if not on:
            skipped.append({"variant": v, "reason": f"exists on {', '.join(spec.backends)}, none of --backends"})
        for b in on:
            cells.append(Cell(f"{b}/{v}", b, v, spec.summary, spec.anchor, spec.build))
    for a in artifacts:
        manifest = read_manifest(a)
        if (manifest.get("generation") or {}).get("kv_layout"):
            raise UserError(f"{a}: a generation-ready artifact (with a KV cache); compare times full-sequence "
                            "artifacts: optimize with --no-kv-cache for it")
        b = BACKEND_OF_ARTIFACT.get(manifest.get("backend"), manifest.get("backend", "?"))
        cells.append(Cell(f"{b}/{a.name}", b, a.name, f"artifact {a}", False, V.artifact_variant(a)))
    if "tvm" in backends and "fp32" in variants and not artifacts:
        tuned = V.tvm_tuned_cell(batch, seqs)
        if tuned is not None:
            cell_id, summary, builder = tuned
            cells.append(Cell(cell_id, "tvm", V.TVM_TUNED, summary, False, builder))
    if len({c.id for c in cells}) != len(cells):
        raise UserError("two cells would have the same name; give artifact folders distinct names")
    cells.sort(key=lambda c: (c.id != "torch/fp32",))  # the reference first
    _check_cells(cells, skipped)

    machine = machine_record(measure_bandwidth=measure_bandwidth)
    progress.phase("loading the PyTorch reference", 1)
    ref = load_reference(source) if source else None
    progress.advance()
    if ref is None:  # an .onnx or .gir file: no PyTorch model to run or to measure against
        skipped += [{"variant": c.variant, "backend": c.backend, "reason": "no PyTorch model for this source"}
                    for c in cells if c.backend == "torch"]
        cells = [c for c in cells if c.backend != "torch"]
    else:
        import torch

        torch.set_num_threads(threads)
        if data is not None and ref.kind != "decoder":
            raise UserError("--data gives perplexity, which needs a decoder (a model with logits)")
        max_seq = ref.config.get("max_seq_len")
        if max_seq and max(seqs) > max_seq:
            raise UserError(f"--seq {max(seqs)} is longer than the model's context ({max_seq})")
        if generate and max_seq and max(seqs) + generate - 1 > max_seq:
            raise UserError(f"--generate {generate} after a prompt of --seq {max(seqs)} needs "
                            f"{max(seqs) + generate - 1} positions; the model has {max_seq}")
    if generate is not None:
        if generate < 1 or generate_rounds < 1:
            raise UserError("--generate must be a positive number of tokens")
        if ref is None or ref.kind != "decoder":
            raise UserError("--generate times decoding, which needs a decoder with its PyTorch model "
                            "(a graphopt checkpoint or a Hugging Face folder)")

    _check_cells(cells, skipped)
    scratch = None
    if workdir is None:
        scratch = tempfile.TemporaryDirectory(prefix="graphopt-compare-")
        workdir = scratch.name
    Path(workdir).mkdir(parents=True, exist_ok=True)
    ctx = V.BuildContext(source, Path(workdir), threads, ref)
    try:
        return _measure(ctx, cells, artifacts, batch, seqs, timing, data, data_tokens, machine,
                        library_versions(), skipped, progress, models, measure_memory, generate, generate_rounds)
    finally:
        for c in cells:
            if c.runner is not None:
                c.runner.close()
        if scratch is not None:
            scratch.cleanup()


def _feeds_graph(ctx: V.BuildContext, artifacts: list[Path]):
    """(a graph whose inputs say how to make valid feeds, the output names): the export, or
    for artifact folders a graph of just their signature (token ids are then drawn below the
    reference's vocabulary)."""
    if not artifacts:
        graph = ctx.export_graph()
        return graph, [v.name for v in graph.outputs]

    sig = read_manifest(artifacts[0])["signature"]
    g = Graph("signature")
    for e in sig["inputs"]:
        g.add_input(e["name"], TensorType(DType.from_short(e["dtype"]), None if e["shape"] is None else tuple(e["shape"])))
    return g, [e["name"] for e in sig["outputs"]]


def _make_feeds(graph, ref, dims: dict) -> dict:
    feeds = sample_inputs(graph, dims, seed=0)
    vocab = (ref.config.get("vocab_size") if ref is not None else None)
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    if ids is not None and vocab and index_bound(ids) is None:  # a signature only: nothing to read the vocabulary from
        rng = np.random.default_rng(0)
        feeds["input_ids"] = rng.integers(0, vocab, feeds["input_ids"].shape).astype(feeds["input_ids"].dtype)
    return feeds


def _check_cells(cells: list, skipped: list) -> None:
    """Nothing to time (every variant on none of the backends): a report of no cells is no answer."""
    if not cells:
        why = "; ".join(f"{s['backend'] + '/' if s.get('backend') else ''}{s['variant']}: {s['reason']}" for s in skipped)
        raise UserError(f"no cell to measure ({why}): give --variants and --backends that pair up "
                        "(graphopt compare --list-variants)")


def _measure(ctx, cells, artifacts, batch, seqs, timing, data, data_tokens, machine, versions, skipped,
             progress, models, measure_memory, generate, generate_rounds) -> dict:
    ref = ctx.reference
    progress.phase("exporting the model", 1)
    graph, output_names = _feeds_graph(ctx, artifacts)
    progress.advance()
    shapes = [(batch, s) for s in seqs]
    feeds = {s: _make_feeds(graph, ref, {"batch": b, "seq": s}) for b, s in shapes}
    largest = feeds[shapes[-1][1]]
    kind = ref.kind if ref is not None else ("decoder" if output_names[:1] == ["logits"] else "encoder")

    progress.phase("building variants", len(cells))
    for c in cells:
        progress.advance(c.id)
        try:
            c.runner = c.build(ctx, c.backend)
            c.runner.run(largest)
        except Exception as e:  # noqa: BLE001 - a failing cell is reported, the rest go on
            c.error = describe(e)
            c.runner = None

    reference_what = "eager fp32 PyTorch" if ref is not None else "ONNX Runtime on the export, ORT_DISABLE_ALL"
    ref_run = ref if ref is not None else _disable_all_runner(ctx)
    results: dict[str, list[dict]] = {c.id: [] for c in cells}
    for b, s in shapes:
        f = feeds[s]
        want = np.asarray(ref_run(f))
        live = {}
        progress.phase(f"checking accuracy at batch {b} x seq {s}", len(cells))
        for c in cells:
            progress.advance(c.id)
            entry = {"batch": b, "seq": s}
            results[c.id].append(entry)
            if c.runner is None:
                continue
            try:
                entry["accuracy"] = compare_outputs(c.runner.run(f), want, f, kind)
                live[c.id] = (lambda r=c.runner, f=f: r.run(f))
            except Exception as e:  # noqa: BLE001
                entry["error"] = describe(e)
        progress.phase(f"timing batch {b} x seq {s}", 0)
        samples, errors = time_interleaved(live, timing, on_round=lambda rnd, counts: progress.advance(
            f"round {rnd}: " + ", ".join(f"{k} {v}" for k, v in counts.items())))
        for c in cells:
            entry = results[c.id][-1]
            if c.id in errors:
                entry["error"] = errors[c.id]
            elif c.id in samples:
                stats = percentiles(samples[c.id])
                entry.update(stats)
                entry["samples_ms"] = samples[c.id]
                entry["sequences_per_s"] = b / stats["p50_ms"] * 1e3
                entry["tokens_per_s"] = b * s / stats["p50_ms"] * 1e3

    if measure_memory:
        _peak_memory(ctx, cells, largest, progress)

    generation = None
    if generate:
        prompts = [list(map(int, row)) for row in largest["input_ids"]]  # every row whole: no padding
        generation = _generation(ctx, cells, prompts, generate, generate_rounds, progress)

    ppl = None
    if data is not None:
        ppl = _perplexities(ctx, cells, data, data_tokens, batch, seqs, kind, graph, progress)
    progress.done()

    out_cells = []
    for c in cells:
        r = c.runner
        cell = {"id": c.id, "backend": c.backend, "variant": c.variant, "summary": c.summary, "anchor": c.anchor,
                "status": "error" if c.error else "ok", "error": c.error,
                "build_seconds": None if r is None else r.build_seconds,
                "tuning_seconds": None if r is None else r.tuning_seconds,
                "size_bytes": None if r is None else r.size_bytes,
                "size_what": None if r is None else r.size_what,
                "path": None if r is None else r.path,
                "settings": {} if r is None else r.settings,
                "memory": c.record.get("memory"),
                "results": results[c.id]}
        if ppl is not None and c.id in ppl["cells"]:
            cell["perplexity"] = ppl["cells"][c.id]
        if generation is not None and c.id in generation["cells"]:
            cell["generation"] = generation["cells"][c.id]
        out_cells.append(cell)
    ids = [c["id"] for c in out_cells if c["status"] == "ok"]
    baseline = next((i for i in ("ort/ort-plain", "torch/fp32") if i in ids), ids[0] if ids else None)
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"arguments": list(models), "source": ctx.source, "kind": kind,
                  "export_seconds": None if ctx.export_seconds is None else round(ctx.export_seconds, 3)},
        "reference": {"what": reference_what, "id": "torch/fp32" if ref is not None else None},
        "baseline": baseline,
        "settings": {"batch": batch, "seqs": list(seqs), "threads": ctx.threads,
                     "timing": dataclasses.asdict(timing),
                     "interleaving": "rounds over every cell, rotating start; untimed runs (one at least, "
                                     "switch_time seconds at least) at each visit before its timed block",
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "data": data,
                     "ort_session": V.ort_settings(ctx.threads),
                     "inputs": "graphopt.sample_inputs (seed 0): token ids in the vocabulary, "
                               "attention masks with the first row left-padded by a third"},
        "machine": machine,
        "versions": versions,
        "skipped": skipped,
        "perplexity": None if ppl is None else {k: v for k, v in ppl.items() if k != "cells"},
        "generation": None if generation is None else {k: v for k, v in generation.items() if k != "cells"},
        "cells": out_cells,
    }


def _peak_memory(ctx, cells, feeds: dict, progress) -> None:
    """Each cell's peak memory, from a fresh process of its own (graphopt.compare.memory),
    one at a time after the timing, so that nothing else runs beside it."""
    measurable = [c for c in cells if c.runner is not None]
    progress.phase("peak memory (a fresh process per cell)", len(measurable))
    path = ctx.workdir / "memory-feeds.npz"
    np.savez(path, **feeds)
    for c in measurable:
        progress.advance(c.id)
        spec = c.runner.memory_spec
        c.record["memory"] = (memory.measure(spec, path) if spec is not None else
                              {"error": "this cell cannot be loaded on its own in a fresh process"})


def generation_kwargs(optimize_kwargs: dict) -> dict:
    """`optimize` arguments of a variant's generation-ready build: the default pipeline does
    the KV-cache rewrite itself; a pipeline of the variant's own gets it appended."""
    kwargs = dict(optimize_kwargs)
    if kwargs.get("passes"):
        kwargs["passes"] += ",rewrite-kv-cache,slice-last-token-logits"
    return kwargs


def _generation(ctx, cells, prompts, new_tokens, rounds, progress) -> dict:
    """`--generate`: a generation-ready build of every cell that has one (graphopt's variants
    and eager torch), all timed with the same Generator loop (graphopt.compare.decoding)."""
    gens, errors, build_seconds = {}, {}, {}
    todo = [c for c in cells if (c.backend == "torch" and c.variant == "fp32") or
            (c.backend != "torch" and c.variant in V.VARIANTS and V.VARIANTS[c.variant].optimize_kwargs is not None)]
    progress.phase("building generation-ready artifacts (KV cache)", len(todo))
    for c in todo:
        progress.advance(c.id)
        try:
            if c.backend == "torch":
                gens[c.id] = decoding.torch_generator(ctx.reference)
                continue
            path, build_seconds[c.id] = ctx.optimize(f"{c.variant}-gen", c.backend, kv_cache=True,
                                                     **generation_kwargs(V.VARIANTS[c.variant].optimize_kwargs))
            gens[c.id] = decoding.artifact_generator(ctx, path)
        except Exception as e:  # noqa: BLE001 - a failing cell is reported, the rest go on
            errors[c.id] = describe(e)
    progress.phase(f"timing generation of {new_tokens} tokens", rounds)
    results, failed = decoding.time_generation(gens, prompts, new_tokens, rounds,
                                               on_round=lambda rnd: progress.advance(f"round {rnd}"))
    errors.update(failed)
    want = results.get("torch/fp32", {}).get("tokens")
    out = {}
    for c in todo:
        if c.id in errors:
            out[c.id] = {"error": errors[c.id]}
            continue
        r = results[c.id]
        out[c.id] = {**r, "build_seconds": build_seconds.get(c.id, 0.0),
                     "same_tokens": None if want is None else decoding.same_tokens(r["tokens"], want)}
    skipped = [c.id for c in cells if c not in todo]
    return {"new_tokens": new_tokens, "prompt_tokens": len(prompts[0]), "batch": len(prompts), "rounds": rounds,
            "reference": "torch/fp32" if want is not None else None, "how": decoding.HOW,
            "not_generated": {cid: "no generation-ready build (an anchor or an artifact folder)" for cid in skipped},
            "cells": out}


def _disable_all_runner(ctx: V.BuildContext):
    sess = V.ort_session(ctx.export_onnx(), ctx.threads, "none")
    name = sess.get_outputs()[0].name
    return lambda feeds: sess.run([name], feeds)[0]


def _perplexities(ctx, cells, data, data_tokens, batch, seqs, kind, graph, progress) -> dict | None:
    if kind != "decoder":
        raise UserError("--data gives perplexity, which needs a decoder (a model with logits)")
    tokenizer = Path(ctx.source) / "tokenizer.json"
    window = max(seqs)
    windows = text_windows(data, str(tokenizer), window, data_tokens)
    if len(windows) == 0:
        raise UserError(f"--data {data}: fewer than {window} tokens of text")
    names = [v.name for v in graph.inputs if not v.is_initializer]
    out = {"data": data, "tokens": int(windows.size), "window": window, "cells": {}}
    progress.phase("perplexity on --data", len(cells) + 1)
    if ctx.reference is not None:
        out["reference"] = perplexity(ctx.reference, windows, batch, names)
    progress.advance("reference")
    for c in cells:
        progress.advance(c.id)
        if c.runner is None:
            continue
        try:
            out["cells"][c.id] = {"perplexity": perplexity(c.runner.run, windows, batch, names)}
        except Exception as e:  # noqa: BLE001
            out["cells"][c.id] = {"error": describe(e)}
    return out
