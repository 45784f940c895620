"""The accuracy guard behind `graphopt optimize --accuracy-budget METRIC=VALUE`.

The quantized model is measured against the fp32 one on held-out token windows; when it
misses the budget, every quantized layer's sensitivity is measured (that layer alone
quantized), and the most sensitive layers are kept in float, one more at a time, until the
budget holds. When even that fails, optimize stops with the best it reached (a UserError:
exit code 2, nothing written).

Metrics (a decoder's logits over token windows; an encoder's pooled output over sentences):
    perplexity=+2%    perplexity at most 2 % above fp32's
    top1=0.99         the arg-max token agrees with fp32's at >= 99 % of positions
    cosine=0.995      every held-out sentence's mean-pooled embedding has cosine >= 0.995
                      with fp32's (the worst sentence is the score)
The driver measures through ONNX Runtime's lowering in memory (`graphopt.driver`: the core
imports no backend): the arithmetic the ORT artifact runs, and the reference's.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph
from graphopt.calibration import check_vocabulary, model_dir, model_tokenizer, read_texts, token_input, window_len

METRICS = ("perplexity", "top1", "cosine")
HIGHER_IS_BETTER = ("top1", "cosine")
EVAL_TOKENS = 8192
MIN_TOKENS = 128  # scored tokens a budget is checked on, at least


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str
    value: float  # perplexity: the allowed relative increase; top1: the least agreement

    @staticmethod
    def parse(text: str) -> "Budget":
        metric, eq, raw = text.partition("=")
        metric = metric.strip()
        if not eq or metric not in METRICS:
            raise UserError(f"--accuracy-budget {text!r}: expected perplexity=+2%, top1=0.99 or cosine=0.995")
        value = None
        if metric == "perplexity":
            m = re.fullmatch(r"\+?(\d+(?:\.\d*)?|\.\d+)%", raw.strip(), re.ASCII)
            value = float(m.group(1)) / 100 if m else None
        else:
            try:
                value = float(raw)
            except ValueError:
                pass
        if value is None or not 0 <= value < float("inf") or (metric in HIGHER_IS_BETTER and value > 1):
            want = "+N% (for example +2%)" if metric == "perplexity" else "a fraction in [0, 1]"
            raise UserError(f"--accuracy-budget {text!r}: {metric} takes {want}")
        return Budget(metric, value)

    def __str__(self) -> str:
        # as given: ':g' showed cosine=0.99999999 as cosine=1, a budget no model misses
        if self.metric == "perplexity":
            return f"perplexity=+{self.value * 100:.10g}%"
        return f"{self.metric}={self.value:.10g}"


@dataclasses.dataclass
class Measured:
    perplexity: float | None
    argmax: np.ndarray | None
    embeddings: np.ndarray | None = None  # an encoder's pooled outputs [sentences, hidden]

    def score(self, budget: Budget, base: "Measured") -> float:
        """The metric's value against fp32 (relative perplexity increase, top-1 agreement, or
        the least cosine of a sentence's embedding with fp32's)."""
        if budget.metric == "perplexity":
            return self.perplexity / base.perplexity - 1
        if budget.metric == "cosine":
            a, b = self.embeddings.astype(np.float64), base.embeddings.astype(np.float64)
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            return float(cos.min())
        return float((self.argmax == base.argmax).mean())

    def shown(self, budget: Budget, base: "Measured") -> str:
        """The score as a line prints it: enough digits to compare with the budget's."""
        s = self.score(budget, base)
        return f"perplexity {s * 100:+.4f}%" if budget.metric == "perplexity" else f"{budget.metric} {s:.7f}"

    def meets(self, budget: Budget, base: "Measured") -> bool:
        s = self.score(budget, base)
        return s <= budget.value if budget.metric == "perplexity" else s >= budget.value


def held_out_tokens(model, graph: Graph, data: str | None) -> tuple[np.ndarray, str]:
    """Token ids to measure on: `data` (text or .jsonl), or a graphopt.train checkpoint's own
    held-out val.txt (its last EVAL_TOKENS tokens)."""
    folder = model_dir(model)
    if data is None:
        if folder is None or not (folder / "val.txt").is_file():
            raise UserError("--accuracy-budget needs held-out text: give --accuracy-data FILE (text or .jsonl)")
        path = folder / "val.txt"
    else:
        path = Path(data)
        if not path.is_file():
            raise UserError(f"--accuracy-data {path}: no such file")
    name = token_input(graph, str(path), option="--accuracy-data")
    tok = model_tokenizer(folder, str(path), option="--accuracy-data")
    texts = read_texts(path, option="--accuracy-data")
    ids = np.concatenate([np.asarray(tok.encode(t).ids, np.int64) for t in texts]) if texts else np.zeros(0, np.int64)
    check_vocabulary(graph, name, ids, f"--accuracy-data {path}")
    if len(ids) <= MIN_TOKENS:  # a perplexity over a handful of tokens says nothing of a 2 % budget
        raise UserError(f"--accuracy-data {path}: {len(ids)} tokens, too little text to measure accuracy on "
                        f"(give at least {MIN_TOKENS + 1})")
    return ids[-(EVAL_TOKENS + 1):], str(path)


