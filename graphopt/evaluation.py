"""`graphopt eval` on an artifact folder (any backend): the perplexity and bits per byte that
graphopt.train measures on a checkpoint, on the same text with the same tokenizer, so a
quantized or pruned variant is measured the way its source model was.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from graphopt.accuracy import artifact_logits, perplexity
from graphopt.artifact import load as load_artifact
from graphopt.calibration import window_len
from graphopt.errors import UserError
from graphopt.train.evaluate import EvalResult, encode_scored, load_documents, scored_prefix
from graphopt.train.tokenizer import load_tokenizer


def evaluate_artifact(folder, data=None, batch_size: int = 16, max_tokens: int = 0) -> tuple[EvalResult, str]:
    """The same measurement on an artifact folder that `graphopt optimize` wrote (any
    backend): its tokenizer, context length and default text are those of the model it was
    optimized from (report.json's "model"), unless the folder has a tokenizer.json itself."""
    folder = Path(folder)
    art = load_artifact(folder)
    logits_fn = artifact_logits(art)  # first: an artifact that cannot be scored says so before any text is read
    report = folder / "report.json"
    source = None
    if report.is_file():
        try:
            source = json.loads(report.read_text()).get("model")
        except (ValueError, AttributeError):
            raise UserError(f"{report}: not a readable report (JSON object); optimize the model again") from None
    origin = Path(source) if source and Path(source).is_dir() else None
    tok_path = next((p for p in (folder / "tokenizer.json", origin / "tokenizer.json" if origin else None)
                     if p is not None and p.is_file()), None)
    if tok_path is None:
        raise UserError(f"{folder}: no tokenizer.json in the artifact nor in the model it came from ({source})")
    outputs = [o["name"] for o in art.outputs]
    if "logits" not in outputs:
        raise UserError(f"{folder}: gives {', '.join(outputs)}, no logits: perplexity measures a decoder; an "
                        "encoder's accuracy is the cosine of its outputs (graphopt compare, --accuracy-budget cosine=...)")
    if data is None and origin is None:
        raise UserError(f"{folder}: no default text (the model it came from is not a folder): pass --data")
    docs, text_source = load_documents(origin if data is None else folder, data)
    from graphopt.train.trainer import unigram_perplexity  # imports torch

    tok = load_tokenizer(tok_path)
    ids, n_bytes, n_docs = scored_prefix(tok, docs, encode_scored(tok, docs, text_source), max_tokens)
    # windows of the model's context, as `graphopt eval CHECKPOINT` scores a graphopt.train
    # checkpoint (its max_seq_len: the same measurement); a Hugging Face model's at most 256;
    # never past the artifact's cache size
    seq_len = _train_context(origin) or window_len(origin)
    max_positions = (art.manifest.get("generation") or {}).get("max_positions", art.manifest.get("max_positions"))
    if isinstance(max_positions, int) and max_positions > 0:
        seq_len = min(seq_len, max_positions)
    p = perplexity(logits_fn, np.asarray(ids), seq_len, batch_size)
    result = EvalResult(documents=n_docs, tokens=p.tokens, bytes=n_bytes, loss=p.loss, perplexity=p.perplexity,
                        bits_per_byte=p.nll / math.log(2) / n_bytes, unigram_perplexity=unigram_perplexity(ids))
    return result, text_source


def _train_context(origin: Path | None) -> int | None:
    """The context of the graphopt.train checkpoint at `origin` (its config's model.max_seq_len), or None."""
    try:
        cfg = json.loads((origin / "config.json").read_text()) if origin is not None else None
    except (OSError, ValueError):
        return None
    n = cfg.get("model", {}).get("max_seq_len") if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else None
    return n if isinstance(n, int) and n > 0 else None
