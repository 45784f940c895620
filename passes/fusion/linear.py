"""fuse-linear, fuse-gated-mlp, merge-projections: projections as graphopt.Linear.

- MatMul (or Gemm) by a constant weight, plus a constant bias, becomes Linear; the
  flatten-to-2-D / unflatten Reshapes that exporters put around Gemm go away (Linear takes
  any leading dims); a following ReLU/GELU/SiLU becomes the Linear's activation.
- A SiLU/GELU Linear multiplied by a plain Linear of the same input is a gated MLP
  (SwiGLU): graphopt.GatedLinear.
- Linears that read the same input (Q, K and V projections) are merged into one Linear over
  the concatenated weights, followed by a Split.
"""
from __future__ import annotations

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.registry import refine_types
from graphopt.symbolic import dim_tokens, symbolic_value
from graphopt.pattern import (
    Decline, RewriteRule, Rewriter, apply_patterns, const, constant_value, op, remove_dead, replace_value, var,
)

G = GRAPHOPT_DOMAIN


def _vector_bias(v: Value, n) -> np.ndarray | None:
    """The bias as a [N] vector if v is a constant broadcasting like one."""
    c = constant_value(v)
    if c is None or not isinstance(n, int) or c.size != n or (c.ndim and c.shape[-1] != n):
        return None
    return c.reshape(n)


def _out_features(w: Value, trans: int):
    shape = w.type.shape if w.type is not None else None
    if shape is None or len(shape) != 2:
        return None
    return shape[0] if trans else shape[1]


class GemmToLinear(RewriteRule):
    name = "gemm"  # Gemm(A, W, C) with alpha=beta=1 -> Linear(A, W, C) {trans_w=transB}
    pattern = op("Gemm", var("x"), const("w"), any_inputs=True, capture="n")

    def check(self, m):
        n = m["n"]
        if n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0 or n.attr("transA", 0):
            return "alpha/beta are not 1 or A is transposed"
        if len(n.inputs) > 2 and n.inputs[2] is not None and \
                _vector_bias(n.inputs[2], _out_features(n.inputs[1], n.attr("transB", 0))) is None:
            return "the bias is not a constant vector"
        return None

    def rewrite(self, rw, m):
        n = m["n"]
        args = [n.inputs[0], n.inputs[1]]
        if len(n.inputs) > 2 and n.inputs[2] is not None:
            b = _vector_bias(n.inputs[2], _out_features(n.inputs[1], n.attr("transB", 0)))
            args.append(n.inputs[2] if n.inputs[2].type.rank == 1 else rw.const(b, "bias"))
        return rw.op("Linear", *args, domain=G, trans_w=n.attr("transB", 0))


class MatMulAddToLinear(RewriteRule):
    name = "matmul-add"  # Add(MatMul(X, W), b) -> Linear(X, W, b)
    pattern = op("Add", op("MatMul", var("x"), const("w", rank=2), single_use=True), const("b"),
                 commute=True, capture="add")

    def check(self, m):
        if m["x"].type is None or m["x"].type.rank is None or m["x"].type.rank < 2:
            return "X has rank < 2"
        return None if _vector_bias(m["b"], _out_features(m["w"], 0)) is not None else "the bias is not a vector over the output features"

    def rewrite(self, rw, m):
        b = m["b"] if m["b"].type.rank == 1 else rw.const(_vector_bias(m["b"], _out_features(m["w"], 0)), "bias")
        return rw.op("Linear", m["x"], m["w"], b, domain=G)


class MatMulToLinear(RewriteRule):
    name = "matmul"  # MatMul(X, W) -> Linear(X, W)
    pattern = op("MatMul", var("x"), const("w", rank=2), capture="n")

    def check(self, m):
        v = m["n"].outputs[0]
        if len(v.uses()) == 1 and v.uses()[0][0].op_type == "Add":
            return Decline("an Add follows: matmul-add takes it")
        if m["x"].type is None or m["x"].type.rank is None or m["x"].type.rank < 2:
            return "X has rank < 2"
        return None

    def rewrite(self, rw, m):
        return rw.op("Linear", m["x"], m["w"], domain=G)


def _plain_linear(v: Value) -> Node | None:
    n = v.producer()
    if n is None or n.op_type != "Linear" or n.domain != G or n.attr("activation", ""):
        return None
    return n


