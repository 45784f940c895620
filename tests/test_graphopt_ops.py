"""graphopt.Attention, graphopt.RMSNorm and graphopt.RotaryEmbedding, checked three ways.

For every configuration in the grids below, a one-node graph runs in the reference
interpreter (ONNX's reference kernels); then the node is decomposed into opset-20 core ops,
the graph verifies, and the decomposition runs in the interpreter and in ONNX Runtime
(graph optimizations off) and must give the reference outputs. As an independent oracle,
ONNX Runtime's own opset-23 `Attention` / `RMSNormalization` / `RotaryEmbedding` kernels
must agree with the reference, and importing such an opset-23 model must map the node onto
the graphopt op. Each configuration also runs with symbolic batch and sequence dimensions.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.interpreter import run
from graphopt.ir import GRAPHOPT_DOMAIN, Attr, Graph, TensorType
from graphopt.onnx_io import from_onnx_model, save_onnx
from graphopt.lowering import decompose_node
from graphopt.registry import infer_types
from graphopt.testing import one_node_graph as shared_one_node_graph
from graphopt.verify import verify
from graphopt.builder import make_node  # noqa: E402

# (rtol, atol) for the same computation done two ways, per element type. Measured here:
# float32 differs by at most 5e-7, float16 by one unit in the last place (which rtol 1e-3 admits).
TOLERANCE = {np.dtype(np.float64): (1e-12, 1e-12), np.dtype(np.float32): (1e-5, 1e-6),
             np.dtype(np.float16): (1e-3, 1e-3)}

# graphopt op -> (ONNX opset-23 op, {graphopt attribute: ONNX attribute} where they differ)
ONNX_OPS = {
    "Attention": ("Attention", {"num_heads": "q_num_heads", "causal": "is_causal"}),
    "RMSNorm": ("RMSNormalization", {}),
    "RotaryEmbedding": ("RotaryEmbedding", {}),
}


@dataclasses.dataclass
class Case:
    """One configuration of one op. `inputs` follow the op's input order (None: an omitted
    optional input); each is (name, array, dims), where `dims` names the dimensions that
    become symbols in the dynamic variant (None: the dimension stays static)."""

    id: str
    op: str
    inputs: list
    attrs: dict
    outputs: list[str]

    def feeds(self) -> dict[str, np.ndarray]:
        return {name: a for name, a, _ in filter(None, self.inputs)}


def _rng(seed: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, seed)))


# --------------------------------------------------------------------------------------
# Configurations


def attention_case(id, *, b=2, nq=4, nkv=None, sq=3, skv=None, past=0, h=8, hv=None, rank=4, mask=None,
                   mask_shape=None, present=False, dtype=np.float32, sinks=False, **attrs) -> Case:
    """mask: None, "bool", "bool_row_masked" (one query row fully masked), "int64", "float"
    (the query's type; some entries -inf) or another float type's name; mask_shape defaults
    to (sq, past + skv); sinks: an 8th input of per-head sink logits."""
    nkv = nkv or nq
    skv = skv or sq
    hv = hv or h
    rng = _rng(id)
    total = past + skv

    def rand(*shape):
        return rng.standard_normal(shape).astype(dtype)

    if rank == 4:
        inputs = [("Q", rand(b, nq, sq, h), ("batch", None, "seq", None)),
                  ("K", rand(b, nkv, skv, h), ("batch", None, "kv_seq", None)),
                  ("V", rand(b, nkv, skv, hv), ("batch", None, "kv_seq", None))]
    else:
        attrs.setdefault("num_heads", nq)
        if nkv != nq:
            attrs.setdefault("kv_num_heads", nkv)
        inputs = [("Q", rand(b, sq, nq * h), ("batch", "seq", None)),
                  ("K", rand(b, skv, nkv * h), ("batch", "kv_seq", None)),
                  ("V", rand(b, skv, nkv * hv), ("batch", "kv_seq", None))]
    mshape = mask_shape or (sq, total)
    mdims = tuple({sq: "seq", total: "total_seq"}.get(d) if d > 1 and len(mshape) - i <= 2 else None
                  for i, d in enumerate(mshape))
    if mask is None:
        inputs.append(None)
    elif mask.startswith("bool"):
        m = rng.random(mshape) < 0.7
        m[..., 0] = True  # no fully-masked rows, except where asked for
        if mask == "bool_row_masked":
            m[..., 1, :] = False
        inputs.append(("attn_mask", m, mdims))
    elif mask == "int64":  # additive, as ONNX allows
        inputs.append(("attn_mask", rng.integers(-2, 3, mshape), mdims))
    else:  # "float" (the query's type) or a float type name
        m = rand(*mshape).astype(dtype if mask == "float" else mask)
        m[rng.random(mshape) < 0.2] = -np.inf
        m[..., 0] = 0.0
        inputs.append(("attn_mask", m, mdims))
    if past:
        inputs += [("past_key", rand(b, nkv, past, h), ("batch", None, "past_seq", None)),
                   ("past_value", rand(b, nkv, past, hv), ("batch", None, "past_seq", None))]
    if sinks:  # around the scores' own size, one large enough to take most of its row
        logits = rand(nq) * 2
        logits[0] = 6.0
        inputs += [None] * (7 - len(inputs)) + [("sinks", logits, (None,))]
    while inputs[-1] is None:
        inputs.pop()
    outputs = ["Y", "present_key", "present_value"] if present else ["Y"]
    return Case(id, "Attention", inputs, attrs, outputs)


ATTENTION_CASES = [
    attention_case("bnsh_mha"),
    attention_case("bnsh_gqa_cross", nq=4, nkv=2, sq=3, skv=5),
    attention_case("bnsh_mqa", nq=4, nkv=1, sq=2, skv=6),
    attention_case("bnsh_causal", sq=4, causal=1),
    attention_case("bnsh_causal_q_shorter", sq=3, skv=5, causal=1),
    attention_case("bnsh_causal_q_longer", sq=5, skv=3, causal=1),
    attention_case("bnsh_causal_past_gqa", nq=4, nkv=2, sq=3, past=4, present=True, causal=1),
    attention_case("bnsh_decode_step", nq=4, nkv=2, sq=1, past=6, present=True, causal=1),
    attention_case("bnsh_past_not_causal", sq=2, skv=3, past=2, present=True),
    attention_case("bnsh_bool_mask", sq=3, skv=5, mask="bool"),
    attention_case("bnsh_float_mask_4d", sq=3, skv=4, mask="float", mask_shape=(2, 1, 3, 4)),
    attention_case("bnsh_causal_bool_mask", nq=4, nkv=2, sq=4, mask="bool", mask_shape=(1, 4, 4), causal=1),
    attention_case("bnsh_causal_float_mask_past", sq=2, past=3, mask="float", present=True, causal=1),
    attention_case("bnsh_fully_masked_row", sq=3, skv=4, mask="bool_row_masked"),
    attention_case("bnsh_scale", scale=0.3),
    attention_case("bnsh_softcap_causal_mask", sq=4, mask="float", causal=1, softcap=1.5),
    attention_case("bnsh_v_head_differs", nq=4, nkv=2, skv=5, hv=6),
    attention_case("bsd_mha", rank=3),
    attention_case("bsd_default_kv_heads", rank=3, sq=2, skv=3, kv_num_heads=0),
    attention_case("bsd_gqa_causal_past", rank=3, nq=4, nkv=2, sq=3, past=2, present=True, causal=1),
    attention_case("bsd_cross_bool_mask_scale", rank=3, nq=2, sq=2, skv=5, mask="bool", scale=0.5),
    attention_case("bsd_v_head_differs_softcap", rank=3, nq=4, nkv=2, skv=4, hv=4, softcap=2.0),
    attention_case("bnsh_present_without_past", nq=4, nkv=2, present=True, causal=1),
    attention_case("bsd_present_without_past", rank=3, nq=4, nkv=2, present=True),
    attention_case("bnsh_float_mask_full_4d", nq=4, nkv=2, sq=3, skv=4, mask="float", mask_shape=(2, 4, 3, 4)),
    attention_case("bnsh_f16_mask_for_f32_query", sq=3, skv=4, mask="float16", causal=1),
    attention_case("bnsh_int_mask", sq=3, skv=4, mask="int64"),
    attention_case("bnsh_fp16_gqa_causal_past", nq=4, nkv=2, sq=3, past=2, mask="float", present=True,
                   causal=1, dtype=np.float16),
]


def rope_case(id, *, rank, positions, interleaved, rot=0, b=2, n=2, s=5, h=8, max_pos=12,
              dtype=np.float32) -> Case:
    rng = _rng(id)
    half = (rot or h) // 2
    attrs = {"interleaved": interleaved}
    if rot:
        attrs["rotary_embedding_dim"] = rot
    if rank == 4:
        x = ("input", rng.standard_normal((b, n, s, h)).astype(dtype), ("batch", None, "seq", None))
    else:
        attrs["num_heads"] = n
        x = ("input", rng.standard_normal((b, s, n * h)).astype(dtype), ("batch", "seq", None))
    if positions:
        angles = np.arange(max_pos)[:, None] * (0.9 ** np.arange(half))[None, :]
        pos = ("position_ids", rng.integers(0, max_pos, (b, s)).astype(np.int64), ("batch", "seq"))
        cache_dims = (None, None)
    else:
        angles = rng.uniform(0, 6.3, (b, s, half))
        pos = None
        cache_dims = ("batch", "seq", None)
    inputs = [x, ("cos_cache", np.cos(angles).astype(dtype), cache_dims),
              ("sin_cache", np.sin(angles).astype(dtype), cache_dims)] + ([pos] if pos else [])
    return Case(id, "RotaryEmbedding", inputs, attrs, ["output"])


ROPE_CASES = [
    rope_case(f"rank{rank}_{'pos' if positions else 'nopos'}_il{interleaved}_{'partial' if rot else 'full'}",
              rank=rank, positions=positions, interleaved=interleaved, rot=rot)
    for rank in (4, 3) for positions in (False, True) for interleaved in (0, 1) for rot in (0, 4)
] + [rope_case("rank3_pos_il1_fp16", rank=3, positions=True, interleaved=1, dtype=np.float16)]
_symbolic_hidden = rope_case("rank3_symbolic_hidden_rot_is_head", rank=3, positions=True, interleaved=0, rot=8)
_symbolic_hidden.inputs[0] = _symbolic_hidden.inputs[0][:2] + (("batch", "seq", "hidden"),)
ROPE_CASES.append(_symbolic_hidden)


def rms_case(id, *, axis=-1, dtype=np.float32, scale_shape=None, shape=(2, 5, 16), x_scale=3.0, **attrs) -> Case:
    rng = _rng(id)
    scale_shape = scale_shape or shape[axis % len(shape):]
    x = (rng.standard_normal(shape) * x_scale).astype(dtype)
    scale = rng.uniform(0.5, 1.5, scale_shape).astype(dtype)
    sdims = tuple("seq" if len(scale_shape) - i == 2 and len(scale_shape) == 2 else None
                  for i in range(len(scale_shape)))
    xdims = ("batch", "seq") + (None,) * (len(shape) - 2)
    return Case(id, "RMSNorm", [("X", x, xdims), ("scale", scale, sdims)],
                dict(axis=axis, **attrs), ["Y"])


RMS_CASES = [
    rms_case("f32_last"),
    rms_case("f32_last_eps", epsilon=0.5),
    rms_case("f32_axis_minus2", axis=-2),
    rms_case("f32_axis_1_positive", axis=1),
    rms_case("f32_axis_minus2_vector_scale", axis=-2, scale_shape=(16,)),
    rms_case("f16_last", dtype=np.float16),
    rms_case("f16_axis_minus2_eps", axis=-2, dtype=np.float16, epsilon=1e-2),
    rms_case("f16_squares_overflow_f16", dtype=np.float16, x_scale=1000.0),  # needs the float32 stash
    rms_case("f64_rank4_axis_minus3", axis=-3, dtype=np.float64, shape=(2, 5, 3, 4)),
]

# attention sinks (GPT-OSS): no ONNX op has them, so their oracle is `sink_attention` below
SINK_CASES = [
    attention_case("sinks_bnsh_gqa_causal_past", nq=4, nkv=2, sq=3, past=4, present=True, causal=1, sinks=True),
    attention_case("sinks_bsd_mask_present", rank=3, nq=4, nkv=2, sq=3, mask="float", present=True, sinks=True),
    attention_case("sinks_bnsh_fully_masked_row", sq=3, skv=4, mask="bool_row_masked", sinks=True),
    attention_case("sinks_bsd_softcap_scale", rank=3, nq=2, sq=2, skv=5, softcap=2.0, scale=0.5, sinks=True),
]
ALL_CASES = ATTENTION_CASES + ROPE_CASES + RMS_CASES


# --------------------------------------------------------------------------------------
# Helpers


def one_node_graph(case: Case, *, dynamic: bool = False) -> Graph:
    inputs = [None if spec is None else (*spec, False) for spec in case.inputs]
    return shared_one_node_graph(case.op, inputs, case.attrs, n_out=len(case.outputs), name=case.id,
                                 node_name=f"{case.op.lower()}_node", output_names=case.outputs, dynamic=dynamic)


def assert_close(actual: dict, expected: dict, what: str, tolerance=None) -> None:
    assert actual.keys() == expected.keys(), what
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, \
            f"{what} {name}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
        rtol, atol = tolerance or TOLERANCE[want.dtype]
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol,
                                   err_msg=f"{what}: {name}")


def run_ort(model: onnx.ModelProto | str, feeds: dict, outputs: list[str]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return dict(zip(outputs, sess.run(outputs, feeds)))


def onnx_attrs(case: Case) -> dict:
    renames = ONNX_OPS[case.op][1]
    attrs = {renames.get(k, k): v for k, v in case.attrs.items()}
    if "q_num_heads" in attrs and not attrs.get("kv_num_heads"):
        attrs["kv_num_heads"] = attrs["q_num_heads"]  # ONNX requires it; graphopt defaults it
    return attrs


def opset23_model(case: Case, *, dynamic: bool = False) -> onnx.ModelProto:
    """The case as a model with the real ONNX opset-23 op."""
    onnx_op, renames = ONNX_OPS[case.op]
    names, infos = [], []
    for spec in case.inputs:
        if spec is None:
            names.append("")
            continue
        name, a, dims = spec
        shape = [s if dynamic and s else d for d, s in zip(a.shape, dims)]
        names.append(name)
        infos.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), shape))
    attrs = onnx_attrs(case)
    node = helper.make_node(onnx_op, names, case.outputs, name=f"{onnx_op}_23", **attrs)
    out_dtype = helper.np_dtype_to_tensor_dtype(case.inputs[0][1].dtype)
    outs = [helper.make_tensor_value_info(n, out_dtype, None) for n in case.outputs]
    graph = helper.make_graph([node], case.id, infos, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def dims_match(inferred, actual: tuple, bound: dict) -> bool:
    """True when an inferred shape fits the runtime shape: ints equal, symbols bound to the
    runtime size."""
    return inferred is not None and len(inferred) == len(actual) and all(
        d == n if isinstance(d, int) else (isinstance(d, str) and bound.get(d) == n)
        for d, n in zip(inferred, actual))


def symbol_bindings(case: Case) -> dict[str, int]:
    bound = {}
    for name, a, dims in filter(None, case.inputs):
        for d, s in zip(a.shape, dims):
            if s:
                assert bound.setdefault(s, d) == d, f"{case.id}: symbol {s} is {d} and {bound[s]}"
    return bound


# --------------------------------------------------------------------------------------
# The decomposition agrees with the reference, in the interpreter and in ONNX Runtime


# A fully masked row is NaN out of Softmax until the decomposition's guard zeroes it.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", ALL_CASES + SINK_CASES, ids=lambda c: f"{c.op}-{c.id}")
def test_decomposition_matches_reference(case, dynamic, tmp_path):
    g = one_node_graph(case, dynamic=dynamic)
    verify(g)
    feeds = case.feeds()
    want = run(g, feeds)

    # the inference rule gives the shapes the reference produces (symbols passing through)
    node = g.nodes[0]
    bound = symbol_bindings(case) if dynamic else {}
    for v, t in zip(node.outputs, infer_types(node)):
        assert t.dtype.np_dtype == want[v.name].dtype, f"{v.name}: inferred {t}"
        if dynamic and v.name.startswith("present") and "past_key" in feeds:
            # past_seq + kv_seq has no name: the sequence dimension may be unknown
            assert dims_match(t.shape[:2] + t.shape[3:], want[v.name].shape[:2] + want[v.name].shape[3:], bound)
        else:
            assert dims_match(t.shape, want[v.name].shape, bound), \
                f"{v.name}: inferred {t}, reference gives {list(want[v.name].shape)}"

    decompose_node(node)
    verify(g)
    assert not [n for n in g.nodes if n.domain == GRAPHOPT_DOMAIN]
    assert [v.name for v in g.outputs] == case.outputs
    assert_close(run(g, feeds), want, "decomposition in the interpreter")

    path = tmp_path / "decomposed.onnx"
    save_onnx(g, path)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain == ""] == [20]
    onnx.checker.check_model(model, full_check=True)
    assert_close(run_ort(str(path), feeds, case.outputs), want, "decomposition in ONNX Runtime")


# --------------------------------------------------------------------------------------
# ONNX Runtime's opset-23 kernels as an independent oracle; import maps onto graphopt ops


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: f"{c.op}-{c.id}")
def test_reference_matches_onnxruntime_opset23_kernel(case):
    feeds = case.feeds()
    model = opset23_model(case, dynamic=True)
    from_ort = run_ort(model, feeds, case.outputs)
    assert_close(run(one_node_graph(case), feeds), from_ort, "reference vs ORT's opset-23 kernel")

    imported = from_onnx_model(model)
    verify(imported)
    assert [n.op for n in imported.nodes] == [f"graphopt.{case.op}"]
    graphopt_names = {onnx_name: name for name, onnx_name in ONNX_OPS[case.op][1].items()}
    assert imported.nodes[0].attrs == {graphopt_names.get(k, k): Attr.infer(v) for k, v in onnx_attrs(case).items()}
    assert_close(run(imported, feeds), from_ort, "imported opset-23 model vs ORT")


def sink_attention(case: Case) -> np.ndarray:
    """Y of an attention-sinks case, written out per head and query row in float64: each row's
    softmax over its visible scores and the head's sink logit, the sink weighing no value."""
    feeds = {name: a.astype(np.float64) if a.dtype.kind == "f" else a for name, a, _ in filter(None, case.inputs)}
    q, k, v, sinks = feeds["Q"], feeds["K"], feeds["V"], feeds["sinks"]
    nq = case.attrs.get("num_heads") or q.shape[1]
    nkv = case.attrs.get("kv_num_heads") or (nq if q.ndim == 3 else k.shape[1])
    if q.ndim == 3:  # BSD -> BNSH
        q, k, v = (t.reshape(t.shape[0], t.shape[1], n, -1).transpose(0, 2, 1, 3) for t, n in ((q, nq), (k, nkv), (v, nkv)))
    if "past_key" in feeds:
        k = np.concatenate([feeds["past_key"], k], axis=2)
        v = np.concatenate([feeds["past_value"], v], axis=2)
    batch, _, sq, head = q.shape
    total = k.shape[2]
    mask = feeds.get("attn_mask")
    bias = np.zeros((sq, total)) if mask is None else (np.where(mask, 0.0, -np.inf) if mask.dtype == np.bool_ else mask)
    bias = np.broadcast_to(bias, (batch, nq, sq, total))
    scale = case.attrs.get("scale") or 1 / np.sqrt(head)
    cap = case.attrs.get("softcap")
    y = np.zeros((batch, nq, sq, v.shape[3]))
    for b_, h, i in np.ndindex(batch, nq, sq):
        kv = h // (nq // nkv)
        s = k[b_, kv] @ q[b_, h, i] * scale
        if cap:
            s = cap * np.tanh(s / cap)
        s = s + bias[b_, h, i]
        if case.attrs.get("causal"):
            s[np.arange(total) > i + total - sq] = -np.inf
        top = max(s.max(), sinks[h])
        e = np.exp(s - top)
        y[b_, h, i] = e @ v[b_, kv] / (e.sum() + np.exp(sinks[h] - top))
    return y if case.inputs[0][1].ndim == 4 else y.transpose(0, 2, 1, 3).reshape(batch, sq, -1)


@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: c.id)
def test_attention_sinks_reference_is_the_softmax_with_each_heads_sink(case):
    got = run(one_node_graph(case), case.feeds())
    np.testing.assert_allclose(got["Y"], sink_attention(case), rtol=1e-5, atol=1e-6)
    if "past_key" in case.feeds():  # the presents hold the past and the new keys, no sink's
        np.testing.assert_array_equal(got["present_key"][:, :, :4], case.feeds()["past_key"])
    if case.id == "sinks_bnsh_fully_masked_row":  # a row that sees no key attends the sink alone
        assert np.all(got["Y"][:, :, 1] == 0)