def guard(base: Graph, quantize: Callable[[str], tuple[Graph, list]], budget: Budget,
          measure: Callable[[Graph], Measured], progress: Callable[[str], None]) -> tuple[str, dict]:
    """Choose the layers to keep in float. `quantize(exclude)` runs the quantization pass with
    that `exclude` option and returns (graph, its quantized layer names). Returns the exclude
    string to use and the report's "accuracy" entry."""
    progress("accuracy: measuring fp32")
    fp32 = measure(base)
    full, layers = quantize("")
    progress(f"accuracy: measuring all {len(layers)} layers quantized")
    reached = measure(full)
    entry = {"budget": str(budget), "metric": budget.metric, "fp32_perplexity": fp32.perplexity}
    if reached.meets(budget, fp32):
        return "", {**entry, "perplexity": reached.perplexity, "score": reached.score(budget, fp32), "kept_float": []}
    sensitivity = {}
    for i, layer in enumerate(layers):
        progress(f"accuracy: sensitivity {i + 1}/{len(layers)}: {layer}")
        alone, _ = quantize(";".join(x for x in layers if x != layer))
        s = measure(alone).score(budget, fp32)
        sensitivity[layer] = 1 - s if budget.metric in HIGHER_IS_BETTER else s  # larger: more sensitive
    ranked = sorted(layers, key=lambda x: -sensitivity[x])
    best = (reached.score(budget, fp32), reached, [])
    # at least one layer stays quantized: every layer in float is the float model, not a mix that meets it
    for n_kept in range(1, len(ranked)):
        kept = ranked[:n_kept]
        g, _ = quantize(";".join(kept))
        m = measure(g)
        progress(f"accuracy: {n_kept} layer(s) kept in float: {m.shown(budget, fp32)}")
        if m.meets(budget, fp32):
            return ";".join(kept), {**entry, "perplexity": m.perplexity, "score": m.score(budget, fp32),
                                    "kept_float": kept, "sensitivity": sensitivity}
        better = m.score(budget, fp32) > best[0] if budget.metric in HIGHER_IS_BETTER else m.score(budget, fp32) < best[0]
        if better:
            best = (m.score(budget, fp32), m, kept)
    base = f" (fp32 perplexity {fp32.perplexity:.4g})" if fp32.perplexity is not None else ""
    raise UserError(f"--accuracy-budget {budget}: no mix with a layer quantized meets it; the best reached "
                    f"{best[1].shown(budget, fp32)}{base}; nothing was written")


def held_out_sentences(model, graph: Graph, data: str | None, max_len: int = 128) -> tuple[list[dict], str]:
    """An encoder's held-out sentences (`data`: one a line, or .jsonl), one feed dict each,
    tokenized with the model folder's tokenizer.json. One sentence a run: with dynamic int8 the
    activation scales depend on everything in the batch (padding too), so a sentence's
    embedding would depend on its neighbours."""
    if data is None:
        raise UserError("--accuracy-budget cosine=... needs held-out sentences: give --accuracy-data FILE "
                        "(one sentence a line, or .jsonl)")
    path = Path(data)
    if not path.is_file():
        raise UserError(f"--accuracy-data {path}: no such file")
    texts = [t for raw in read_texts(path, "--accuracy-data") for t in (raw.splitlines() if path.suffix != ".jsonl" else [raw])
             if t.strip()]
    if not texts:
        raise UserError(f"--accuracy-data {path}: no sentences")
    names = {v.name for v in graph.inputs if not v.is_initializer}
    if "input_ids" not in names or "attention_mask" not in names:
        raise UserError(f"--accuracy-budget cosine=...: an encoder with input_ids and attention_mask inputs; "
                        f"this one takes {sorted(names)}")
    folder = model_dir(model)
    tok = model_tokenizer(folder, str(path), option="--accuracy-data")
    tok.enable_truncation(min(max_len, window_len(folder)))  # within the model's positions
    feeds = []
    for e in tok.encode_batch(texts):
        row = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
        feeds.append({k: np.array([v], np.int64) for k, v in row.items() if k in names})
    check_vocabulary(graph, "input_ids", np.concatenate([f["input_ids"].ravel() for f in feeds]), f"--accuracy-data {path}")
    return feeds, str(path)


def seq_len_of(model) -> int:
    folder = model_dir(model)
    return window_len(folder)


