"""Fused graphopt ops that fusion passes produce: Linear, SkipNorm and GatedLinear.

Like every graphopt op, each is declared once with attributes, type inference, a numpy
reference and a decomposition into core ops at the canonical opset (so any backend can run
it). Backends lower them to their own fused kernels where they have one.
"""
from __future__ import annotations

import math

import numpy as np

from graphopt.builder import Builder
from graphopt.errors import UserError
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, TensorType, Value, constant_value
from graphopt.registry import AttrSpec, OpDef, register_op

ACTIVATIONS = ("", "relu", "gelu", "gelu_tanh", "silu")


def _unsupported(node: Node, why: str) -> UserError:
    return UserError(f"node {node.name!r} ({node.op}): {why}")


def _activation(node: Node) -> str:
    # the declared default: "" for Linear (no activation), "silu" for GatedLinear (SwiGLU)
    act = node.attr("activation", "silu" if node.op_type == "GatedLinear" else "")
    if act not in ACTIVATIONS:
        known = ", ".join(repr(a) for a in ACTIVATIONS)
        raise _unsupported(node, f"unknown activation {act!r} (expected one of {known})")
    return act


def activate_np(x: np.ndarray, act: str) -> np.ndarray:
    """Reference activations, computed in float64 and cast back."""
    if not act:
        return x
    xf = x.astype(np.float64)
    if act == "relu":
        y = np.maximum(xf, 0)
    elif act == "silu":
        y = xf / (1 + np.exp(-xf))
    elif act == "gelu":
        from math import erf

        y = 0.5 * xf * (1 + np.vectorize(erf)(xf / math.sqrt(2)))
    else:  # gelu_tanh
        y = 0.5 * xf * (1 + np.tanh(math.sqrt(2 / math.pi) * (xf + 0.044715 * xf ** 3)))
    return y.astype(x.dtype)


def activate(b: Builder, x: Value, act: str) -> Value:
    """The activation in core ops (opset 20)."""
    if not act:
        return x
    if act == "relu":
        return b.Relu(x)
    if act == "silu":
        return b.Mul(x, b.Sigmoid(x))
    return b.Gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def _matmul_dims(node: Node, x: TensorType, w: TensorType) -> tuple:
    if w.shape is None or len(w.shape) != 2:
        raise _unsupported(node, "the weight must be a matrix")
    k_w, n = (w.shape[1], w.shape[0]) if node.attr("trans_w", 0) else w.shape
    if x.shape is not None and isinstance(x.shape[-1], int) and isinstance(k_w, int) and x.shape[-1] != k_w:
        raise _unsupported(node, f"X has {x.shape[-1]} features but the weight takes {k_w}")
    return n


# --------------------------------------------------------------------------------------
# Linear: Y = act(X @ W + B)


def _projection_infer(node: Node):
    """Linear and GatedLinear: X [..., K] times the weight in input 1 -> [..., N]."""
    x, w = node.inputs[0], node.inputs[1]
    if x.type is None or w.type is None:
        return [None]
    _activation(node)
    n = _matmul_dims(node, x.type, w.type)
    shape = None if x.type.shape is None else tuple(x.type.shape[:-1]) + (n,)
    return [TensorType(x.type.dtype, shape)]


def _linear_reference(node: Node, inputs):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    if node.attr("trans_w", 0):
        w = w.T
    y = np.matmul(x, w)
    if bias is not None:
        y = y + bias
    return [activate_np(y.astype(x.dtype), _activation(node))]


def _linear_decompose(b: Builder, node: Node):
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if node.attr("trans_w", 0):
        w = b.Transpose(w, perm=[1, 0])
    y = b.MatMul(x, w)
    if bias is not None:
        y = b.Add(y, bias)
    return [activate(b, y, _activation(node))]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "Linear",
    attrs={"activation": AttrSpec(AttrKind.STRING, default=""), "trans_w": AttrSpec(AttrKind.INT, default=0)},
    min_inputs=2, max_inputs=3, min_outputs=1, max_outputs=1,
    infer=_projection_infer, reference=_linear_reference, decompose=_linear_decompose,
    doc="Y = act(X @ W + B): W is [K, N] ([N, K] with trans_w=1), B is [N] or absent; activation is "
        "'', relu, gelu (erf), gelu_tanh or silu.",
))


# --------------------------------------------------------------------------------------
# SkipNorm: S = X + skip (+ bias); Y = norm(S)


def _skipnorm_infer(node: Node):
    x = node.inputs[0]
    if x.type is None:
        return [None] * len(node.outputs)
    if node.attr("norm", "layer") not in ("layer", "rms"):
        raise _unsupported(node, "norm must be 'layer' or 'rms'")
    return [x.type] * len(node.outputs)


def _skipnorm_parts(node: Node):
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    return ins[0], ins[1], ins[2], ins[3], ins[4]  # x, skip, gamma, beta, bias


def _skipnorm_reference(node: Node, inputs):
    ins = list(inputs) + [None] * (5 - len(inputs))
    x, skip, gamma, beta, bias = ins
    s = x + skip
    if bias is not None:
        s = s + bias
    s = s.astype(x.dtype)
    sf = s.astype(np.float32 if x.dtype != np.float64 else np.float64)
    eps = node.attr("epsilon", 1e-5)
    if node.attr("norm", "layer") == "layer":
        mean = sf.mean(axis=-1, keepdims=True)
        var = ((sf - mean) ** 2).mean(axis=-1, keepdims=True)
        y = (sf - mean) / np.sqrt(var + eps)
    else:
        y = sf / np.sqrt((sf ** 2).mean(axis=-1, keepdims=True) + eps)
    y = y.astype(x.dtype) * gamma
    if beta is not None:
        y = y + beta
    return [y.astype(x.dtype), s][:len(node.outputs)]


def _skipnorm_decompose(b: Builder, node: Node):
    x, skip, gamma, beta, bias = _skipnorm_parts(node)
    s = b.Add(x, skip)
    if bias is not None:
        s = b.Add(s, bias)
    eps = node.attr("epsilon", 1e-5)
    if node.attr("norm", "layer") == "layer":
        y = b.LayerNormalization(s, gamma, beta, axis=-1, epsilon=eps)
    else:
        y = b.op("RMSNorm", s, gamma, domain=GRAPHOPT_DOMAIN, axis=-1, epsilon=eps)
        if beta is not None:
            y = b.Add(y, beta)
    return [y, s][:len(node.outputs)]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "SkipNorm",
    attrs={"norm": AttrSpec(AttrKind.STRING, default="layer"), "epsilon": AttrSpec(AttrKind.FLOAT, default=1e-5)},
    min_inputs=3, max_inputs=5, min_outputs=1, max_outputs=2,
    infer=_skipnorm_infer, reference=_skipnorm_reference, decompose=_skipnorm_decompose,
    doc="Residual add and norm over the last axis: S = X + skip (+ bias); Y = LayerNorm(S) * gamma + beta "
        "(norm='layer') or RMSNorm(S) * gamma (+ beta) (norm='rms'). Inputs X, skip, gamma, beta?, bias?; "
        "outputs Y and optionally S (the residual stream).",
))


# --------------------------------------------------------------------------------------
# GatedLinear (SwiGLU and friends): Y = act(X @ Wg + Bg) * (X @ Wu + Bu)


def _gated_parts(node: Node):
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    return ins[0], ins[1], ins[2], ins[3], ins[4]  # x, w_gate, w_up, b_gate, b_up


def _gated_reference(node: Node, inputs):
    ins = list(inputs) + [None] * (5 - len(inputs))
    x, wg, wu, bg, bu = ins
    g, u = np.matmul(x, wg), np.matmul(x, wu)
    if bg is not None:
        g = g + bg
    if bu is not None:
        u = u + bu
    return [(activate_np(g.astype(x.dtype), _activation(node)) * u).astype(x.dtype)]


def _gated_decompose(b: Builder, node: Node):
    """One MatMul with the two weights side by side, then Split: half the weight reads of two
    separate projections' launches, and the form ONNX Runtime runs fastest."""
    x, wg, wu, bg, bu = _gated_parts(node)
    cg, cu = constant_value(wg), constant_value(wu)
    if cg is not None and cu is not None:
        w = b.const(np.concatenate([cg, cu], axis=1), "gate_up_weight")
    else:
        w = b.Concat(wg, wu, axis=1)
    y = b.MatMul(x, w)
    if bg is not None or bu is not None:
        n = wg.type.shape[1]
        zero = np.zeros(n, dtype=x.type.dtype.np_dtype)
        bgv, buv = constant_value(bg) if bg is not None else zero, constant_value(bu) if bu is not None else zero
        if bgv is None or buv is None:
            raise _unsupported(node, "biases must be constants to decompose")
        y = b.Add(y, b.const(np.concatenate([bgv, buv]), "gate_up_bias"))
    gate, up = b.Split(y, axis=-1, num_outputs=2)
    return [b.Mul(activate(b, gate, _activation(node)), up)]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "GatedLinear",
    attrs={"activation": AttrSpec(AttrKind.STRING, default="silu")},
    min_inputs=3, max_inputs=5, min_outputs=1, max_outputs=1,
    infer=_projection_infer, reference=_gated_reference, decompose=_gated_decompose,
    doc="Gated MLP projection (SwiGLU with activation='silu', GeGLU with 'gelu'): "
        "Y = act(X @ W_gate + B_gate) * (X @ W_up + B_up); weights [K, N]; inputs X, W_gate, W_up, B_gate?, B_up?.",
))