class AbsorbActivation(RewriteRule):
    name = "activation"  # Relu/Gelu(Linear(...)) -> Linear{activation}
    pattern = op(("Relu", "Gelu"), op("Linear", domain=G, any_inputs=True, capture="lin", single_use=True),
                 capture="act")

    def check(self, m):
        return None if not m["lin"].attr("activation", "") else "the Linear already has an activation"

    def rewrite(self, rw, m):
        act = m["act"]
        kind = "relu" if act.op_type == "Relu" else ("gelu_tanh" if act.attr("approximate", "none") == "tanh" else "gelu")
        lin = m["lin"]
        return rw.op("Linear", *lin.inputs, domain=G, trans_w=lin.attr("trans_w", 0), activation=kind)


class AbsorbSiLU(RewriteRule):
    name = "silu"  # Mul(L, Sigmoid(L)) with L = Linear(...) -> Linear{activation=silu}
    pattern = op("Mul", var("y"), op("Sigmoid", var("y"), capture="sig"), commute=True, capture="mul")

    def check(self, m):
        lin = _plain_linear(m["y"])
        if lin is None:
            return "SiLU of something other than a plain Linear"
        if len(m["y"].uses()) != 2 or m["y"].is_graph_output:
            return "the Linear's output has other uses"
        return None

    def rewrite(self, rw, m):
        lin = m["y"].producer()
        m.nodes.append(lin)
        return rw.op("Linear", *lin.inputs, domain=G, trans_w=lin.attr("trans_w", 0), activation="silu")


class FlattenUnflatten(RewriteRule):
    name = "flatten-unflatten"  # Reshape(Linear(Reshape(X, [-1, K])), lead(X) + [N]) -> Linear(X)
    pattern = op("Reshape", op("Linear", op("Reshape", var("x"), var("s1"), capture="flat", single_use=True),
                                        any_inputs=True, domain=G, capture="lin"),
                 var("s2"), capture="unflat")

    def check(self, m):
        x, flat, lin = m["x"], m["flat"], m["lin"]
        if lin.inputs[0] is not flat.outputs[0] or len(lin.outputs[0].uses()) != 1:
            return "the Linear does not read the flattened input alone"
        xt, ft = dim_tokens(x), flat.outputs[0].type
        if xt is None or ft is None or ft.rank != 2 or not isinstance(ft.shape[1], int):
            return "the first Reshape does not flatten to [rows, features]"
        target = symbolic_value(m["s2"])
        n_out = lin.outputs[0].type.shape[-1] if lin.outputs[0].type is not None else None
        if not isinstance(target, list) or len(target) < 2 or target[-1] not in (n_out, -1):
            return "the second Reshape's target is unknown"
        lead = target[:-1]
        if len(lead) >= len(xt) or any(t != d for t, d in zip(lead, xt)) or -1 in lead:
            return "the second Reshape does not restore the leading dims of the input"
        rest = xt[len(lead):]
        if not all(isinstance(d, int) for d in rest) or int(np.prod(rest)) != ft.shape[1]:
            return "the flattened features are not the input's trailing dims"
        return None

    def rewrite(self, rw, m):
        lin, x = m["lin"], m["x"]
        lead = len(symbolic_value(m["s2"])) - 1
        if x.type.rank != lead + 1:  # merge trailing dims (e.g. heads x head_size) first
            x = rw.Reshape(x, rw.const(np.array([0] * lead + [m["flat"].outputs[0].type.shape[1]], np.int64), "shape"))
        m.nodes.append(lin)
        attrs = {k: a.value for k, a in lin.attrs.items()}
        return rw.op("Linear", x, *lin.inputs[1:], domain=G, **attrs)


class GatedMLP(RewriteRule):
    name = "gated-mlp"  # Mul(Linear{silu}(X, Wg), Linear(X, Wu)) -> GatedLinear(X, Wg, Wu)
    pattern = op("Mul", op("Linear", var("x"), const("wg"), any_inputs=True, domain=G, capture="gate", single_use=True),
                 op("Linear", var("x"), const("wu"), any_inputs=True, domain=G, capture="up", single_use=True),
                 commute=True, capture="mul")

    def check(self, m):
        g, u = m["gate"], m["up"]
        if g.attr("activation", "") not in ("silu", "gelu", "gelu_tanh") or u.attr("activation", ""):
            return "not an activated gate times a plain up projection"
        if g.inputs[0] is not u.inputs[0]:
            return "the gate and up projections read different inputs"
        if g.attr("trans_w", 0) or u.attr("trans_w", 0):
            return "transposed weights"
        if m["wg"].type != m["wu"].type:
            return "the gate and up weights differ in shape"
        if (len(g.inputs) > 2) != (len(u.inputs) > 2):
            return "only one of the projections has a bias"
        return None

    def rewrite(self, rw, m):
        g, u = m["gate"], m["up"]
        args = [m["x"], m["wg"], m["wu"]] + ([g.inputs[2], u.inputs[2]] if len(g.inputs) > 2 else [])
        return rw.op("GatedLinear", *args, domain=G, activation=g.attr("activation"))


