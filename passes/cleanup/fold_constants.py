"""fold-constants: evaluate what can be evaluated ahead of time."""
from __future__ import annotations

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph, Node
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import constant_value, remove_dead, replace_value
from graphopt.registry import run_reference

from .cse import NONDETERMINISTIC


def constant_of_constant_node(node: Node) -> np.ndarray | None:
    """The tensor a Constant node makes, whichever attribute spells it."""
    for key, kind in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                      ("value_int", np.int64), ("value_ints", np.int64)):
        if key in node.attrs:
            v = node.attrs[key].value
            return v if kind is None else np.array(v, dtype=kind)
    return None


def static_shape_value(node: Node) -> np.ndarray | None:
    """Shape/Size of an input whose dimensions are all known."""
    x = node.inputs[0]
    if x is None or x.type is None or not x.type.is_static:
        return None
    shape = np.array(x.type.shape, dtype=np.int64)
    if node.op_type == "Size":
        return np.array(int(np.prod(shape)), dtype=np.int64)
    rank = len(shape)
    start = node.attr("start", 0)
    end = node.attr("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return shape[start:end]


@register_pass("fold-constants", aliases=("fold",))
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants, turn Constant nodes into weights, and
    replace Shape/Size of fully static tensors by their value.

    Before:  %s = Shape(%x: f32[2, 4])     After:  (weight) @s_folded = [2, 4]
             %n = Gather(%s, @zero)                 (weight) @n_folded = 2
    Option max-size: results with more elements are left unfolded (they would only
    grow the model file).
    """

    max_size: int = 1024

    def __post_init__(self) -> None:  # checked when the pipeline is parsed, before any model load
        if self.max_size < 0:
            raise UserError(f"fold-constants: max-size must be 0 or more, not {self.max_size}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(graph.nodes):
            if node.graph is not graph:
                continue
            values = self._evaluate(node)
            if values is None:
                continue
            outs = [v for v in node.outputs if v is not None]
            if len(values) < len(outs) or any(v.is_graph_output for v in outs):
                continue  # a graph output keeps its producer (and its name)
            if node.op_type != "Constant" and any(np.asarray(a).size > self.max_size for a in values):
                size = max(np.asarray(a).size for a in values)
                result.details.append({"node": node.name, "op": node.op,
                                       "reason": f"result has {size} elements, over max-size={self.max_size}"})
                continue
            news = []
            for v, arr in zip(node.outputs, values):
                if v is None:
                    continue
                arr = np.asarray(arr)
                if v.type is not None and arr.dtype != v.type.dtype.np_dtype:
                    arr = arr.astype(v.type.dtype.np_dtype)
                news.append((v, graph.add_initializer(graph.fresh_name(v.name), arr)))
            for v, c in news:
                replace_value(graph, v, c)
            remove_dead(graph, [node])
            result.count("constants-to-weights" if node.op_type == "Constant" else "nodes-folded")
        return result

    def _evaluate(self, node: Node) -> list | None:
        if node.op_type == "Constant":
            arr = constant_of_constant_node(node)
            return None if arr is None else [arr]
        if node.op_type in NONDETERMINISTIC:
            return None
        if node.op_type in ("Shape", "Size") and node.domain == "":
            arr = static_shape_value(node)
            return None if arr is None else [arr]
        args = []
        for v in node.inputs:
            if v is None:
                args.append(None)
                continue
            c = constant_value(v)
            if c is None:
                return None
            args.append(np.asarray(c))
        if not node.inputs:
            return None
        try:
            return run_reference(node, args)
        except Exception:
            return None  # leave it to run time (the interpreter will report real errors)
