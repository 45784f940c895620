"""graphopt.Linear: X @ W (+ bias) (+ activation), W stored [K, N] (or [N, K] with trans_w); what
fuse-linear produces from MatMul/Gemm + Add (+ activation).
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import (
    GRAPHOPT_DOMAIN,
    AttrKind,
    Node,
)
from graphopt.ops.activations import (
    activate,
    activate_np,
    activation_of,
    projection_infer,
)
from graphopt.registry import AttrSpec, OpDef, register_op


def _linear_reference(node: Node, inputs):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    if node.attr("trans_w", 0):
        w = w.T
    y = np.matmul(x, w)
    if bias is not None:
        y = y + bias
    return [activate_np(y.astype(x.dtype), activation_of(node))]


def _linear_decompose(b: Builder, node: Node):
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if node.attr("trans_w", 0):
        w = b.Transpose(w, perm=[1, 0])
    y = b.MatMul(x, w)
    if bias is not None:
        y = b.Add(y, bias)
    return [activate(b, y, activation_of(node))]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "Linear",
    attrs={"activation": AttrSpec(AttrKind.STRING, default=""), "trans_w": AttrSpec(AttrKind.INT, default=0)},
    min_inputs=2, max_inputs=3, min_outputs=1, max_outputs=1,
    infer=projection_infer, reference=_linear_reference, decompose=_linear_decompose,
    doc="Y = act(X @ W + B): W is [K, N] ([N, K] with trans_w=1), B is [N] or absent; activation is "
        "'', relu, gelu (erf), gelu_tanh or silu.",
))