# --------------------------------------------------------------------------------------
# Inference with symbolic dimensions, several nodes, and the cases that must be refused


def _f32(*shape) -> TensorType:
    return TensorType(DType.FLOAT32, shape)


def _node(g: Graph, op: str, inputs: list, *, infer: bool = True, num_outputs: int = 1, **attrs):
    """A graphopt node appended to `g`; with infer=False its outputs are typed unknown, so
    that the decomposition (not the inference rule) meets whatever is wrong with it."""
    types = None if infer else [TensorType(DType.FLOAT32, None)] * num_outputs
    node = make_node(g, op, inputs, domain=GRAPHOPT_DOMAIN, attrs=attrs, num_outputs=num_outputs,
                       output_types=types, name=f"my_{op.lower()}")
    g.append(node)
    g.outputs = list(node.outputs)
    return node


def test_inference_passes_symbolic_dims_through():
    g = Graph()
    x = g.add_input("x", _f32("batch", "seq", 32))
    attn = _node(g, "Attention", [x, g.add_input("k", _f32("batch", "kv_seq", 16)),
                                  g.add_input("v", _f32("batch", "kv_seq", 8)), None,
                                  g.add_input("past_k", _f32("batch", 2, 5, 8)),
                                  g.add_input("past_v", _f32("batch", 2, 5, 4))],
                 num_outputs=3, num_heads=4, kv_num_heads=2)
    assert [t.shape for t in infer_types(attn)] == [("batch", "seq", 16), ("batch", 2, None, 8),
                                                    ("batch", 2, None, 4)]
    q = g.add_input("q", _f32("batch", 4, "seq", 8))
    attn4 = _node(g, "Attention", [q, g.add_input("k4", _f32("batch", 2, "seq", 8)),
                                   g.add_input("v4", _f32("batch", 2, "seq", 6))], num_outputs=3)
    assert [t.shape for t in infer_types(attn4)] == [("batch", 4, "seq", 6), ("batch", 2, "seq", 8),
                                                     ("batch", 2, "seq", 6)]
    cache = g.add_input("cos", _f32(64, 4))
    ids = g.add_input("ids", TensorType(DType.INT64, ("batch", "seq")))
    rope = _node(g, "RotaryEmbedding", [x, cache, cache, ids], num_heads=4)
    assert infer_types(rope)[0].shape == ("batch", "seq", 32)
    norm = _node(g, "RMSNorm", [x, g.add_input("w", _f32(32))])
    assert infer_types(norm)[0].shape == ("batch", "seq", 32)


