"""graphopt.MoE: a mixture-of-experts feed-forward block after its router, what the Hugging
Face frontend exports for transformers' experts modules (Mixtral, Qwen-MoE, OLMoE, ...).

The router stays in core ops (it differs by family: a softmax then top-k, renormalized or not;
top-k then a softmax; ...); graphopt.MoE takes what it chose, `index` and `weights` [.., k],
and computes for each token the weighted sum of its chosen experts' outputs. Experts run only
where a backend has a sparse kernel (ORT's com.microsoft.MoE on CPU); the decomposition runs
every expert on every token and weights it by the router's weight for that token (zero where
it was not chosen): the same sum, and what the core-op form of the block can express.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, constant_value
from graphopt.ops.activations import ACTIVATIONS, activate, activate_np
from graphopt.ops.common import i64, unsupported
from graphopt.registry import AttrSpec, OpDef, register_op


def moe_activation(node: Node) -> str:
    act = node.attr("activation", "silu")
    if act not in ACTIVATIONS:
        raise unsupported(node, f"unknown activation {act!r} (expected one of {', '.join(map(repr, ACTIVATIONS))})")
    return act


def moe_shapes(node: Node) -> tuple[int, int, int, int] | None:
    """(experts, k, hidden, inner) when every one is static, else None."""
    x, index, _, up, down = node.inputs[:5]
    if any(v.type is None or v.type.shape is None for v in (x, index, up, down)):
        return None
    (e, n_up, h), (e2, h2, inner) = up.type.shape, down.type.shape
    k = index.type.shape[-1]
    dims = (e, k, h, inner, n_up, e2, h2, x.type.shape[-1])
    if not all(isinstance(d, int) for d in dims):
        return None
    return e, k, h, inner


def _moe_infer(node: Node):
    x, index, weights, up, down = node.inputs[:5]
    if any(v.type is None for v in (x, index, weights, up, down)):
        return [None]
    if index.type.dtype.is_float:
        raise unsupported(node, f"index is {index.type.dtype.short}; expected an integer type")
    if up.type.rank != 3 or down.type.rank != 3:
        raise unsupported(node, f"the expert weights must be [experts, out, in], got {up.type} and {down.type}")
    shapes = moe_shapes(node)
    if shapes is not None:
        e, _, h, inner = shapes
        n_up = up.type.shape[1]
        want = 2 * inner if node.attr("gated", 1) else inner
        if n_up != want or down.type.shape[0] != e or down.type.shape[1] != h or x.type.shape[-1] != h:
            raise unsupported(node, f"expert weights {up.type} and {down.type} do not fit X {x.type}")
    return [x.type]


def _moe_reference(node: Node, inputs):
    x, index, weights, up, down = inputs[:5]
    return [moe_np(x, index, weights, up, down, moe_activation(node), node.attr("gated", 1))]


def moe_np(x, index, weights, up, down, act: str, gated: int) -> np.ndarray:
    """The weighted sum of each token's chosen experts (every expert computed, weighted by
    its router weight: zero where not chosen), in X's type."""
    y = np.zeros(x.shape, x.dtype)
    for e in range(up.shape[0]):
        w = (weights * (index == e).astype(weights.dtype)).sum(-1, keepdims=True)
        h = np.matmul(x, up[e].T)
        if gated:
            gate, u = np.split(h, 2, axis=-1)
            h = activate_np(gate, act) * u
        else:
            h = activate_np(h, act)
        y = y + (np.matmul(h.astype(x.dtype), down[e].T) * w).astype(x.dtype)
    return y


def _moe_decompose(b: Builder, node: Node):
    """Every expert on every token: X @ up[e]^T, the activation, @ down[e]^T, times the
    router's weight for e (the sum of `weights` where `index` is e), summed over experts."""
    x, index, weights, up, down = node.inputs[:5]
    if up.type is None or up.type.shape is None or not isinstance(up.type.shape[0], int):
        raise unsupported(node, "the number of experts must be static to decompose")
    act, gated = moe_activation(node), node.attr("gated", 1)
    ups, downs = constant_value(up), constant_value(down)
    y = None
    for e in range(up.type.shape[0]):
        h = gated_activation(b, b.MatMul(x, _expert_weight(b, up, ups, e, "expert_up")), act, gated)
        h = b.Mul(b.MatMul(h, _expert_weight(b, down, downs, e, "expert_down")), router_weight(b, index, weights, e))
        y = h if y is None else b.Add(y, h)
    return [y]


def router_weight(b: Builder, index, weights, e: int):
    """[.., 1]: the sum of `weights` where `index` is expert e (zero where it was not chosen)."""
    chosen = b.Cast(b.Equal(index, b.const(np.array(e, index.type.dtype.np_dtype), "expert")),
                    to=weights.type.dtype.onnx_type)
    return b.ReduceSum(b.Mul(weights, chosen), b.const(i64(-1), "axes"), keepdims=1)


def gated_activation(b: Builder, h, act: str, gated: int):
    """act(gate) * up over the two halves of `h` (gated), or act(h)."""
    if not gated:
        return activate(b, h, act)
    gate, u = b.Split(h, axis=-1, num_outputs=2)
    return b.Mul(activate(b, gate, act), u)


def _expert_weight(b: Builder, stacked, value: np.ndarray | None, e: int, name: str):
    """Expert e's weight [in, out] for a MatMul: a constant of its own when the stack is one."""
    if value is not None:
        return b.const(np.ascontiguousarray(value[e].T), name)
    return b.Transpose(b.Gather(stacked, b.const(np.array(e, np.int64), "expert"), axis=0), perm=[1, 0])


register_op(OpDef(
    GRAPHOPT_DOMAIN, "MoE",
    attrs={"activation": AttrSpec(AttrKind.STRING, default="silu"), "gated": AttrSpec(AttrKind.INT, default=1)},
    min_inputs=5, max_inputs=5, min_outputs=1, max_outputs=1,
    infer=_moe_infer, reference=_moe_reference, decompose=_moe_decompose,
    doc="Mixture-of-experts block after its router: inputs X [.., hidden], index [.., k] (the experts "
        "chosen per token), weights [.., k] (their router weights), W_up [experts, 2 * inner, hidden] "
        "(gate rows then up rows; [experts, inner, hidden] with gated=0), W_down [experts, hidden, inner]. "
        "Y = sum over j of weights[.., j] * expert(index[.., j], X), "
        "expert(e, X) = (act(X @ W_gate[e]^T) * (X @ W_up[e]^T)) @ W_down[e]^T (gated; act(X @ W_up[e]^T) "
        "@ W_down[e]^T otherwise).",
))
