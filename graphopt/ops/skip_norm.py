"""graphopt.SkipNorm: a residual Add feeding a LayerNorm or RMSNorm; the second output is the
residual stream (the Add's sum) where other nodes read it.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import (
    GRAPHOPT_DOMAIN,
    AttrKind,
    Node,
)
from graphopt.ops.common import unsupported
from graphopt.registry import AttrSpec, OpDef, register_op


def _skipnorm_infer(node: Node):
    x = node.inputs[0]
    if x.type is None:
        return [None] * len(node.outputs)
    if node.attr("norm", "layer") not in ("layer", "rms"):
        raise unsupported(node, "norm must be 'layer' or 'rms'")
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
