"""Creating nodes with the op registry's help: output counts and types inferred.

`make_node(graph, op, inputs, ...)` is `Graph.make_node` with the registry asked for what the
IR cannot know (how many outputs an op has, their types); a `Builder` places such nodes at one
point of a graph:

    b = Builder(graph, before=node)
    y = b.MatMul(x, w)                      # core op, output type inferred
    m = b.op("RMSNorm", x, s, domain="graphopt", epsilon=1e-6)
    c = b.const(np.array([0, 0, -1]))      # a new initializer
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from graphopt.ir import Attr, Graph, Node, NodeMeta, TensorType, Value
from graphopt.registry import get_op, infer_types


def make_node(graph: Graph, op_type: str, inputs: Sequence[Value | None], *, domain: str = "",
              attrs: dict | None = None, output_types: Sequence[TensorType | None] | None = None,
              num_outputs: int | None = None, output_names: Sequence[str] | None = None,
              name: str | None = None, meta: NodeMeta | None = None, infer: bool = True) -> Node:
    """`graph.make_node`, with the output count from the op's definition when not given and,
    unless `infer` is off or `output_types` are given, the output types inferred."""
    counted = num_outputs is None and output_names is None and output_types is None  # by the registry
    if counted or (infer and output_types is None):
        opdef = get_op(domain, op_type)  # (a backend's own op, typed by its caller, need not be registered)
        if not opdef.min_inputs <= len(inputs) <= opdef.max_inputs:
            raise ValueError(f"{opdef.qualified_name} takes {opdef.takes_inputs()} inputs, not {len(inputs)}")
    if counted:
        num_outputs = opdef.num_outputs_for(attrs or {})
    node = graph.make_node(op_type, inputs, domain=domain, attrs=attrs, output_types=output_types,
                           num_outputs=num_outputs, output_names=output_names, name=name, meta=meta)
    if output_types is None and infer:
        try:
            types = infer_types(node)
        except BaseException:  # the node is not made: its inputs lose the use it registered
            node._detach_inputs()
            raise
        for v, t in zip(node.outputs, types):
            v.type = t
    return node


class Builder:
    def __init__(self, graph: Graph, before: Node | None = None, created_by: str = "", name_prefix: str = ""):
        self.graph = graph
        self.before = before
        self.created_by = created_by
        self.name_prefix = name_prefix  # new nodes are named "<prefix>/<Op>" (stable, readable)
        self.nodes: list[Node] = []
        self._counts: dict[str, int] = {}

    def op(self, op_type: str, *inputs: Value | None, domain: str = "", n_out: int | None = None,
           output_types: Sequence[TensorType | None] | None = None, **attrs) -> Value | tuple[Value, ...]:
        attrs = {k: Attr.infer(v) for k, v in attrs.items() if v is not None}
        name = None
        if self.name_prefix:
            k = self._counts.get(op_type, 0)
            self._counts[op_type] = k + 1
            name = f"{self.name_prefix}/{op_type}" + (f"_{k}" if k else "")
        node = make_node(
            self.graph, op_type, list(inputs), domain=domain, attrs=attrs, num_outputs=n_out, name=name,
            output_types=output_types, meta=NodeMeta(created_by=self.created_by))
        if self.before is not None:
            self.graph.insert_before(self.before, node)
        else:
            self.graph.append(node)
        self.nodes.append(node)
        outs = node.outputs
        return outs[0] if len(outs) == 1 else outs

    def const(self, array, name: str = "const") -> Value:
        """A new initializer holding `array`."""
        return self.graph.add_initializer(self.graph.fresh_name(name), np.asarray(array))

    def __getattr__(self, op_type: str):
        if op_type.startswith("_") or not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)
