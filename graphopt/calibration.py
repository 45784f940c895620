"""Calibration data for the passes that need it (GPTQ): a list of feed dicts.

`--calibration FILE` is a text file, a `.jsonl` of texts (one JSON string or {"text": ...}
a line), or an `.npz` of model inputs (one array per input, samples along axis 0). Text is
tokenized with the model's own tokenizer (tokenizer.json in the model folder) and cut into
windows of the model's context. Without a file, a graphopt.train checkpoint trained on the
default corpus (the Python standard library) calibrates on that corpus's *training*
documents -- never on its validation text, on which its accuracy is measured.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.errors import UserError
from graphopt.frontends.huggingface import config_positions
from graphopt.ir import Graph
from graphopt.sample_inputs import index_bound

DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 256
BATCH = 4  # windows per feed dict


def load_calibration(path: str | Path | None, model: str | Path | None, graph: Graph, *,
                     samples: int = DEFAULT_SAMPLES, progress: Callable[[str], None] | None = None) -> list[dict]:
    progress = progress or (lambda msg: None)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--calibration {path}: no such file")
        if path.suffix == ".npz":
            return _npz_feeds(path, graph, samples, model_dir(model))
        texts = read_texts(path)
        source = str(path)
    else:
        texts, source = _default_texts(model)
    progress(f"calibrating on {source}")
    name = token_input(graph, source)
    folder = model_dir(model)
    tok = model_tokenizer(folder, source)
    ids = np.concatenate([np.asarray(tok.encode(t).ids, np.int64) for t in texts]) if texts else np.zeros(0, np.int64)
    check_vocabulary(graph, name, ids, f"--calibration {source}")
    seq_len = window_len(folder)
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise UserError(f"--calibration {source}: {len(ids)} token{'' if len(ids) == 1 else 's'}, fewer than one "
                        f"window of {seq_len}")
    picks = np.linspace(0, n_windows - 1, min(samples, n_windows)).astype(int)  # spread over the corpus
    rows = np.stack([ids[i * seq_len:(i + 1) * seq_len] for i in picks])
    names = [v.name for v in graph.inputs if not v.is_initializer]
    return [text_feeds(names, name, rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]


def read_texts(path: Path, option: str = "--calibration") -> list[str]:
    """The texts of a text file (one text) or a .jsonl (a JSON string or {"text": ...} a
    line); a bad file is a UserError naming `option`."""
    from graphopt.train.data import read_jsonl

    if path.suffix == ".jsonl":
        return read_jsonl(path, option)
    try:
        return [path.read_text(encoding="utf-8-sig")]  # a byte-order mark is not text
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{option} {path}: not a UTF-8 text file ({e})") from None


def _npz_feeds(path: Path, graph: Graph, samples: int, folder: Path | None = None) -> list[dict]:
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as e:  # numpy raises several kinds for a bad file
        raise UserError(f"--calibration {path}: not a readable .npz ({e})") from None
    names = [v.name for v in graph.inputs if not v.is_initializer]
    missing = [n for n in names if n not in data]
    if missing:
        raise UserError(f"--calibration {path}: no array for input {missing[0]!r} (the model takes {names})")
    context = model_context(folder)
    dims: dict[str, tuple[int, str]] = {}  # a symbolic dim -> (its size, the array that set it)
    for v in graph.inputs:
        if v.is_initializer or v.type is None:
            continue
        a, want = data[v.name], v.type.dtype.np_dtype
        if a.ndim == 0 or len(a) == 0 or (index_bound(v) is not None and a.size == 0):
            # (an empty past of a cached decoder is a prefill's; empty token ids are nothing to run)
            raise UserError(f"--calibration {path}: array {v.name!r} has shape {list(a.shape)}: give samples along "
                            "its first axis" + (", each of at least one token" if index_bound(v) else ""))
        if a.dtype != want:
            if not (a.dtype.kind in "iu" and np.dtype(want).kind == "i" and a.size
                    and np.iinfo(want).min <= a.min() and a.max() <= np.iinfo(want).max):
                raise UserError(f"--calibration {path}: array {v.name!r} has dtype {a.dtype}; the model's input is "
                                f"{v.type}")
            data[v.name] = a = a.astype(want)  # int32 token ids for an int64 input: the same ids
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UserError(f"--calibration {path}: array {v.name!r} holds NaN or infinity; calibration measures "
                            "the ranges of finite activations")
        if v.type.shape is None:
            continue
        shape = list(v.type.shape)
        if a.ndim != len(shape):
            raise UserError(f"--calibration {path}: array {v.name!r} has shape {list(a.shape)}; the model's input is "
                            f"{shape} (samples along the first axis)")
        for axis, d in enumerate(shape[1:], start=1):  # the first axis is the samples'
            seen = dims.setdefault(d, (a.shape[axis], v.name)) if isinstance(d, str) else (d, None)
            if a.shape[axis] != seen[0]:
                other = f"array {seen[1]!r} has {seen[0]}" if seen[1] else f"the model's input is {shape}"
                raise UserError(f"--calibration {path}: array {v.name!r} has shape {list(a.shape)}: its dimension "
                                f"{axis} ({d}) is {a.shape[axis]}, but {other}")
        rows = index_bound(v)
        if rows is not None and a.size and (a.min() < 0 or a.max() >= rows):
            raise UserError(f"--calibration {path}: array {v.name!r} holds token id {int(a.max() if a.max() >= rows else a.min())}, "
                            f"outside the model's vocabulary of {rows}")
        if rows is not None and context is not None and a.ndim == 2 and a.shape[1] > context:
            raise UserError(f"--calibration {path}: array {v.name!r} has sequences of {a.shape[1]} tokens; "
                            f"the model has {context} positions")
    counts = {k: len(data[k]) for k in names}
    if len(set(counts.values())) > 1:
        raise UserError(f"--calibration {path}: the arrays hold different numbers of samples "
                        f"({', '.join(f'{k}: {n}' for k, n in counts.items())}); give each input the same")
    n = min(min(counts.values()), samples)
    return [{k: data[k][i:i + BATCH] for k in names} for i in range(0, n, BATCH)]


# inputs text feeds besides the token ids, and what with (a Hugging Face decoder's mask: no padding)
_TEXT_COMPANIONS = {"attention_mask": np.ones_like, "token_type_ids": np.zeros_like}


def token_input(graph: Graph, source: str, option: str = "--calibration") -> str:
    """The name of the graph's input of token ids that text feeds: its one input, or input_ids
    beside an attention_mask (and token_type_ids), which `text_feeds` fills; else a UserError."""
    ins = [v for v in graph.inputs if not v.is_initializer]
    ints = all(v.type is not None and v.type.dtype.short == "i64" for v in ins)
    if ints and len(ins) == 1:
        return ins[0].name
    names = [v.name for v in ins]
    if ints and "input_ids" in names and all(n == "input_ids" or n in _TEXT_COMPANIONS for n in names):
        return "input_ids"
    raise UserError(f"{option} {source}: text feeds a model whose inputs are token ids (and an attention_mask); "
                    f"this one takes {names}" + _npz_hint(option, "inputs"))


def text_feeds(names, ids_name: str, rows: np.ndarray) -> dict:
    """The feeds of windows of token ids `rows` [n, seq] for a model with inputs `names`."""
    return {n: rows if n == ids_name else _TEXT_COMPANIONS[n](rows) for n in names}


def model_dir(model) -> Path | None:
    """The folder holding the model's tokenizer.json and config.json: the model's own, or the
    folder of a model file (an Optimum-style folder holds model.onnx beside them)."""
    if model is None or not isinstance(model, (str, Path)):
        return None
    p = Path(model)
    return p if p.is_dir() else (p.parent if p.is_file() else None)


def check_vocabulary(graph: Graph, name: str, ids: np.ndarray, where: str) -> None:
    """Token ids from the tokenizer beside the model must index its embedding table (a
    tokenizer of another model gives ids past it: a clear error here, not a kernel's)."""
    v = next((v for v in graph.inputs if v.name == name), None)
    rows = index_bound(v) if v is not None else None
    if rows is not None and ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise UserError(f"{where}: the tokenizer gives token id {int(ids.max())}, outside the model's vocabulary "
                        f"of {rows} (is the tokenizer.json beside the model this model's?)")


def model_tokenizer(folder: Path | None, source: str, option: str = "--calibration"):
    """The tokenizer.json in the model's folder (else a UserError naming `option`)."""
    from tokenizers import Tokenizer

    if folder is None or not (folder / "tokenizer.json").is_file():
        raise UserError(f"{option} {source}: text needs the model's tokenizer.json beside it"
                        + _npz_hint(option, "token ids"))
    try:
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{folder / 'tokenizer.json'}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def _npz_hint(option: str, what: str) -> str:
    return f"; give an .npz of {what} instead" if option == "--calibration" else ""


def model_context(folder: Path | None) -> int | None:
    """The positions the model at `folder` takes, from its config (None where it records none)."""
    cfg = folder / "config.json" if folder is not None else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        return None
    if isinstance(data, dict) and "model_type" in data:  # Hugging Face: RoBERTa's positions start past the padding id
        return config_positions(data)
    model = data.get("model", data) if isinstance(data, dict) else {}
    return next((model[k] for k in ("max_seq_len", "n_positions", "max_position_embeddings")
                 if isinstance(model.get(k), int)), None)


def window_len(folder: Path | None) -> int:
    """The length of one window of text: the model's context, at most DEFAULT_SEQ_LEN."""
    context = model_context(folder)
    return DEFAULT_SEQ_LEN if context is None else min(context, DEFAULT_SEQ_LEN)


def has_default_calibration(model) -> bool:
    """Whether `model` is a graphopt.train checkpoint trained on the default corpus, whose
    training documents are its default calibration data."""
    cfg = Path(model) / "config.json" if model is not None else None
    try:
        data = json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else {}
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and str(data.get("format", "")).startswith("graphopt.train")
            and isinstance(data.get("train", {}), dict) and not data.get("train", {}).get("data"))


def default_calibration_source(model) -> str | None:
    """Where a model's default calibration data comes from, as the report says it (None: it has none)."""
    if not has_default_calibration(model):
        return None
    from graphopt.train.data import default_data_dir

    return f"the training split of {default_data_dir()}"


def _default_texts(model) -> tuple[list[str], str]:
    """A graphopt.train checkpoint trained on the default corpus: its training documents."""
    if has_default_calibration(model):
        from graphopt.train.data import DataConfig, collect_documents, default_data_dir

        docs = collect_documents(default_data_dir(), DataConfig())
        train = [d["text"] for d in docs if d["split"] == "train"]
        # 64 documents spread over the corpus are plenty (DEFAULT_SAMPLES windows are drawn from them)
        return train[::max(1, len(train) // 64)], default_calibration_source(model)
    raise UserError("this model has no default calibration data: give --calibration FILE "
                    "(text, .jsonl of texts, or .npz of inputs)")
