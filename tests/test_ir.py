"""The IR: types, attributes, use lists kept current by the mutation API, and verify()."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.builder import Builder, make_node
from graphopt.dtypes import DType
from graphopt.errors import VerificationError
from graphopt.interpreter import run
from graphopt.ir import Attr, AttrKind, Graph, Node, TensorType, Value, topological_sort
from graphopt.text import print_graph
from graphopt.verify import verify

F32 = DType.FLOAT32


def small_graph() -> Graph:
    g = Graph("g")
    x = g.add_input("x", TensorType(F32, ("batch", 4)))
    w = g.add_initializer("w", np.arange(12, dtype=np.float32).reshape(4, 3))
    b = Builder(g)
    y = b.MatMul(x, w)
    z = b.Relu(y)
    g.outputs = [b.Add(z, y)]
    return g


def test_types_and_symbolic_dims():
    t = TensorType(F32, ("batch", "seq", 256))
    assert t.rank == 3 and not t.is_static and t.numel is None
    assert str(t) == "f32[batch, seq, 256]"
    assert str(TensorType(F32, None)) == "f32[*]"
    assert str(TensorType(DType.INT64, ())) == "i64[]"
    assert TensorType(F32, (2, 3)).numel == 6
    assert str(TensorType(F32, ("2*seq", None))) == 'f32["2*seq", ?]'
    with pytest.raises(TypeError):
        TensorType(F32, (1.5,))


def test_attributes_keep_their_kind():
    assert Attr.infer(3).kind is AttrKind.INT and isinstance(Attr.infer(3).value, int)
    assert Attr.infer(True).value == 1 and Attr.infer(True).kind is AttrKind.INT
    assert Attr.infer(3.0).kind is AttrKind.FLOAT
    assert Attr.infer([1, 2]).kind is AttrKind.INTS
    assert Attr.infer([1, 2.5]).kind is AttrKind.FLOATS
    assert Attr.ints([]).kind is AttrKind.INTS and Attr.floats([]) != Attr.ints([])
    with pytest.raises(TypeError, match="empty list"):
        Attr.infer([])
    assert Attr.tensor(np.array([1, 2])) == Attr.tensor(np.array([1, 2]))
    assert Attr.tensor(np.array([1, 2])) != Attr.tensor(np.array([1, 2], np.int32))
    assert Attr.float(float("nan")) == Attr.float(float("nan"))


def test_builder_infers_types_and_uses():
    g = small_graph()
    verify(g)
    mm, relu, add = g.nodes
    assert mm.outputs[0].type == TensorType(F32, ("batch", 3))
    y = mm.outputs[0]
    assert [(n.op_type, i) for n, i in y.uses()] == [("Relu", 0), ("Add", 1)]
    assert y.producer() is mm and g.initializers["w"].producer() is None


def test_replace_all_uses_with_keeps_use_lists_and_outputs():
    g = small_graph()
    mm, relu, add = g.nodes
    y, z = mm.outputs[0], relu.outputs[0]
    out = add.outputs[0]
    # Add(z, y) -> Add(y, y); relu becomes dead
    z.replace_all_uses_with(y)
    assert z.uses() == [] and [(n.op_type, i) for n, i in y.uses()] == [("Relu", 0), ("Add", 1), ("Add", 0)]
    g.remove_node(relu)
    verify(g)
    # replacing a graph output re-points the graph output
    out.replace_all_uses_with(y)
    assert g.outputs == [y]
    g.remove_node(add)
    verify(g)
    assert [n.op_type for n in g.nodes] == ["MatMul"]


def test_remove_node_refuses_used_outputs():
    g = small_graph()
    with pytest.raises(ValueError, match="still used"):
        g.remove_node(g.nodes[0])


def test_insert_before_and_set_input():
    g = small_graph()
    mm, relu, add = g.nodes
    b = Builder(g, before=relu)
    neg = b.Neg(mm.outputs[0])
    relu.set_input(0, neg)
    verify(g)
    assert [n.op_type for n in g.nodes] == ["MatMul", "Neg", "Relu", "Add"]
    x = np.array([[1, -1, 2, 0.5]], np.float32)
    w = g.initializers["w"].const_value
    y = x @ w
    np.testing.assert_allclose(run(g, {"x": x})[g.outputs[0].name], np.maximum(-y, 0) + y, rtol=1e-6)


@pytest.mark.parametrize("breakage, message", [
    ("stale-use", "use list"),
    ("order", "not defined before"),
    ("unknown-op", "unknown op"),
    ("attr-kind", "attribute 'axis' is float"),
    ("bad-type", "infers"),
    ("arity", "inputs"),
    ("duplicate-name", "named"),
    ("unknown-attr", "unknown attribute"),
])
def test_verify_catches_broken_invariants(breakage, message):
    g = small_graph()
    mm, relu, add = g.nodes
    if breakage == "stale-use":
        relu._inputs[0] = g.inputs[0]  # bypass the API: the use list goes stale
    elif breakage == "order":
        g.nodes = [relu, mm, add]
    elif breakage == "unknown-op":
        relu.op_type = "Frobnicate"
    elif breakage == "attr-kind":
        n = make_node(g, "Softmax", [add.outputs[0]], attrs={"axis": Attr.float(1.0)}, infer=False,
                        output_types=[add.outputs[0].type])
        g.append(n)
    elif breakage == "bad-type":
        relu.outputs[0].type = TensorType(DType.INT64, ("batch", 3))
    elif breakage == "arity":
        relu.append_input(g.inputs[0])
    elif breakage == "duplicate-name":
        relu.outputs[0].name = mm.outputs[0].name
    elif breakage == "unknown-attr":
        relu.attrs["alpha"] = Attr.float(0.1)
    with pytest.raises(VerificationError, match=message):
        verify(g)


def test_topological_sort_restores_order_and_detects_cycles():
    g = small_graph()
    g.nodes.reverse()
    topological_sort(g)
    verify(g)
    mm, relu, add = g.nodes
    mm.set_input(0, add.outputs[0])
    with pytest.raises(ValueError, match="cycle"):
        topological_sort(g)


def test_copy_is_independent():
    g = small_graph()
    c = g.copy()
    verify(c)
    c.nodes[1].op_type = "Sigmoid"
    assert g.nodes[1].op_type == "Relu"
    assert c.initializers["w"].const_value is g.initializers["w"].const_value
    assert print_graph(g) != print_graph(c) and print_graph(g.copy()) == print_graph(g)


def test_fresh_names_never_collide():
    g = Graph()
    names = {g.add_input("v", TensorType(F32, (1,))).name}
    for _ in range(5):
        n = make_node(g, "Relu", [g.inputs[0]])
        g.append(n)
        names.add(n.outputs[0].name)
    assert len(names) == 6


def test_value_without_graph_has_no_uses():
    v = Value("a", TensorType(F32, (1,)))
    n = Node("Relu", [v], [Value("b")])
    assert v.uses() == [(n, 0)]
    assert not v.is_graph_output and not v.is_initializer


def test_a_node_the_builder_cannot_type_is_not_left_behind():
    """Inference failed after graph.make_node had registered the node's uses on its inputs: the
    graph then failed verify with a use by a node it did not hold. And a wrong input count is
    named before inference (it was an unpacking error naming neither op nor node)."""
    import pytest

    from graphopt.builder import Builder
    from graphopt.errors import UserError
    from graphopt.verify import verify

    g = Graph("m")
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 4)))
    b = Builder(g)
    with pytest.raises(UserError, match="'axis' must be in"):
        b.Softmax(x, axis=7)
    with pytest.raises(ValueError, match="graphopt.RMSNorm takes 2 inputs, not 1"):
        b.op("RMSNorm", x, domain="graphopt")
    assert x.uses() == []
    g.outputs = [b.Relu(x)]
    verify(g)


def test_an_initializer_is_a_read_only_view_of_the_callers_array():
    # A pass (a plugin's, say) that changed a constant in place and then failed would change
    # the caller's array and the snapshot the pass manager rolls back to.
    g = Graph("g")
    mine = np.ones(4, np.float32)
    v = g.add_initializer("w", mine)
    with pytest.raises(ValueError, match="read-only"):
        v.const_value[0] = 5.0
    assert mine.flags.writeable and mine[0] == 1.0
    mine[1] = 2.0                        # a view, not a copy: no weight is held twice
    assert v.const_value[1] == 2.0