LINEAR_RULES = [GemmToLinear(), MatMulAddToLinear(), MatMulToLinear(), FlattenUnflatten(), AbsorbActivation(),
                AbsorbSiLU()]


@register_pass("fuse-linear")
class FuseLinear(Pass):
    """Fuse MatMul/Gemm + bias (+ ReLU/GELU/SiLU) into graphopt.Linear, dropping the 2-D
    flatten/unflatten Reshapes around Gemm.

    Before:  %f = Reshape(%x, @[-1, 768])            After:  %y = graphopt.Linear(%x, @w, @b) {activation="gelu"}
             %g = Gemm(%f, @w, @b)
             %u = Reshape(%g, %shape_of_x_with_3072)
             %y = Gelu(%u)
    """

    category = "fusion"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        res = apply_patterns(graph, LINEAR_RULES, ctx, explain=True)
        refine_types(graph)
        return res


@register_pass("fuse-gated-mlp")
class FuseGatedMLP(Pass):
    """Fuse act(X @ Wg) * (X @ Wu) (SwiGLU, GeGLU) into graphopt.GatedLinear.

    Before:  %g = graphopt.Linear(%x, @wg) {activation="silu"}     After:
             %u = graphopt.Linear(%x, @wu)                           %y = graphopt.GatedLinear(%x, @wg, @wu)
             %y = Mul(%g, %u)
    """

    category = "fusion"
    requires = ("fuse-linear",)  # it pairs graphopt.Linear nodes

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return apply_patterns(graph, [GatedMLP()], ctx, explain=True)


@register_pass("merge-projections")
class MergeProjections(Pass):
    """Merge Linears that read the same input (Q, K, V projections) into one Linear over the
    concatenated weights followed by a Split: one pass over the input instead of three.

    Before:  %q = graphopt.Linear(%x, @wq, @bq)          After:  %qkv = graphopt.Linear(%x, @w_qkv, @b_qkv)
             %k = graphopt.Linear(%x, @wk, @bk)                  %q, %k, %v = Split(%qkv, @[dq, dk, dv]) {axis=-1}
             %v = graphopt.Linear(%x, @wv, @bv)
    """

    category = "fusion"
    requires = ("fuse-linear",)  # it merges graphopt.Linear nodes

    min_group: int = 2

    def __post_init__(self) -> None:  # checked when the pipeline is parsed, before any model load
        if self.min_group < 2:
            raise UserError(f"merge-projections: min-group {self.min_group}: a merge needs at least 2 projections")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        groups: dict[int, list[Node]] = {}
        for n in graph.nodes:
            if n.op_type == "Linear" and n.domain == G and not n.attr("activation", "") and not n.attr("trans_w", 0) \
                    and constant_value(n.inputs[1]) is not None \
                    and (len(n.inputs) < 3 or n.inputs[2] is None or constant_value(n.inputs[2]) is not None):
                groups.setdefault(id(n.inputs[0]), []).append(n)
        for members in groups.values():
            if len(members) < self.min_group:
                continue
            ws = [constant_value(n.inputs[1]) for n in members]
            if len({(w.shape[0], w.dtype) for w in ws}) != 1:
                continue
            sizes = [w.shape[1] for w in ws]
            biases = []
            for n, size in zip(members, sizes):
                b = constant_value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] is not None else None
                biases.append(np.zeros(size, ws[0].dtype) if b is None else b.reshape(size))
            has_bias = any(len(n.inputs) > 2 and n.inputs[2] is not None for n in members)
            first = members[0]
            rw = Rewriter(graph, first, "merge-projections")
            w = rw.const(np.concatenate(ws, axis=1), "merged_weight")
            args = [first.inputs[0], w] + ([rw.const(np.concatenate(biases), "merged_bias")] if has_bias else [])
            merged = rw.op("Linear", *args, domain=G)
            parts = rw.Split(merged, rw.const(np.array(sizes, np.int64), "split_sizes"), axis=-1, n_out=len(members))
            for n, part in zip(members, parts):
                replace_value(graph, n.outputs[0], part)
            remove_dead(graph, members)
            result.count("projections-merged", len(members))
            result.count("groups")
        return result


__all__ = ["FuseLinear", "FuseGatedMLP", "MergeProjections"]
