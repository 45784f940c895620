"""The layers the quantization passes rewrite, and what the passes do alike around them.

A site is a linear layer with a constant weight (graphopt.Linear / GatedLinear, MatMul or Gemm
by a constant, a tied LM head MatMul(x, Transpose(@table))); `find_site` finds one or says
why a node is not one. `collect_sites` applies a pass's `exclude` option and records what it
leaves (a mixture of experts, graphopt.MoE, that a pass did not quantize whole -- quantize-weights
with rtn makes it a graphopt.QuantMoE -- it first decomposes: every expert's projections become
linears of their own, so that they are quantized; the experts then run dense); `weight_bytes` / `count_weight_bytes` give the report's byte counts;
`drop_unread_weights` removes the float weights a rewrite no longer reads; `gated_epilogue`
builds a gated MLP's Split and gate after a quantized projection of gate and up side by side.
"""
from __future__ import annotations

import dataclasses
import difflib

import numpy as np

from graphopt.builder import Builder
from graphopt.errors import UserError
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, TensorType, Value
from graphopt.ops.activations import activate
from graphopt.pass_manager import PassResult
from graphopt.pattern import constant_value, remove_dead, replace_value
from graphopt.registry import get_op

G = GRAPHOPT_DOMAIN


@dataclasses.dataclass
class Site:
    """A layer to quantize: Y = act(X @ W_nk^T + bias), then `kind`'s epilogue."""

    node: Node
    kind: str               # linear | gated-linear | matmul | gemm | tied
    x: Value
    w_nk: np.ndarray        # [N, K], float
    bias: Value | np.ndarray | None
    activation: str
    weights: tuple[Value, ...]   # the float weights it reads (dropped when unused after)
    extra_nodes: tuple[Node, ...] = ()


def _const_vector(v: Value | None, n: int) -> np.ndarray | None | bool:
    """A bias as a [n] array; None when absent; False when it is not a constant vector."""
    if v is None:
        return None
    c = constant_value(v)
    if c is None or c.size != n:
        return False
    return c.reshape(n)


def _weight_bias_site(node: Node, kind: str, w_is_nk: bool, activation: str) -> Site | str:
    """Linear and Gemm: Y = act(X @ W + B), W constant [K, N] (or [N, K] when `w_is_nk`), B a constant vector or absent."""
    ins = node.inputs
    w = constant_value(ins[1])
    if w is None or w.ndim != 2:
        return "the weight is not a constant matrix"
    w_nk = w if w_is_nk else w.T
    bias = ins[2] if len(ins) > 2 else None
    if bias is not None and _const_vector(bias, w_nk.shape[0]) is False:
        return "the bias is not a constant vector"
    return Site(node, kind, ins[0], w_nk, bias, activation, (ins[1],))


def find_site(node: Node, tied: bool) -> Site | str:
    """The site at `node`, or why it is not one (pure: it never mutates)."""
    ins = node.inputs
    if node.domain == G and node.op_type == "Linear":
        return _weight_bias_site(node, "linear", bool(node.attr("trans_w", 0)), node.attr("activation", ""))
    if node.domain == G and node.op_type == "GatedLinear":
        wg, wu = constant_value(ins[1]), constant_value(ins[2])
        if wg is None or wu is None:
            return "the weights are not constants"
        n = wg.shape[1]
        biases = [_const_vector(v, n) for v in (list(ins[3:5]) + [None, None])[:2]]
        if any(b is False for b in biases):
            return "the biases are not constant vectors"
        bias = None
        if any(b is not None for b in biases):
            bias = np.concatenate([b if b is not None else np.zeros(n, wg.dtype) for b in biases])
        act = node.attr("activation", "silu")
        return Site(node, "gated-linear", ins[0], np.concatenate([wg, wu], axis=1).T, bias, act, (ins[1], ins[2]))
    if node.domain != "":
        return "not a linear layer"
    if node.op_type == "MatMul":
        x, wv = ins
        if x.type is None or x.type.rank is None or x.type.rank < 2:
            return "X has rank < 2"
        w = constant_value(wv)
        if w is not None and w.ndim == 2:
            return Site(node, "matmul", x, w.T, None, "", (wv,))
        t = wv.producer()
        if t is not None and t.op_type == "Transpose" and t.domain == "" and list(t.attr("perm", [1, 0])) == [1, 0]:
            w = constant_value(t.inputs[0])
            if w is not None and w.ndim == 2:
                if not tied:
                    return "a tied weight (option tied=false)"
                return Site(node, "tied", x, w, None, "", (t.inputs[0],), (t,))
        return "the weight is not a constant matrix"
    if node.op_type == "Gemm":
        if node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0 or node.attr("transA", 0):
            return "alpha/beta are not 1 or A is transposed"
        return _weight_bias_site(node, "gemm", bool(node.attr("transB", 0)), "")
    return "not a linear layer"