def test_two_nodes_decompose_in_one_graph(tmp_path):
    """Decompositions of several nodes share a graph without name clashes."""
    case = ATTENTION_CASES[6]  # causal, past, GQA, present outputs
    g = one_node_graph(case)
    first = g.nodes[0]
    second = make_node(g, "Attention", [first.outputs[0], *first.inputs[1:]], domain=GRAPHOPT_DOMAIN,
                         attrs=case.attrs, num_outputs=3)
    g.append(second)
    g.outputs = list(second.outputs)
    feeds = case.feeds()
    want = run(g, feeds)
    decompose_node(first)
    decompose_node(second)
    verify(g)
    assert_close(run(g, feeds), want, "two decomposed nodes")
    save_onnx(g, tmp_path / "two.onnx")
    assert_close(run_ort(str(tmp_path / "two.onnx"), feeds, list(want)), want, "two decomposed nodes in ORT")


def test_attention_3d_without_num_heads_is_refused():
    g = Graph()
    q, k, v = (g.add_input(n, _f32(2, 3, 32)) for n in "qkv")
    with pytest.raises(UserError, match="'my_attention'.*num_heads is required"):
        _node(g, "Attention", [q, k, v])
    node = _node(g, "Attention", [q, k, v], infer=False)
    with pytest.raises(UserError, match="'my_attention'.*num_heads is required"):
        decompose_node(node)


