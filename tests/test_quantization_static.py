"""quantize-static: QDQ pairs from calibration ranges. The quantized graph's error against fp32
stays within int8's budget, ONNX Runtime runs it with its integer kernels (the optimized ORT
graph has MatMulIntegerToFloat and no float MatMul), and ORT's numbers equal the reference's."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.interpreter import run
from graphopt.ir import Graph, TensorType
from graphopt.pass_manager import PassContext, PassManager
from graphopt.passes.quantization.static import activation_range, entropy_threshold

F32 = DType.FLOAT32
K, N = 64, 48


def mlp_graph(seed: int = 0) -> Graph:
    """Linear(gelu, bias) -> GatedLinear(silu) -> MatMul, and a Gemm reading the same X as the first Linear."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    g = Graph("mlp")
    x = g.add_input("x", TensorType(F32, ("batch", "seq", K)))
    b = Builder(g)
    h = b.op("Linear", x, b.const(w(K, N), "w1"), b.const(w(N), "b1"), domain="graphopt", activation="gelu")
    m = b.op("GatedLinear", h, b.const(w(N, N), "wg"), b.const(w(N, N), "wu"), domain="graphopt", activation="silu")
    y = b.MatMul(m, b.const(w(N, K), "w2"))
    side = b.MatMul(x, b.const(w(K, K), "w3"))
    g.outputs = [b.Add(y, side)]
    return g


def feeds(seed: int, rows: int = 32) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((2, rows, K)).astype(np.float32)}


def quantize(g: Graph, method: str) -> tuple[Graph, PassManager]:
    pm = PassManager(f"quantize-static{{calibration={method}}}",
                     ctx=PassContext(hints={"calibration": [feeds(i) for i in range(4)]}))
    return pm.run(g), pm


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_static_int8_is_within_budget_and_runs_integer_kernels_on_ort(method, tmp_path):
    import onnx
    import onnxruntime as ort

    import graphopt.backends.onnxruntime as ort_backend
    from graphopt.onnx_io import to_onnx_model

    g = mlp_graph()
    held_out = feeds(99)
    want = run(g, held_out)[g.outputs[0].name]
    q, pm = quantize(g, method)
    assert pm.records[0].stats == {**pm.records[0].stats, "linear": 1, "gated-linear": 1, "matmul": 2}
    ops = [n.op_type for n in q.nodes]
    assert ops.count("QuantizeLinear") == 3  # x (shared by two layers), the Linear's and the GatedLinear's outputs
    assert ops.count("DequantizeLinear") == 3 + 4
    got = run(q, held_out)[q.outputs[0].name]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-4 < rel < 0.05, rel  # int8 changes the numbers, by about a percent

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(to_onnx_model(ort_backend.lower(q, "cpu")).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, held_out)[0]
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused.count("MatMulIntegerToFloat") == 4 and "MatMul" not in fused and "DequantizeLinear" not in fused, fused
    np.testing.assert_allclose(out, got, rtol=1e-4, atol=1e-4 * np.abs(got).max())


def test_ranges_minmax_percentile_entropy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(100_000).astype(np.float32)
    x[:5] = [40, -35, 30, 25, -20]  # a few outliers
    assert activation_range(x, "minmax") == (-35.0, 40.0)
    lo, hi = activation_range(x, "percentile", 99.9)
    assert 2.5 < hi < 4 and -4 < lo < -2.5
    t = entropy_threshold(np.abs(x))
    assert 3 < t < 20, t  # clips the outliers, keeps the Gaussian's body
    assert activation_range(np.abs(x), "minmax")[0] == 0.0  # 0 is always in range (exact zero point)


def test_static_needs_calibration_and_checks_options():
    from graphopt.errors import UserError

    with pytest.raises(UserError, match=r"quantize-static needs calibration data: give --calibration FILE .*"
                                        r"graphopt.optimize\(\.\.\., calibration=FILE\), or a PassManager's "
                                        r"PassContext\(hints={.calibration.: \[feeds, ...\]}\)"):
        PassManager("quantize-static").run(mlp_graph())
    with pytest.raises(UserError, match="calibration must be minmax, percentile or entropy"):
        PassManager("quantize-static{calibration=kl}", ctx=PassContext(hints={"calibration": [feeds(0)]})).run(mlp_graph())


def test_int8_static_under_the_accuracy_guard_on_the_shipped_model(tmp_path):
    """--quantize int8-static with --accuracy-budget on examples/default (calibrated on its
    training corpus, measured on its val.txt): the guard drives quantize-static like
    quantize-weights, and the report says what it reached and kept."""
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from graphopt.cli import cli

    pytest.importorskip("torch")
    model = Path(__file__).resolve().parents[1] / "examples" / "default"
    r = CliRunner().invoke(cli, ["optimize", str(model), "-o", str(tmp_path / "q"), "-q", "--quantize", "int8-static",
                                 "--accuracy-budget", "perplexity=+0.5%"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    acc, q = report["accuracy"], report["quantization"]
    assert q["method"] == "static-percentile" and 0 < acc["score"] <= 0.005, acc
    assert sorted(q["kept_float"]) == sorted(acc["kept_float"])
    assert sum(q["layers"].values()) + len(q["kept_float"]) == 25  # 6 x (qkv, o, gate-up, down) + the head


def test_last_token_slicing_moves_through_the_qdq_pairs():
    """A decoder quantized by quantize-static still gets last-token logits: the slice moves
    above QuantizeLinear/DequantizeLinear (per-tensor scales) and the int8 weights'
    DequantizeLinear, and the last position's numbers are those of the full sequence."""
    rng = np.random.default_rng(3)
    g = Graph("head")
    x = g.add_input("x", TensorType(F32, ("batch", "seq", K)))
    b = Builder(g)
    h = b.op("Linear", x, b.const((rng.standard_normal((K, N)) * 0.1).astype(np.float32), "w1"),
             b.const((rng.standard_normal(N) * 0.1).astype(np.float32), "b1"), domain="graphopt", activation="gelu")
    g.outputs = [b.MatMul(h, b.const((rng.standard_normal((N, 3 * K)) * 0.1).astype(np.float32), "lm_head"))]
    q, _ = quantize(g, "percentile")
    assert [n.op_type for n in q.nodes].count("QuantizeLinear") == 2
    held_out = feeds(7)
    full = run(q, held_out)[q.outputs[0].name]
    sliced = PassManager("slice-last-token-logits").run(q)
    assert sliced.outputs[0].type.shape[1] == 1
    slices = [n for n in sliced.nodes if n.op_type == "Slice"]
    assert len(slices) == 1 and [u[0].op_type for u in slices[0].outputs[0].uses()] == ["QuantizeLinear"]
    got = run(sliced, held_out)[sliced.outputs[0].name]
    np.testing.assert_allclose(got[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)
