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
# The KV-cache layouts rewrite-kv-cache writes and a manifest's "generation" names.
KV_LAYOUTS = ("BNSH", "BSNH", "static", "paged")


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
    if "generation" in manifest:
        _check_generation(manifest["generation"], sig, path, mpath)
    return manifest


def _whole(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_generation(gen, sig: dict, path: Path, mpath: Path) -> None:
    """The "generation" section a hand edit could make inconsistent: what the Generator
    would otherwise trip on halfway through a prompt (an EOS id of "x", an unknown layout, a
    static buffer length that is not the one its cache inputs have)."""
    where = f"{mpath}: generation"
    if not isinstance(gen, dict):
        raise UserError(f"{where} must be an object")
    layout = gen.get("kv_layout", "BNSH")
    if layout not in KV_LAYOUTS:
        raise UserError(f"{where}: kv_layout {layout!r} is not one of {', '.join(KV_LAYOUTS)}")
    if gen.get("logits", "last") not in ("last", "all"):
        raise UserError(f"{where}: logits {gen.get('logits')!r} is not last or all")
    if gen.get("tokenizer") is not None:
        artifact_file(path, gen["tokenizer"], f"{where}: tokenizer")
    prefix = gen.get("prompt_prefix_ids", [])
    if not (isinstance(prefix, list) and all(_whole(i) for i in prefix)):
        raise UserError(f"{where}: prompt_prefix_ids {prefix!r} is not a list of token ids")
    for key in ("max_positions", "num_layers", "block_size", "recompute_cache_at"):
        if key in gen and gen[key] is not None and not _whole(gen[key]):
            raise UserError(f"{where}: {key} {gen[key]!r} is not a whole number")
    eos = gen.get("eos_token_id")
    if not (eos is None or _whole(eos) or (isinstance(eos, list) and eos and all(_whole(e) for e in eos))):
        raise UserError(f"{where}: eos_token_id {eos!r} is not a token id (or a list of them)")
    share = gen.get("past_present_share_buffer", False)
    if not isinstance(share, bool) or (share and layout != "BNSH"):
        raise UserError(f"{where}: past_present_share_buffer {share!r} must be true or false, and true only "
                        "with kv_layout BNSH (a static cache is shared by its layout)")
    if layout == "static":
        past = next((e for e in sig["inputs"] if e["name"] == "past_key_values.0.key"), None)
        buffer = past["shape"][2] if past and isinstance(past.get("shape"), list) and len(past["shape"]) == 4 else None
        if isinstance(buffer, int) and gen.get("max_positions") != buffer:
            raise UserError(f"{where}: max_positions {gen.get('max_positions')!r} is not the static cache's "
                            f"{buffer} positions (its past_key_values inputs)")


def _is_dim(d) -> bool:
    """A signature dimension: a size (an int >= 0, not a bool), a symbol name, or None."""
    return d is None or isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
