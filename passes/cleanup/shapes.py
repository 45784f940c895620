"""simplify-shapes: shape computations evaluated symbolically.

Exporters compute shapes at run time: `Shape -> Gather -> Unsqueeze -> Concat -> Reshape`.
With symbolic dims (`batch`, `seq`) most of that is known ahead of time. This pass
evaluates integer shape tensors over symbols and then
- replaces every shape tensor that is fully known by a constant;
- gives Reshape a constant target where the symbols line up with the input's own dims
  (copied with 0) and at most one is left to infer (-1);
- gives Expand a constant target where each symbolic dim equals the input's (1 keeps it).
The dead Shape/Gather/Concat chains are left to eliminate-dead-code.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.errors import UserError
from graphopt.ir import Attr, Graph, Node
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import constant_value, remove_dead, replace_value
from graphopt.registry import refine_types
from graphopt.symbolic import (  # noqa: F401  (symbolic_value, dim_tokens: re-exported for passes)
    _UNKNOWN, _dim_token, _is_int_shape_value, dim_tokens, evaluate, symbolic_value, type_reshapes,
)


@register_pass("simplify-shapes")
class SimplifyShapes(Pass):
    """Evaluate shape computations over symbolic dims; fold what is known into constants and
    give Reshape/Expand constant targets.

    Before:  %s = Shape(%x: f32[batch, seq, 64])          After:
             %b = Gather(%s, @zero) {axis=0}                %y = Reshape(%x, @shape_folded)
             %t = Concat(%u, @[seq_len, 4, 16]) ...           (@shape_folded = [0, 0, 4, 16])
             %y = Reshape(%x, %t)
    """

    max_rounds: int = 4

    def __post_init__(self) -> None:  # checked when the pipeline is parsed, before any model load
        if self.max_rounds < 1:
            raise UserError(f"simplify-shapes: max-rounds must be 1 or more, not {self.max_rounds}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Evaluate, rewrite, refine the types that the rewrites made known, and repeat."""
        result = PassResult()
        for _ in range(self.max_rounds):
            before = dict(result.stats)
            self._round(graph, result)
            refined = refine_types(graph) + type_reshapes(graph)
            if result.stats == before and not refined:
                break
            result.count("types-refined", refined)
        return result

    def _round(self, graph: Graph, result: PassResult) -> None:
        env: dict[int, object] = {}
        for node in graph.nodes:
            out = node.outputs[0] if node.outputs else None
            if out is None or not _is_int_shape_value(out) or len(node.outputs) != 1:
                continue
            val = evaluate(node, env)
            if val is not _UNKNOWN:
                env[id(out)] = val
        touched: list[Node] = []
        for node in list(graph.nodes):
            out = node.outputs[0] if node.outputs else None
            if out is None or id(out) not in env or node.op_type == "Constant" or out.is_graph_output:
                continue
            val = env[id(out)]
            if isinstance(val, int) or (isinstance(val, list) and all(isinstance(e, int) for e in val)):
                arr = np.array(val, dtype=out.type.dtype.np_dtype)
                if out.type.shape is not None and tuple(out.type.shape) not in ((), (len(np.atleast_1d(arr)),)) \
                        and not (out.type.rank == 1 and arr.ndim == 1):
                    continue
                c = graph.add_initializer(graph.fresh_name(out.name + "_folded"), arr)
                replace_value(graph, out, c)
                touched.append(node)
                result.count("shape-values-folded")
        for node in list(graph.nodes):
            if node.op_type == "Reshape" and node.domain == "":
                self._reshape(graph, node, env, result)
            elif node.op_type == "Expand" and node.domain == "":
                self._expand(graph, node, env, result)
        touched += self._shapes_from_inputs(graph, result)
        remove_dead(graph, touched)

    def _shapes_from_inputs(self, graph: Graph, result: PassResult) -> list[Node]:
        """Shape(x) whose dims are all numbers or symbols of the graph inputs becomes a
        Concat of those inputs' dims: the same values, but x no longer has to be computed
        for its shape, so fusions see single-use tensors and dead code can go."""
        where: dict[str, tuple] = {}  # symbol -> (graph input, axis)
        for v in graph.inputs:
            for i, d in enumerate(v.type.shape or ()):
                if isinstance(d, str):
                    where.setdefault(d, (v, i))
        if not where:
            return []
        first = graph.nodes[0] if graph.nodes else None
        done: list[Node] = []
        for node in list(graph.nodes):
            if node.op_type != "Shape" or node.domain != "" or node.inputs[0].is_graph_input or node.outputs[0].is_graph_output:
                continue
            x = node.inputs[0]
            dims = x.type.shape if x.type is not None else None
            if dims is None:
                continue
            r = len(dims)
            start, end = node.attr("start", 0), node.attr("end", r)
            start = min(max(start + r if start < 0 else start, 0), r)
            end = min(max(end + r if end < 0 else end, 0), r)
            sel = dims[start:end]
            if not sel or not all(isinstance(d, int) or d in where for d in sel) or all(isinstance(d, int) for d in sel):
                continue
            b = Builder(graph, before=first, created_by="simplify-shapes", name_prefix=f"{node.name}/from_inputs")
            parts = []
            for d in sel:
                if isinstance(d, int):
                    parts.append(b.const(np.array([d], np.int64), "dim"))
                else:
                    v, i = where[d]
                    parts.append(b.Shape(v, start=i, end=i + 1))
            new = parts[0] if len(parts) == 1 else b.Concat(*parts, axis=0)
            replace_value(graph, node.outputs[0], new)
            done.append(node)
            result.count("shapes-from-inputs")
        return done

    def _reshape(self, graph: Graph, node: Node, env, result: PassResult) -> None:
        data, shape = node.inputs[0], node.inputs[1]
        if constant_value(shape) is not None:
            return
        val = env.get(id(shape), _UNKNOWN)
        dims = data.type.shape if data.type is not None else None
        if not isinstance(val, list) or dims is None:
            return
        # The new target copies input dims with 0, so it needs allowzero=0; that is the same
        # Reshape as long as no literal 0 is in the target (then allowzero never mattered).
        target, infer = [], 0
        for i, e in enumerate(val):
            if isinstance(e, int):
                if e == 0:
                    return  # a literal 0: "copy" or "zero" depending on allowzero; leave it alone
                target.append(e)
                infer += e == -1
            elif e is not None and i < len(dims) and _dim_token(data, i, dims[i]) == e:
                target.append(0)
            else:
                target.append(-1)
                infer += 1
        if infer > 1:
            result.details.append({"node": node.name, "op": node.op,
                                   "reason": f"{infer} target dims are neither known nor copied from the input"})
            return
        c = graph.add_initializer(graph.fresh_name("shape_folded"), np.array(target, np.int64))
        node.set_input(1, c)
        if node.attr("allowzero", 0):
            node.attrs["allowzero"] = Attr.int(0)
        result.count("reshapes-made-static")

    def _expand(self, graph: Graph, node: Node, env, result: PassResult) -> None:
        data, shape = node.inputs[0], node.inputs[1]
        if constant_value(shape) is not None:
            return
        val = env.get(id(shape), _UNKNOWN)
        dims = data.type.shape if data.type is not None else None
        if not isinstance(val, list) or dims is None or len(val) < len(dims):
            return
        offset = len(val) - len(dims)
        target = []
        for i, e in enumerate(val):
            j = i - offset
            if isinstance(e, int):
                target.append(e)
            elif j >= 0 and e is not None and _dim_token(data, j, dims[j]) == e:
                target.append(1)  # Expand keeps a dim it is asked to broadcast to 1
            else:
                return
        c = graph.add_initializer(graph.fresh_name("expand_shape_folded"), np.array(target, np.int64))
        node.set_input(1, c)
        result.count("expands-made-static")
