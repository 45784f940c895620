"""Loading a `MODEL` argument into the IR and writing graphs back out.

Accepted today: an `.onnx` file (with external data) and a `.gir` text file with its
weights. Hugging Face folders, graphopt training checkpoints and PyTorch state dicts come
through the frontends (see `graphopt.frontends`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from graphopt.errors import UserError
from graphopt.fileutil import check_output_files
from graphopt.ir import Graph
from graphopt.frontends import load_model_path
from graphopt.frontends.huggingface import onnx_config_hints
from graphopt.onnx_io import load_onnx, save_onnx
from graphopt.text import load_gir, save_gir, weights_file_of


# Files that go through graphopt.frontends rather than being read as a graph directly.
FRONTEND_SUFFIXES = (".pt", ".pth", ".bin", ".pt2", ".safetensors")


def load_graph(path: str | os.PathLike) -> Graph:
    """Read a model file into a verified-importable `Graph`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        try:
            graph = load_onnx(path)
        except UserError as e:
            if (path.parent / "manifest.json").is_file():  # an artifact's lowered graph (its backend's own ops)
                raise UserError(f"{e}; {path.name} is the lowered graph of the artifact {path.parent}: inspect the "
                                "folder, or optimize the model it came from") from None
            raise
        onnx_config_hints(graph, path)  # an Optimum export folder's config.json: the maximum context
        return graph
    if suffix == ".gir":
        return load_gir(path)
    if path.is_dir() or suffix in FRONTEND_SUFFIXES:
        try:
            return load_model_path(path)
        except UserError as e:
            raise UserError(f"{e}{_unreadable_manifest_hint(path)}") from None
    raise UserError(f"{path}: unknown model format {suffix or '(no suffix)'!r}; expected an .onnx or .gir "
                    "file, a Hugging Face or graphopt checkpoint folder, or a .pt/.bin/.pt2 file")


def _unreadable_manifest_hint(folder: Path) -> str:
    """A folder whose manifest.json is not valid JSON may be a damaged artifact: say so,
    since the error from its lowered model.onnx (ORT's own ops) alone would mislead."""
    manifest = folder / "manifest.json"
    if not folder.is_dir() or not manifest.is_file():
        return ""
    try:
        json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return f" (and {manifest} is not valid JSON: if this is a graphopt artifact, its manifest is damaged)"
    return ""


def save_graph(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None,
               overwrite: bool = True, inputs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Write `graph` as `.onnx` or `.gir` (by suffix), atomically: every file appears
    whole or not at all. Returns the files written.

    An existing file is replaced only with `overwrite`, and never one of `inputs` (or a file
    one of them names): see `graphopt.fileutil.check_output_files`."""
    import shutil
    import tempfile

    path = Path(path)
    suffix = _output_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write everything into a scratch folder beside the target, then move the files into place.
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if suffix == ".onnx":
            files = save_onnx(graph, work / path.name, external_data=external_data)
        else:
            files = save_gir(graph, work / path.name)
        targets = [path.parent / f.name for f in files]
        if any(t.exists() for t in targets):
            check_output_files(targets, model_files(*inputs), overwrite=overwrite)
        for f in files[1:] + files[:1]:  # the main file last: it names the others
            os.replace(f, path.parent / f.name)
        return targets
    finally:
        shutil.rmtree(work, ignore_errors=True)


def output_files(path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """The files `save_graph(graph, path)` writes: the model and the weights beside it (an
    .onnx's `.data` file only where `external_data` says so; by default it depends on size)."""
    path = Path(path)
    if _output_suffix(path) == ".gir":
        return [path, path.parent / (path.stem + ".weights.safetensors")]
    return [path] + ([path.parent / (path.name + ".data")] if external_data else [])


def _output_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".gir"):
        raise UserError(f"{path}: unknown output format {suffix or '(no suffix)'!r}; expected .onnx or .gir")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give an output file name")
    return suffix


def model_files(*paths: str | os.PathLike) -> dict[Path, Path]:
    """`paths` and the files they name (a .gir's weights file, an .onnx's external data),
    each mapped to the path it belongs to."""
    out = {}
    for path in map(Path, paths):
        out[path] = path
        try:
            if path.suffix.lower() == ".gir":
                name = weights_file_of(path.read_text())
                out.update({path.parent / name: path} if name else {})
            elif path.suffix.lower() == ".onnx":
                import onnx
                from google.protobuf.message import DecodeError

                proto = onnx.load(str(path), load_external_data=False)
                out.update({path.parent / loc: path for loc in sorted(_external_locations(proto))})
        except (OSError, ValueError, DecodeError):  # (an unreadable input fails where it is loaded)
            continue
    return out


def _external_locations(proto) -> set[str]:
    from onnx import TensorProto

    return {e.value for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}
