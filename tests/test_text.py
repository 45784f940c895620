"""The textual form: printing and parsing round-trip; errors name the line."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.dtypes import DType
from graphopt.errors import ParseError
from graphopt.interpreter import run
from graphopt.ir import Attr, AttrKind, Graph, TensorType
from graphopt.testing import random_graph
from graphopt.text import load_gir, parse_graph, print_graph, same_graph, save_gir
from graphopt.verify import verify
from graphopt.builder import make_node  # noqa: E402

F32 = DType.FLOAT32


def roundtrip(g: Graph) -> Graph:
    external: dict = {}
    text = print_graph(g, external=external)
    weights = dict(g.weights())
    weights.update(external)
    g2 = parse_graph(text, weights=weights)
    assert print_graph(g2) == print_graph(g) and same_graph(g2, g)
    return g2


def test_golden_text():
    g = Graph("block")
    x = g.add_input("x", TensorType(F32, ("batch", "seq", 8)))
    w = g.add_initializer("wq", np.zeros((8, 8), np.float32))
    n = make_node(g, "MatMul", [x, w], output_names=["q"], name="q_proj")
    g.append(n)
    g.outputs = [n.outputs[0]]
    assert print_graph(g) == (
        'opset {"": 20}\n'
        "graph @block(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 8]) {\n"
        "  weights {\n"
        "    @wq: f32[8, 8]\n"
        "  }\n"
        '  %q = MatMul(%x, @wq) : f32[batch, seq, 8] loc("q_proj")\n'
        "  return %q\n"
        "}\n")


def test_every_attribute_kind_and_odd_names_roundtrip():
    g = Graph("odd names")
    x = g.add_input("onnx::input/0", TensorType(F32, ("batch", None, "2*seq")))
    big = np.arange(100, dtype=np.float32).reshape(10, 10)
    consts = []
    for i, arr in enumerate([np.array([1.5, -0.0, np.inf], np.float32), np.array(7, np.int64),
                             np.array([True, False]), np.array([1, 2], np.float16),
                             np.array([0.1, 3.0], dtype=DType.BFLOAT16.np_dtype), big]):
        n = make_node(g, "Constant", [], attrs={"value": Attr.tensor(arr)}, name=f"const {i}")
        g.append(n)
        consts.append(n)
    split = make_node(g, "Split", [x], attrs={"axis": 0, "num_outputs": 2}, name="split")
    g.append(split)
    clip = make_node(g, "Clip", [split.outputs[0], None, consts[0].outputs[0]], infer=False,
                       output_types=[split.outputs[0].type])
    g.append(clip)
    g.outputs = [clip.outputs[0], split.outputs[1]] + [c.outputs[0] for c in consts]
    for k, v in {"i": Attr.int(-3), "f": Attr.float(1e-5), "s": Attr.string('a "q"\n'), "ints": Attr.ints([]),
                 "floats": Attr.floats([]), "strings": Attr.strings(["x", ""]), "fl": Attr.floats([0.5, 2.0])}.items():
        clip.attrs[k] = v  # not valid for Clip, but the text form must carry any attribute
    g2 = roundtrip(g)
    assert g2.nodes[-1].attrs == clip.attrs
    assert g2.nodes[-1].inputs[1] is None
    assert g2.inputs[0].name == "onnx::input/0" and g2.inputs[0].type == x.type
    for a, b in zip(consts, g2.nodes):
        assert a.attrs["value"] == b.attrs["value"]


def test_gir_files_roundtrip(tmp_path):
    g = random_graph(3)
    save_gir(g, tmp_path / "g.gir")
    assert (tmp_path / "g.weights.safetensors").exists()
    g2 = load_gir(tmp_path / "g.gir")
    verify(g2)
    x = np.random.default_rng(0).standard_normal((3, g.inputs[0].type.shape[1])).astype(np.float32)
    for a, b in zip(run(g, {"x": x}).values(), run(g2, {"x": x}).values()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("header, message", [
    ('opset {"": 13}', r"opset ai.onnx 13: graphopt's text IR is at 20"),
    ('opset {"": 99}', r"opset ai.onnx 99"),
    ('metadata {"ir_version": "x"}', r"metadata field 'ir_version' has the wrong type \('x'\)"),
    ('metadata {"metadata_props": {"a": 1}}', r"metadata field 'metadata_props' has the wrong type"),
    ('metadata {"passes": "dce"}', r"metadata field 'passes' has the wrong type"),
])
def test_a_gir_header_of_another_opset_or_mistyped_metadata_is_refused(header, message):
    """Before: an opset-13 .gir was written to ONNX as it stood (onnxruntime then refused the
    artifact), and a mistyped metadata field was an internal error."""
    text = header + "\ngraph @g(%x: f32[2]) -> (f32[2]) {\n  %y = Relu(%x) : f32[2]\n  return %y\n}\n"
    with pytest.raises(ParseError, match=message):
        parse_graph(text)
    parse_graph('opset {"": 20}\nmetadata {"ir_version": 10, "export_seconds": 1}\n' + text.split("\n", 1)[1])


@pytest.mark.parametrize("literal, message", [
    ("dense<i8[2]>[-129, 3]", r"-129 is outside i8's range \[-128, 127\]"),
    ("dense<u64[1]>[-1]", r"-1 is outside u64's range"),
    ("dense<i64[3]>[1.5, 2, 3]", r"a i64\[3\] holds integers"),
    ("dense<bool[2]>[0.0, true]", r"a bool\[2\] holds true, false, 0 or 1"),
    ('dense<f32[100]>@"nope::value"', r"tensor 'nope::value' is not in the weights file"),
    # A finite literal past the range was read as infinity.
    ("dense<f16[2]>[70000.0, 1.0]", r"70000.0 is outside f16's range \(largest 65504; write inf"),
    ("dense<f32[1]>[1e39]", r"1e39 is outside f32's range"),
])
def test_a_dense_literal_the_type_cannot_hold_is_a_parse_error(literal, message):
    """Before: OverflowError, ValueError or KeyError from numpy and the weights file, an internal
    error; and a bool 0.0 was read as true."""
    text = f"graph @g() -> (?) {{\n  %c = Constant() {{value={literal}}} : ?\n  return %c\n}}\n"
    with pytest.raises(ParseError, match=message):
        parse_graph(text, weights={})


def test_gir_weights_file_keys_never_collide(tmp_path):
    """Large tensor attributes go to the weights file under "<node>::<attr>": two Constant nodes
    of one name (ONNX allows it) and an initializer named "k::value" overwrote each other, and
    the round trip silently changed the results."""
    g = Graph("dup")
    x = g.add_input("x", TensorType(DType.FLOAT32, (100,)))
    w = g.add_initializer("k::value", np.full(100, 3.0, np.float32))
    values = [np.arange(100, dtype=np.float32), -np.arange(100, dtype=np.float32)]
    def add(op, inputs, **kw):
        n = make_node(g, op, inputs, **kw)
        g.append(n)
        return n.outputs[0]

    consts = [add("Constant", [], attrs={"value": Attr.tensor(v)}, name="k") for v in values]
    g.outputs = [add("Add", [add("Add", [add("Mul", [x, consts[0]]), consts[1]]), w])]
    save_gir(g, tmp_path / "g.gir")
    x0 = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    want = x0 * values[0] + values[1] + 3.0
    for graph in (g, load_gir(tmp_path / "g.gir")):
        np.testing.assert_array_equal(next(iter(run(graph, {"x": x0}).values())), want)


@given(st.integers(0, 10_000), st.integers(1, 20))
def test_random_graphs_roundtrip_and_keep_results(seed, n):
    g = random_graph(seed, n)
    verify(g)
    g2 = roundtrip(g)
    verify(g2)
    x = np.random.default_rng(seed).standard_normal((2, g.inputs[0].type.shape[1])).astype(np.float32)
    for a, b in zip(run(g, {"x": x}).values(), run(g2, {"x": x}).values()):
        np.testing.assert_array_equal(a, b)


BASE = '''graph @g(%x: f32[2]) -> (f32[2]) {
  %y = Relu(%x) : f32[2]
  return %y
}
'''


@pytest.mark.parametrize("bad, line, message", [
    (BASE.replace("Relu(%x)", "Relu(%x"), 2, "expected"),
    (BASE.replace("%y = Relu(%x)", "%y = Relu(%z)"), 2, "used before it is defined"),
    (BASE.replace("f32[2]) {", "f33[2]) {"), 1, "unknown element type"),
    (BASE.replace("return %y", "return %q"), 3, "not defined"),
    (BASE.replace(": f32[2]\n", ": f32[2] {axis=}\n"), 2, "expected"),
    (BASE.replace("return %y", "%y = Neg(%x) : f32[2]\n  return %y"), 3, "defined twice"),
    ("opset {bad\n" + BASE, 1, "bad opset line"),
    (BASE.replace("%y = Relu(%x) : f32[2]", "%y = Relu(@w) : f32[2]"), 2, "used before"),
    # Python's own OverflowError from onnx, without the node, before.
    (BASE.replace("Relu(%x) : f32[2]", "Softmax(%x) {axis=99999999999999999999} : f32[2]"), 2,
     "99999999999999999999 is outside the int64 range"),
    (BASE.replace("Relu(%x) : f32[2]", "Relu(%x) {alpha=[1.0, 1e40]} : f32[2]"), 2, "1e40 is outside f32's range"),
    # Two results of one name (the ONNX model then had two outputs called "y"); no result at all.
    (BASE.replace("-> (f32[2])", "-> (f32[2], f32[2])").replace("return %y", "return %y, %y"), 3,
     "'y' is returned twice"),
    (BASE.replace("-> (f32[2])", "-> ()").replace("return %y", "return"), 3, "the graph returns nothing"),
])
def test_parse_errors_name_the_line(bad, line, message):
    with pytest.raises(ParseError, match=message) as e:
        parse_graph(bad, filename="bad.gir")
    assert f"bad.gir:{line}:" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_header_result_type_that_disagrees_with_the_returned_value_is_a_parse_error():
    """The header's type silently replaced the node's annotation (verify then blamed the node
    for a type the user never wrote on it)."""
    import pytest

    from graphopt.errors import ParseError
    from graphopt.text import parse_graph

    text = ('graph @m(%x: f32[batch, 4]) -> (f32[batch, 4]) {\n'
            '  %y = Relu(%x) : f32[batch, 5]\n'
            '  return %y\n}\n')
    with pytest.raises(ParseError, match="<string>:3:10: returned value 'y' is f32\\[batch, 5\\] where it is "
                                         "defined, but the graph's header declares f32\\[batch, 4\\]"):
        parse_graph(text)
    assert parse_graph(text.replace("f32[batch, 5]", "f32[batch, 4]")).outputs[0].type.shape == ("batch", 4)
    # a header more precise than the annotation (or the other way) is compatible: the header's is kept
    assert parse_graph(text.replace("f32[batch, 5]", "f32[?, 4]")).outputs[0].type.shape == ("batch", 4)
    with pytest.raises(ParseError, match="is f16\\[batch, 4\\] where it is defined"):
        parse_graph(text.replace("f32[batch, 5]", "f16[batch, 4]"))


def test_same_graph_sees_a_changed_weight_or_attribute():
    g = random_graph(5)
    assert same_graph(g, roundtrip(g))
    w = g.copy()
    name, v = next(iter(w.initializers.items()))
    v.const_value = v.const_value.copy()
    v.const_value.flat[0] += 1.0
    assert not same_graph(g, w)
    a = g.copy()
    node = next(n for n in a.nodes if n.attrs)
    key = next(iter(node.attrs))
    node.attrs[key] = Attr.string("changed") if node.attrs[key].kind is not AttrKind.STRING else Attr.int(7)
    assert not same_graph(g, a)
