"""AWQ (quantize-weights{method=awq}): the per-input-channel scale is exact in fp32 wherever it
goes (folded into a norm, a linear layer, a gated MLP's up projection, or an explicit Mul), and
the searched scales beat round-to-nearest on activations with outlier channels."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.interpreter import run
from graphopt.ir import Graph, TensorType
from graphopt.pass_manager import PassContext, PassManager
from graphopt.passes.quantization.awq import awq_rescale, fold_scale, scale_weight, search_scale
from graphopt.passes.quantization.weights import Site, find_site
from graphopt.testing import assert_close
from graphopt.verify import verify

F32 = DType.FLOAT32
K, N = 64, 48


def outlier_inputs(rng, rows: int, k: int = K) -> np.ndarray:
    """Activations whose channels differ in magnitude by orders (as real LLM activations do)."""
    channel = np.exp(rng.standard_normal(k) * 1.5).astype(np.float32)
    return (rng.standard_normal((2, rows, k)) * channel).astype(np.float32)


def block_graph(seed: int = 0) -> Graph:
    """Each producer AWQ folds into, and one it cannot (Tanh: an explicit Mul):

    RMSNorm -> two MatMuls (one group, one scale); SkipNorm(rms) -> GatedLinear -> MatMul (the
    scale goes into the up projection); LayerNormalization -> Linear(relu) -> Linear (the
    second scale goes into the first Linear's columns); Tanh -> Gemm."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    def gain(k=K):
        return np.exp(rng.standard_normal(k)).astype(np.float32)

    g = Graph("awq")
    x = g.add_input("x", TensorType(F32, ("batch", "seq", K)))
    b = Builder(g)
    h = b.op("RMSNorm", x, b.const(gain(), "norm0"), domain="graphopt", axis=-1, epsilon=1e-5)
    q, k = b.MatMul(h, b.const(w(K, K), "wq")), b.MatMul(h, b.const(w(K, K), "wk"))
    y, s = b.op("SkipNorm", x, b.Add(q, k), b.const(gain(), "norm1"), domain="graphopt", norm="rms", epsilon=1e-5,
                n_out=2)
    m = b.op("GatedLinear", y, b.const(w(K, N), "wg"), b.const(w(K, N), "wu"), domain="graphopt", activation="silu")
    d = b.MatMul(m, b.const(w(N, K), "wd"))
    ln = b.LayerNormalization(b.Add(s, d), b.const(gain(), "ln_scale"), b.const(w(K), "ln_bias"), axis=-1,
                              epsilon=1e-5)
    r = b.op("Linear", ln, b.const(w(K, N), "w1"), b.const(w(N), "b1"), domain="graphopt", activation="relu")
    o = b.op("Linear", r, b.const(w(N, K), "w2"), domain="graphopt")
    t = b.Gemm(b.Reshape(b.Tanh(o), b.const(np.array([-1, K], np.int64), "rows")), b.const(w(N, K), "w3"),
               b.const(w(N), "b3"), transB=1)
    g.outputs = [t]
    verify(g)
    return g


def sites_of(g: Graph) -> list[Site]:
    return [s for s in (find_site(n, tied=True) for n in g.nodes) if isinstance(s, Site)]


def test_each_fold_is_exact_in_fp32():
    """Given scales (not searched), W * s and X / s leave every output equal within fp32 rounding."""
    rng = np.random.default_rng(1)
    g = block_graph()
    feeds = {"x": outlier_inputs(rng, 8)}
    want = run(g, feeds)[g.outputs[0].name]
    groups: dict[int, list[Site]] = {}
    for site in sites_of(g):
        groups.setdefault(id(site.x), []).append(site)
    how = []
    for group in groups.values():
        s = np.exp(rng.standard_normal(group[0].w_nk.shape[1])).astype(np.float32)
        for site in group:
            scale_weight(g, site.node, site.kind, s)
        how.append(fold_scale(g, group[0].x, [site.node for site in group], s, group[0].node.name))
    verify(g)
    assert sorted(how) == sorted(["folded into graphopt.RMSNorm", "folded into graphopt.SkipNorm",
                                  "folded into graphopt.GatedLinear", "folded into LayerNormalization",
                                  "folded into graphopt.Linear", "Mul"])
    assert_close(run(g, feeds)[g.outputs[0].name], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fold_is_refused_where_x_has_other_readers():
    """X read by a layer outside the group (here the residual Add) cannot be divided at its source."""
    g = Graph("shared")
    x = g.add_input("x", TensorType(F32, ("batch", K)))
    b = Builder(g)
    h = b.op("RMSNorm", x, b.const(np.ones(K, np.float32), "norm"), domain="graphopt", axis=-1, epsilon=1e-5)
    y = b.MatMul(h, b.const(np.eye(K, dtype=np.float32), "w"))
    g.outputs = [b.Add(y, h)]
    feeds = {"x": np.random.default_rng(2).standard_normal((3, K)).astype(np.float32)}
    want = run(g, feeds)[g.outputs[0].name]
    s = np.linspace(0.5, 2, K).astype(np.float32)
    scale_weight(g, y.producer(), "matmul", s)
    assert fold_scale(g, h, [y.producer()], s, "t") == "Mul"
    assert_close(run(g, feeds)[g.outputs[0].name], want, rtol=1e-5, atol=1e-5)


def test_searched_scales_are_exact_in_fp32_and_found_on_outliers():
    rng = np.random.default_rng(3)
    g = block_graph()
    feeds = [{"x": outlier_inputs(rng, 64)} for _ in range(2)]
    held_out = {"x": outlier_inputs(rng, 16)}
    want = run(g, held_out)[g.outputs[0].name]
    records = awq_rescale(g, sites_of(g), feeds, bits=4, block_size=32, symmetric=False)
    verify(g)
    assert len(records) == 6 and sum(r["alpha"] > 0 for r in records) >= 3, records
    assert_close(run(g, held_out)[g.outputs[0].name], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_search_never_does_worse_than_rtn_and_beats_it_on_outliers():
    rng = np.random.default_rng(4)
    x = outlier_inputs(rng, 256).reshape(-1, K)
    w = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
    alpha, s, errors = search_scale(x, w, 4, 32, False)
    assert alpha > 0 and s is not None and s.shape == (K,)
    assert min(errors) == errors[int(round(alpha * len(errors)))] < 0.7 * errors[0], errors  # errors[0]: RTN


def test_awq_beats_rtn_through_the_pass_on_held_out_inputs():
    rng = np.random.default_rng(5)
    g = block_graph()
    calibration = [{"x": outlier_inputs(np.random.default_rng(6), 64)} for _ in range(2)]
    held_out = {"x": outlier_inputs(np.random.default_rng(6), 64)}  # the same channel magnitudes
    del rng
    want = run(g, held_out)[g.outputs[0].name]
    errors = {}
    for method in ("rtn", "awq"):
        pm = PassManager(f"quantize-weights{{bits=4,block-size=32,method={method},awq-then=rtn}}",
                         ctx=PassContext(hints={"calibration": calibration}))
        q = pm.run(g)
        assert sum(n.op_type == "QuantLinear" for n in q.nodes) == 7
        errors[method] = float(np.linalg.norm(run(q, held_out)[g.outputs[0].name] - want))
    assert errors["awq"] < 0.9 * errors["rtn"], errors
    assert pm.records[0].stats["awq-scaled"] >= 3


def test_awq_needs_calibration():
    from graphopt.errors import UserError

    with pytest.raises(UserError, match=r"method=awq.*--calibration"):
        PassManager("quantize-weights{method=awq}").run(block_graph())


def test_awq_then_gptq_rounds_the_scaled_weights_with_gptq():
    """awq-then=gptq (the default) keeps AWQ's exact scaling and replaces only the rounding:
    on the outlier block it beats GPTQ alone on held-out inputs."""
    g = block_graph()
    calibration = [{"x": outlier_inputs(np.random.default_rng(6), 64)} for _ in range(2)]
    held_out = {"x": outlier_inputs(np.random.default_rng(6), 64)}
    want = run(g, held_out)[g.outputs[0].name]
    errors = {}
    for method in ("gptq", "awq"):
        pm = PassManager(f"quantize-weights{{bits=4,block-size=32,method={method}}}",
                         ctx=PassContext(hints={"calibration": calibration}))
        errors[method] = float(np.linalg.norm(run(pm.run(g), held_out)[g.outputs[0].name] - want))
    assert pm.records[0].options["awq_then"] == "gptq"
    assert errors["awq"] < errors["gptq"], errors


def test_clip_ratio_one_is_round_to_nearest():
    from graphopt.ops.quant_format import quantize_rows
    from graphopt.passes.quantization.awq import quantize_clipped

    w = np.random.default_rng(7).standard_normal((12, 40)).astype(np.float32)
    for symmetric in (False, True):
        want = quantize_rows(w, 4, 16, symmetric)
        got = quantize_clipped(w, np.ones((12, 3), np.float32), 4, 16, symmetric)
        for a, b in zip(got, want):
            assert (a is None and b is None) or np.array_equal(a, b)