def split_names(exclude: str) -> set[str]:
    """The node names of an `exclude` option (separated by ';')."""
    return {s.strip() for s in exclude.split(";") if s.strip()}


def collect_sites(graph: Graph, tied: bool, exclude: str, result: PassResult, unsupported,
                  check_as: str | None = None, known: set[str] | None = None) -> list[Site]:
    """Every site not in `exclude` (node names separated by ';') whose input type
    `unsupported(type)` accepts (it returns a reason to skip, or None); the skipped ones are
    recorded in `result.details` with their reason. A mixture of experts is split first into
    linears of its own (named after it: the same names every run, which the accuracy guard's
    exclude relies on). With `check_as` (the pass's name), an exclude name that is no node of
    the graph, before or after the split (or in `known`), is an error: a typo would quantize the
    layer it meant to keep."""
    excluded = split_names(exclude)
    known = set(known or ()) | {n.name for n in graph.nodes}
    experts = [n for n in graph.nodes if n.domain == G and n.op_type == "MoE" and n.name not in excluded]
    for node in experts:  # each expert's projections become linears of their own, quantized alike
        stacked = list(node.inputs)
        builder = Builder(graph, before=node, created_by="quantize:moe", name_prefix=node.name)
        (y,) = get_op(G, "MoE").decompose(builder, node)
        replace_value(graph, node.outputs[0], y)
        remove_dead(graph, [node])
        drop_unread_weights(graph, [v for v in stacked if v is not None])  # else counted as kept, not replaced
    if experts:
        result.count("moe-decomposed", len(experts))
    sites, names = [], []
    for node in list(graph.nodes):
        known.add(node.name)
        site = find_site(node, tied)
        if not isinstance(site, Site):
            continue
        names.append(node.name)
        reason = "excluded" if node.name in excluded else unsupported(site.x.type)
        if reason:
            result.details.append({"node": node.name, "op": node.op, "reason": reason})
        else:
            sites.append(site)
    unknown = sorted(excluded - known) if check_as else []
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else \
            f"the layers it quantizes: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
        raise UserError(f"{check_as}: exclude names no node of the graph: {', '.join(unknown)} ({hint})")
    return sites


def weight_bytes(graph: Graph) -> dict[str, int]:
    return {name: v.const_value.nbytes for name, v in graph.initializers.items() if v.const_value is not None}


def count_weight_bytes(result: PassResult, before: dict[str, int], graph: Graph) -> None:
    """Bytes of the weights the pass removed, and of those it added in their place."""
    now = weight_bytes(graph)
    result.count("float-weight-bytes", sum(n for name, n in before.items() if name not in now))
    result.count("quantized-weight-bytes", sum(n for name, n in now.items() if name not in before))


def site_inputs(site: Site) -> list[Value]:
    """The values the site's nodes read (call before the rewrite; drop_unread_weights after)."""
    return list({id(v): v for n in (site.node, *site.extra_nodes) for v in n.inputs if v is not None}.values())


def drop_unread_weights(graph: Graph, read: list[Value]) -> None:
    for w in read:  # the float weights and biases nothing reads any more
        if w.is_initializer and not w.uses() and not w.is_graph_output and not w.is_graph_input:
            graph.remove_initializer(w.name)


def gated_epilogue(b: Builder, y: Value, site: Site) -> Value:
    """A gated MLP quantized as one projection of [gate | up]: act(gate) * up; else y as is."""
    if site.kind != "gated-linear":
        return y
    gate, up = b.Split(y, axis=-1, num_outputs=2)
    return b.Mul(activate(b, gate, site.activation), up)


def float32_only(t: TensorType | None) -> str | None:
    return None if t is not None and t.dtype.short == "f32" else "X is not f32"


def float_only(t: TensorType | None) -> str | None:
    return None if t is not None and t.dtype.is_float else "X is not a float tensor"
