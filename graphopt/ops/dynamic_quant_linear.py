"""graphopt.DynamicQuantLinear: int8 weights (per output channel) with the activations quantized
per call; ORT lowers it to DynamicQuantizeMatMul.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, TensorType
from graphopt.ops.activations import activate, activate_np
from graphopt.ops.common import unsupported
from graphopt.ops.quant_format import quant_parts
from graphopt.registry import AttrSpec, OpDef, register_op


def dynamic_quantize_np(x: np.ndarray):
    """ONNX DynamicQuantizeLinear: (q u8, scale f32, zero point u8)."""
    x = x.astype(np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255) if hi > lo else np.float32(1.0)
    zp = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
    q = np.clip(np.round(x / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp


def _dyn_infer(node: Node):
    x, w = node.inputs[:2]
    if w.type is not None and (w.type.dtype.short != "i8" or w.type.rank != 2):
        raise unsupported(node, f"the weight must be an i8 matrix [K, N], not {w.type}")
    if x.type is None or w.type is None:
        return [None]
    if x.type.dtype.short != "f32":
        raise unsupported(node, f"X must be f32, not {x.type.dtype.short}")
    k, n = w.type.shape
    shape = x.type.shape
    if shape is not None and isinstance(shape[-1], int) and isinstance(k, int) and shape[-1] != k:
        raise unsupported(node, f"X has {shape[-1]} features but the weight takes K={k}")
    return [TensorType(x.type.dtype, None if shape is None else tuple(shape[:-1]) + (n,))]


def _dyn_reference(node: Node, inputs):
    ins = list(inputs) + [None] * (5 - len(inputs))
    x, wq, w_scale, w_zp, bias = ins
    xq, xs, xzp = dynamic_quantize_np(x)
    wzp = np.zeros((), np.int32) if w_zp is None else w_zp.astype(np.int32)
    acc = np.matmul(xq.astype(np.int64) - int(xzp), wq.astype(np.int64) - wzp)  # exact
    y = (acc.astype(np.float32) * (xs * w_scale.astype(np.float32))).astype(np.float32)
    if bias is not None:
        y = y + bias
    return [activate_np(y.astype(np.float32), node.attr("activation", ""))]


def _dyn_decompose(b: Builder, node: Node):
    x, wq, w_scale, w_zp, bias = quant_parts(node)
    xq, xs, xzp = b.DynamicQuantizeLinear(x)
    # MatMulInteger takes u8 or i8 on each side with its zero point; the weight's defaults to 0
    acc = b.MatMulInteger(xq, wq, xzp, w_zp) if w_zp is not None else b.MatMulInteger(xq, wq, xzp)
    y = b.Mul(b.Cast(acc, to=1), b.Mul(xs, w_scale))
    if bias is not None:
        y = b.Add(y, bias)
    return [activate(b, y, node.attr("activation", ""))]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "DynamicQuantLinear",
    attrs={"activation": AttrSpec(AttrKind.STRING, default="")},
    min_inputs=3, max_inputs=5, min_outputs=1, max_outputs=1,
    infer=_dyn_infer, reference=_dyn_reference, decompose=_dyn_decompose,
    doc="Y = act((Xq - x_zp) @ (W - w_zp) * x_scale * w_scale + B): W is i8 [K, N] with w_scale [N] (per "
        "channel) or [] (per tensor) and w_zero_point? i8 of the same shape (absent: 0); X is quantized at each "
        "call as ONNX DynamicQuantizeLinear does (u8, one scale and zero point from its min and max); inputs X, "
        "W, w_scale, w_zero_point?, B?.",
))
