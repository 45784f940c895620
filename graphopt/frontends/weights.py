"""Reading weights safely: safetensors, or `torch.load(weights_only=True)` -- never a pickle
that needs code.

`torch.load(weights_only=True)` unpickles with an allow-list of tensor-building globals and
stops at the first opcode that names anything else, *before* resolving it, so a file whose
pickle would call `os.system` is refused without running anything. That refusal (and any
other unreadable file) becomes a one-line `UserError`.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

from graphopt.errors import UserError

# Files read as a state dict (name -> tensor).
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

# Keys under which training scripts commonly nest the weights in a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def load_state_dict(path: str | Path) -> dict:
    """The tensors in a `.safetensors` file or a PyTorch `.pt/.pth/.bin` state-dict file, on CPU.

    A PyTorch file is read with `torch.load(weights_only=True)`; a pickle that needs any code
    beyond plain tensors and containers is refused with a `UserError` naming what it asked for.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors(path)
    obj = _torch_load_weights_only(path)
    return _as_state_dict(obj, path)


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _torch_load_weights_only(path: Path):
    import pickle

    import torch

    # The zip format (torch >= 1.6) can be memory-mapped; the legacy format cannot.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(_refusal(path, e)) from None
    except KeyError:  # torch.load reads a file that is not a checkpoint's as a legacy one: its "magic number"
        raise UserError(f"{path}: not a readable PyTorch checkpoint (not a zip or pickle file torch.save "
                        "writes)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None


def _refusal(path: Path, e: Exception) -> str:
    msg = str(e)
    # torch names what the pickle asked for: "Unsupported global: GLOBAL posix.system ..."
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    if m is None:  # not a request for code: a corrupt or foreign file ("Unsupported operand 110")
        op = re.search(r"Unsupported operand (\d+)", msg)
        detail = f"unsupported pickle opcode {op.group(1)}" if op else _first_line(e)
        return f"{path}: not a readable PyTorch checkpoint ({detail})"
    return (f"{path}: refused: its pickle needs code to load (it asks for {m.group(1)}); graphopt reads "
            "weights only (torch.load weights_only=True or safetensors) -- save model.state_dict() or "
            "safetensors instead, or, if you trust the file, load the module yourself and call "
            "graphopt.from_torch")


def _as_state_dict(obj, path: Path) -> dict:
    import torch

    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"{path}: holds no tensors; expected a state dict (a dict of tensors)")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
