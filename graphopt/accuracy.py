"""Accuracy of a runnable decoder on a token stream: perplexity, the way graphopt.train scores
a checkpoint (non-overlapping windows of `seq_len` predictions, every token predicted once),
so an artifact's figure and its checkpoint's figure are the same measurement.

`logits_fn(input_ids [batch, seq] int64) -> logits [batch, seq, vocab]` is anything that
runs the model: an artifact (`artifact_logits(graphopt.load(OUT))`), an ORT session, the
reference interpreter.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from graphopt.errors import UserError
from graphopt.generation import Generator


@dataclasses.dataclass
class Perplexity:
    nll: float       # summed negative log-likelihood, nats
    tokens: int      # predicted tokens

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return perplexity_of(self.loss)


def perplexity_of(loss: float) -> float:
    """exp(loss); a loss past exp's range (about 709.78) is inf, a NaN loss stays NaN."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def windows(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Windows of seq_len + 1 tokens that overlap by one: each predicts seq_len tokens."""
    ids = np.asarray(ids, np.int64)
    return [ids[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, seq_len: int,
               batch_size: int = 8, progress: Callable[[str], None] | None = None) -> Perplexity:
    nll, count = 0.0, 0
    ws = windows(ids, seq_len)
    for i in range(0, len(ws), batch_size):
        by_len: dict[int, list] = {}
        for w in ws[i:i + batch_size]:  # the last window may be shorter
            by_len.setdefault(len(w), []).append(w)
        for rows in by_len.values():
            rows = np.stack(rows)
            logits = np.asarray(logits_fn(rows[:, :-1]), np.float64)
            top = logits.max(axis=-1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
            target = np.take_along_axis(logits, rows[:, 1:, None], axis=-1)[..., 0]
            nll += float((log_z - target).sum())
            count += rows[:, 1:].size
        if progress:
            progress(f"scored {min(i + batch_size, len(ws))}/{len(ws)} windows")
    return Perplexity(nll, count)


def artifact_logits(artifact, input_name: str = "input_ids", output_name: str = "logits"):
    """A logits_fn over an artifact that `graphopt.load` returned. A generation-ready
    artifact runs as a prefill (a full mask, an empty cache); one that computes the logits at
    the last position only cannot be scored, and says how to make one that can."""
    generation = artifact.manifest.get("generation") or {}
    takes_mask = any(e["name"] == "attention_mask" for e in artifact.inputs)
    if not generation:
        def fn(ids: np.ndarray) -> np.ndarray:
            feeds = {input_name: ids, **({"attention_mask": np.ones_like(ids)} if takes_mask else {})}
            return artifact.run(feeds)[output_name]
        return fn
    if generation.get("logits") == "last":
        raise UserError(f"{artifact.path}: computes the logits at the last position only (for generation); "
                        "perplexity needs every position: optimize with --logits all (or --no-kv-cache)")

    gen = Generator.for_artifact(artifact, io_binding=False)  # an empty growing cache, for artifact.run

    def prefill(ids: np.ndarray) -> np.ndarray:
        feeds, _ = gen.prefill_feeds(ids, np.ones(ids.shape, gen.spec.mask_dtype), ids.shape[1])
        return artifact.run(feeds)[output_name]
    return prefill
