"""Loading a `MODEL` argument into the IR and writing graphs back out.

Accepted today: an `.onnx` file (with external data) and a `.gir` text file with its
weights. Hugging Face folders, graphopt training checkpoints and PyTorch state dicts come
through the frontends (see `graphopt.frontends`).
"""
from __future__ import annotations

import os
from pathlib import Path

from graphopt.errors import UserError
from graphopt.ir import Graph
from graphopt.frontends import load_model_path
from graphopt.onnx_io import load_onnx, save_onnx
from graphopt.text import load_gir, save_gir


# Files that go through graphopt.frontends rather than being read as a graph directly.
FRONTEND_SUFFIXES = (".pt", ".pth", ".bin", ".pt2", ".safetensors")


def load_graph(path: str | os.PathLike) -> Graph:
    """Read a model file into a verified-importable `Graph`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return load_onnx(path)
    if suffix == ".gir":
        return load_gir(path)
    if path.is_dir() or suffix in FRONTEND_SUFFIXES:
        return load_model_path(path)
    raise UserError(f"{path}: unknown model format {suffix or '(no suffix)'!r}; expected an .onnx or .gir "
                    "file, a Hugging Face or graphopt checkpoint folder, or a .pt/.bin/.pt2 file")


def save_graph(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Write `graph` as `.onnx` or `.gir` (by suffix), atomically: every file appears
    whole or not at all. Returns the files written."""
    import shutil
    import tempfile

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".gir"):
        raise UserError(f"{path}: unknown output format {suffix or '(no suffix)'!r}; expected .onnx or .gir")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give an output file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write everything into a scratch folder beside the target, then move the files into place.
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if suffix == ".onnx":
            files = save_onnx(graph, work / path.name, external_data=external_data)
        else:
            files = save_gir(graph, work / path.name)
        for f in files[1:] + files[:1]:  # the main file last: it names the others
            os.replace(f, path.parent / f.name)
        return [path.parent / f.name for f in files]
    finally:
        shutil.rmtree(work, ignore_errors=True)