def test_attention_decomposition_refuses_symbolic_head_counts_and_size():
    g = Graph()
    k, v = g.add_input("k", _f32(2, 2, 5, 8)), g.add_input("v", _f32(2, 2, 5, 8))
    gqa = _node(g, "Attention", [g.add_input("q", _f32(2, "heads", 5, 8)), k, v])
    with pytest.raises(UserError, match="'my_attention'.*static head counts"):
        decompose_node(gqa)
    g = Graph()
    q, k, v = (g.add_input(n, _f32(2, 3, "hidden")) for n in "qkv")
    unscaled = _node(g, "Attention", [q, k, v], num_heads=4)
    with pytest.raises(UserError, match="'my_attention'.*head size must be static"):
        decompose_node(unscaled)


def test_attention_mask_shorter_than_the_keys_is_refused():
    # ONNX's reference pads such a mask, ONNX Runtime refuses it, and so do we.
    g = Graph()
    q, k, v = (g.add_input(n, _f32(1, 2, 3, 8)) for n in "qkv")
    with pytest.raises(UserError, match="'my_attention'.*mask's last dimension is 2.*is 3"):
        _node(g, "Attention", [q, k, v, g.add_input("mask", _f32(3, 2))])
    g = Graph()
    q, k, v = (g.add_input(n, _f32(1, 2, "seq", 8)) for n in "qkv")
    _node(g, "Attention", [q, k, v, g.add_input("mask", _f32("seq", "total"))])
    feeds = {n: np.zeros((1, 2, 3, 8), np.float32) for n in "qkv"} | {"mask": np.zeros((3, 2), np.float32)}
    with pytest.raises(UserError, match="'my_attention'.*mask's last dimension is 2.*is 3"):
        run(g, feeds)


