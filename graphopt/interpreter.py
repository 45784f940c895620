"""The reference interpreter: runs any IR graph on numpy inputs, one node at a time.

Core ops run on ONNX's reference kernels (`onnx.reference`), graphopt ops on their
reference implementations in the registry. It is slow and obviously correct: the oracle
every pass is checked against. Feeds are checked against a graph's signature
(`graphopt.ir.signature`) by `check_signature_feeds`, which `Artifact.run` uses on a manifest's.
"""
from __future__ import annotations

import numpy as np

from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.ir import Graph, signature
from graphopt.registry import run_reference
from graphopt.sample_inputs import mask_terms, mask_total


def check_signature_feeds(sig: dict, feeds: dict[str, np.ndarray],
                          sums: dict[str, tuple[str, ...]] | None = None) -> dict[str, np.ndarray]:
    """`feeds` as the signature wants them (numpy arrays), or a UserError naming the input. A dim
    named in `sums` ({"past_seq + seq": ("past_seq", "seq")}) must equal the sum of those dims."""
    names = [e["name"] for e in sig["inputs"]]
    extra = sorted(set(feeds) - set(names))
    if extra:
        raise UserError(f"unknown input {extra[0]!r}; the model takes {names}")
    out, bound = {}, {}
    for e in sig["inputs"]:
        if e["name"] not in feeds:
            shape = "" if e["shape"] is None else f"[{', '.join(map(str, e['shape']))}]"
            raise UserError(f"missing input {e['name']!r} ({e['dtype']}{shape})")
        a = np.asarray(feeds[e["name"]])
        want = DType.from_short(e["dtype"]).np_dtype
        if a.dtype != want:
            raise UserError(f"input {e['name']!r} has dtype {a.dtype}, expected {want}")
        shape = e["shape"]
        if shape is not None:
            if a.ndim != len(shape):
                raise UserError(f"input {e['name']!r} has shape {list(a.shape)}, expected {shape}")
            for d, n in zip(shape, a.shape):
                if isinstance(d, int) and d != n:
                    raise UserError(f"input {e['name']!r} has shape {list(a.shape)}, expected {shape}")
                if isinstance(d, str) and bound.setdefault(d, n) != n:
                    raise UserError(f"input {e['name']!r}: dimension {d!r} is {n} here but {bound[d]} elsewhere")
        limit = e.get("index_limit")
        if isinstance(limit, int) and a.size and (a.min() < -limit or a.max() >= limit):
            bad = a.min() if a.min() < -limit else a.max()
            raise UserError(f"input {e['name']!r}: index {bad} is outside [-{limit}, {limit}) (the rows of the "
                            "table it indexes; token ids from another model's tokenizer?)")
        out[e["name"]] = a
    for e in sig["inputs"]:  # a dim that is a sum of others ("past_seq + seq"), once they are bound
        for axis, d in enumerate(e["shape"] or []):
            terms = (sums or {}).get(d) if isinstance(d, str) else None
            want = sum(bound[t] for t in terms) if terms and all(t in bound for t in terms) else None
            if want is not None and out[e["name"]].shape[axis] != want:
                raise UserError(f"input {e['name']!r} has shape {list(out[e['name']].shape)}: its dimension {axis} "
                                f"is {d} = {want} here")
    return out


def check_feeds(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate feeds against the graph's inputs (names, dtypes, ranks, static and symbolic
    dims, ids against the table they index, a cached decoder's mask against past + new
    tokens); returns them as arrays. A mismatch is a `UserError` naming the input."""
    weights = {v.name: v for v in graph.inputs if v.is_initializer}
    past, seq = mask_terms(graph)
    total = mask_total(graph)
    out = check_signature_feeds(signature(graph), {k: a for k, a in feeds.items() if k not in weights},
                                {total: (past, seq)} if total else None)
    for name in feeds.keys() & weights.keys():  # a feed for an input that has a default (a weight)
        a, want = np.asarray(feeds[name]), weights[name].type
        fits = want.shape is None or (a.ndim == len(want.shape) and all(
            not isinstance(d, int) or d == n for d, n in zip(want.shape, a.shape)))
        if a.dtype != want.dtype.np_dtype or not fits:
            raise UserError(f"input {name!r} has {a.dtype}{list(a.shape)}, expected {want}")
        out[name] = a
    return out


def run(graph: Graph, feeds: dict[str, np.ndarray], *, keep_all: bool = False) -> dict[str, np.ndarray]:
    """Run the graph; returns its outputs by name (with `keep_all`, every value by name)."""
    env: dict[int, np.ndarray] = {}
    for name, v in graph.initializers.items():
        env[id(v)] = np.asarray(v.const_value)
    feeds = check_feeds(graph, feeds)
    for v in graph.inputs:
        if v.name in feeds:
            env[id(v)] = feeds[v.name]
    names: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        undefined = next((i for i, v in enumerate(node.inputs) if v is not None and id(v) not in env), None)
        if undefined is not None:  # a graph that was not verified: a cycle, or another graph's value
            raise RuntimeError(f"node {node.name!r} ({node.op}) input {undefined} ({node.inputs[undefined].name!r}) "
                               "is not defined before the node")
        args = [None if v is None else env[id(v)] for v in node.inputs]
        try:
            with np.errstate(all="ignore"):  # masked rows and the like are the model's business
                results = run_reference(node, args)
        except UserError:
            raise
        except Exception as e:
            raise RuntimeError(f"node {node.name!r} ({node.op}) failed in the reference interpreter: {e}") from e
        for v, r in zip(node.outputs, results):
            if v is not None:
                if r is None:
                    raise RuntimeError(f"node {node.name!r} ({node.op}) produced no value for {v.name!r}")
                r = np.asarray(r)
                # a kernel's wrong dtype is caught at its node, not blamed on the node that reads it
                if v.type is not None and r.dtype != v.type.dtype.np_dtype:
                    raise RuntimeError(f"node {node.name!r}: the reference kernel of {node.op} returned {r.dtype} "
                                       f"for {v.name!r}, which is typed {v.type.dtype.short}")
                env[id(v)] = r
                if keep_all:
                    names[v.name] = env[id(v)]
    result = {v.name: env[id(v)] for v in graph.outputs}
    if keep_all:
        names.update(result)
        return names
    return result

