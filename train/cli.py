"""CLI commands owned by graphopt.train: `train`, `eval`, `generate`.

torch and tokenizers are imported inside the command bodies so `graphopt --help` stays fast.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from graphopt.errors import UserError

from .options import click_type

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
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (expected a JSON object of training options)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object of training options")
    return d


def _run_options(f):
    """The flags of a training run that `train` and `finetune` share."""
    options = [
        click.option("--data", type=click.Path(path_type=Path), help="Folder of text files: .py, .txt, .md, .rst [default: the Python stdlib's .py files]."),
        click.option("--out", type=click.Path(path_type=Path), help="Run folder."),
        click.option("--batch-size", type=click_type("batch_size"), help="Sequences per process per micro-step."),
        click.option("--grad-accum", type=click_type("grad_accum"), help="Micro-steps per optimizer step."),
        click.option("--max-steps", type=click_type("max_steps")),
        click.option("--lr", type=click_type("lr"), help="Peak learning rate."),
        click.option("--warmup-steps", type=click_type("warmup_steps")),
        click.option("--weight-decay", type=click_type("weight_decay")),
        click.option("--grad-clip", type=click_type("grad_clip")),
        click.option("--eval-interval", type=click_type("eval_interval")),
        click.option("--eval-tokens", type=click_type("eval_tokens")),
        click.option("--checkpoint-interval", type=click_type("checkpoint_interval")),
        click.option("--log-interval", type=click_type("log_interval")),
        click.option("--seed", type=click_type("seed")),
        click.option("--bf16/--no-bf16", default=None, help="bf16 autocast."),
        click.option("--grad-checkpointing/--no-grad-checkpointing", default=None, help="Activation checkpointing."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--threads", type=click_type("threads"), help="torch intra-op threads (0 = torch default)."),
        click.option("--stop-at-step", type=click.IntRange(min=1),
                     help="End after this step (with a checkpoint); the schedule still spans --max-steps."),
        click.option("--resume/--no-resume", default=True, show_default=True,
                     help="Continue from the run folder's latest checkpoint."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _val_options(what: str):
    """--val FILE / --val-tokens N of `prune` and `finetune`: the validation text on which
    `what` is measured (what `graphopt optimize` reports as perplexity before and after)."""
    def decorate(f):
        f = click.option("--val-tokens", type=click_type("val_tokens"), default=0, show_default=True,
                         help="Score only the first N tokens of the validation text (0 = all).")(f)
        return click.option("--val", type=click.Path(path_type=Path),
                            help=f"Validation text for {what} [default: CHECKPOINT/val.txt; without one, "
                                 "perplexity is skipped with a note].")(f)
    return decorate


def _set_flags(options: dict, flags: dict) -> dict:
    for name in _TRAIN_FLAGS:
        if flags.get(name) is not None:
            options[name] = str(flags[name]) if isinstance(flags[name], Path) else flags[name]
    return options


@click.command("train")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file of training options (flags override it).")
@click.option("--preset", type=click.Choice(["tiny", "small", "default", "medium", "gpt-small"]),
              help="Model size preset (default: default).")
@click.option("--arch", type=click.Choice(["llama", "gpt"]))
@click.option("--vocab-size", type=click.IntRange(min=1))
@click.option("--seq-len", type=click.IntRange(min=1), help="Context length (model max_seq_len).")
@click.option("--dim", type=click.IntRange(min=1))
@click.option("--layers", type=click.IntRange(min=1))
@click.option("--heads", type=click.IntRange(min=1))
@click.option("--kv-heads", type=click.IntRange(min=1))
@click.option("--mlp-hidden", type=click.IntRange(min=1))
@_run_options
def train_command(config_file, preset, resume, stop_at_step, **flags):
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
    file_preset = options.pop("preset", None)  # a --preset flag overrides the file's
    if file_preset is not None and file_preset not in PRESETS:
        raise UserError(f"{config_file}: unknown preset {file_preset!r} (known: {', '.join(PRESETS)})")
    model = dict(PRESETS[preset or file_preset or "default"])
    model_opt = options.pop("model", {})
    if isinstance(model_opt, str):
        if model_opt not in PRESETS:
            raise UserError(f"{config_file}: unknown model preset {model_opt!r} (known: {', '.join(PRESETS)})")
        model_opt = PRESETS[model_opt]
    if not isinstance(model_opt, dict):
        raise UserError(f"{config_file}: model must be a preset name or an object of model fields, not {model_opt!r}")
    model.update(model_opt)
    for flag, field in _MODEL_FLAGS.items():
        if flags.get(flag) is not None:
            model[field] = flags[flag]
    if model.get("arch") == "gpt":
        model.pop("num_kv_heads", None)
    _set_flags(options, flags)
    cfg = TrainConfig.from_dict(dict(options, model=model), str(config_file or "flags"))
    cfg.validate(str(config_file or "flags"))  # its errors name the file (train validates again)
    folder = train(cfg, resume=resume, stop_at_step=stop_at_step)
    _say_checkpoint(folder)


@click.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Folder of text files (.py, .txt, .md, .rst; cleaned as the training corpus is: tabs "
                   "to spaces, trailing spaces dropped), one text file (documents separated by "
                   "<|endoftext|>) or a .jsonl of texts, to score [default: CHECKPOINT/val.txt].")
@click.option("--batch-size", type=click_type("batch_size"), default=16, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=0), default=0, help="Score only the first N tokens (0 = all); bits per byte then counts the bytes of the "
                   "decoded tokens (a character cut in two counts as one replacement character).")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
def eval_command(checkpoint, data, batch_size, max_tokens, as_json):
    """Perplexity and bits per byte of CHECKPOINT on held-out text.

    CHECKPOINT is a checkpoint folder, a run folder (its latest checkpoint), or an artifact
    folder that `graphopt optimize` wrote (any backend: a quantized variant is measured the
    same way; its tokenizer and default text are those of the model it came from). Also
    prints the perplexity of a unigram model fitted on the same tokens, as a baseline.

    \b
    Examples:
      graphopt eval examples/default
      graphopt eval runs/tiny --data ~/held_out_texts
      graphopt optimize examples/default -o out/int4-all --quantize int4 --logits all
      graphopt eval out/int4-all                # an artifact folder (logits at every position)
    """
    from dataclasses import asdict

    from .checkpoint import is_hf_folder
    from .evaluate import evaluate_artifact, evaluate_checkpoint

    if (Path(checkpoint) / "manifest.json").is_file():
        result, source = evaluate_artifact(checkpoint, data, batch_size, max_tokens)
    elif is_hf_folder(Path(checkpoint)):
        raise UserError(f"{checkpoint}: a Hugging Face folder; eval scores graphopt.train checkpoints and artifacts: "
                        f"graphopt optimize {checkpoint} -o OUT --logits all, then graphopt eval OUT --data TEXT")
    else:
        result, source = evaluate_checkpoint(checkpoint, data, batch_size, max_tokens)
    if as_json:
        from graphopt.fileutil import json_text

        click.echo(json_text(dict(asdict(result), source=source)))
        return
    click.echo(f"text:               {source} ({result.documents} document{'' if result.documents == 1 else 's'}, "
               f"{result.bytes:,} bytes)")
    click.echo(f"tokens scored:      {result.tokens:,}")
    click.echo(f"loss:               {result.loss:.4f} nats/token")
    click.echo(f"perplexity:         {result.perplexity:.3f}")
    click.echo(f"bits per byte:      {result.bits_per_byte:.4f}")
    click.echo(f"unigram perplexity: {result.unigram_perplexity:.3f} "
               f"(model/unigram = {result.perplexity / result.unigram_perplexity:.4f})")


@click.command("finetune")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--lora-rank", type=click_type("lora_rank"), default=0, show_default=True,
              help="Train rank-R LoRA adapters with the base frozen (0 = train every weight).")
@click.option("--lora-alpha", type=click_type("lora_alpha"), help="LoRA scale numerator [default: 2 * rank].")
@click.option("--lora-targets", default="all", show_default=True,
              help="Comma-separated projections to adapt: q,k,v,o,gate,up,down (GPT: q/k/v is one merged projection).")
@click.option("--distill-from", type=click.Path(path_type=Path),
              help="Teacher checkpoint (same tokenizer): add a KL loss on its temperature-softened logits.")
@click.option("--distill-temperature", type=click_type("distill_temperature"), default=2.0, show_default=True)
@click.option("--distill-alpha", type=click_type("distill_alpha"), default=0.5, show_default=True,
              help="Weight of the distillation term; the language-model loss gets 1 - alpha.")
@_val_options("the base's and the fine-tuned model's perplexity, recorded in the last checkpoint")
@_run_options
def finetune_command(checkpoint, lora_rank, lora_alpha, lora_targets, distill_from, distill_temperature,
                     distill_alpha, val, val_tokens, resume, stop_at_step, **flags):
    """Fine-tune CHECKPOINT: LoRA adapters, distillation from a teacher, or both.

    The data (default: the Python stdlib, as `train`) is tokenized with CHECKPOINT's own
    tokenizer; --data may be a folder of .py/.txt/.md/.rst files or one text file. Each
    checkpoint in OUT/checkpoints/ holds the merged weights (a plain checkpoint for
    `graphopt optimize`, no extra ops) and, with LoRA, the unmerged adapter.safetensors.
    Re-running the same command resumes; `torchrun` runs it data-parallel, as `train`. The
    last checkpoint records the perplexity before and after on --val (printed; `graphopt
    optimize` reports it with the pruning's).

    \b
    Examples:
      graphopt finetune examples/default --data notes.txt --lora-rank 8 --max-steps 300 --out runs/lora
      graphopt finetune pruned/ --distill-from examples/default --max-steps 600 --out runs/recover
      graphopt finetune pruned/ --distill-from examples/default --val held_out.txt --val-tokens 20000 --out runs/r2
      torchrun --nproc-per-node 2 -m graphopt finetune examples/default --lora-rank 8 --out runs/ddp
    """
    from .finetune import FinetuneConfig, finetune

    options = _set_flags(dict(checkpoint=str(checkpoint), lora_rank=lora_rank, lora_alpha=lora_alpha,
                              lora_targets=lora_targets, distill_from=str(distill_from or ""),
                              distill_temperature=distill_temperature, distill_alpha=distill_alpha,
                              val=str(val or ""), val_tokens=val_tokens), flags)
    cfg = FinetuneConfig.from_dict(options, "flags")
    folder = finetune(cfg, resume=resume, stop_at_step=stop_at_step)
    _say_checkpoint(folder)


def _say_checkpoint(folder) -> None:
    """The last line of a run; under torchrun once (by rank 0, which wrote it), not per rank."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"checkpoint: {folder}")


@click.command("prune")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the pruned checkpoint.")
@click.option("--heads-ratio", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="Fraction of each layer's KV groups (with their query heads) to remove.")
@click.option("--mlp-ratio", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="Fraction of each layer's MLP channels to remove.")
@click.option("--min-keep", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fewest KV groups / channels a layer keeps.")
@click.option("--importance", type=click.Choice(["magnitude", "wanda"]), default="magnitude", show_default=True,
              help="Unit score: magnitude (the L2 norm of its weights) or wanda (|W| * ||x|| of its output-side "
                   "weights on calibration text): the rules of the prune-heads / prune-mlp passes.")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="A text file that --importance wanda runs the model on [default: the training "
                   "corpus of a checkpoint trained on the default one, never its validation text].")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True,
              help="Remove the ratio from every layer, or the lowest-scoring units of the whole model "
                   "(layers then keep different sizes).")
