"""graphopt training checkpoints (`graphopt.train`): a checkpoint folder (model.safetensors +
config.json with a "model" section) or a run folder (`checkpoints/latest`), exported as
`input_ids -> logits` with `batch` and `seq` dynamic.

The model comes from `graphopt.train.load_model(folder)`, which reads safetensors only.
The train models take token ids and no attention mask, so the graph has one input.
"""
from __future__ import annotations

from pathlib import Path

from graphopt.errors import UserError

FORMAT_PREFIX = "graphopt.train.checkpoint"
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


def is_training_config(config: dict) -> bool:
    fmt = config.get("format")
    if isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX):
        return True
    return isinstance(config.get("model"), dict) and "model_type" not in config


def is_run_folder(folder: Path) -> bool:
    return (folder / "checkpoints" / "latest").is_file() and not (folder / "config.json").exists()


def load_training_checkpoint(folder: Path, *, progress: bool = True):
    """A checkpoint (or run) folder -> Graph."""
    import torch

    from graphopt.frontends.torch_export import export_module

    try:
        from graphopt.train import load_model
    except ImportError as e:
        raise UserError(f"{folder}: a graphopt training checkpoint, but graphopt.train cannot be imported "
                        f"({e}); pip install 'graphopt[training]'") from None
    model, config = load_model(folder)
    max_seq = int(getattr(config, "max_seq_len", 0) or 0) or None
    seq = min(EXAMPLE_SEQ, max_seq) if max_seq else EXAMPLE_SEQ
    vocab = int(getattr(config, "vocab_size", 2))
    input_ids = torch.randint(0, vocab, (EXAMPLE_BATCH, seq), generator=torch.Generator().manual_seed(0))
    seq_dim = torch.export.Dim("seq", min=1, max=max_seq) if max_seq else torch.export.Dim("seq", min=1)
    dims = {0: torch.export.Dim("batch", min=1), 1: seq_dim}
    arch = getattr(config, "arch", type(model).__name__)
    graph = export_module(model.eval(), (input_ids,), {}, ["input_ids"], ["logits"], {"input_ids": dims},
                          label=f"{Path(folder).name or folder} (graphopt.train {arch})", progress=progress,
                          source=str(folder))
    if max_seq:  # the KV-cache rewrite builds its position tables this long
        graph.metadata.metadata_props["graphopt.max_positions"] = str(max_seq)
    return graph
