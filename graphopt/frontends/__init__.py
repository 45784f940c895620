"""graphopt.frontends: models users have -> graphopt IR.

`from_torch(module, example_inputs, ...)` exports a PyTorch module (torch.onnx, dynamo
exporter; TorchScript only as a stated fallback) with dynamic `batch` and `seq` dimensions.
`load_model_path(path)` takes what a user has on disk -- a Hugging Face `save_pretrained`
folder, a graphopt training checkpoint (or run) folder, a `.pt/.pth/.bin/.safetensors` state
dict next to a `config.json` -- and exports it the same way. Weights load only through
safetensors or `torch.load(weights_only=True)`; a pickle that needs code is refused, and so is
an exported-program `.pt2` file (loading one unpickles and evaluates code from the file).

Modules: `torch_export` (export, import, progress), `huggingface` (transformers models),
`training` (graphopt.train checkpoints), `weights` (safe state-dict reading). torch and
transformers are imported inside the functions that need them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from graphopt.errors import UserError
from graphopt.ir import Graph

__all__ = ["from_torch", "load_model_path"]

# What reading each kind of input needs, and the extra that installs it.
_NEEDS = {
    "hf": (("torch", "transformers", "onnxscript"), "hf"),
    "training": (("torch", "onnxscript", "safetensors"), "torch"),
    "state_dict": (("torch",), "hf"),
}


def require(kind: str, path) -> None:
    """A one-line `UserError` naming the install command when a package that reading `path`
    (a Hugging Face folder, a training checkpoint, a state dict) needs is missing."""
    import importlib

    modules, extra = _NEEDS[kind]
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            what = {"hf": "a Hugging Face model", "training": "a graphopt training checkpoint",
                    "state_dict": "a PyTorch state dict"}[kind]
            raise UserError(f"{path}: reading {what} needs {name}, which is not installed: "
                            f"pip install 'graphopt[{extra}]'") from None


def from_torch(module, example_inputs, dynamic=None, input_names=None, output_names=None, *,
               name: str | None = None, progress: bool = True) -> Graph:
    """Export a PyTorch module (or `torch.export.ExportedProgram`) into a `Graph`; see
    `graphopt.frontends.torch_export.from_torch`."""
    from graphopt.frontends.torch_export import from_torch as _from_torch

    return _from_torch(module, example_inputs, dynamic, input_names, output_names, name=name, progress=progress)


def load_model_path(path: str | os.PathLike, *, progress: bool = True) -> Graph:
    """A model folder or checkpoint file -> `Graph`. A user mistake (unknown architecture,
    missing weight, unsafe pickle, no config) is a one-line `UserError`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, progress=progress)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        raise UserError(f"{path}: exported programs (.pt2) are not loaded: torch.export.load unpickles and "
                        "evaluates code from the file; if you trust it, load it yourself and call "
                        "graphopt.from_torch(program, ...), or export it to .onnx")
    from graphopt.frontends.weights import STATE_DICT_SUFFIXES

    if suffix in STATE_DICT_SUFFIXES:
        return _load_state_dict_file(path, progress=progress)
    raise UserError(f"{path}: unknown checkpoint format {suffix or '(no suffix)'!r}; expected a folder "
                    f"or a {'/'.join(STATE_DICT_SUFFIXES)} state-dict file next to a config.json")


def _load_folder(folder: Path, *, progress: bool) -> Graph:
    from graphopt.frontends import training

    config_path = folder / "config.json"
    if config_path.is_file():
        config = _read_config(config_path)
        if training.is_training_config(config):
            require("training", folder)
            return training.load_training_checkpoint(folder, progress=progress)
        from graphopt.frontends import huggingface

        if huggingface.is_hf_config(config):
            require("hf", folder)
            return huggingface.load_hf_folder(folder, config, progress=progress)
        raise UserError(f"{config_path}: neither a Hugging Face config (no model_type) nor a graphopt "
                        "training checkpoint config (no model section)")
    if training.is_run_folder(folder):
        require("training", folder)
        return training.load_training_checkpoint(folder, progress=progress)
    if (folder / "model.onnx").is_file():  # an optimized artifact or exported model folder
        from graphopt.onnx_io import load_onnx

        return load_onnx(folder / "model.onnx")
    raise UserError(f"{folder}: not a model folder: no config.json (Hugging Face or graphopt checkpoint), "
                    "no checkpoints/latest (graphopt training run) and no model.onnx")


def _load_state_dict_file(path: Path, *, progress: bool) -> Graph:
    from graphopt.frontends import training
    from graphopt.frontends.weights import load_state_dict

    config_path = path.parent / "config.json"
    config = _read_config(config_path) if config_path.is_file() else None
    if config is not None and training.is_training_config(config):
        if path.name == "model.safetensors":
            require("training", path.parent)
            return training.load_training_checkpoint(path.parent, progress=progress)
        raise UserError(f"{path}: a graphopt training checkpoint keeps its weights in model.safetensors; "
                        f"give the checkpoint folder {path.parent}")
    # Read (or refuse) the weights before asking for a config: an unsafe pickle is the
    # more important thing to tell the user.
    require("state_dict", path)
    state_dict = load_state_dict(path)
    if config is None:
        raise UserError(f"{path}: a state dict needs a Hugging Face config.json beside it to say which "
                        f"model it belongs to; there is none in {path.parent}")
    from graphopt.frontends import huggingface

    if not huggingface.is_hf_config(config):
        raise UserError(f"{config_path}: not a Hugging Face config (no model_type)")
    require("hf", path)
    return huggingface.load_hf_state_dict_file(path, config, state_dict, progress=progress)


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON config ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: the config is not a JSON object")
    return config