@_val_options("the unpruned and the pruned model's perplexity, recorded in OUT")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT even when it is not an earlier pruned checkpoint (a trained one, other files).")
def prune_command(checkpoint, out, heads_ratio, mlp_ratio, min_keep, importance, calibration, scope, val, val_tokens,
                  overwrite):
    """Prune a training CHECKPOINT into a smaller one: whole KV groups and MLP channels.

    Writes OUT, a plain checkpoint with the smaller config (`graphopt finetune` recovers it,
    `graphopt optimize` takes it), and prints the parameters and block FLOPs removed and the
    perplexity on the validation text before and after (recorded in OUT; `graphopt optimize`
    reports it). The units removed are those the IR passes prune-heads / prune-mlp remove at
    the same ratios and importance.

    \b
    Examples:
      graphopt prune examples/default --heads-ratio 0.5 --mlp-ratio 0.25 --out pruned
      graphopt prune examples/default --mlp-ratio 0.5 --importance wanda --calibration notes.txt --out pruned
      graphopt prune examples/default --heads-ratio 0.5 --val held_out.txt --val-tokens 20000 --out pruned
      graphopt finetune pruned --distill-from examples/default --out runs/recover
      graphopt optimize runs/recover -o out/pruned
    """
    from .prune import describe, prune_checkpoint

    summary = prune_checkpoint(checkpoint, out, heads_ratio, mlp_ratio, min_keep, importance, scope,
                               val=val, val_tokens=val_tokens, calibration=calibration, overwrite=overwrite)
    click.echo(describe(summary))
    click.echo(f"checkpoint: {out}")


COMMANDS: list = [train_command, eval_command, finetune_command, prune_command]
