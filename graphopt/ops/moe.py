"""graphopt.MoE: a mixture-of-experts feed-forward block after its router, what the Hugging
Face frontend exports for transformers' experts modules (Mixtral, Qwen-MoE, OLMoE, ...).

The router stays in core ops (it differs by family: a softmax then top-k, renormalized or not;
top-k then a softmax; ...); graphopt.MoE takes what it chose, `index` and `weights` [.., k],
and computes for each token the weighted sum of its chosen experts' outputs. Experts run only
where a backend has a sparse kernel (ORT's com.microsoft.MoE on CPU); the decomposition runs
every expert on every token and weights it by the router's weight for that token (zero where
it was not chosen): the same sum, and what the core-op form of the block can express.

GPT-OSS's experts have biases (inputs 6 and 7: [experts, 2 * inner] and [experts, hidden]) and a
clamped SwiGLU: gate clamped to at most `limit`, up to [-limit, limit] (limit 0: no clamp), then
gate * sigmoid(alpha * gate) * (up + beta); plain SwiGLU is alpha 1, beta 0, limit 0.
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


def moe_form(node: Node) -> tuple[float, float, float]:
    """(alpha, beta, limit) of the gated activation; other than (1, 0, 0) only for gated SiLU."""
    form = (float(node.attr("alpha", 1.0)), float(node.attr("beta", 0.0)), float(node.attr("limit", 0.0)))
    if form != (1.0, 0.0, 0.0) and (moe_activation(node) != "silu" or not node.attr("gated", 1)):
        raise unsupported(node, "alpha, beta and limit go with gated silu (SwiGLU) only")
    if form[2] < 0:
        raise unsupported(node, f"limit {form[2]} is negative")
    return form


def moe_biases(node: Node):
    """(up bias [experts, 2 * inner], down bias [experts, hidden]): values or None."""
    return tuple((list(node.inputs[5:7]) + [None, None])[:2])


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
        for bias, size in zip(moe_biases(node), (n_up, h)):
            if bias is not None and bias.type is not None and bias.type.shape not in (None, (e, size)):
                raise unsupported(node, f"a bias of {bias.type} for {e} experts of {size} outputs")
    moe_form(node)
    return [x.type]


def _moe_reference(node: Node, inputs):
    x, index, weights, up, down = inputs[:5]
    up_bias, down_bias = (list(inputs[5:7]) + [None, None])[:2]
    return [moe_np(x, index, weights, up, down, moe_activation(node), node.attr("gated", 1), up_bias, down_bias,
                   moe_form(node))]


def moe_np(x, index, weights, up, down, act: str, gated: int, up_bias=None, down_bias=None,
           form: tuple = (1.0, 0.0, 0.0)) -> np.ndarray:
    """The weighted sum of each token's chosen experts (every expert computed, weighted by
    its router weight: zero where not chosen), in X's type."""
    alpha, beta, limit = form
    y = np.zeros(x.shape, x.dtype)
    for e in range(up.shape[0]):
        w = (weights * (index == e).astype(weights.dtype)).sum(-1, keepdims=True)
        h = np.matmul(x, up[e].T) + (0 if up_bias is None else up_bias[e])
        if gated:
            gate, u = np.split(h, 2, axis=-1)
            if limit:
                gate, u = np.minimum(gate, limit), np.clip(u, -limit, limit)
            act_gate = activate_np(gate, act) if alpha == 1.0 else gate / (1 + np.exp(-alpha * gate))
            h = act_gate * (u + beta)
        else:
            h = activate_np(h, act)
        d = np.matmul(h.astype(x.dtype), down[e].T) + (0 if down_bias is None else down_bias[e])
        y = y + (d * w).astype(x.dtype)
    return y


def _moe_decompose(b: Builder, node: Node):
    """Every expert on every token: X @ up[e]^T, the activation, @ down[e]^T, times the
    router's weight for e (the sum of `weights` where `index` is e), summed over experts."""
    x, index, weights, up, down = node.inputs[:5]
    if up.type is None or up.type.shape is None or not isinstance(up.type.shape[0], int):
        raise unsupported(node, "the number of experts must be static to decompose")
    act, gated, form = moe_activation(node), node.attr("gated", 1), moe_form(node)
    ups, downs = constant_value(up), constant_value(down)
    biases = moe_biases(node)
    bias_values = [None if v is None else constant_value(v) for v in biases]
    y = None
    for e in range(up.type.shape[0]):
        h = b.MatMul(x, _expert_weight(b, up, ups, e, "expert_up"))
        h = gated_activation(b, _expert_bias(b, h, biases[0], bias_values[0], e, "expert_up_bias"), act, gated, form)
        h = _expert_bias(b, b.MatMul(h, _expert_weight(b, down, downs, e, "expert_down")), biases[1], bias_values[1],
                         e, "expert_down_bias")
        h = b.Mul(h, router_weight(b, index, weights, e))
        y = h if y is None else b.Add(y, h)
    return [y]


