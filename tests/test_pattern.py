"""The pattern API: captures, constraints, commuted operands, single use, the reason a match
failed, and the bounded fixed-point driver."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import GraphoptError
from graphopt.pattern import RewriteRule, apply_patterns, const, match, op, var
from graphopt.text import parse_graph, print_graph
from graphopt.verify import verify

SRC = '''graph @g(%x: f32[batch, 4]) -> (f32[batch, 4]) {
  weights {
    @w: f32[4, 4]
    @b: f32[4]
  }
  %m = MatMul(%x, @w) : f32[batch, 4] loc("m")
  %y = Add(@b, %m) : f32[batch, 4] loc("y")
  return %y
}
'''
W = {"w": np.eye(4, dtype=np.float32), "b": np.arange(4, dtype=np.float32)}

LINEAR = op("Add", op("MatMul", var("x"), const("w"), capture="mm", single_use=True), const("b", rank=1),
            commute=True, capture="add")


def test_match_captures_with_commuted_operands():
    g = parse_graph(SRC, weights=W)
    m = match(LINEAR, g.outputs[0])
    assert m.ok and m["x"] is g.inputs[0] and m["w"].name == "w" and m["b"].name == "b"
    assert m["mm"].name == "m" and m["add"].name == "y"
    assert [n.name for n in m.nodes] == ["y", "m"]


def test_match_is_pure_and_explains_failure():
    g = parse_graph(SRC.replace("%m = MatMul", "%m = Mul"), weights=W)
    before = print_graph(g)
    m = match(LINEAR, g.outputs[0])
    assert not m.ok and m.reason == "expected MatMul, found Mul" and m.at.name == "m"
    assert print_graph(g) == before
    no_commute = op("Add", op("MatMul", var("x"), const("w")), const("b"))
    m = match(no_commute, parse_graph(SRC, weights=W).outputs[0])
    assert not m.ok and "found a weight 'b'" in m.reason


def test_single_use_and_same_variable_constraints():
    two_uses = SRC.replace("-> (f32[batch, 4])", "-> (f32[batch, 4], f32[batch, 4])").replace("return %y", "return %y, %m")
    m = match(LINEAR, parse_graph(two_uses, weights=W).outputs[0])
    assert not m.ok and m.reason == "MatMul output 'm' has other uses"
    square = op("Mul", var("a"), var("a"))
    g = parse_graph('''graph @g(%x: f32[2], %z: f32[2]) -> (f32[2], f32[2]) {
  %p = Mul(%x, %x) : f32[2] loc("p")
  %q = Mul(%x, %z) : f32[2] loc("q")
  return %p, %q
}
''')
    assert match(square, g.outputs[0]).ok
    assert "must be the same value" in match(square, g.outputs[1]).reason


class AddToSub(RewriteRule):
    name = "add-to-sub-neg"  # x + b -> x - (-b): never converges on its own output form
    pattern = op("Add", var("x"), var("y"))

    def rewrite(self, rw, m):
        return rw.Add(m["x"], rw.Neg(rw.Neg(m["y"])))


class FoldDoubleNeg(RewriteRule):
    name = "double-neg"  # Neg(Neg(x)) -> x
    pattern = op("Neg", op("Neg", var("x")))

    def rewrite(self, rw, m):
        return m["x"]


def test_fixed_point_driver_counts_rules_and_bounds_iterations():
    g = parse_graph('''graph @g(%x: f32[2]) -> (f32[2]) {
  %a = Neg(%x) : f32[2] loc("a")
  %b = Neg(%a) : f32[2] loc("b")
  %c = Neg(%b) : f32[2] loc("c")
  %d = Neg(%c) : f32[2] loc("d")
  %e = Relu(%d) : f32[2] loc("e")
  return %e
}
''')
    res = apply_patterns(g, [FoldDoubleNeg()])
    verify(g)
    assert res.stats == {"double-neg": 2} and [n.op_type for n in g.nodes] == ["Relu"]
    g = parse_graph(SRC, weights=W)
    with pytest.raises(GraphoptError, match="did not converge in 5 iterations"):
        apply_patterns(g, [AddToSub()], max_iterations=5)


def test_rewrite_keeps_graph_output_names():
    g = parse_graph('''graph @g(%x: f32[2]) -> (f32[2]) {
  %a = Relu(%x) : f32[2] loc("a")
  %b = Neg(%a) : f32[2] loc("b")
  %out = Neg(%b) : f32[2] loc("out")
  return %out
}
''')
    apply_patterns(g, [FoldDoubleNeg()])
    verify(g)
    assert [v.name for v in g.outputs] == ["out"] and [n.op_type for n in g.nodes] == ["Relu"]


def test_commuted_operands_are_tried_again_when_a_later_operand_fails():
    """Mul(Add(x, z), z) against Mul(Add(a, b) commuted, a): the first order binds a = x, and
    only the Mul's second operand shows it wrong; the match backtracks into the Add's swap."""
    g = parse_graph('''graph @g(%x: f32[2], %z: f32[2]) -> (f32[2]) {
  %s = Add(%x, %z) : f32[2] loc("s")
  %y = Mul(%s, %z) : f32[2] loc("y")
  return %y
}
''')
    x, z = g.inputs
    m = match(op("Mul", op("Add", var("a"), var("b"), commute=True), var("a")), g.outputs[0])
    assert m.ok and m["a"] is z and m["b"] is x
    # nested two deep, with the conflict found in a third operand's subtree
    deep = op("Mul", op("Add", op("Add", var("a"), var("b"), commute=True), var("c")), var("a"))
    g2 = parse_graph('''graph @g(%x: f32[2], %z: f32[2], %w: f32[2]) -> (f32[2]) {
  %s = Add(%x, %z) : f32[2] loc("s")
  %t = Add(%s, %w) : f32[2] loc("t")
  %y = Mul(%t, %z) : f32[2] loc("y")
  return %y
}
''')
    m = match(deep, g2.outputs[0])
    assert m.ok and m["a"] is g2.inputs[1] and m["b"] is g2.inputs[0] and m["c"] is g2.inputs[2]
    assert [n.name for n in m.nodes] == ["y", "t", "s"]
    # and where no assignment works, the reason of the attempt that got furthest
    m = match(op("Mul", op("Add", var("a"), var("b"), commute=True), var("a")),
              parse_graph(SRC_MUL_OTHER).outputs[0])
    assert not m.ok and "must be the same value" in m.reason


SRC_MUL_OTHER = '''graph @g(%x: f32[2], %z: f32[2], %w: f32[2]) -> (f32[2]) {
  %s = Add(%x, %z) : f32[2] loc("s")
  %y = Mul(%s, %w) : f32[2] loc("y")
  return %y
}
'''


def test_the_failure_reported_is_the_attempt_that_got_furthest():
    """Add(Mul(x, w), b) commuted against Add(Mul(%x, %v), %c): one order fails at the Mul's
    constant (two ops matched), the other at once (a graph input where a Mul should be)."""
    g = parse_graph('''graph @g(%x: f32[2], %v: f32[2], %c: f32[2]) -> (f32[2]) {
  %m = Mul(%x, %v) : f32[2] loc("m")
  %y = Add(%m, %c) : f32[2] loc("y")
  return %y
}
''')
    m = match(op("Add", op("Mul", var("x"), const("w")), var("b"), commute=True), g.outputs[0])
    assert not m.ok and m.reason == "w 'v' is not a constant" and m.depth == 2


def test_a_tree_of_commuted_ops_fails_without_trying_every_order(monkeypatch):
    """31 commuted Adds over anonymous operands, then an operand that cannot match: each
    subtree's orders bind the same captures, so the search tries them once, not 2^31 times."""
    import graphopt.pattern as pattern

    lines, names = [], [f"%i{k}" for k in range(32)]
    level, k = names, 0
    while len(level) > 1:
        nxt = []
        for a, b in zip(level[::2], level[1::2]):
            lines.append(f"  %a{k} = Add({a}, {b}) : f32[2]")
            nxt.append(f"%a{k}")
            k += 1
        level = nxt
    lines.append(f"  %y = Mul({level[0]}, %i0) : f32[2]")
    args = ", ".join(f"{n}: f32[2]" for n in names)
    g = parse_graph(f"graph @g({args}) -> (f32[2]) {{\n" + "\n".join(lines) + "\n  return %y\n}\n")

    def tree(depth):
        return var() if depth == 0 else op("Add", tree(depth - 1), tree(depth - 1), commute=True)
    calls = []
    node = pattern._match_node

    def counted(*args):
        calls.append(1)
        if len(calls) > 10_000:
            raise AssertionError("the search retries the same orders")
        return node(*args)
    monkeypatch.setattr(pattern, "_match_node", counted)
    m = match(op("Mul", tree(5), op("Neg", var())), g.outputs[0])
    assert not m.ok and "expected Neg" in m.reason
    assert len(calls) < 2_000  # each subtree once an order of its parent: 343 calls