def test_rope_decomposition_refuses_unknown_head_size():
    g = Graph()
    x = g.add_input("x", _f32("batch", "seq", "hidden"))
    cache = g.add_input("cos", _f32("batch", "seq", 4))
    node = _node(g, "RotaryEmbedding", [x, cache, cache], num_heads=2)
    with pytest.raises(UserError, match="'my_rotaryembedding'.*head size must be static"):
        decompose_node(node)


def test_rope_refuses_3d_without_num_heads_and_odd_rotary_dim():
    g = Graph()
    x = g.add_input("x", _f32(2, 5, 16))
    cache = g.add_input("cos", _f32(2, 5, 4))
    with pytest.raises(UserError, match="'my_rotaryembedding'.*num_heads is required"):
        _node(g, "RotaryEmbedding", [x, cache, cache])
    odd = _node(g, "RotaryEmbedding", [x, cache, cache], num_heads=2, rotary_embedding_dim=5)
    with pytest.raises(UserError, match="'my_rotaryembedding'.*must be even"):
        decompose_node(odd)


def test_rmsnorm_refuses_mixed_types_and_positive_axis_of_unknown_rank():
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT16, (2, 8)))
    with pytest.raises(UserError, match="'my_rmsnorm'.*same element type"):
        _node(g, "RMSNorm", [x, g.add_input("w", _f32(8))])
    g = Graph()
    unranked = _node(g, "RMSNorm", [g.add_input("x", TensorType(DType.FLOAT32, None)),
                                    g.add_input("w", _f32(8))], axis=1)
    with pytest.raises(UserError, match="'my_rmsnorm'.*known rank"):
        decompose_node(unranked)


