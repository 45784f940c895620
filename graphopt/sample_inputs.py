"""Sample inputs that are valid for a model: token ids below the vocabulary size, 0/1
attention masks, position ids in range, and symbolic dimensions bound to small sizes.

Used by check-numerics and by benchmarks when the user gives no `--inputs FILE.npz`.
"""
from __future__ import annotations

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph, Value

DEFAULT_DIMS = {"batch": 2, "seq": 8, "past_seq": 4}
# Ops through which an integer input keeps its meaning as indices.
_INDEX_PRESERVING = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


def sum_dims(graph: Graph) -> dict[str, list[str]]:
    """The input dims that are sums of others, with their terms (names or whole numbers): a dim
    named so ("past_seq + seq", "past_sequence_length + 1") and a cached decoder's mask length
    however its exporter named it (`mask_total`: past + new)."""
    total = mask_total(graph)
    sums = {}
    for v in graph.inputs:
        for d in (v.type.shape or ()) if v.type is not None else ():
            if isinstance(d, str) and d != total:
                terms = [t.strip() for t in d.split(" + ")]
                if len(terms) > 1 and all(t.isidentifier() or t.isdigit() for t in terms):
                    sums[d] = terms
    if total is not None:
        sums[total] = list(mask_terms(graph))
    return sums


def bind_dims(graph: Graph, dims: dict[str, int] | None = None) -> dict[str, int]:
    bound = dict(DEFAULT_DIMS)
    bound.update(dims or {})
    sums = {d: terms for d, terms in sum_dims(graph).items() if d not in bound}  # bound below, once their terms are
    for v in graph.inputs:
        for d in (v.type.shape or ()):
            if not isinstance(d, str) or d in bound or d in sums:
                continue
            low = d.lower()
            bound[d] = 4 if "past" in low else 8 if ("seq" in low or "len" in low) else 2
    for d, terms in sums.items():
        for t in terms:
            if not t.isdigit():
                bound.setdefault(t, 4 if "past" in t.lower() else 8)
        bound.setdefault(d, sum(int(t) if t.isdigit() else bound[t] for t in terms))
    return bound


def mask_terms(graph: Graph) -> tuple[str, str] | tuple[None, None]:
    """(the cache's past length, the new tokens' length) of a decoder with a KV cache
    (past_key_values.* inputs): the dims its attention mask must add up to; Nones otherwise."""
    inputs = {v.name: v.type.shape for v in graph.inputs if not v.is_initializer}
    ids = inputs.get("input_ids")
    if not (ids and len(ids) == 2 and isinstance(ids[1], str)):
        return None, None
    pasts = {d for name, shape in inputs.items() if name.startswith("past_key_values.")
             for d in (shape or ())[1:] if isinstance(d, str)}
    return (pasts.pop(), ids[1]) if len(pasts) == 1 else (None, None)


def mask_total(graph: Graph) -> str | None:
    """The attention mask's length dim in a decoder with a KV cache, which covers the past and
    the new tokens (whatever its exporter named it: "total", "past_sequence_length + 1"),
    or None."""
    past, seq = mask_terms(graph)
    mask = next((v.type.shape for v in graph.inputs if v.name == "attention_mask"), None)
    if past is None or not (mask and len(mask) == 2 and isinstance(mask[1], str)) or mask[1] in (past, seq):
        return None
    return mask[1]


def index_bound(v: Value) -> int | None:
    """The smallest size of a tensor that `v` indexes into through Gather (vocabularies,
    position tables), following index-preserving ops; None when it indexes nothing."""
    best = None
    stack, seen = [v], set()
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        for node, i in cur.uses():
            if node.op_type == "Gather" and i == 1 and node.domain == "":
                data = node.inputs[0]
                if data is not None and data.type is not None and data.type.shape:
                    axis = node.attr("axis", 0) % len(data.type.shape)
                    size = data.type.shape[axis]
                    if isinstance(size, int):
                        best = size if best is None else min(best, size)
            elif node.op_type in _INDEX_PRESERVING and i == 0:
                stack.extend(o for o in node.outputs if o is not None)
    return best


def sample_inputs(graph: Graph, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    bound = bind_dims(graph, dims)
    feeds: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        if v.is_initializer:
            continue
        t = v.type
        if t.shape is None:
            raise UserError(f"input {v.name!r} has unknown rank; give sample inputs with --inputs FILE.npz")
        shape = tuple(d if isinstance(d, int) else bound.get(d, 2) if isinstance(d, str) else 2 for d in t.shape)
        dt = t.dtype.np_dtype
        name = v.name.lower()
        if t.dtype.is_float:
            feeds[v.name] = rng.standard_normal(shape).astype(dt)
        elif dt == np.bool_:
            feeds[v.name] = rng.random(shape) < 0.5
        elif "mask" in name:
            mask = np.ones(shape, dt)
            if len(shape) >= 2 and shape[0] > 1 and shape[-1] > 2:
                mask[0, ..., : shape[-1] // 3] = 0  # left padding on the first row
            feeds[v.name] = mask
        elif "position" in name and shape:
            feeds[v.name] = np.broadcast_to(np.arange(shape[-1], dtype=dt), shape).copy()
        else:
            high = index_bound(v) or 4
            feeds[v.name] = rng.integers(0, high, shape).astype(dt)
    return feeds


def check_index_ranges(graph: Graph, feeds: dict[str, np.ndarray], source: str = "--inputs") -> None:
    """Integer inputs that index a table (token ids into a vocabulary, positions into a
    position table) must lie in [0, size): out-of-range ids are a one-line `UserError`."""
    for v in graph.inputs:
        a = feeds.get(v.name)
        if a is None or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            continue
        high = index_bound(v)
        if high is None:
            continue
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= high:
            bad = lo if lo < 0 else hi
            raise UserError(f"{source}: input {v.name!r} holds id {bad}, outside [0, {high}) "
                            f"(the size of the table it indexes)")


def load_inputs(path) -> dict[str, np.ndarray]:
    """Read feeds from an .npz file (one array per graph input)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such inputs file")
    # numpy and zipfile raise almost anything on a corrupt file (BadZipFile, EOFError,
    # NotImplementedError for a garbled compression method, IndexError, ...): all mean the same.
    with open(path, "rb") as f:
        magic = f.read(6)
    if not magic.startswith((b"PK\x03\x04", b"\x93NUMPY")):  # neither zip nor .npy: numpy took it for a pickle
        raise UserError(f"{path}: not an .npz file (np.savez writes one: np.savez('in.npz', input_ids=ids))")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz file of arrays ({_first_line(e)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: holds a single array (.npy); --inputs takes an .npz with one array per "
                        "model input, e.g. np.savez('in.npz', input_ids=ids)")
    try:
        with data:
            return {k: data[k] for k in data.files}
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz file of arrays ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:160] if text else type(e).__name__)
