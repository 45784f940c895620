"""Perplexity and bits per byte of a checkpoint on held-out text, next to a unigram baseline."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from graphopt.errors import UserError


@dataclass
class EvalResult:
    documents: int
    tokens: int          # predicted tokens (each document's tokens and its closing <eos>)
    bytes: int           # UTF-8 bytes of the documents
    loss: float          # mean NLL per token, nats
    perplexity: float
    bits_per_byte: float
    unigram_perplexity: float  # unigram model fitted on these same tokens


def load_documents(checkpoint: Path, data: Path | None) -> tuple[list[str], str]:
    """The documents to score: `data` (a folder of text files or a val.txt) or the
    checkpoint's own val.txt."""
    from .data import TEXT_SUFFIXES, DataConfig, collect_documents, read_val_text

    if data is None:
        path = Path(checkpoint) / "val.txt"
        if not path.is_file():
            raise UserError(f"{checkpoint}: no val.txt (a graphopt.train checkpoint's held-out text); "
                            "pass --data FILE_OR_DIR")
        return read_val_text(path), str(path)
    data = Path(data)
    if data.is_file():
        return read_val_text(data, "--data"), str(data)
    # Every text file is scored: not the training cleaner's length rules (a prose paragraph is
    # one long line) nor its excluded test folders, but not the installed packages of a Python
    # tree either; what is left out (binary, not UTF-8, duplicates) is said.
    cfg = DataConfig(val_fraction=0.0, suffixes=TEXT_SUFFIXES, min_chars=1, max_line_chars=sys.maxsize,
                     exclude_dirs=("__pycache__", "site-packages", "dist-packages"))
    docs = collect_documents(data, cfg, say_left_out=True)
    return [d["text"] for d in docs], str(data)


def encode_scored(tok, docs: list[str], source: str):
    """The token ids of `docs`, at least two (one prediction); fewer is a UserError."""
    from .data import encode_documents

    ids = encode_documents(tok, docs)
    if len(ids) < 2:
        raise UserError(f"{source}: too little text to score (it needs at least one token)")
    return ids


def scored_prefix(tok, docs: list[str], ids, max_tokens: int) -> tuple:
    """(the ids scored, their text's bytes, the documents they reach): all of them, or with
    `max_tokens` the first max_tokens + 1 ids (max_tokens predictions), the bytes of their text
    (approximate: the prefix decoded) and the documents that begin in them."""
    from .tokenizer import EOS

    if not (max_tokens and len(ids) > max_tokens + 1):
        return ids, sum(len(d.encode()) for d in docs), len(docs)
    ids = ids[:max_tokens + 1]
    sep = 0 if tok.token_to_id(EOS) is None else 1
    start, reached = sep, 0
    for enc in tok.encode_batch(docs):
        if start >= len(ids):
            break
        reached += 1
        start += len(enc.ids) + sep
    return ids, len(tok.decode(ids[1:].tolist()).encode()), reached


def evaluate_checkpoint(checkpoint, data=None, batch_size: int = 16, max_tokens: int = 0) -> tuple[EvalResult, str]:
    from .checkpoint import load_model, resolve_checkpoint
    from .tokenizer import load_tokenizer

    folder = resolve_checkpoint(checkpoint)
    model, cfg = load_model(folder)
    tok = load_tokenizer(folder / "tokenizer.json")
    docs, source = load_documents(folder, data)
    return score_documents(model, cfg, tok, docs, source, batch_size, max_tokens, str(folder)), source


def score_documents(model, cfg, tok, docs: list[str], source: str, batch_size: int = 16, max_tokens: int = 0,
                    where: str = "model") -> EvalResult:
    """The perplexity (and bits per byte, unigram baseline) of `model` on `docs`."""
    import torch

    from .trainer import evaluate_tokens, perplexity_of, unigram_perplexity

    ids, n_bytes, n_docs = scored_prefix(tok, docs, encode_scored(tok, docs, source), max_tokens)
    if ids.max() >= cfg.vocab_size:
        raise UserError(f"{where}: tokenizer produces ids beyond the model's vocab_size={cfg.vocab_size}")
    device = next(model.parameters()).device
    with torch.inference_mode():
        nll, count = evaluate_tokens(model, ids, cfg.max_seq_len, batch_size, device=device)
    loss = nll / count
    return EvalResult(documents=n_docs, tokens=count, bytes=n_bytes, loss=loss,
                      perplexity=perplexity_of(loss), bits_per_byte=nll / math.log(2) / n_bytes,
                      unigram_perplexity=unigram_perplexity(ids))


# ---------------------------------------------------------------- validation perplexity in checkpoints
# `graphopt prune` and `graphopt finetune` record the perplexity of the models they start from
# and write on one validation text, so `graphopt optimize` can report "unpruned -> pruned ->
# recovered". The text is identified by its SHA-256, so the same text copied into another
# checkpoint still counts as the same.

def validation_text(option: str, val, checkpoint: Path) -> Path | None:
    """The validation text to score: `val` (a file; missing is a one-line error naming
    `option`), else the checkpoint's val.txt, else None (perplexity is then skipped)."""
    if val:
        path = Path(val)
        if not path.is_file():
            raise UserError(f"{option} {val}: no such file (give a text file, e.g. a checkpoint's val.txt)")
        return path
    path = Path(checkpoint) / "val.txt"
    return path if path.is_file() else None


def skipped(checkpoint: Path, option: str) -> dict:
    return {"skipped": f"{checkpoint} has no val.txt; pass {option} FILE to measure perplexity"}


def text_record(path: Path, max_tokens: int) -> dict:
    """What identifies a measurement's text: the file, its SHA-256 and the token cap."""
    import hashlib

    return {"text": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), "max_tokens": max_tokens}


def same_text(a: dict, b: dict) -> bool:
    return all(a.get(k) is not None and a.get(k) == b.get(k) for k in ("sha256", "max_tokens"))


def text_perplexity(model, cfg, tokenizer_path: Path, text: Path, max_tokens: int = 0) -> tuple[float, int]:
    """(perplexity, tokens scored) of `model` on the documents of `text` (as `graphopt eval
    --data TEXT` scores them)."""
    from .tokenizer import load_tokenizer

    docs, source = load_documents(Path(text).parent, text)
    result = score_documents(model, cfg, load_tokenizer(tokenizer_path), docs, source, max_tokens=max_tokens)
    return result.perplexity, result.tokens


# Artifact folders are the compiler's: graphopt registers how to measure one (graphopt.evaluation),
# so train/ knows nothing of the compiler and `graphopt eval` still takes either.
_ARTIFACT_EVALUATOR = None


def register_artifact_evaluator(fn) -> None:
    """`fn(folder, data, batch_size, max_tokens) -> (EvalResult, text source)` for artifact folders."""
    global _ARTIFACT_EVALUATOR
    _ARTIFACT_EVALUATOR = fn


def evaluate_artifact(folder, data=None, batch_size: int = 16, max_tokens: int = 0) -> tuple[EvalResult, str]:
    if _ARTIFACT_EVALUATOR is None:
        raise UserError(f"{folder}: an artifact folder is measured through graphopt's CLI (graphopt eval FOLDER)")
    return _ARTIFACT_EVALUATOR(folder, data, batch_size, max_tokens)