def test_causal_attention_with_a_key_padding_mask_broadcast_over_queries():
    """A (B, 1, 1, T) mask with causal=1: the reference must broadcast the mask's query axis
    before building the causal mask (ONNX's own reference builds it from the mask's shape)."""
    from graphopt.interpreter import run
    from graphopt.ir import Graph, TensorType
    from graphopt.lowering import decompose_graphopt_ops

    rng = np.random.default_rng(3)
    b, n, s, h = 2, 2, 5, 8
    q, k, v = (rng.standard_normal((b, n, s, h)).astype(np.float32) for _ in range(3))
    mask = np.zeros((b, 1, 1, s), np.float32)
    mask[0, ..., :2] = -np.inf
    g = Graph()
    ins = [g.add_input(name, TensorType.of(a)) for name, a in (("q", q), ("k", k), ("v", v), ("mask", mask))]
    node = make_node(g, "Attention", ins, domain="graphopt", attrs={"causal": 1})
    g.append(node)
    g.outputs = [node.outputs[0]]
    feeds = {"q": q, "k": k, "v": v, "mask": mask}
    got = run(g, feeds)[g.outputs[0].name]
    # numpy: causal + key padding, fully masked rows give zeros
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(h) + mask + np.triu(np.full((s, s), -np.inf, np.float32), 1)
    with np.errstate(all="ignore"):
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    want = np.nan_to_num(p) @ v
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    d = g.copy()
    decompose_graphopt_ops(d)
    np.testing.assert_allclose(run(d, feeds)[d.outputs[0].name], want, rtol=1e-5, atol=1e-6)


