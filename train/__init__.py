"""graphopt.train: small decoder models, their tokenizer and data, the trainer and fine-tuning.

`models` holds the GPT and Llama-style decoders and their dataclass configs, `tokenizer` the
byte-level BPE, `data` the resumable preparation of text folders into memory-mapped token
files, `trainer` the (DDP-capable) training loop, `checkpoint` the atomic safetensors
checkpoint folders, `evaluate` perplexity / bits per byte, `generate` KV-cache sampling,
`finetune` and `lora` fine-tuning (LoRA merged for export, distillation), `prune` structured
pruning of a checkpoint into a smaller config, and `cli` the `train`, `eval`, `generate`,
`finetune` and `prune` commands. It knows nothing of the compiler; its
checkpoint folders (safetensors weights + JSON config + tokenizer) are what `graphopt
optimize` takes as MODEL. Nothing here imports torch at module scope.
"""
from __future__ import annotations


def load_model(folder, device: str = "cpu"):
    """Returns `(model, config)` -- an eval-mode `nn.Module` and its dataclass config -- from a
    checkpoint folder (or a run folder, meaning its latest checkpoint).

    Raises `graphopt.errors.UserError` for a missing folder, missing or mismatched weights,
    or an impossible config.
    """
    from .checkpoint import load_model as _load

    return _load(folder, device)


def load_tokenizer(folder):
    """The `tokenizers.Tokenizer` stored in a checkpoint folder."""
    from .checkpoint import resolve_checkpoint
    from .tokenizer import load_tokenizer as _load

    return _load(resolve_checkpoint(folder) / "tokenizer.json")


__all__ = ["load_model", "load_tokenizer"]
