"""eliminate-common-subexpressions (cse)."""
from __future__ import annotations

import numpy as np

from graphopt.ir import Graph
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import remove_dead, replace_value, replaceable

# Ops whose two identical calls may give different results.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}
MAX_WEIGHT_COMPARE_BYTES = 1 << 20  # identical weights are merged only below this size


@register_pass("eliminate-common-subexpressions", aliases=("cse",))
class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same op on the same inputs with the same attributes,
    and identical small weights.

    Before:  %a = Shape(%x)            After:  %a = Shape(%x)
             %b = Shape(%x)                    %c = Add(%a, %a)
             %c = Add(%a, %b)
    """

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        seen_weights: dict[tuple, object] = {}
        for name, v in list(graph.initializers.items()):
            arr = v.const_value
            if v.is_graph_input or arr.nbytes > MAX_WEIGHT_COMPARE_BYTES:
                continue
            key = (arr.dtype.str, arr.shape, np.ascontiguousarray(arr).tobytes())
            first = seen_weights.setdefault(key, v)
            if first is not v and not v.is_graph_output and v.uses():
                v.replace_all_uses_with(first)
                result.count("weights-merged")
        seen: dict[tuple, object] = {}
        for node in list(graph.nodes):
            if node.graph is not graph or node.op_type in NONDETERMINISTIC:
                continue
            key = (node.domain, node.op_type, tuple(None if v is None else id(v) for v in node.inputs),
                   tuple(sorted(node.attrs.items())), len(node.outputs))
            first = seen.setdefault(key, node)
            if first is node:
                continue
            pairs = [(a, b) for a, b in zip(node.outputs, first.outputs) if a is not None]
            if any(b is None for _, b in pairs) or not all(replaceable(a, b) for a, b in pairs):
                continue
            for a, b in pairs:
                replace_value(graph, a, b)
            remove_dead(graph, [node])
            result.count("nodes-merged")
        return result
