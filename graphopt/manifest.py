"""The artifact manifest's format: what `manifest.json` holds, read and checked.

An artifact can hold native code (a TVM `model.so`) that loading it runs, so every file name a
manifest gives must be relative and stay inside the artifact folder. Backends, the writers of
artifacts and `graphopt.load` all read manifests through `read_manifest` and `artifact_file`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from graphopt.errors import UserError

MANIFEST_FORMAT = "graphopt-artifact"
MANIFEST_VERSION = 1


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
    if not path.exists():
        raise UserError(f"{path}: no such folder")
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
                       and all(_is_dim(d) for d in e["shape"]))))
            if not ok:
                raise UserError(f"{mpath}: signature {side} entry {e!r} needs a name, a dtype and a shape "
                                "(sizes: whole numbers >= 0 or symbol names)")
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


def _is_dim(d) -> bool:
    """A signature dimension: a size (an int >= 0, not a bool), a symbol name, or None."""
    return d is None or isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
