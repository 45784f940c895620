"""Fused graphopt ops (Linear, SkipNorm, GatedLinear, MoE): reference vs decomposition, in the
interpreter and in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.interpreter import run
from graphopt.onnx_io import save_onnx
from graphopt.lowering import decompose_graphopt_ops, decompose_node
from graphopt.registry import infer_types
from graphopt.testing import assert_close, run_ort
from graphopt.testing import one_node_graph, quant_moe_inputs
from graphopt.verify import verify

F32 = DType.FLOAT32
RNG = np.random.default_rng(0)


def one_node(op, inputs: dict, consts: dict, attrs: dict, n_out=1):
    specs = [None if a is None else (name, a, ("batch",) + (None,) * (a.ndim - 1), False) for name, a in inputs.items()]
    specs += [None if a is None else (name, a, None, True) for name, a in consts.items()]
    g = one_node_graph(op, specs, attrs, n_out=n_out, name="t", drop_trailing_empty=True)
    verify(g)
    return g, {k: v for k, v in inputs.items() if v is not None}


def check_decomposition(g, feeds, tmp_path):
    want = run(g, feeds)
    d = g.copy()
    decompose_graphopt_ops(d)
    verify(d)
    assert all(n.domain == "" for n in d.nodes)
    for k, v in run(d, feeds).items():
        assert_close(v, want[k], rtol=1e-5, atol=1e-5, what=f"interpreter {k}")
    save_onnx(d, tmp_path / "d.onnx")
    for k, v in run_ort(tmp_path / "d.onnx", feeds).items():
        assert_close(v, want[k], rtol=1e-5, atol=1e-5, what=f"ORT {k}")
    return want


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("act", ["", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("trans_w, bias", [(0, True), (1, True), (0, False)])
def test_linear(act, trans_w, bias, tmp_path):
    x, w = f32(3, 5, 8), f32(8, 6)
    g, feeds = one_node("Linear", {"x": x}, {"w": w.T.copy() if trans_w else w, "b": f32(6) if bias else None},
                        {"activation": act, "trans_w": trans_w})
    assert infer_types(g.nodes[0])[0].shape == ("batch", 5, 6)
    want = check_decomposition(g, feeds, tmp_path)
    y = x @ w + (g.initializers["b"].const_value if bias else 0)
    ref = {"": y, "relu": np.maximum(y, 0), "silu": y / (1 + np.exp(-y))}.get(act)
    if ref is not None:
        assert_close(list(want.values())[0], ref.astype(np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("with_beta, with_bias, n_out", [(True, True, 2), (False, False, 1), (True, False, 2)])
def test_skipnorm(norm, with_beta, with_bias, n_out, tmp_path):
    x, skip = f32(2, 4, 16), f32(2, 4, 16)
    g, feeds = one_node("SkipNorm", {"x": x, "skip": skip},
                        {"gamma": f32(16), "beta": f32(16) if with_beta else None, "bias": f32(16) if with_bias else None},
                        {"norm": norm, "epsilon": 1e-6}, n_out=n_out)
    if not with_beta and with_bias:
        pytest.skip("bias without beta needs an empty input")
    want = check_decomposition(g, feeds, tmp_path)
    s = x + skip + (g.initializers["bias"].const_value if with_bias else 0)
    if n_out == 2:
        assert_close(want[g.outputs[1].name], s.astype(np.float32))
    if norm == "layer":
        ref = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-6)
        ref = ref * g.initializers["gamma"].const_value + (g.initializers["beta"].const_value if with_beta else 0)
        assert_close(want[g.outputs[0].name], ref.astype(np.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_linear(act, bias, tmp_path):
    x = f32(2, 3, 8)
    wg, wu = f32(8, 12), f32(8, 12)
    consts = {"wg": wg, "wu": wu}
    if bias:
        consts.update(bg=f32(12), bu=f32(12))
    g, feeds = one_node("GatedLinear", {"x": x}, consts, {"activation": act})
    want = list(check_decomposition(g, feeds, tmp_path).values())[0]
    gate = x @ wg + (consts["bg"] if bias else 0)
    up = x @ wu + (consts["bu"] if bias else 0)
    if act == "silu":
        assert_close(want, (gate / (1 + np.exp(-gate)) * up).astype(np.float32), rtol=1e-5, atol=1e-5)
    d = g.copy()
    decompose_node(d.nodes[0])
    assert [n.op_type for n in d.nodes].count("MatMul") == 1  # the two projections share one MatMul


@pytest.mark.parametrize("gated", [1, 0])
@pytest.mark.parametrize("weights_const", [True, False])
def test_moe_is_the_weighted_sum_of_the_chosen_experts(gated, weights_const, tmp_path):
    """Reference and decomposition (every expert on every token, weighted by the router's
    weight for it) against the sparse sum computed token by token over the chosen experts."""
    tokens, k, experts, hidden, inner = 6, 2, 4, 8, 5
    x = f32(tokens, hidden)
    index = np.stack([RNG.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int64)
    weights = RNG.uniform(0.1, 0.6, (tokens, k)).astype(np.float32)
    up, down = f32(experts, (2 if gated else 1) * inner, hidden), f32(experts, hidden, inner)
    specs = [(name, a, ("batch", None), False) for name, a in (("x", x), ("index", index), ("weights", weights))]
    # stacked weights as graph inputs: the decomposition gathers each expert at run time
    specs += [(name, a, None, weights_const) for name, a in (("up", up), ("down", down))]
    g = one_node_graph("MoE", specs, {"activation": "silu" if gated else "relu", "gated": gated}, name="t")
    verify(g)
    feeds = {name: a for name, a, _, const in specs if not const}
    want = list(check_decomposition(g, feeds, tmp_path).values())[0]
    sparse = np.zeros_like(x, dtype=np.float64)
    for t in range(tokens):
        for j in range(k):
            e = index[t, j]
            h = up[e].astype(np.float64) @ x[t]
            if gated:
                gate, u = h[:inner], h[inner:]
                h = gate / (1 + np.exp(-gate)) * u
            else:
                h = np.maximum(h, 0)
            sparse[t] += weights[t, j] * (down[e] @ h)
    assert_close(want, sparse.astype(np.float32), rtol=1e-4, atol=1e-4)
    if weights_const:  # each expert's weights are constants of their own, not slices taken at run time
        d = g.copy()
        decompose_node(d.nodes[0])
        ops = [n.op_type for n in d.nodes]
        assert ops.count("MatMul") == 2 * experts and "Gather" not in ops and "Transpose" not in ops


@pytest.mark.parametrize("weights_const", [True, False])
def test_moe_with_biases_and_a_clamped_swiglu_is_gpt_oss_experts(weights_const, tmp_path):
    """GPT-OSS's experts: biases after both projections, gate clamped to at most `limit`, up to
    [-limit, limit], gate * sigmoid(1.702 gate) * (up + 1): reference and decomposition against
    the sparse sum written out token by token (the limit low enough that both clamps bite)."""
    tokens, k, experts, hidden, inner, limit = 6, 2, 4, 8, 5, 1.5
    x = f32(tokens, hidden) * 2
    index = np.stack([RNG.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int64)
    weights = RNG.uniform(0.1, 0.6, (tokens, k)).astype(np.float32)
    up, down = f32(experts, 2 * inner, hidden), f32(experts, hidden, inner)
    up_bias, down_bias = f32(experts, 2 * inner), f32(experts, hidden)
    specs = [(name, a, ("batch", None), False) for name, a in (("x", x), ("index", index), ("weights", weights))]
    specs += [(name, a, None, weights_const) for name, a in (("up", up), ("down", down), ("up_bias", up_bias),
                                                             ("down_bias", down_bias))]
    g = one_node_graph("MoE", specs, {"activation": "silu", "gated": 1, "alpha": 1.702, "beta": 1.0, "limit": limit},
                       name="t")
    verify(g)
    feeds = {name: a for name, a, _, const in specs if not const}
    want = list(check_decomposition(g, feeds, tmp_path).values())[0]
    sparse = np.zeros_like(x, dtype=np.float64)
    clamped = 0
    for t in range(tokens):
        for j in range(k):
            e = index[t, j]
            h = up[e].astype(np.float64) @ x[t] + up_bias[e]
            gate, u = h[:inner], h[inner:]
            clamped += int((gate > limit).sum() + (np.abs(u) > limit).sum())
            gate, u = np.minimum(gate, limit), np.clip(u, -limit, limit)
            sparse[t] += weights[t, j] * (down[e] @ (gate / (1 + np.exp(-1.702 * gate)) * (u + 1)) + down_bias[e])
    assert clamped > 10
    assert_close(want, sparse.astype(np.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False)])
def test_quant_moe_is_the_moe_of_its_dequantized_experts(bits, symmetric, tmp_path):
    """QuantMoE's reference and its decomposition (a QuantLinear per expert projection) against
    graphopt.MoE's reference on the dequantized weights."""
    x, index, weights, quant, (up, down) = quant_moe_inputs(RNG, bits=bits, symmetric=symmetric)
    names = ["up_packed", "up_scales", "down_packed", "down_scales", "up_zero_points", "down_zero_points"]
    specs = [(name, a, ("batch", None), False) for name, a in (("x", x), ("index", index), ("weights", weights))]
    specs += [(name, a, None, True) for name, a in zip(names, quant)]
    attrs = {"bits": bits, "block_size": 32, "hidden": 64, "inner": 32, "activation": "silu", "gated": 1}
    g = one_node_graph("QuantMoE", specs, attrs, name="t")
    verify(g)
    feeds = {"x": x, "index": index, "weights": weights}
    want = list(check_decomposition(g, feeds, tmp_path).values())[0]
    m = one_node_graph("MoE", specs[:3] + [("up", up, None, True), ("down", down, None, True)],
                       {"activation": "silu", "gated": 1}, name="m")
    assert_close(want, list(run(m, feeds).values())[0], rtol=1e-5, atol=1e-5)
    d = g.copy()
    decompose_node(d.nodes[0])
    assert [n.op_type for n in d.nodes].count("QuantLinear") == 2 * 4


