"""Artifacts: what `graphopt optimize` writes, and `graphopt.load(OUTDIR)` to run one.

A backend is a module with `NAME`, `check_target(target)`, `save(graph, outdir, target,
options) -> manifest fields`, `Executable(outdir, manifest, threads)` (with `.run(feeds)`)
and `versions()`; `KNOWN_BACKENDS` maps backend names to those modules.

    OUTDIR/model.onnx       the lowered model (+ model.onnx.data for large weights)
    OUTDIR/manifest.json    backend, target, signature (symbolic dims), versions
    OUTDIR/report.json      what each pass did and cost

`load(OUTDIR).run(feeds)` checks the feeds against the signature and runs the artifact on
its backend, whatever that backend is.

An artifact is code: a TVM artifact's `model.so` is a native library that loading runs, so
load only artifacts you trust. `read_manifest` checks the manifest before any backend sees
it: every file it names must be a plain relative path that stays inside the folder.
"""
from __future__ import annotations

import inspect
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from graphopt.click_types import MAX_THREADS
from graphopt.errors import UserError
from graphopt.ir import Graph, signature  # noqa: F401  (signature: part of the artifact API)
from graphopt import __version__
from graphopt.dtypes import DType
from graphopt.generation import Generator, generate_text
from graphopt.interpreter import check_signature_feeds
from graphopt.passes.kvcache.rewrite import PAST_SEQ, TOTAL_SEQ
from graphopt.manifest import (  # noqa: F401  (the manifest format: part of the artifact API)
    MANIFEST_FORMAT, MANIFEST_VERSION, artifact_file, read_manifest,
)

KNOWN_BACKENDS = {"onnxruntime": "graphopt.backends.onnxruntime", "tvm": "graphopt.backends.tvm"}
BACKEND_ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "tvm": "tvm"}


def make_manifest(graph: Graph, backend: str, target: str, backend_fields: dict, backend_versions: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "backend": backend,
        "target": target,
        **backend_fields,
        "signature": signature(graph),
        "versions": {"graphopt": __version__, "python": platform.python_version(), **backend_versions},
    }


def shares_cache_buffer(manifest: dict) -> bool:
    """Whether an artifact's growing (BNSH) cache may be driven as one buffer per layer that is
    both past and present: `generation.past_present_share_buffer` (every present is
    GroupQueryAttention's, the past read by it alone) on an ORT CPU artifact."""
    gen = manifest.get("generation") or {}
    return bool(gen.get("past_present_share_buffer") is True and gen.get("kv_layout", "BNSH") == "BNSH"
                and manifest.get("backend") == "onnxruntime" and manifest.get("target", "cpu") == "cpu")


def bound_shapes(sig: dict) -> tuple[dict, dict]:
    """A bound runner's arguments from a signature: {output: (shape, numpy dtype)}, {input: shape}."""
    return ({o["name"]: (o["shape"], DType.from_short(o["dtype"]).np_dtype) for o in sig["outputs"]},
            {i["name"]: i["shape"] for i in sig["inputs"]})


def cache_aliases(outputs) -> dict[str, str]:
    """{present.N.key|value: past_key_values.N.key|value}: each present written into its past."""
    return {o: "past_key_values." + o.removeprefix("present.") for o in outputs if o.startswith("present.")}


def _dims(value) -> tuple:
    """A numpy array's or an OrtValue's shape."""
    shape = value.shape
    return tuple(shape() if callable(shape) else shape)


