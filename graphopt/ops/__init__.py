"""graphopt.ops: graphopt's own ops, one module per op.

Each module declares its op once, with `register_op`: attributes, type and shape inference, a
numpy reference kernel and a decomposition into core ONNX ops at the canonical opset (so every
backend can run it). Importing this package registers them all; the op registry finds it
through the entry point group `graphopt.ops` (graphopt/plugins.py), as it would a plugin's ops.
Shared pieces: `common` (errors, shape constants), `activations`, `quant_format` (the packed
weight layout).

RMSNorm, RotaryEmbedding and Attention have the semantics of the ONNX opset-23 ops of the same
purpose (imported opset-23 nodes map onto them one to one), and their reference kernels are
ONNX's own; where the ONNX reference, ONNX's function body and ONNX Runtime disagree, the op's
doc says which behaviour graphopt takes. tests/test_graphopt_ops.py checks every decomposition
against the reference and the reference against ONNX Runtime's opset-23 kernels.
"""
from graphopt.ops import (  # noqa: F401  (each module registers its op on import)
    attention, dynamic_quant_linear, gated_linear, linear, moe, quant_gather, quant_linear, quant_moe, rms_norm,
    rotary_embedding, skip_norm,
)