class AddOfZ(RewriteRule):
    """Add(x, y) commuted, but only where the second operand is the graph input %z."""
    name = "add-z"
    pattern = op("Add", var("x"), var("y"), commute=True)

    def check(self, m):
        return None if m["y"].name == "z" else "y is not %z"

    def rewrite(self, rw, m):
        return rw.Sub(m["x"], rw.Neg(m["y"]))


def test_a_check_that_refuses_one_order_is_offered_the_other():
    """Add(%z, %x): the first order binds y = %x, which the check refuses; the swapped order
    (y = %z) it accepts, and the rule fires. `matches` lists both orders."""
    from graphopt.pattern import matches

    g = parse_graph('''graph @g(%x: f32[2], %z: f32[2]) -> (f32[2]) {
  %y = Add(%z, %x) : f32[2] loc("y")
  return %y
}
''')
    found = list(matches(AddOfZ.pattern, g.outputs[0]))
    assert [m["y"].name for m in found] == ["x", "z"]
    x = np.array([1.0, 2.0], np.float32)
    z = np.array([10.0, 20.0], np.float32)
    from graphopt.interpreter import run

    before = run(g, {"x": x, "z": z})
    assert apply_patterns(g, [AddOfZ()]).stats == {"add-z": 1}
    assert [n.op_type for n in g.nodes] == ["Neg", "Sub"]
    assert g.nodes[0].inputs[0].name == "z"
    np.testing.assert_allclose(run(g, {"x": x, "z": z})["y"], before["y"])