def check_block_table(feeds) -> None:
    """A paged artifact's `block_table`: every block id the attention mask covers (its first
    ceil(mask length / block size) columns) must name a block of the pool; a kernel would
    otherwise write outside it or read another request's block."""
    table, pool, mask = (feeds.get(k) for k in ("block_table", "past_key_values.0.key", "attention_mask"))
    if table is None or pool is None or mask is None:
        return
    num_blocks, block_size = _dims(pool)[:2]
    table = np.asarray(table)
    if table.ndim != 2 or not block_size:
        return
    used = table[:, :-(-_dims(mask)[-1] // block_size)]
    bad = np.argwhere((used < 0) | (used >= num_blocks))
    if len(bad):
        row, col = (int(i) for i in bad[0])
        raise UserError(f"block_table[{row}, {col}] is block {int(used[row, col])}; the paged KV cache's pool has "
                        f"{num_blocks} blocks (ids 0 to {num_blocks - 1})")


def _checking_block_table(run):
    def checked(feeds):
        check_block_table(feeds)
        return run(feeds)
    return checked


# Artifact.generate's options: Generator.generate's keywords, less what only graphopt's own text path sets
GENERATE_OPTIONS = set(inspect.signature(Generator.generate).parameters) - {"self", "prompts", "max_new_tokens",
                                                                            "allowed_first"}


class Artifact:
    """A loaded artifact. `run(feeds)` -> outputs by name."""

    def __init__(self, path: Path, manifest: dict, executable):
        self.path = path
        self.manifest = manifest
        self._exe = executable

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["signature"]["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["signature"]["outputs"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            names = ", ".join(i["name"] for i in self.inputs)
            raise UserError(f"run takes a dict of input name -> array (the inputs: {names}), "
                            f"got {type(feeds).__name__}")
        gen = self.manifest.get("generation") or {}
        # rewrite-kv-cache's own sum of dims; an exporter's dim names are labels ("past_sequence_length + 1")
        feeds = check_signature_feeds(self.manifest["signature"], feeds, sums={TOTAL_SEQ: (PAST_SEQ, "seq")} if gen else None)
        limit, covered = gen.get("max_positions"), feeds.get("attention_mask")
        if not gen and "max_positions" in self.manifest:  # an encoder: one sequence of positions, no cache
            limit, covered = self.manifest["max_positions"], feeds.get("input_ids", covered)
        if isinstance(limit, int) and limit > 0 and covered is not None and covered.ndim == 2 \
                and covered.shape[1] > limit:
            if gen.get("kv_layout") in ("static", "paged"):
                raise UserError(f"attention_mask covers {covered.shape[1]} positions; the {gen['kv_layout']} KV "
                                f"cache holds {limit} (rewrite-kv-cache{{max-positions=N}} for more)")
            which = "attention_mask" if gen else "input_ids"
            raise UserError(f"{which} covers {covered.shape[1]} positions; the model has {limit} (its context): "
                            f"give at most {limit}")
        if gen.get("kv_layout") == "paged":
            check_block_table(feeds)
        return self._exe.run(feeds)

    @property
    def shares_cache_buffer(self) -> bool:
        """Whether a growing (BNSH) cache may be driven as one buffer per layer that is both
        past and present (`shares_cache_buffer(manifest)`); see `decode_run(shared=True)`."""
        return shares_cache_buffer(self.manifest)

    def decode_run(self, *, io_binding: bool | None = None, shared: bool = False):
        """`run` for a generation loop. With IO binding (ORT only) the cache stays in ORT's own
        buffers: its outputs are valid until its next call, and the presents are OrtValues to
        feed back as they are. `None` binds where it pays: a static or paged cache (the buffer
        is shared and written in place) or a GPU target. A growing cache on CPU runs
        `session.run` instead, which takes numpy feeds and gives its outputs without a copy
        either way; binding two values a layer a step only added Python time (the shipped
        model's greedy decode: 1,532 tokens/s bound against 1,637 plain, interleaved).

        `shared` (where `shares_cache_buffer`): the caller feeds each past as a buffer of every
        position the request will need ([batch, heads, positions, head], zeros at first) and
        gets it back as the present, the step written in place, as a static cache is; the
        attention mask still says how many positions are filled. A growing drive copies the
        whole past into a new present every step."""
        if shared:
            if not self.shares_cache_buffer:
                raise UserError(f"{self.path}: this artifact's cache cannot be shared between past and present "
                                "(only an ORT CPU artifact whose attention is GroupQueryAttention)")
            io_binding = True
        if io_binding is None:
            gen = self.manifest.get("generation") or {}
            io_binding = gen.get("kv_layout") in ("static", "paged") or self.manifest.get("target", "cpu") != "cpu"
        if io_binding and hasattr(self._exe, "bound_runner"):
            shapes, inputs = bound_shapes(self.manifest["signature"])
            if shared:  # each present written into its past's buffer
                return self._exe.bound_runner(shapes, inputs, cache_aliases(shapes)).run
            run = self._exe.bound_runner(shapes, inputs).run
            paged = (self.manifest.get("generation") or {}).get("kv_layout") == "paged"
            return _checking_block_table(run) if paged else run
        return self.run

    def generate(self, prompts, max_new_tokens: int = 32, **options):
        """Continue `prompts` (a string or a list of them, with the tokenizer beside the model;
        or token ids, one list or a batch) on this artifact's backend; returns a
        `graphopt.generation.GenerationResult` (tokens, texts, time to first token, decode
        tokens/s). Options: temperature, top_k, top_p, seed, eos_token_id, on_tokens."""
        unknown = sorted(set(options) - GENERATE_OPTIONS)
        if unknown:
            raise UserError(f"generate() has no option {unknown[0]!r} (its options: max_new_tokens, "
                            f"{', '.join(sorted(GENERATE_OPTIONS))})")
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(p, str) for p in prompts)):
            # each row's text as it reads after its prompt (a SentencePiece decoder keeps the space)
            return generate_text(self, [prompts] if isinstance(prompts, str) else list(prompts), max_new_tokens,
                                 **options)
        return Generator.for_artifact(self).generate(prompts, max_new_tokens, **options)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, backend={self.backend!r}, target={self.manifest['target']!r})"


def load(path: str | os.PathLike, *, threads: int | None = None) -> Artifact:
    """Load an artifact folder written by `graphopt optimize`. An artifact is code (a TVM
    artifact is a native library that loading runs): load only artifacts you trust."""
    import importlib

    if threads is not None and (not isinstance(threads, (int, np.integer)) or isinstance(threads, bool)
                                or not 1 <= threads <= MAX_THREADS):
        raise UserError(f"threads={threads!r}: a whole number from 1 to {MAX_THREADS} (or None: the backend's choice)")
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"load(path=...): expected the path of an artifact folder, got {type(path).__name__}")
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except OSError as e:  # the file system refused the name (too long) or the folder (permissions)
        shown = str(path) if len(str(path)) <= 80 else f"{str(path)[:77]}..."
        raise UserError(f"{shown}: {e.strerror or e}") from None
    mpath = path / "manifest.json"
    backend = manifest.get("backend")
    if backend not in KNOWN_BACKENDS:
        raise UserError(f"{mpath}: backend {backend!r} is not available in this graphopt "
                        f"(known: {', '.join(KNOWN_BACKENDS)})")
    module = importlib.import_module(KNOWN_BACKENDS[backend])
    module.check_target(manifest.get("target", "cpu"))
    return Artifact(path, manifest, module.Executable(path, manifest, threads=threads))
