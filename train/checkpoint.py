"""Checkpoint folders: written atomically, loaded with safetensors only (no unpickling).

    model.safetensors   weights (a tied LM head is stored once, as tok_emb.weight)
    config.json         {"format", "model": {...}, "train": {...}, "step", "metrics"}
    tokenizer.json      the BPE tokenizer
    val.txt             the held-out validation documents (when known)
    optimizer.pt        optimizer + scheduler state (training checkpoints only;
                        read with torch.load(weights_only=True))
    adapter.safetensors the unmerged LoRA adapter (`graphopt finetune --lora-rank`, only)

A training run folder keeps `checkpoints/step_XXXXXXX/` and a `checkpoints/latest` file
naming the newest; every command that takes a CHECKPOINT also accepts the run folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from graphopt.errors import UserError

FORMAT = "graphopt.train.checkpoint/1"


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder whose `checkpoints/latest` names one."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text(errors="replace").strip()
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise UserError(f"{latest}: names {name!r}, not a checkpoint folder inside {latest.parent}")
        if not (latest.parent / name / "config.json").is_file():
            raise UserError(f"{latest}: names {name!r}, which is not a complete checkpoint (no config.json)")
        return path / "checkpoints" / name
    if not path.exists():
        raise UserError(f"{path}: checkpoint folder not found")
    raise UserError(f"{path}: not a checkpoint (no config.json) and not a run folder (no checkpoints/latest)")


def _is_hf_config(d) -> bool:
    return isinstance(d, dict) and ("model_type" in d or "architectures" in d)


def is_hf_folder(folder: Path) -> bool:
    """Whether `folder` holds a Hugging Face model's config.json (not a graphopt.train checkpoint)."""
    try:
        return _is_hf_config(json.loads((Path(folder) / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read checkpoint config ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        hf = _is_hf_config(d)
        raise UserError(f"{path}: not a graphopt.train checkpoint config (no 'model' section)"
                        + ("; a Hugging Face folder" if hf else ""))
    return d


def _stored_state(model) -> dict:
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_model(folder, device: str = "cpu"):
    """Returns `(model, config)` from a checkpoint (or run) folder, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import build_model, config_from_dict

    folder = resolve_checkpoint(folder)
    cfg = config_from_dict(read_config(folder)["model"])
    model = build_model(cfg)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights}: weights file missing")
    try:
        loaded = load_file(str(weights), device=device)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
    expected = _stored_state(model)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing:
        raise UserError(f"{weights}: missing weight(s) {', '.join(missing[:3])}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if unexpected:
        raise UserError(f"{weights}: unexpected weight(s) {', '.join(unexpected[:3])}"
                        + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
    for name, tensor in expected.items():
        if tuple(loaded[name].shape) != tuple(tensor.shape):
            raise UserError(f"{weights}: weight {name} has shape {tuple(loaded[name].shape)}, "
                            f"config.json implies {tuple(tensor.shape)}")
    model.load_state_dict(loaded, strict=False)  # strict=False only for the tied lm_head alias
    return model.to(device).eval(), cfg


def save_checkpoint(folder: Path, model, config: dict, tokenizer_path: Path,
                    val_text: Path | None = None, training_state: dict | None = None,
                    extra_files: dict | None = None) -> Path:
    """Writes a complete checkpoint into `folder` atomically (temp folder, then rename); a
    previous checkpoint in `folder` stays whole until the new one is complete.
    `extra_files` maps a file name to {name: tensor}, saved beside the weights (safetensors)."""
    import torch
    from safetensors.torch import save_file

    from graphopt.fileutil import atomic_dir

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Built in a scratch folder beside `folder`; an older checkpoint of that name is replaced
    # only once the new one is complete (one atomic exchange of the two names).
    with atomic_dir(folder) as tmp:
        save_file(_stored_state(model), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(dict(config, format=FORMAT), indent=2) + "\n")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        if val_text is not None and Path(val_text).exists():
            shutil.copyfile(val_text, tmp / "val.txt")
        for name, tensors in (extra_files or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        if training_state is not None:
            torch.save(training_state, tmp / "optimizer.pt")
    return folder


def mark_latest(run_dir: Path, name: str, keep: int) -> None:
    """Points `checkpoints/latest` at `name` and prunes all but the newest `keep` steps."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tmp = ckpt_dir / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, ckpt_dir / "latest")
    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != name:
            # Renamed out of sight first, so a kill mid-delete never leaves a partial step_*.
            trash = old.with_name(f".{old.name}.deleting")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(old, trash)
    for trash in ckpt_dir.glob(".step_*.deleting"):
        shutil.rmtree(trash, ignore_errors=True)


def load_training_state(folder: Path) -> dict:
    import torch

    path = Path(folder) / "optimizer.pt"
    if not path.is_file():
        raise UserError(f"{path}: no optimizer state; cannot resume from an export-only checkpoint")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on a bad file
        raise UserError(f"{path}: not a readable optimizer state ({type(e).__name__}); "
                        "resume from an earlier checkpoint or use another --out") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "step"} <= set(state):
        raise UserError(f"{path}: not a graphopt optimizer state (needs optimizer, scheduler and step)")
    return state
