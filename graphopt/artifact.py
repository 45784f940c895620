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

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, backend={self.backend!r}, target={self.manifest['target']!r})"


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


# Manifest fields that name files inside the artifact folder.
_PATH_FIELDS = ("model", "weights")


def artifact_file(folder: Path, name, where) -> Path:
    """`folder / name` for a file name taken from a manifest: refused (one line) unless it is
    a relative path that stays inside `folder` (no absolute path, no `..`, no symlink out)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UserError(f"{where}: names the file {name!r}, which is not a file name")
    if os.path.isabs(name) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{where}: names the file {name!r}; artifact paths must be relative and stay inside "
                        "the artifact folder")
    base = Path(folder).resolve()
    path = (base / name).resolve()
    if base not in path.parents:
        raise UserError(f"{where}: the file {name!r} resolves outside the artifact folder")
    return Path(folder) / name


def read_manifest(path: str | os.PathLike) -> dict:
    """The checked manifest of the artifact folder `path`: a graphopt manifest of a known
    format version, with a signature, and only relative file names inside the folder."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{path}: not a graphopt artifact (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{mpath}: not a text file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{mpath}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{mpath}: not a graphopt manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{mpath}: format_version must be an integer, not {version!r}")
    if version > MANIFEST_VERSION:
        raise UserError(f"{mpath}: written by a newer graphopt (format {version}); upgrade graphopt")
    sig = manifest.get("signature")
    if not (isinstance(sig, dict) and all(isinstance(sig.get(k), list) for k in ("inputs", "outputs"))):
        raise UserError(f"{mpath}: the manifest has no valid signature (inputs and outputs)")
    for side in ("inputs", "outputs"):
        for e in sig[side]:
            ok = (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("dtype"), str)
                  and (e.get("shape") is None or (isinstance(e["shape"], list)
                       and all(isinstance(d, (int, str)) or d is None for d in e["shape"]))))
            if not ok:
                raise UserError(f"{mpath}: signature {side} entry {e!r} needs a name, a dtype and a shape")
    if not isinstance(manifest.get("target", "cpu"), str):
        raise UserError(f"{mpath}: target must be a string")
    for key in _PATH_FIELDS:
        if key in manifest:
            artifact_file(path, manifest[key], f"{mpath}: {key}")
    files = manifest.get("files", [])
    if not isinstance(files, list):
        raise UserError(f"{mpath}: files must be a list of file names")
    for name in files:
        artifact_file(path, name, f"{mpath}: files")
    return manifest


def load(path: str | os.PathLike, *, threads: int | None = None) -> Artifact:
    """Load an artifact folder written by `graphopt optimize`. An artifact is code (a TVM
    artifact is a native library that loading runs): load only artifacts you trust."""
    import importlib

    path = Path(path)
    manifest = read_manifest(path)
    mpath = path / "manifest.json"
    backend = manifest.get("backend")
    if backend not in KNOWN_BACKENDS:
        raise UserError(f"{mpath}: backend {backend!r} is not available in this graphopt "
                        f"(known: {', '.join(KNOWN_BACKENDS)})")
    module = importlib.import_module(KNOWN_BACKENDS[backend])
    module.check_target(manifest.get("target", "cpu"))
    return Artifact(path, manifest, module.Executable(path, manifest, threads=threads))
