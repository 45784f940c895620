"""eliminate-dead-code (dce)."""
from __future__ import annotations

from graphopt.ir import Graph
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass


@register_pass("eliminate-dead-code", aliases=("dce",))
class EliminateDeadCode(Pass):
    """Remove nodes whose results nothing uses, and weights nothing reads.

    Before:  %a = Relu(%x)             After:  %a = Relu(%x)
             %b = Neg(%x)                      return %a
             return %a
    Graph inputs stay (they are the model's signature), even when unused.
    """

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        live = {id(v) for v in graph.outputs}
        dead = []
        for node in reversed(graph.nodes):
            if any(v is not None and id(v) in live for v in node.outputs):
                live.update(id(v) for v in node.inputs if v is not None)
            else:
                dead.append(node)
        for node in dead:  # already in reverse order: users before producers
            graph.remove_node(node)
        result.count("nodes-removed", len(dead))
        for name in [k for k, v in graph.initializers.items() if id(v) not in live and not v.is_graph_input]:
            graph.remove_initializer(name)
            result.count("weights-removed")
        return result
