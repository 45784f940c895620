"""The schema of a training config (a `--config` file or the flags): each option's type and
range, checked where it is parsed -- click types for the flags (`click_type`), `check_option`
for a config file -- so a wrong value is a one-line error before any work. No torch here
(`graphopt --help` imports this).
"""
from __future__ import annotations

from pathlib import PurePath

import click

from graphopt.click_types import MAX_THREADS, FiniteFloatRange
from graphopt.errors import UserError

# The byte-level BPE tokenizer always holds 256 byte tokens plus <|endoftext|>.
MIN_VOCAB = 257

# The schema of a training config (file or flags): option -> (type, low, high); a bound is
# inclusive unless it is written as ("open", x). None means unbounded.
SCHEMA = {
    "data": ((str, PurePath), None, None), "out": ((str, PurePath), None, None), "model": (dict, None, None),
    "batch_size": (int, 1, None), "grad_accum": (int, 1, None), "max_steps": (int, 1, None),
    "lr": (float, ("open", 0.0), None), "min_lr_ratio": (float, 0.0, 1.0),
    "warmup_steps": ((int, type(None)), 0, None), "weight_decay": (float, 0.0, None),
    "beta1": (float, 0.0, ("open", 1.0)), "beta2": (float, 0.0, ("open", 1.0)),
    "grad_clip": (float, ("open", 0.0), None), "eval_interval": (int, 1, None), "eval_tokens": (int, 1, None),
    "checkpoint_interval": (int, 1, None), "keep_checkpoints": (int, 1, None), "log_interval": (int, 1, None),
    "seed": (int, 0, 2**63 - 1), "bf16": (bool, None, None), "grad_checkpointing": (bool, None, None),
    "device": (str, None, None), "threads": (int, 0, MAX_THREADS),
    # fine-tuning (graphopt finetune)
    "checkpoint": ((str, PurePath), None, None), "lora_rank": (int, 0, None),
    "lora_alpha": ((float, type(None)), ("open", 0.0), None), "lora_targets": (str, None, None),
    "distill_from": ((str, PurePath), None, None), "distill_temperature": (float, ("open", 0.0), None),
    "distill_alpha": (float, 0.0, 1.0), "val": ((str, PurePath), None, None), "val_tokens": (int, 0, None),
}
DEVICES = ("auto", "cpu", "cuda")


def _bound(b):
    return (b[1], True) if isinstance(b, tuple) else (b, False)


def click_type(name: str):
    """The click type of the flag for option `name`, with its SCHEMA range."""
    want, low, high = SCHEMA[name]
    (lo, lo_open), (hi, hi_open) = _bound(low), _bound(high)
    number = FiniteFloatRange if float in (want if isinstance(want, tuple) else (want,)) else click.IntRange
    return number(min=lo, max=hi, min_open=lo_open, max_open=hi_open)


def check_option(name: str, value, source: str) -> None:
    """One training option against SCHEMA: its type (an int is not a bool; a float option
    takes an int) and its range; a mismatch is a one-line `UserError` naming `source`."""
    want, low, high = SCHEMA[name]
    types = want if isinstance(want, tuple) else (want,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                             dict: "an object", type(None): "null", PurePath: "a path"}[t] for t in types)
        raise UserError(f"{source}: {name} must be {names}, not {value!r}")
    if value is None or isinstance(value, (str, PurePath, dict, bool)):
        if name == "device" and value not in DEVICES:
            raise UserError(f"{source}: device must be one of {', '.join(DEVICES)}, not {value!r}")
        return
    (lo, lo_open), (hi, hi_open) = _bound(low), _bound(high)
    if value != value or (lo is not None and (value < lo or (lo_open and value == lo))) or \
            (hi is not None and (value > hi or (hi_open and value == hi))):
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        raise UserError(f"{source}: {name}={value!r} must be {' and '.join(x for x in (lo_s, hi_s) if x)}")