def test_a_bias_or_scale_of_the_wrong_width_and_a_wrong_arity_are_named_by_verify():
    """A hand-edited .gir: graphopt.Linear with another layer's bias, RMSNorm with a scale of the
    wrong width (verified and written; onnxruntime failed at run time), and RMSNorm with one input
    (verify said "not enough values to unpack", naming no node)."""
    from graphopt.errors import VerificationError
    from graphopt.text import parse_graph

    head = "graph @g(%x: f32[2, 32]) -> (f32[2, 32]) {\n  weights {\n    @w: f32[32, 32]\n    @b8: f32[8]\n  }\n"
    weights = {"w": np.zeros((32, 32), np.float32), "b8": np.zeros(8, np.float32)}
    for body, message in (
            ("%y = graphopt.Linear(%x, @w, @b8) : f32[2, 32]", "the bias has 8 values but the output has 32 features"),
            ("%y = graphopt.RMSNorm(%x, @b8) : f32[2, 32]", "the scale has 8 values but X has 32 features"),
            ("%y = graphopt.RMSNorm(%x) : f32[2, 32]", r"\(graphopt.RMSNorm\) has 1 inputs; graphopt.RMSNorm takes 2$")):
        g = parse_graph(head + f"  {body}\n  return %y\n}}\n", weights=weights)
        with pytest.raises(VerificationError, match=message):
            verify(g)
