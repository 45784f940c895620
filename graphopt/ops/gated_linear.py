"""graphopt.GatedLinear: act(X @ Wg) * (X @ Wu) (SwiGLU, GeGLU), what fuse-gated-mlp produces;
decomposed as one MatMul over both weights and a Split.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import (
    GRAPHOPT_DOMAIN,
    AttrKind,
    Node,
    constant_value,
)
from graphopt.ops.activations import (
    activate,
    activate_np,
    activation_of,
    projection_infer,
)
from graphopt.ops.common import unsupported
from graphopt.registry import AttrSpec, OpDef, register_op


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
    return [(activate_np(g.astype(x.dtype), activation_of(node)) * u).astype(x.dtype)]


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
            raise unsupported(node, "biases must be constants to decompose")
        y = b.Add(y, b.const(np.concatenate([bgv, buv]), "gate_up_bias"))
    gate, up = b.Split(y, axis=-1, num_outputs=2)
    return [b.Mul(activate(b, gate, activation_of(node)), up)]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "GatedLinear",
    attrs={"activation": AttrSpec(AttrKind.STRING, default="silu")},
    min_inputs=3, max_inputs=5, min_outputs=1, max_outputs=1,
    infer=projection_infer, reference=_gated_reference, decompose=_gated_decompose,
    doc="Gated MLP projection (SwiGLU with activation='silu', GeGLU with 'gelu'): "
        "Y = act(X @ W_gate + B_gate) * (X @ W_up + B_up); weights [K, N]; inputs X, W_gate, W_up, B_gate?, B_up?.",
))
