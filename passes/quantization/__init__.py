"""Quantization passes: weights stored in fewer bits, with their accuracy measured.

`quantize-weights` (weights.py) rewrites every linear layer with a constant weight
(graphopt.Linear / GatedLinear, plain MatMul / Gemm, a tied LM head: sites.py) into
graphopt.QuantLinear: int4 or int8 weights, block-wise scales and zero points, round-to-
nearest, GPTQ (gptq.py) or AWQ (awq.py), the last two with calibration data from the pass
context. `quantize-dynamic` (dynamic.py) makes the same sites graphopt.DynamicQuantLinear:
int8 weights, activations quantized at each call. `quantize-static` (static.py) makes them
QDQ pairs around MatMul: int8 weights and activations, ranges from calibration.
"""
from graphopt.passes.quantization import dynamic, static, weights  # noqa: F401
