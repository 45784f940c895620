"""Weight quantization: the QuantLinear format and op (reference, decomposition, ORT
MatMulNBits lowering), and the quantize-weights pass (sites, numbers, error bounds, GPTQ)."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.interpreter import run
from graphopt.ir import Graph, TensorType
from graphopt.onnx_io import save_onnx
from graphopt.pass_manager import PassContext, PassManager
from graphopt.ops.quant_format import dequantize_blockwise, pack, quantize_blockwise, unpack
from graphopt.lowering import decompose_graphopt_ops
from graphopt.testing import assert_close, run_ort
from graphopt.verify import verify

F32 = DType.FLOAT32
RNG = np.random.default_rng(0)
FORMATS = [(4, 32, False), (4, 64, True), (4, 128, False), (8, 32, True), (8, 128, False), (4, 16, False)]


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def numpy_dequantize(packed, scales, zero_points, bits, block_size, k):
    """An independent, element-by-element reading of the format (MatMulNBits' layout)."""
    n, nb = scales.shape
    w = np.zeros((n, nb * block_size), np.float32)
    for r in range(n):
        for b in range(nb):
            if zero_points is None:
                zp = 2 ** (bits - 1)
            elif bits == 8:
                zp = int(zero_points[r, b])
            else:
                byte = int(zero_points[r, b // 2])
                zp = (byte >> 4) if b % 2 else (byte & 15)
            for i in range(block_size):
                if bits == 8:
                    q = int(packed[r, b, i])
                else:
                    byte = int(packed[r, b, i // 2])
                    q = (byte >> 4) if i % 2 else (byte & 15)
                w[r, b * block_size + i] = np.float32(q - zp) * scales[r, b]
    return w[:, :k]


def quant_linear_graph(k=40, n=12, bits=4, block_size=16, symmetric=False, bias=True, activation="", seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    packed, scales, zp = quantize_blockwise(w, bits, block_size, symmetric)
    g = Graph("q")
    x = g.add_input("x", TensorType(F32, ("batch", 5, k)))
    b = Builder(g)
    ins = [x, b.const(packed, "w_q"), b.const(scales, "w_scales"), None if zp is None else b.const(zp, "w_zp")]
    if bias:
        ins.append(b.const(rng.standard_normal(n).astype(np.float32), "bias"))
    y = b.op("QuantLinear", *ins, domain="graphopt", K=k, N=n, bits=bits, block_size=block_size, activation=activation)
    g.outputs = [y]
    verify(g)
    return g, {"x": rng.standard_normal((2, 5, k)).astype(np.float32)}, (w, packed, scales, zp)


# --------------------------------------------------------------------------------------
# The format


@pytest.mark.parametrize("bits, block_size, symmetric", FORMATS)
def test_quantize_error_is_within_half_a_step(bits, block_size, symmetric):
    k = 100  # not a multiple of any block size: the last block is padded
    w = f32(7, k) * 3
    packed, scales, zp = quantize_blockwise(w, bits, block_size, symmetric)
    assert packed.dtype == np.uint8 and packed.shape == (7, -(-k // block_size), block_size * bits // 8)
    deq = dequantize_blockwise(packed, scales, zp, bits, block_size, k)
    assert_close(deq, numpy_dequantize(packed, scales, zp, bits, block_size, k), rtol=0, atol=0)
    step = np.repeat(np.abs(scales), block_size, axis=1)[:, :k]
    # Asymmetric: every weight lies on the grid's span, so rounding errs by at most half a
    # step; symmetric: the side opposite the largest magnitude is clipped by up to one step.
    bound = step * (0.5 if not symmetric else 1.0) * (1 + 1e-6)
    assert (np.abs(deq - w) <= bound).all()
    assert np.abs(deq - w).max() > 0.1 * step.max() / 2  # and it did quantize


def test_pack_unpack_roundtrip():
    q = RNG.integers(0, 16, (3, 9)).astype(np.uint8)
    assert_close(unpack(pack(q, 4), 4, 9), q)
    assert pack(q, 4).shape == (3, 5)
    assert_close(pack(np.array([[1, 2]], np.uint8), 4), np.array([[0x21]], np.uint8))  # low nibble first


# --------------------------------------------------------------------------------------
# The op: reference, decomposition, ORT lowering


@pytest.mark.parametrize("bits, block_size, symmetric", FORMATS)
def test_reference_matches_numpy_dequantize_then_matmul(bits, block_size, symmetric):
    g, feeds, (w, packed, scales, zp) = quant_linear_graph(k=72, bits=bits, block_size=block_size,
                                                           symmetric=symmetric)
    bias = g.initializers["bias"].const_value
    want = feeds["x"].astype(np.float64) @ numpy_dequantize(packed, scales, zp, bits, block_size, 72).T + bias
    assert_close(run(g, feeds)[g.outputs[0].name], want.astype(np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["", "gelu", "silu"])
@pytest.mark.parametrize("bits, block_size, symmetric", FORMATS)
def test_decomposition_matches_reference(bits, block_size, symmetric, activation, tmp_path):
    g, feeds, _ = quant_linear_graph(bits=bits, block_size=block_size, symmetric=symmetric, activation=activation)
    want = run(g, feeds)[g.outputs[0].name]
    d = g.copy()
    decompose_graphopt_ops(d)
    verify(d)
    assert all(n.domain == "" for n in d.nodes)
    assert "MatMul" in [n.op_type for n in d.nodes]
    assert_close(run(d, feeds)[d.outputs[0].name], want, rtol=1e-5, atol=1e-5, what="interpreter")
    save_onnx(d, tmp_path / "d.onnx")
    assert_close(next(iter(run_ort(tmp_path / "d.onnx", feeds).values())), want, rtol=1e-5, atol=1e-5, what="ORT")


@pytest.mark.parametrize("bits, block_size, symmetric", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_ort_lowering_is_matmul_nbits(bits, block_size, symmetric, bias, tmp_path):
    import graphopt.backends.onnxruntime as ort_backend

    g, feeds, _ = quant_linear_graph(k=192, n=24, bits=bits, block_size=block_size, symmetric=symmetric,
                                     bias=bias, activation="gelu")
    want = run(g, feeds)[g.outputs[0].name]
    lowered = ort_backend.lower(g, "cpu", options={"quant_accuracy_level": "0"})  # not "auto": it may pick 4
    assert [n.op for n in lowered.nodes][0] == "com.microsoft.MatMulNBits"
    save_onnx(lowered, tmp_path / "l.onnx")
    got = next(iter(run_ort(tmp_path / "l.onnx", feeds).values()))
    # fp32 compute (accuracy_level unset): the kernel differs from the reference only in
    # the order it sums K=192 products of |x| ~ 1 and |w| ~ 1.
    assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_ort_int8_compute_is_within_its_activation_rounding(tmp_path):
    """accuracy_level=4 quantizes X to int8 per block: an error of about |x|max/127 per
    element, summed over K with the weights' magnitudes."""
    import graphopt.backends.onnxruntime as ort_backend

    g, feeds, (w, packed, scales, zp) = quant_linear_graph(k=128, n=16, bits=4, block_size=32, bias=False)
    want = run(g, feeds)[g.outputs[0].name]
    save_onnx(ort_backend.lower(g, "cpu", options={"quant_accuracy_level": "4"}), tmp_path / "l.onnx")
    got = next(iter(run_ort(tmp_path / "l.onnx", feeds).values()))
    deq = dequantize_blockwise(packed, scales, zp, 4, 32, 128)
    x = feeds["x"]
    x_step = np.abs(x).reshape(2, 5, 4, 32).max(-1) / 127  # per block of 32 along K
    bound = np.einsum("bsk,nk->bsn", np.repeat(x_step, 32, -1) / 2, np.abs(deq)) + 1e-4
    assert (np.abs(got - want) <= bound).all()
    assert np.abs(got - want).max() > 1e-5  # it really computed in int8


# --------------------------------------------------------------------------------------
# The pass


def linear_graph(kind: str, k=64, n=48, seed=1):
    """One layer of each kind the pass quantizes, and the float weight it reads [N, K]."""
    rng = np.random.default_rng(seed)
    g = Graph(kind)
    x = g.add_input("x", TensorType(F32, ("batch", "seq", k)))
    b = Builder(g)
    w_kn = rng.standard_normal((k, n)).astype(np.float32) * 0.1
    if kind == "linear":
        y = b.op("Linear", x, b.const(w_kn, "w"), b.const(rng.standard_normal(n).astype(np.float32), "b"),
                 domain="graphopt", activation="gelu")
    elif kind == "gated":
        w_up = rng.standard_normal((k, n)).astype(np.float32) * 0.1
        y = b.op("GatedLinear", x, b.const(w_kn, "wg"), b.const(w_up, "wu"), domain="graphopt")
        w_kn = np.concatenate([w_kn, w_up], axis=1)
    elif kind == "matmul":
        y = b.MatMul(x, b.const(w_kn, "w"))
    elif kind == "gemm":
        x2 = g.add_input("x2", TensorType(F32, ("rows", k)))
        g.inputs.remove(x)
        y = b.Gemm(x2, b.const(np.ascontiguousarray(w_kn.T), "w"), b.const(np.ones(n, np.float32), "c"), transB=1)
    elif kind == "tied":  # an embedding table [V, K] read by Gather and, transposed, by the LM head
        ids = g.add_input("ids", TensorType(DType.INT64, ("batch", "seq")))
        table = b.const(np.ascontiguousarray(w_kn.T), "table")
        y = b.MatMul(b.Add(x, b.Gather(table, ids)), b.Transpose(table, perm=[1, 0]))
    g.outputs = [y]
    verify(g)
    feeds = {v.name: (rng.integers(0, n, (2, 3)) if v.type.dtype is DType.INT64 else
                      rng.standard_normal([2 if d == "batch" or d == "rows" else 3 for d in v.type.shape[:-1]]
                                          + [k]).astype(np.float32))
             for v in g.inputs}
    return g, feeds, w_kn.T


@pytest.mark.parametrize("kind, stat", [("linear", "linear"), ("gated", "gated-linear"), ("matmul", "matmul"),
                                        ("gemm", "gemm"), ("tied", "tied")])
@pytest.mark.parametrize("bits", [4, 8])
def test_pass_rewrites_each_site_and_stores_it_packed(kind, stat, bits):
    g, feeds, w_nk = linear_graph(kind)
    pm = PassManager(f"quantize-weights{{bits={bits},block-size=32}}")
    q = pm.run(g)  # verifies after the pass
    assert pm.records[0].stats[stat] == 1
    ops = [n.op for n in q.nodes]
    assert ops.count("graphopt.QuantLinear") == 1
    assert not {"MatMul", "Gemm", "graphopt.Linear", "graphopt.GatedLinear", "Transpose"} & set(ops)
    floats = {k: v for k, v in q.weights().items() if v.dtype == np.float32 and v.size >= w_nk.size // 2}
    if kind == "tied":
        assert list(floats) == ["table"]  # the Gather still reads it
    else:
        assert not floats, f"float weights left: {list(floats)}"
    node = next(n for n in q.nodes if n.op_type == "QuantLinear")
    packed = node.inputs[1].const_value
    assert packed.dtype == np.uint8 and packed.nbytes == w_nk.size * bits // 8


@pytest.mark.parametrize("k, bits, block, want", [
    (192, 8, 128, 64),   # 2 blocks padded to 256 values against 3 whole blocks of 64
    (192, 4, 32, 32),    # a multiple: unchanged
    (512, 8, 128, 128),
    (48, 4, 32, 16),     # 2 blocks of 32 (16 values padding) against 3 of 16: 41 bytes against 38
    (100, 8, 128, 128),  # no power of two >= 16 divides 100: the smaller blocks store more
    (40, 8, 64, 16),     # 1 block of 64 (69 bytes) against 3 of 16 (63)
    (80, 4, 32, 32),     # f32 scales: 3 blocks of 32 (62 bytes) against 5 of 16 (63)
])
@pytest.mark.parametrize("scale_bytes, zero_points", [(4, True), (2, True), (2, False)])
def test_fit_block_takes_the_block_that_stores_the_fewest_bytes(k, bits, block, want, scale_bytes, zero_points):
    from graphopt.ops.quant_format import fit_block, num_blocks

    def stored(b):
        nb = num_blocks(k, b)
        return nb * b * bits // 8 + scale_bytes * nb + (-(-nb * bits // 8) if zero_points else 0)

    got = fit_block(k, bits, block, scale_bytes, zero_points)
    if (scale_bytes, zero_points) == (4, True):
        assert got == want
    assert stored(got) == min(stored(b) for b in (16, 32, 64, 128) if b <= block)
    if k % block == 0:
        assert got == block
    if (k, scale_bytes) == (80, 2):  # f16 scales: 5 blocks of 16 (53 bytes; 50 symmetric) against 3 of 32 (56; 54)
        assert got == 16


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_a_layer_whose_k_the_block_does_not_divide_is_quantized_with_the_fitted_block(method):
    """K=192 at block-size=128 (the shipped model's width under --quantize int8): the layer is
    quantized at block 64, stored in fewer bytes, and its output is the numpy dequantize-then-
    matmul of its own scales at that block."""
    g, feeds, w_nk = linear_graph("matmul", k=192, n=40)
    calibration = [{"x": np.random.default_rng(i).standard_normal((2, 3, 192)).astype(np.float32)} for i in range(2)]
    pm = PassManager(f"quantize-weights{{bits=8,block-size=128,method={method}}}",
                     ctx=PassContext(hints={"calibration": calibration}))
    q = pm.run(g)
    node = next(n for n in q.nodes if n.op_type == "QuantLinear")
    assert node.attr("block_size") == 64 and node.attr("K") == 192
    packed, scales = node.inputs[1].const_value, node.inputs[2].const_value
    zp = node.inputs[3].const_value if len(node.inputs) > 3 and node.inputs[3] is not None else None
    assert packed.shape == (40, 3, 64) and scales.shape == (40, 3)
    assert next(d for d in pm.records[0].details if "K" in d)["block_size"] == 64
    x = {**feeds, **run(q, feeds, keep_all=True)}[node.inputs[0].name]
    deq = dequantize_blockwise(packed, scales, zp, 8, 64, 192)
    assert_close(run(q, feeds)[q.outputs[0].name], x @ deq.T, rtol=1e-5, atol=1e-5, what="fitted block")


@pytest.mark.parametrize("bits", [4, 8])
def test_summary_counts_the_values_a_packed_weight_holds_not_its_bytes(bits):
    """A 4-bit weight [48, 64] is 1,536 bytes but 3,072 values; the report's parameter count
    is of values (plus the 48 x 2 scales and the zero points, two a byte at 4 bits)."""
    from graphopt.summary import summarize

    g, _, _ = linear_graph("matmul", k=64, n=48)
    q = PassManager(f"quantize-weights{{bits={bits},block-size=32}}").run(g)
    zero_point_values = 48 * (2 if bits == 8 else 2)  # 2 blocks a row: 2 bytes at 8 bits, 1 byte of 2 at 4
    assert summarize(q)["parameters"]["count"] == 64 * 48 + 48 * 2 + zero_point_values
    assert summarize(q)["parameters"]["bytes"] == 64 * 48 * bits // 8 + 48 * 2 * 4 + 48 * 2 * bits // 8


@pytest.mark.parametrize("kind", ["linear", "matmul", "gemm", "tied"])
def test_pass_error_is_bounded_by_the_quantization_step(kind):
    """|y_q - y| <= sum_k |x_k| |w_nk - deq(w)_nk| <= |x| @ (step / 2)^T before the
    activation (GELU is 1.13-Lipschitz; the others here have none)."""
    g, feeds, w_nk = linear_graph(kind)
    want = run(g, feeds)[g.outputs[0].name]
    q = PassManager("quantize-weights{bits=4,block-size=32}").run(g)
    got = run(q, feeds)[q.outputs[0].name]
    node = next(n for n in q.nodes if n.op_type == "QuantLinear")
    scales = node.inputs[2].const_value
    step = np.repeat(np.abs(scales), 32, axis=1)[:, :w_nk.shape[1]]
    x = {**feeds, **run(q, feeds, keep_all=True)}[node.inputs[0].name]
    bound = np.abs(x) @ (step / 2).T * (1.13 if kind == "linear" else 1.0) + 1e-5
    err = np.abs(got - want)
    assert (err <= bound).all()
    assert err.max() > 1e-3  # int4 changes the numbers: the bound is not vacuous
    assert err.max() < 0.5 * np.abs(want).max()


def test_gated_linear_error_is_small():
    g, feeds, _ = linear_graph("gated")
    want = run(g, feeds)[g.outputs[0].name]
    got = run(PassManager("quantize-weights{bits=8,block-size=32}").run(g), feeds)[g.outputs[0].name]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01  # int8: ~0.4 % of a step-free output


def test_pass_leaves_excluded_and_non_constant_layers():
    g = Graph("t")
    x = g.add_input("x", TensorType(F32, ("batch", 4, 32)))
    w = g.add_input("w", TensorType(F32, (32, 16)))
    b = Builder(g)
    y = b.MatMul(x, w)  # a weight that is an input, not a constant
    z = b.op("Linear", y, b.const(f32(16, 8), "w2"), domain="graphopt")
    g.outputs = [z]
    pm = PassManager(f"quantize-weights{{exclude={z.producer().name}}}")
    q = pm.run(g)
    assert [n.op for n in q.nodes] == ["MatMul", "graphopt.Linear"]
    assert pm.records[0].details == [{"node": z.producer().name, "op": "graphopt.Linear", "reason": "excluded"}]
    from graphopt.passes.quantization.weights import find_site

    assert find_site(y.producer(), tied=True) == "the weight is not a constant matrix"


@pytest.mark.parametrize("name", ["quantize-weights", "quantize-dynamic"])
def test_an_exclude_naming_no_node_is_an_error_and_a_recipe_may_list_them(name, tmp_path):
    """`exclude=nonexistent` quantized every layer without a word; a TOML recipe's list became
    the string "['a', 'b']"; `exclude=` (as `graphopt passes` prints it) was refused."""
    from graphopt.errors import UserError
    from graphopt.pass_manager import load_recipe

    g = Graph("t")
    x = g.add_input("x", TensorType(F32, ("batch", 32)))
    b = Builder(g)
    h = b.op("Linear", x, b.const(f32(32, 16), "w1"), domain="graphopt")
    g.outputs = [b.op("Linear", h, b.const(f32(16, 8), "w2"), domain="graphopt")]
    first, second = h.producer().name, g.outputs[0].producer().name
    with pytest.raises(UserError, match=f"{name}: exclude names no node of the graph: {first}x"):
        PassManager(f"{name}{{exclude={first}x}}").run(g)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[passes]]\nname = "{name}"\nexclude = ["{first}", "{second}"]\n')
    pm = PassManager(load_recipe(recipe))
    pm.run(g)
    assert sorted(d["node"] for d in pm.records[0].details if d["reason"] == "excluded") == sorted([first, second])
    assert sum(n.op.startswith("graphopt.Quant") or n.op.startswith("graphopt.Dynamic")
               for n in PassManager(f"{name}{{exclude=}}").run(g).nodes) == 2


def test_pass_options_are_checked():
    from graphopt.errors import UserError

    for bad in ("bits=3", "block-size=48", "method=spqr"):
        with pytest.raises(UserError, match="quantize-weights"):
            PassManager(f"quantize-weights{{{bad}}}").run(linear_graph("matmul")[0])
    with pytest.raises(UserError, match="calibration"):
        PassManager("quantize-weights{method=gptq}").run(linear_graph("matmul")[0])


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(symmetric):
    """GPTQ minimizes the layer's output error on the calibration inputs: on inputs with
    strongly correlated features (as real activations have) it must beat round-to-nearest on
    held-out inputs of the same distribution."""
    k, n = 128, 32
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((k, k)).astype(np.float32) * np.linspace(2, 0.05, k)[None, :]

    def inputs(rows):
        return (rng.standard_normal((1, rows, k)).astype(np.float32) @ mix.T).astype(np.float32)

    g, _, _ = linear_graph("matmul", k=k, n=n)
    calibration = [{"x": inputs(256)} for _ in range(4)]
    held_out = {"x": inputs(512)}
    want = run(g, held_out)[g.outputs[0].name]
    errors = {}
    for method in ("rtn", "gptq"):
        ctx = PassContext(hints={"calibration": calibration})
        q = PassManager(f"quantize-weights{{bits=4,block-size=32,method={method},symmetric={symmetric}}}",
                        ctx=ctx).run(g)
        errors[method] = float(np.linalg.norm(run(q, held_out)[g.outputs[0].name] - want))
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


# --------------------------------------------------------------------------------------
# QuantGather (quantized embeddings) and the tied table


def quant_gather_graph(bits=4, block_size=32, symmetric=False, k=48, rows=20):
    table = f32(rows, k)
    packed, scales, zp = quantize_blockwise(table, bits, block_size, symmetric)
    g = Graph("qg")
    ids = g.add_input("ids", TensorType(DType.INT64, ("batch", "seq")))
    b = Builder(g)
    ins = [b.const(packed, "t_q"), ids, b.const(scales, "t_scales")] + ([] if zp is None else [b.const(zp, "t_zp")])
    y = b.op("QuantGather", *ins, domain="graphopt", K=k, bits=bits, block_size=block_size)
    g.outputs = [y]
    verify(g)
    return g, {"ids": RNG.integers(0, rows, (2, 3))}, (packed, scales, zp)


@pytest.mark.parametrize("bits, block_size, symmetric", FORMATS)
def test_quant_gather_reference_decomposition_and_ort(bits, block_size, symmetric, tmp_path):
    import graphopt.backends.onnxruntime as ort_backend

    g, feeds, (packed, scales, zp) = quant_gather_graph(bits, block_size, symmetric)
    want = numpy_dequantize(packed, scales, zp, bits, block_size, 48)[feeds["ids"]]
    got = run(g, feeds)[g.outputs[0].name]
    assert got.shape == (2, 3, 48)
    assert_close(got, want, rtol=0, atol=0)
    d = g.copy()
    decompose_graphopt_ops(d)
    verify(d)
    assert_close(run(d, feeds)[d.outputs[0].name], want, rtol=0, atol=0, what="decomposition")
    lowered = ort_backend.lower(g, "cpu")
    assert "com.microsoft.GatherBlockQuantized" in [n.op for n in lowered.nodes]
    save_onnx(lowered, tmp_path / "g.onnx")
    assert_close(next(iter(run_ort(tmp_path / "g.onnx", feeds).values())), want, rtol=0, atol=0, what="ORT")


def test_tied_embedding_and_head_share_one_quantized_copy():
    g, feeds, _ = linear_graph("tied")
    want = run(g, feeds)[g.outputs[0].name]
    pm = PassManager("quantize-weights{bits=8,block-size=32,embeddings=true}")
    q = pm.run(g)
    assert pm.records[0].stats["tied"] == 1 and pm.records[0].stats["embedding"] == 1
    gather = next(n for n in q.nodes if n.op_type == "QuantGather")
    head = next(n for n in q.nodes if n.op_type == "QuantLinear")
    assert gather.inputs[0] is head.inputs[1] and gather.inputs[2] is head.inputs[2]  # one copy
    assert all(v.dtype != np.float32 or v.size < 100 for v in q.weights().values())  # the float table is gone
    got = run(q, feeds)[q.outputs[0].name]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01


# --------------------------------------------------------------------------------------
# quantize-dynamic and DynamicQuantLinear


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_quant_linear_reference_decomposition_and_ort(per_channel, tmp_path):
    import graphopt.backends.onnxruntime as ort_backend
    from graphopt.passes.quantization.dynamic import quantize_int8_symmetric

    k, n = 64, 24
    w = f32(k, n)
    q, scale = quantize_int8_symmetric(w, per_channel)
    g = Graph("d")
    x = g.add_input("x", TensorType(F32, ("batch", 3, k)))
    b = Builder(g)
    y = b.op("DynamicQuantLinear", x, b.const(q, "w"), b.const(scale, "s"), None, b.const(f32(n), "bias"),
             domain="graphopt", activation="gelu")
    g.outputs = [y]
    verify(g)
    feeds = {"x": f32(2, 3, k)}
    want = run(g, feeds)[y.name]
    # independently: ONNX DynamicQuantizeLinear by hand, then the integer product
    xv = feeds["x"]
    lo, hi = min(xv.min(), 0), max(xv.max(), 0)
    xs = np.float32((hi - lo) / 255)
    xzp = np.clip(np.round(-lo / xs), 0, 255)
    xq = np.clip(np.round(xv / xs) + xzp, 0, 255)
    pre = ((xq - xzp) @ q.astype(np.float64)) * (np.float64(xs) * scale) + g.initializers["bias"].const_value
    from graphopt.ops.activations import activate_np

    assert_close(want, activate_np(pre.astype(np.float32), "gelu"), rtol=1e-5, atol=1e-5)
    d = g.copy()
    decompose_graphopt_ops(d)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in d.nodes}
    save_onnx(d, tmp_path / "d.onnx")
    assert_close(next(iter(run_ort(tmp_path / "d.onnx", feeds).values())), want, rtol=1e-5, atol=1e-5)
    lowered = ort_backend.lower(g, "cpu")
    assert lowered.nodes[0].op == "com.microsoft.DynamicQuantizeMatMul"
    save_onnx(lowered, tmp_path / "l.onnx")
    assert_close(next(iter(run_ort(tmp_path / "l.onnx", feeds).values())), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "gated", "matmul", "gemm", "tied"])
def test_quantize_dynamic_pass(kind):
    g, feeds, w_nk = linear_graph(kind)
    want = run(g, feeds)[g.outputs[0].name]
    pm = PassManager("quantize-dynamic")
    q = pm.run(g)
    ops = [n.op for n in q.nodes]
    assert ops.count("graphopt.DynamicQuantLinear") == 1
    assert not {"MatMul", "Gemm", "graphopt.Linear", "graphopt.GatedLinear"} & set(ops)
    got = run(q, feeds)[q.outputs[0].name]
    # int8 weights and activations: each a half step of 1/255 (activations) or 1/254
    # (weights) of its range; the output error stays around 1 % of the output's norm.
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-4 < rel < 0.02, rel


# --------------------------------------------------------------------------------------
# Golden IR

GOLDEN_WEIGHTS = {"wg": f32(64, 32) * 0.1, "wu": f32(64, 32) * 0.1, "wd": f32(32, 64) * 0.1, "b": f32(32)}
GOLDEN_BEFORE = '''graph @mlp(%x: f32[batch, seq, 64]) -> (f32[batch, seq, 64]) {
  weights {
    @wg: f32[64, 32]
    @wu: f32[64, 32]
    @wd: f32[32, 64]
    @b: f32[32]
  }
  %h = graphopt.GatedLinear(%x, @wg, @wu, @b, @b) {activation="silu"} : f32[batch, seq, 32] loc("mlp")
  %y = MatMul(%h, @wd) : f32[batch, seq, 64] loc("down")
  return %y
}
'''
GOLDEN_AFTER = '''graph @mlp(%x: f32[batch, seq, 64]) -> (f32[batch, seq, 64]) {
  weights {
    @wg_q4: u8[64, 2, 16]
    @wg_scales: f32[64, 2]
    @wg_zero_points: u8[64, 1]
    @wg_bias: f32[64]
    @wd_q4: u8[64, 1, 16]
    @wd_scales: f32[64, 1]
    @wd_zero_points: u8[64, 1]
  }
  %quantlinear = graphopt.QuantLinear(%x, @wg_q4, @wg_scales, @wg_zero_points, @wg_bias) {K=64, N=64, bits=4, block_size=32} : f32[batch, seq, 64] loc("mlp/QuantLinear")
  %split, %split_0 = Split(%quantlinear) {axis=-1, num_outputs=2} : f32[batch, seq, 32], f32[batch, seq, 32] loc("mlp/Split")
  %sigmoid = Sigmoid(%split) : f32[batch, seq, 32] loc("mlp/Sigmoid")
  %mul = Mul(%split, %sigmoid) : f32[batch, seq, 32] loc("mlp/Mul")
  %mul_1 = Mul(%mul, %split_0) : f32[batch, seq, 32] loc("mlp/Mul_1")
  %y = graphopt.QuantLinear(%mul_1, @wd_q4, @wd_scales, @wd_zero_points) {K=32, N=64, bits=4, block_size=32} : f32[batch, seq, 64] loc("down/QuantLinear")
  return %y
}
'''


def test_golden_gated_mlp_and_matmul():
    from graphopt.testing import apply_pipeline_text

    _, out, records = apply_pipeline_text(GOLDEN_BEFORE, "quantize-weights", weights=GOLDEN_WEIGHTS, check=False)
    assert out == GOLDEN_AFTER, out
    assert records[0].stats["gated-linear"] == 1 and records[0].stats["matmul"] == 1


def test_accuracy_level_auto_is_chosen_by_timing_and_recorded(tmp_path, monkeypatch):
    """quant_accuracy_level=auto times both levels on the graph's MatMulNBits shapes at one row
    (a decode step) and at 64 (a prefill), judged apart: 4 when >= 10 % faster at one row count
    and <= 10 % slower at the other; the artifact's manifest records the times."""
    import json

    import graphopt
    import graphopt.backends.onnxruntime as ort_backend
    from graphopt.backends.onnxruntime import accuracy_level

    g, _, _ = quant_linear_graph(k=192, n=24)
    choice = accuracy_level.choose_accuracy_level(g)
    ratio = {r: choice["ms"]["4"][r] / choice["ms"]["0"][r] for r in ("1", "64")}
    assert min(min(t.values()) for t in choice["ms"].values()) > 0
    assert choice["level"] == (4 if min(ratio.values()) <= 0.9 and max(ratio.values()) <= 1.1 else 0)
    assert accuracy_level.choose_accuracy_level(g) == choice  # timed once per shape and process
    assert (192, 24, 4, 16) in accuracy_level._CACHE

    def level_in(lowered):
        node = next(n for n in lowered.nodes if n.op_type == "MatMulNBits")
        return node.attr("accuracy_level", 0)

    cases = [  # level -> rows -> ms, and the level the rule must choose
        ({0: {1: 1.0, 64: 10.0}, 4: {1: 0.5, 64: 5.0}}, 4),   # faster at both
        ({0: {1: 1.0, 64: 10.0}, 4: {1: 0.95, 64: 9.5}}, 0),  # under 10 % faster: not worth the error
        ({0: {1: 1.0, 64: 30.0}, 4: {1: 0.5, 64: 30.0}}, 4),  # a decode step 2x faster, prefill even (summed: 1.6 %)
        ({0: {1: 1.0, 64: 10.0}, 4: {1: 0.5, 64: 12.0}}, 0),  # the step faster but the prefill 20 % slower
    ]
    for i, (ms, forced) in enumerate(cases):
        monkeypatch.setattr(accuracy_level, "_CACHE", {})
        monkeypatch.setattr(accuracy_level, "_measure", lambda *shape, ms=ms: ms)
        assert level_in(ort_backend.lower(g, "cpu")) == forced, ms
        assert level_in(ort_backend.lower(g, "cpu", options={"quant_accuracy_level": "0"})) == 0  # forced by the user
        graphopt.optimize(g, tmp_path / f"a{i}", passes="eliminate-dead-code", overwrite=True)
        manifest = json.loads((tmp_path / f"a{i}" / "manifest.json").read_text())
        assert manifest["quant_accuracy_level"]["level"] == forced
    # a level given to the backend is recorded too (the manifest said nothing of it)
    graphopt.optimize(g, tmp_path / "given", passes="eliminate-dead-code", backend_options={"quant_accuracy_level": "4"})
    given = json.loads((tmp_path / "given" / "manifest.json").read_text())["quant_accuracy_level"]
    assert given["level"] == 4 and given["rule"].startswith("given") and given["layers"] >= 1
    assert accuracy_level.choose_accuracy_level(linear_graph("matmul")[0]) is None  # nothing to time


def test_accuracy_level_of_a_generation_ready_decoder_weighs_its_steps(monkeypatch):
    """With a KV cache the graph runs one prefill and many one-row steps: level 4 when one 64-row
    prefill plus 64 one-row steps take at least 10 % less time, whatever either row count alone
    says. The same timings give a graph without a cache the per-row-count rule."""
    import graphopt.backends.onnxruntime as ort_backend
    from graphopt.backends.onnxruntime import accuracy_level

    plain, _, _ = quant_linear_graph(k=192, n=24)
    cached, _, _ = quant_linear_graph(k=192, n=24)
    cached.add_input("past_key_values.0.key", TensorType(F32, ("batch", 2, "past", 8)))
    assert accuracy_level.generates(cached) and not accuracy_level.generates(plain)

    def level_in(lowered):
        return next(n for n in lowered.nodes if n.op_type == "MatMulNBits").attr("accuracy_level", 0)

    cases = [  # level -> rows -> ms; the level for the cached graph, then for the plain one
        ({0: {1: 1.0, 64: 10.0}, 4: {1: 0.5, 64: 12.0}}, 4, 0),  # step 2x faster, prefill 20 % slower: 44 vs 74
        ({0: {1: 1.0, 64: 10.0}, 4: {1: 1.0, 64: 5.0}}, 0, 4),   # only the prefill faster: 69 vs 74, under 10 %
        ({0: {1: 1.0, 64: 10.0}, 4: {1: 0.95, 64: 9.5}}, 0, 0),  # 5 % faster everywhere: not worth the error
        ({0: {1: 1.0, 64: 10.0}, 4: {1: 0.5, 64: 5.0}}, 4, 4),
    ]
    for ms, for_cached, for_plain in cases:
        monkeypatch.setattr(accuracy_level, "_CACHE", {})
        monkeypatch.setattr(accuracy_level, "_measure", lambda *shape, ms=ms: ms)
        assert level_in(ort_backend.lower(cached, "cpu")) == for_cached, ms
        assert level_in(ort_backend.lower(plain, "cpu")) == for_plain, ms
        assert "decode steps" in accuracy_level.choose_accuracy_level(cached)["rule"]


def test_a_mixture_of_experts_splits_into_the_same_named_linears_every_run():
    """quantize-dynamic splits a MoE into a linear per expert projection; their names come from the
    MoE's, the same on every copy of the graph (the accuracy guard runs the pass again with the
    names it measured as exclude; fresh counters named them anew each run), and each can be kept."""
    from graphopt.testing import one_node_graph

    rng = np.random.default_rng(0)
    experts, hidden, inner = 3, 8, 5
    specs = [("x", rng.standard_normal((4, hidden)).astype(np.float32), ("batch", None), False),
             ("index", np.array([[0, 1], [1, 2], [2, 0], [0, 2]], np.int64), ("batch", None), False),
             ("weights", np.full((4, 2), 0.5, np.float32), ("batch", None), False),
             ("up", rng.standard_normal((experts, 2 * inner, hidden)).astype(np.float32), None, True),
             ("down", rng.standard_normal((experts, hidden, inner)).astype(np.float32), None, True)]
    g = one_node_graph("MoE", specs, {"activation": "silu", "gated": 1}, name="t")

    def quantized(exclude=""):  # the layers the pass quantized, by the names the guard reads
        pm = PassManager(f"quantize-dynamic{{exclude={exclude}}}")
        q = pm.run(g)
        assert sum(n.op.startswith("graphopt.DynamicQuant") for n in q.nodes) == 2 * experts - bool(exclude)
        return sorted(d["node"] for d in pm.records[0].details if "kind" in d)

    first = quantized()
    assert len(first) == 2 * experts and quantized() == first
    assert quantized(first[0]) == first[1:]
