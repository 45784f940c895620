"""Artifacts: what `graphopt optimize` writes, and `graphopt.load(OUTDIR)` to run one.

A backend is a module with `NAME`, `check_target(target)`, `save(graph, outdir, target,
options) -> manifest fields`, `Executable(outdir, manifest, threads)` (with `.run(feeds)`)
and `versions()`; `KNOWN_BACKENDS` maps backend names to those modules.

    OUTDIR/model.onnx       the lowered model (+ model.onnx.data for large weights)
    OUTDIR/manifest.json    backend, target, signature (symbolic dims), versions
    OUTDIR/report.json      what each pass did and cost

`load(OUTDIR).run(feeds)` checks the feeds against the signature and runs the artifact on
its backend, whatever that backend is.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph

MANIFEST_FORMAT = "graphopt-artifact"
MANIFEST_VERSION = 1
KNOWN_BACKENDS = {"onnxruntime": "graphopt.backends.onnxruntime", "tvm": "graphopt.backends.tvm"}
BACKEND_ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "tvm": "tvm"}


def signature(graph: Graph) -> dict:
    def entry(v):
        return {"name": v.name, "dtype": v.type.dtype.short,
                "shape": None if v.type.shape is None else list(v.type.shape)}
    return {"inputs": [entry(v) for v in graph.inputs if not v.is_initializer],
            "outputs": [entry(v) for v in graph.outputs]}


def make_manifest(graph: Graph, backend: str, target: str, backend_fields: dict, backend_versions: dict) -> dict:
    import graphopt

    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "backend": backend,
        "target": target,
        **backend_fields,
        "signature": signature(graph),
        "versions": {"graphopt": graphopt.__version__, "python": platform.python_version(), **backend_versions},
    }


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
        return self._exe.run(check_feeds(self.manifest["signature"], feeds))

    def generate(self, prompts, max_new_tokens: int = 32, **options):
        """Continue `prompts` (a string or a list of them, with the tokenizer beside the model;
        or token ids, one list or a batch) on this artifact's backend; returns a
        `graphopt.generation.GenerationResult` (tokens, texts, time to first token, decode
        tokens/s). Options: temperature, top_k, top_p, seed, eos_token_id, on_tokens."""
        from graphopt.generation import Generator, encode_prompts, load_tokenizer

        gen = Generator.for_artifact(self)
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(p, str) for p in prompts)):
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            tok = load_tokenizer(self.path)
            ids, allowed, healed = encode_prompts(self, tok, texts)
            result = gen.generate(ids, max_new_tokens, allowed_first=allowed, **options)
            result.texts = [_strip_prefix(tok.decode(t), h) for t, h in zip(result.tokens, healed)]
            return result
        return gen.generate(prompts, max_new_tokens, **options)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, backend={self.backend!r}, target={self.manifest['target']!r})"


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def check_feeds(sig: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from graphopt.dtypes import DType

    names = [e["name"] for e in sig["inputs"]]
    extra = sorted(set(feeds) - set(names))
    if extra:
        raise UserError(f"unknown input {extra[0]!r}; the model takes {names}")
    out, bound = {}, {}
    for e in sig["inputs"]:
        if e["name"] not in feeds:
            raise UserError(f"missing input {e['name']!r}")
        a = np.asarray(feeds[e["name"]])
        want = DType.from_short(e["dtype"]).np_dtype
        if a.dtype != want:
            raise UserError(f"input {e['name']!r} has dtype {a.dtype}, expected {want}")
        shape = e["shape"]
        if shape is not None:
            if a.ndim != len(shape):
                raise UserError(f"input {e['name']!r} has shape {list(a.shape)}, expected {shape}")
            for d, n in zip(shape, a.shape):
                if isinstance(d, int) and d != n:
                    raise UserError(f"input {e['name']!r} has shape {list(a.shape)}, expected {shape}")
                if isinstance(d, str) and bound.setdefault(d, n) != n:
                    raise UserError(f"input {e['name']!r}: dimension {d!r} is {n} here but {bound[d]} elsewhere")
        out[e["name"]] = a
    return out


def load(path: str | os.PathLike, *, threads: int | None = None) -> Artifact:
    """Load an artifact folder written by `graphopt optimize`."""
    import importlib

    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{path}: not a graphopt artifact (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{mpath}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{mpath}: not a graphopt manifest")
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        raise UserError(f"{mpath}: written by a newer graphopt (format {manifest.get('format_version')}); upgrade graphopt")
    backend = manifest.get("backend")
    if backend not in KNOWN_BACKENDS:
        raise UserError(f"{mpath}: backend {backend!r} is not available in this graphopt "
                        f"(known: {', '.join(KNOWN_BACKENDS)})")
    module = importlib.import_module(KNOWN_BACKENDS[backend])
    module.check_target(manifest.get("target", "cpu"))
    return Artifact(path, manifest, module.Executable(path, manifest, threads=threads))
