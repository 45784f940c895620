"""LoRA: a low-rank update `W + (alpha / rank) * B @ A` beside each chosen linear, trained with
the base weights frozen, and merged back into plain weights for export.

`add_lora(model, targets, rank, alpha)` wraps the chosen projections of every block in place
and freezes everything else; `merge_lora(model)` returns a copy with plain `nn.Linear`s whose
weights hold the update (so a checkpoint, and the artifact made from it, has no extra ops);
`adapter_state(model)` is the unmerged adapter (A and B of every wrapped projection).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.errors import UserError

# Target name -> the block attribute it means, per arch. The GPT projects Q, K and V with one
# merged linear, so any of q, k, v selects it.
TARGETS = {
    "llama": {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"},
    "gpt": {"q": "qkv", "k": "qkv", "v": "qkv", "o": "attn_proj", "up": "mlp_fc", "down": "mlp_proj"},
}


class LoRALinear(nn.Module):
    """`base(x) + scale * x A^T B^T`; B starts at zero, so the wrapped model starts equal to
    the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initializes its weight

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A)


def parse_targets(text: str, arch: str) -> list[str]:
    """The block attributes named by a comma-separated list of targets ("all" = every one)."""
    table = TARGETS[arch]
    names = list(table) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise UserError(f"--lora-targets {text!r}: {arch} models take {', '.join(table)} or all"
                        + (f" (not {', '.join(unknown)})" if unknown else ""))
    return sorted({table[n] for n in names}, key=list(table.values()).index)


def add_lora(model: nn.Module, attributes: list[str], rank: int, alpha: float) -> nn.Module:
    """Freezes `model` and wraps `attributes` of every block with a LoRALinear (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for name in attributes:
            setattr(block, name, LoRALinear(getattr(block, name), rank, alpha))
    return model


def lora_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_state(model: nn.Module) -> dict:
    return {f"{name}.{p}": getattr(m, p) for name, m in lora_modules(model) for p in ("lora_A", "lora_B")}


def load_adapter(model: nn.Module, tensors: dict, source) -> None:
    expected = adapter_state(model)
    if set(tensors) != set(expected):
        raise UserError(f"{source}: the adapter's tensors do not match this run's LoRA targets; use another --out")
    with torch.no_grad():
        for name, p in expected.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise UserError(f"{source}: adapter tensor {name} has shape {tuple(tensors[name].shape)}, "
                                f"this run's rank implies {tuple(p.shape)}")
            p.copy_(tensors[name])


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRALinear replaced by a plain linear holding the merged
    weight; `model` itself is left as it was."""
    merged = copy.deepcopy(model)
    for name, m in lora_modules(merged):
        parent_name, _, attr = name.rpartition(".")
        linear = m.base
        linear.weight.copy_(m.merged_weight())
        setattr(merged.get_submodule(parent_name), attr, linear)
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged
