"""Lowering rules for the quantized ops:

    graphopt.QuantLinear -> com.microsoft.MatMulNBits (bits 4 and 8; the IR already holds
                            its layout) + bias and activation (BiasGelu / FastGelu where fused)
    graphopt.QuantGather -> com.microsoft.GatherBlockQuantized (uint8 data, quantize_axis=1)
    graphopt.DynamicQuantLinear -> com.microsoft.DynamicQuantizeMatMul (+ bias, activation)

The kernel's `accuracy_level` is the backend option `quant_accuracy_level`: "auto" and "0"
leave it unset (the kernel computes in float32, as the reference does); "4" lets the CPU
kernel quantize the activations to int8 per block and use integer dot products (faster,
less exact; docs/quantization.md has the measured perplexity).
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.ir import GRAPHOPT_DOMAIN, Node, TensorType
from graphopt.registry import register_lowering

from graphopt.backends.onnxruntime.kernels import MS_DOMAIN
from graphopt.backends.onnxruntime.lowering import BACKEND, LoweringContext
from graphopt.backends.onnxruntime.rules import bias_activation


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "QuantLinear")
def lower_quant_linear(ctx: LoweringContext, b: Builder, node: Node):
    x, packed, scales = node.inputs[:3]
    zero_points = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    dt = x.type.dtype
    if not ctx.has_kernel(MS_DOMAIN, "MatMulNBits", dt):
        return f"no {ctx.target} MatMulNBits kernel for {dt.short}"
    attrs = {"K": node.attr("K"), "N": node.attr("N"), "bits": node.attr("bits", 4), "block_size": node.attr("block_size", 32)}
    level = str(ctx.options.get("quant_accuracy_level", "auto"))
    if level not in ("auto", "0"):
        attrs["accuracy_level"] = int(level)
    ins = [x, packed, scales] + ([zero_points] if zero_points is not None else [])
    out_type = node.outputs[0].type
    y = b.op("MatMulNBits", *ins, domain=MS_DOMAIN, output_types=[out_type], **attrs)
    return [bias_activation(ctx, b, y, bias, node.attr("activation", ""), out_type)]



@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "QuantGather")
def lower_quant_gather(ctx: LoweringContext, b: Builder, node: Node):
    packed, indices, scales = node.inputs[:3]
    zero_points = node.inputs[3] if len(node.inputs) > 3 else None
    dt = scales.type.dtype
    # the registry's main type of this op is the table's (T1), not the output's
    if not ctx.has_kernel(MS_DOMAIN, "GatherBlockQuantized", DType.UINT8) or dt.short not in ("f32", "f16"):
        return f"no {ctx.target} GatherBlockQuantized kernel for u8 tables with {dt.short} scales"
    if indices.type.dtype.short not in ("i32", "i64"):
        return f"indices are {indices.type.dtype.short}"
    bits, block_size, k = node.attr("bits", 4), node.attr("block_size", 32), node.attr("K")
    rows, nb, blob = packed.type.shape
    # The kernel reads the table as [rows, nb * blob] bytes: a Reshape of the same constant,
    # so that a tied LM head's MatMulNBits and this lookup share one copy in the file.
    data = b.Reshape(packed, b.const(np.array([rows, nb * blob], np.int64), "table_shape"))
    ins = [data, indices, scales] + ([zero_points] if zero_points is not None else [])
    shape = None if indices.type.shape is None else tuple(indices.type.shape) + (nb * block_size,)
    y = b.op("GatherBlockQuantized", *ins, domain=MS_DOMAIN, output_types=[TensorType(dt, shape)],
             bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)
    if nb * block_size != k:
        y = b.Slice(y, b.const(np.array([0], np.int64), "k_start"), b.const(np.array([k], np.int64), "k_end"),
                    b.const(np.array([-1], np.int64), "k_axis"))
    return [y]


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "DynamicQuantLinear")
def lower_dynamic_quant_linear(ctx: LoweringContext, b: Builder, node: Node):
    x, w, scale = node.inputs[:3]
    zero_point = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    if not ctx.has_kernel(MS_DOMAIN, "DynamicQuantizeMatMul", x.type.dtype):
        return f"no {ctx.target} DynamicQuantizeMatMul kernel for {x.type.dtype.short}"
    out_type = node.outputs[0].type
    ins = [x, w, scale] + ([zero_point] if zero_point is not None else [])
    y = b.op("DynamicQuantizeMatMul", *ins, domain=MS_DOMAIN, output_types=[out_type])
    return [bias_activation(ctx, b, y, bias, node.attr("activation", ""), out_type)]
