"""Lowering rules for the quantized ops:

    graphopt.QuantLinear -> com.microsoft.MatMulNBits (bits 4 and 8; the IR already holds
                            its layout) + bias and activation (BiasGelu / FastGelu where fused)

The kernel's `accuracy_level` is the backend option `quant_accuracy_level`: "auto" and "0"
leave it unset (the kernel computes in float32, as the reference does); "4" lets the CPU
kernel quantize the activations to int8 per block and use integer dot products (faster,
less exact; docs/quantization.md has the measured perplexity).
"""
from __future__ import annotations

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, Node
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