@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_moe_with_biases_and_a_clamped_swiglu_is_gpt_oss_moe_of_its_dequantized_experts(symmetric, tmp_path):
    x, index, weights, quant, (up, down) = quant_moe_inputs(RNG, symmetric=symmetric)
    biases = [("up_bias", f32(4, 64)), ("down_bias", f32(4, 64))]
    names = ["up_packed", "up_scales", "down_packed", "down_scales"] + (
        [] if symmetric else ["up_zero_points", "down_zero_points"])
    specs = [(name, a, ("batch", None), False) for name, a in (("x", x), ("index", index), ("weights", weights))]
    quant_specs = [(name, a, None, True) for name, a in zip(names, quant)]
    if symmetric:
        quant_specs += [None, None]
    form = {"activation": "silu", "gated": 1, "alpha": 1.702, "beta": 1.0, "limit": 0.5}
    g = one_node_graph("QuantMoE", specs + quant_specs + [(n, a, None, True) for n, a in biases],
                       {"bits": 4, "block_size": 32, "hidden": 64, "inner": 32, **form}, name="t")
    verify(g)
    feeds = {"x": x, "index": index, "weights": weights}
    want = list(check_decomposition(g, feeds, tmp_path).values())[0]
    m = one_node_graph("MoE", specs + [("up", up, None, True), ("down", down, None, True)]
                       + [(n, a, None, True) for n, a in biases], form, name="m")
    assert_close(want, list(run(m, feeds).values())[0], rtol=1e-5, atol=1e-5)


def test_bad_fused_ops_name_the_node():
    with pytest.raises(UserError, match="node 'Linear_.*X has 8 features but the weight takes 7"):
        one_node("Linear", {"x": f32(2, 8)}, {"w": f32(7, 6)}, {"activation": ""})
    g, _ = one_node("Linear", {"x": f32(2, 8)}, {"w": f32(8, 6)}, {"activation": ""})
    g.nodes[0].attrs["activation"] = type(g.nodes[0].attrs["activation"])(g.nodes[0].attrs["activation"].kind, "swish")
    with pytest.raises(UserError, match="unknown activation 'swish'"):
        run(g, {"x": f32(2, 8)})
