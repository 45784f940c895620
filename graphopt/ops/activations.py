"""The activations fused ops carry (relu, gelu, gelu_tanh, silu): their numpy form for reference
kernels and their core-op form for decompositions, shared by Linear, GatedLinear and the
quantized projections.
"""
from __future__ import annotations

import math

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import (
    Node,
    TensorType,
    Value,
)
from graphopt.ops.common import unsupported

ACTIVATIONS = ("", "relu", "gelu", "gelu_tanh", "silu")


def activation_of(node: Node) -> str:
    # the declared default: "" for Linear (no activation), "silu" for GatedLinear (SwiGLU)
    act = node.attr("activation", "silu" if node.op_type == "GatedLinear" else "")
    if act not in ACTIVATIONS:
        known = ", ".join(repr(a) for a in ACTIVATIONS)
        raise unsupported(node, f"unknown activation {act!r} (expected one of {known})")
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
        raise unsupported(node, "the weight must be a matrix")
    k_w, n = (w.shape[1], w.shape[0]) if node.attr("trans_w", 0) else w.shape
    if x.shape is not None and isinstance(x.shape[-1], int) and isinstance(k_w, int) and x.shape[-1] != k_w:
        raise unsupported(node, f"X has {x.shape[-1]} features but the weight takes {k_w}")
    return n


def projection_infer(node: Node):
    """Linear and GatedLinear: X [..., K] times the weight in input 1 -> [..., N]."""
    x, w = node.inputs[0], node.inputs[1]
    if x.type is None or w.type is None:
        return [None]
    activation_of(node)
    n = _matmul_dims(node, x.type, w.type)
    bias = node.inputs[2] if node.op_type == "Linear" and len(node.inputs) > 2 else None
    last = bias.type.shape[-1] if bias is not None and bias.type is not None and bias.type.shape else None
    if isinstance(last, int) and isinstance(n, int) and last not in (1, n):
        raise unsupported(node, f"the bias has {last} values but the output has {n} features")
    shape = None if x.type.shape is None else tuple(x.type.shape[:-1]) + (n,)
    return [TensorType(x.type.dtype, shape)]
