"""Build examples/tiny_mlp.onnx: a two-layer MLP with LayerNorm and GELU, batch dimension
symbolic. Deterministic (seeded), so the committed file can be rebuilt byte for byte:

    python examples/make_tiny_mlp.py
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    d_in, d_hidden, d_out = 16, 32, 8

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    inits = [w("fc1.weight", d_in, d_hidden), w("fc1.bias", d_hidden), w("fc2.weight", d_hidden, d_out),
             w("fc2.bias", d_out), numpy_helper.from_array(np.ones(d_out, np.float32), "norm.weight"),
             numpy_helper.from_array(np.zeros(d_out, np.float32), "norm.bias")]
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="fc1/MatMul"),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1/Add"),
        helper.make_node("Gelu", ["h1"], ["h2"], name="act/Gelu"),
        helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"], name="fc2/MatMul"),
        helper.make_node("Add", ["h3", "fc2.bias"], ["h4"], name="fc2/Add"),
        helper.make_node("LayerNormalization", ["h4", "norm.weight", "norm.bias"], ["h5"], axis=-1,
                         epsilon=1e-5, name="norm/LayerNorm"),
        helper.make_node("Softmax", ["h5"], ["probs"], axis=-1, name="head/Softmax"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", d_out])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)],
                              producer_name="graphopt-examples", ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = Path(__file__).with_name("tiny_mlp.onnx")
    onnx.save(build(), out)
    print(f"wrote {out}")