def _expert_bias(b: Builder, h, stacked, value: np.ndarray | None, e: int, name: str):
    """h + expert e's bias (h itself without one)."""
    if stacked is None:
        return h
    if value is not None:
        return b.Add(h, b.const(np.ascontiguousarray(value[e]), name))
    return b.Add(h, b.Gather(stacked, b.const(np.array(e, np.int64), "expert"), axis=0))


def router_weight(b: Builder, index, weights, e: int):
    """[.., 1]: the sum of `weights` where `index` is expert e (zero where it was not chosen)."""
    chosen = b.Cast(b.Equal(index, b.const(np.array(e, index.type.dtype.np_dtype), "expert")),
                    to=weights.type.dtype.onnx_type)
    return b.ReduceSum(b.Mul(weights, chosen), b.const(i64(-1), "axes"), keepdims=1)


def gated_activation(b: Builder, h, act: str, gated: int, form: tuple = (1.0, 0.0, 0.0)):
    """act(gate) * up over the two halves of `h` (gated; with `form` (alpha, beta, limit) the
    clamped gate * sigmoid(alpha * gate) * (up + beta)), or act(h)."""
    if not gated:
        return activate(b, h, act)
    gate, u = b.Split(h, axis=-1, num_outputs=2)
    alpha, beta, limit = form
    dt = h.type.dtype.np_dtype if h.type is not None else np.float32
    if limit:
        gate = b.Min(gate, b.const(np.array(limit, dt), "swiglu_limit"))
        u = b.Clip(u, b.const(np.array(-limit, dt), "swiglu_low"), b.const(np.array(limit, dt), "swiglu_limit"))
    if beta:
        u = b.Add(u, b.const(np.array(beta, dt), "swiglu_beta"))
    if alpha != 1.0:
        return b.Mul(b.Mul(gate, b.Sigmoid(b.Mul(gate, b.const(np.array(alpha, dt), "swiglu_alpha")))), u)
    return b.Mul(activate(b, gate, act), u)


def _expert_weight(b: Builder, stacked, value: np.ndarray | None, e: int, name: str):
    """Expert e's weight [in, out] for a MatMul: a constant of its own when the stack is one."""
    if value is not None:
        return b.const(np.ascontiguousarray(value[e].T), name)
    return b.Transpose(b.Gather(stacked, b.const(np.array(e, np.int64), "expert"), axis=0), perm=[1, 0])


register_op(OpDef(
    GRAPHOPT_DOMAIN, "MoE",
    attrs={"activation": AttrSpec(AttrKind.STRING, default="silu"), "gated": AttrSpec(AttrKind.INT, default=1),
           "alpha": AttrSpec(AttrKind.FLOAT, default=1.0), "beta": AttrSpec(AttrKind.FLOAT, default=0.0),
           "limit": AttrSpec(AttrKind.FLOAT, default=0.0)},
    min_inputs=5, max_inputs=7, min_outputs=1, max_outputs=1,
    infer=_moe_infer, reference=_moe_reference, decompose=_moe_decompose,
    doc="Mixture-of-experts block after its router: inputs X [.., hidden], index [.., k] (the experts "
        "chosen per token), weights [.., k] (their router weights), W_up [experts, 2 * inner, hidden] "
        "(gate rows then up rows; [experts, inner, hidden] with gated=0), W_down [experts, hidden, inner]. "
        "Y = sum over j of weights[.., j] * expert(index[.., j], X), "
        "expert(e, X) = (act(X @ W_gate[e]^T) * (X @ W_up[e]^T)) @ W_down[e]^T (gated; act(X @ W_up[e]^T) "
        "@ W_down[e]^T otherwise). Optional biases up_bias [experts, 2 * inner] and down_bias [experts, hidden] "
        "(GPT-OSS) are added after each projection; with gated silu, alpha, beta and limit (0: none) make it "
        "GPT-OSS's clamped SwiGLU: min(gate, limit) * sigmoid(alpha * min(gate, limit)) * (clip(up, -limit, "
        "limit) + beta).",
))
