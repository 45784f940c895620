"""Accuracy of a cell against eager fp32 PyTorch, on the feeds it was timed with, and
perplexity on held-out text for decoders.

Positions that the attention mask pads out are left out: what a model computes there is
unspecified (PyTorch's kernels and the exported graph legitimately differ).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from graphopt.calibration import model_tokenizer, read_texts


def real_positions(feeds: dict, out: np.ndarray) -> np.ndarray | None:
    """A [batch, seq] boolean mask of the unpadded positions, when the output has them."""
    mask = feeds.get("attention_mask")
    if mask is None or out.ndim < 2 or mask.shape != out.shape[:2]:
        return None
    return np.asarray(mask).astype(bool)


def compare_outputs(got: np.ndarray, want: np.ndarray, feeds: dict, kind: str) -> dict:
    """max abs error (and the reference's own scale), plus top-1 agreement of logits for
    decoders, mean-pooled cosine similarity for encoders."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise ValueError(f"output shape {list(got.shape)} differs from PyTorch's {list(want.shape)}")
    real = real_positions(feeds, want)
    g, w = (got[real], want[real]) if real is not None else (got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]))
    finite = np.isfinite(g)
    diff = np.abs(g - w)[finite]
    # JSON has no NaN: the error is over the finite outputs, and the others are counted.
    out = {"max_abs_err": float(diff.max()) if diff.size else 0.0,
           "ref_max_abs": float(np.abs(w).max()) if w.size else 0.0}
    if not finite.all():
        out["nonfinite"] = int((~finite).sum())
    if kind == "decoder":
        out["top1_agreement"] = float((g.argmax(-1) == w.argmax(-1)).mean()) if g.size else 1.0
    else:
        out["pooled_cosine"] = pooled_cosine(got, want, real)
    return out


def pooled_cosine(got: np.ndarray, want: np.ndarray, real: np.ndarray | None) -> float:
    """The smallest, over the batch, cosine similarity of mean-pooled hidden states."""
    if got.ndim < 3:
        a, b = got.reshape(len(got), -1), want.reshape(len(want), -1)
    else:
        m = np.ones(got.shape[:2]) if real is None else real.astype(np.float64)
        a = (got * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
        b = (want * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = num / np.maximum(den, 1e-30)
    return float(np.min(np.nan_to_num(cos, nan=-1.0)))


# --------------------------------------------------------------------------------------
# Perplexity on text (decoders)


def text_windows(data_path: str, tokenizer_path: str, window: int, max_tokens: int) -> np.ndarray:
    """[n, window] token ids from the text file, cut into non-overlapping windows."""
    tok = model_tokenizer(Path(tokenizer_path).parent, data_path, option="--data")  # a bad file: one line
    text = "\n".join(read_texts(Path(data_path), "--data"))  # a .jsonl's texts; checked before any timing
    ids = np.asarray(tok.encode(text).ids, dtype=np.int64)[:max_tokens]
    n = len(ids) // window
    return ids[: n * window].reshape(n, window)


def perplexity(run, windows: np.ndarray, batch: int, input_names: list[str]) -> float:
    """exp(mean next-token NLL) over every window (each scored on its own)."""
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        feeds = {"input_ids": ids}
        if "attention_mask" in input_names:
            feeds["attention_mask"] = np.ones_like(ids)
        logits = np.asarray(run(feeds), dtype=np.float64)[:, :-1]
        target = ids[:, 1:]
        m = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
        picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
        nll += float((logz - picked).sum())
        count += target.size
    if not math.isfinite(nll):
        raise ValueError("non-finite log-likelihood (the model produced NaN or inf logits)")
    return math.exp(min(nll / count, 700.0))
