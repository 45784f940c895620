"""The reference interpreter: runs any IR graph on numpy inputs, one node at a time.

Core ops run on ONNX's reference kernels (`onnx.reference`), graphopt ops on their
reference implementations in the registry. It is slow and obviously correct: the oracle
every pass is checked against.
"""
from __future__ import annotations

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph
from graphopt.registry import run_reference


def check_feeds(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate feeds against the graph's inputs (names, dtypes, ranks, static and symbolic
    dims); returns them as arrays. A mismatch is a `UserError` naming the input."""
    out: dict[str, np.ndarray] = {}
    bound: dict[str, int] = {}
    names = {v.name for v in graph.inputs}
    for k in feeds:
        if k not in names:
            raise UserError(f"unknown input {k!r}; the graph takes {sorted(names)}")
    for v in graph.inputs:
        if v.name not in feeds:
            if v.is_initializer:
                continue
            raise UserError(f"missing input {v.name!r} ({v.type})")
        a = np.asarray(feeds[v.name])
        t = v.type
        if a.dtype != t.dtype.np_dtype:
            raise UserError(f"input {v.name!r} has dtype {a.dtype}, expected {t.dtype.np_dtype} ({t})")
        if t.shape is not None:
            if a.ndim != len(t.shape):
                raise UserError(f"input {v.name!r} has shape {list(a.shape)}, expected {t}")
            for d, n in zip(t.shape, a.shape):
                if isinstance(d, int) and d != n:
                    raise UserError(f"input {v.name!r} has shape {list(a.shape)}, expected {t}")
                if isinstance(d, str):
                    if bound.setdefault(d, n) != n:
                        raise UserError(f"input {v.name!r}: dimension {d!r} is {n} here but {bound[d]} elsewhere")
        out[v.name] = a
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
                env[id(v)] = np.asarray(r)
                if keep_all:
                    names[v.name] = env[id(v)]
    result = {v.name: env[id(v)] for v in graph.outputs}
    if keep_all:
        names.update(result)
        return names
    return result

