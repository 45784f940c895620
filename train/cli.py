"""CLI commands owned by graphopt.train: `train`, `eval`, `generate`.

torch and tokenizers are imported inside the command bodies so `graphopt --help` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from graphopt.errors import UserError

# Flags that override a field of the model config.
_MODEL_FLAGS = {"arch": "arch", "vocab_size": "vocab_size", "seq_len": "max_seq_len", "dim": "dim",
                "layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads",
                "mlp_hidden": "mlp_hidden"}
# Flags that override a field of the training config (same name).
_TRAIN_FLAGS = ("data", "out", "batch_size", "grad_accum", "max_steps", "lr", "warmup_steps",
                "weight_decay", "grad_clip", "eval_interval", "eval_tokens", "checkpoint_interval", "log_interval",
                "seed", "bf16", "grad_checkpointing", "device", "threads")


def _read_config_file(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object of training options")
    return d


@click.command("train")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file of training options (flags override it).")
@click.option("--preset", type=click.Choice(["tiny", "small", "default", "medium", "gpt-small"]),
              help="Model size preset (default: default).")
@click.option("--data", type=click.Path(path_type=Path), help="Folder of text files [default: Python stdlib].")
@click.option("--out", type=click.Path(path_type=Path), help="Run folder [default: runs/default].")
@click.option("--arch", type=click.Choice(["llama", "gpt"]))
@click.option("--vocab-size", type=int)
@click.option("--seq-len", type=int, help="Context length (model max_seq_len).")
@click.option("--dim", type=int)
@click.option("--layers", type=int)
@click.option("--heads", type=int)
@click.option("--kv-heads", type=int)
@click.option("--mlp-hidden", type=int)
@click.option("--batch-size", type=int, help="Sequences per process per micro-step.")
@click.option("--grad-accum", type=int, help="Micro-steps per optimizer step.")
@click.option("--max-steps", type=int)
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--warmup-steps", type=int)
@click.option("--weight-decay", type=float)
@click.option("--grad-clip", type=float)
@click.option("--eval-interval", type=int)
@click.option("--eval-tokens", type=int)
@click.option("--checkpoint-interval", type=int)
@click.option("--log-interval", type=int)
@click.option("--seed", type=int)
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None, help="Activation checkpointing.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--threads", type=int, help="torch intra-op threads (0 = torch default).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the run folder's latest checkpoint.")
def train_command(config_file, preset, resume, **flags):
    """Train a small decoder language model (data-parallel under torchrun).

    Prepares the data (resumable) into OUT/data, then trains, writing checkpoints to
    OUT/checkpoints/. Re-running the same command resumes from the latest checkpoint.

    \b
    Examples:
      graphopt train --preset tiny --max-steps 200 --out runs/tiny
      graphopt train --data ~/corpus --out runs/mine --dim 256 --layers 6 --heads 8
      torchrun --nproc-per-node 2 -m graphopt train --preset small --out runs/ddp
    """
    from .trainer import PRESETS, TrainConfig, train

    options = _read_config_file(config_file) if config_file else {}
    model = dict(PRESETS[preset or options.pop("preset", None) or "default"])
    model_opt = options.pop("model", {})
    if isinstance(model_opt, str):
        if model_opt not in PRESETS:
            raise UserError(f"{config_file}: unknown model preset {model_opt!r}")
        model_opt = PRESETS[model_opt]
    model.update(model_opt)
    for flag, field in _MODEL_FLAGS.items():
        if flags.get(flag) is not None:
            model[field] = flags[flag]
    if model.get("arch") == "gpt":
        model.pop("num_kv_heads", None)
    for name in _TRAIN_FLAGS:
        if flags.get(name) is not None:
            options[name] = str(flags[name]) if isinstance(flags[name], Path) else flags[name]
    cfg = TrainConfig.from_dict(dict(options, model=model), str(config_file or "flags"))
    folder = train(cfg, resume=resume)
    click.echo(f"checkpoint: {folder}")


COMMANDS: list = [train_command]
