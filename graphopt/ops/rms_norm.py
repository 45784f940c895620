"""graphopt.RMSNorm: ONNX RMSNormalization-23's semantics (imported opset-23 nodes map onto it one
to one), with ONNX's reference kernel.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node
from graphopt.ops.common import i64, unsupported
from graphopt.registry import AttrSpec, OpDef, register_op


def _rms_stash_dtype(dtype: np.dtype) -> np.dtype:
    # stash_type=1: normalize in float32, or in float64 for float64 input (as ONNX Runtime
    # and ONNX's reference kernel do; casting float64 down would only lose precision).
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _rms_infer(node: Node):
    x, scale = node.inputs
    if x.type is None or scale.type is None:
        return [None]
    if scale.type.dtype is not x.type.dtype:
        raise unsupported(node, f"X is {x.type.dtype.short} but scale is {scale.type.dtype.short}; "
                                 "they must have the same element type")
    rank, axis = x.type.rank, node.attr("axis", -1)
    if rank is not None and not -rank <= axis < rank:
        raise unsupported(node, f"axis {axis} is out of range for an input of rank {rank}")
    width = x.type.shape[-1] if x.type.shape else None
    size = scale.type.shape[-1] if scale.type.shape else None
    if isinstance(width, int) and isinstance(size, int) and size not in (1, width):
        raise unsupported(node, f"the scale has {size} values but X has {width} features")
    return [x.type]


def _rms_reference(node: Node, inputs):
    from onnx.reference.ops.op_rms_normalization import _rms_normalization

    x, scale = inputs
    stash = _rms_stash_dtype(x.dtype)
    # ONNX's kernel for the first stage (with a unit scale), then the function body's
    # second stage: cast back to X's type, then scale.
    normalized = _rms_normalization(x.astype(stash), np.ones((), stash), axis=node.attr("axis", -1),
                                    epsilon=node.attr("epsilon", 1e-5))
    return [normalized.astype(x.dtype) * scale]


def _rms_decompose(b: Builder, node: Node):
    x, scale = node.inputs
    axis = node.attr("axis", -1)
    rank = x.type.rank
    if axis < 0:
        axes = list(range(axis, 0))
    elif rank is not None:
        axes = list(range(axis, rank))
    else:
        raise unsupported(node, "a non-negative axis needs an input of known rank to decompose")
    stash = _rms_stash_dtype(x.type.dtype.np_dtype)
    xs = x if x.type.dtype.np_dtype == stash else b.Cast(x, to=1)
    mean_square = b.ReduceMean(b.Mul(xs, xs), b.const(i64(*axes), "rms_axes"), keepdims=1)
    eps = b.const(np.array(node.attr("epsilon", 1e-5), stash), "rms_epsilon")
    normalized = b.Mul(xs, b.Reciprocal(b.Sqrt(b.Add(mean_square, eps))))
    if xs is not x:
        normalized = b.Cast(normalized, to=x.type.dtype.onnx_type)
    return [b.Mul(normalized, scale)]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "RMSNorm",
    attrs={"axis": AttrSpec(AttrKind.INT, default=-1), "epsilon": AttrSpec(AttrKind.FLOAT, default=1e-5)},
    min_inputs=2, max_inputs=2, min_outputs=1, max_outputs=1,
    infer=_rms_infer, reference=_rms_reference, decompose=_rms_decompose,
    doc="Y = Cast(X / sqrt(mean(X^2 over axes [axis, rank)) + epsilon), X's type) * scale, as ONNX "
        "RMSNormalization-23 with stash_type=1: the first stage runs in float32 (float64 for float64 "
        "input). X and scale must have the same element type (as in ONNX's function body).",
))
