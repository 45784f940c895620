"""GPT-2 with `reorder_and_upcast_attn`: its scores come from torch.baddbmm on the heads merged
into the batch, `alpha * Q @ K + beta * empty`, then split back into heads for the mask and the
softmax, with V still 4-D. Two changes make it generation-ready: remove-identities drops the
Add of the zeros (`add-zeros`), and fuse-attention reads the scores' merge and split off the
Reshapes' shapes though V is not merged. Each is checked on its own (golden IR, numbers before
and after on the same inputs, the cases it must not take); the model end to end is in
tests/test_families.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from graphopt.interpreter import run
from graphopt.passes.cleanup.simplify import IDENTITY_RULES, RemoveAddZeros
from graphopt.pattern import apply_patterns, match
from graphopt.testing import apply_pipeline_text
from graphopt.text import parse_graph


def ops(g):
    return [n.op for n in g.nodes]


def same_numbers(before: str, after, feeds):
    """The graph parsed from `before` and the rewritten one give the same numbers, bit for bit."""
    want, got = run(parse_graph(before), feeds), run(after, feeds)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def near_misses(text, rules):
    g = parse_graph(text)
    return [dataclasses.asdict(nm) for nm in apply_patterns(g, rules, explain=True).near_misses]


# ---- remove-identities: add-zeros, sub-zeros -------------------------------------------------

# torch.baddbmm(empty, q, k, beta=0, alpha=s) as the dynamo exporter writes it
BADDBMM = '''graph @g(%x: f32[batch, seq, 4]) -> (f32[batch, seq, 4]) {
  %zero = Constant() {value=dense<f32[]>[0.0]} : f32[] loc("zero")
  %s = Shape(%x) : i64[3] loc("s")
  %empty = Expand(%zero, %s) : f32[batch, seq, 4] loc("empty")
  %beta_empty = Mul(%empty, %zero) : f32[batch, seq, 4] loc("beta_empty")
  %y = Add(%x, %beta_empty) : f32[batch, seq, 4] loc("baddbmm")
  %r = Relu(%y) : f32[batch, seq, 4] loc("relu")
  return %r
}
'''
NO_ZEROS = '''graph @g(%x: f32[batch, seq, 4]) -> (f32[batch, seq, 4]) {
  %r = Relu(%x) : f32[batch, seq, 4] loc("relu")
  return %r
}
'''


def _feeds(**shapes):
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    first = next(iter(feeds.values()))
    first.flat[:4] = [np.nan, np.inf, -np.inf, -0.0]  # x + 0 is x for these too (-0.0 compares equal)
    return feeds


def test_add_of_computed_zeros_is_removed_with_the_same_numbers():
    g, out, records = apply_pipeline_text(BADDBMM, "remove-identities,dce")
    assert out == NO_ZEROS and records[0].stats == {"add-zeros": 1}
    same_numbers(BADDBMM, g, _feeds(x=(2, 3, 4)))
    # the zeros on the left, and subtracted on the right
    for text in (BADDBMM.replace("Add(%x, %beta_empty)", "Add(%beta_empty, %x)"),
                 BADDBMM.replace("Add(%x, %beta_empty)", "Sub(%x, %beta_empty)")):
        g, out, _ = apply_pipeline_text(text, "remove-identities,dce")
        assert out == NO_ZEROS
        same_numbers(text, g, _feeds(x=(2, 3, 4)))


def test_zeros_that_broadcast_x_or_are_not_provably_zero_stay():
    # x: [1, seq, 4] + zeros [batch, seq, 4] makes a bigger tensor: the Add is not x
    wider = '''graph @g(%x: f32[1, seq, 4], %w: f32[batch, seq, 4]) -> (f32[batch, seq, 4]) {
  %zero = Constant() {value=dense<f32[]>[0.0]} : f32[] loc("zero")
  %s = Shape(%w) : i64[3] loc("s")
  %empty = Expand(%zero, %s) : f32[batch, seq, 4] loc("empty")
  %y = Add(%x, %empty) : f32[batch, seq, 4] loc("add")
  return %y
}
'''
    g, out, records = apply_pipeline_text(wider, "remove-identities")
    assert "Add" in ops(g) and not records[0].changed
    assert {"rule": "add-zeros", "node": "add", "reason": "the zeros' dim 'batch' could broadcast x's 1"} in [
        {k: nm[k] for k in ("rule", "node", "reason")} for nm in near_misses(wider, IDENTITY_RULES)]
    # 0 * w is NaN where w is inf: zeros times an input are not zeros
    times_input = BADDBMM.replace("%x: f32[batch, seq, 4]) ->",
                                  "%x: f32[batch, seq, 4], %w: f32[batch, seq, 4]) ->") \
        .replace("Mul(%empty, %zero)", "Mul(%empty, %w)")
    g, _, records = apply_pipeline_text(times_input, "remove-identities")
    assert "Add" in ops(g) and not records[0].changed
    add = next(n for n in parse_graph(times_input).nodes if n.op_type == "Add")
    assert match(RemoveAddZeros.pattern, add.outputs[0]).reason == "not provably all zeros"
    # zeros - x is -x
    negated = BADDBMM.replace("Add(%x, %beta_empty)", "Sub(%beta_empty, %x)")
    g, _, records = apply_pipeline_text(negated, "remove-identities")
    assert "Sub" in ops(g) and not records[0].changed
    # a weight that is zero (a freshly initialized bias) is the model's: the fusions expect its Add
    bias = """graph @g(%x: f32[batch, seq, 4]) -> (f32[batch, seq, 4]) {
  weights {
    @bias: f32[4]
  }
  %y = Add(%x, @bias) : f32[batch, seq, 4] loc("add")
  %z = Relu(%y) : f32[batch, seq, 4] loc("relu")
  return %z
}
"""
    g, _, records = apply_pipeline_text(bias, "remove-identities", weights={"bias": np.zeros(4, np.float32)})
    assert "Add" in ops(g) and not records[0].changed


def test_already_clean_is_a_no_op():
    _, out, records = apply_pipeline_text(NO_ZEROS, "remove-identities")
    assert out == NO_ZEROS and not records[0].changed


# ---- fuse-attention: the scores computed with the heads merged into the batch ------------------

# batch 3, 2 heads, 5 positions, head size 4: GPT-2's _upcast_and_reordered_attn, zeros removed
SCORES_BMM = '''graph @attn(%q: f32[3, 2, 5, 4], %k: f32[3, 2, 5, 4], %v: f32[3, 2, 5, 4], %mask: f32[3, 1, 5, 5]) -> (f32[3, 2, 5, 4]) {
  %q_shape = Constant() {value=dense<i64[3]>[6, 5, 4]} : i64[3] loc("q_shape")
  %q3 = Reshape(%q, %q_shape) : f32[6, 5, 4] loc("q3")
  %kt = Transpose(%k) {perm=[0, 1, 3, 2]} : f32[3, 2, 4, 5] loc("kt")
  %kt_shape = Constant() {value=dense<i64[3]>[6, 4, 5]} : i64[3] loc("kt_shape")
  %kt3 = Reshape(%kt, %kt_shape) : f32[6, 4, 5] loc("kt3")
  %s = MatMul(%q3, %kt3) : f32[6, 5, 5] loc("qk")
  %alpha = Constant() {value=dense<f32[]>[0.5]} : f32[] loc("alpha")
  %sa = Mul(%s, %alpha) : f32[6, 5, 5] loc("scale")
  %s_shape = Constant() {value=dense<i64[4]>[3, 2, 5, 5]} : i64[4] loc("s_shape")
  %s4 = Reshape(%sa, %s_shape) : f32[3, 2, 5, 5] loc("split_heads")
  %a = Add(%s4, %mask) : f32[3, 2, 5, 5] loc("add_mask")
  %p = Softmax(%a) {axis=-1} : f32[3, 2, 5, 5] loc("softmax")
  %o = MatMul(%p, %v) : f32[3, 2, 5, 4] loc("pv")
  return %o
}
'''
SCORES_BMM_FUSED = '''graph @attn(%q: f32[3, 2, 5, 4], %k: f32[3, 2, 5, 4], %v: f32[3, 2, 5, 4], %mask: f32[3, 1, 5, 5]) -> (f32[3, 2, 5, 4]) {
  %o = graphopt.Attention(%q, %k, %v, %mask) {kv_num_heads=2, num_heads=2, scale=0.5} : f32[3, 2, 5, 4] loc("pv/Attention")
  return %o
}
'''


def _attention_feeds():
    rng = np.random.default_rng(0)
    causal = np.where(np.tril(np.ones((5, 5), bool)), 0.0, -np.inf).astype(np.float32)
    return {"q": rng.standard_normal((3, 2, 5, 4)).astype(np.float32),
            "k": rng.standard_normal((3, 2, 5, 4)).astype(np.float32),
            "v": rng.standard_normal((3, 2, 5, 4)).astype(np.float32),
            "mask": np.broadcast_to(causal, (3, 1, 5, 5)).copy()}


def test_scores_merged_into_the_batch_fuse_with_v_in_4d():
    g, out, records = apply_pipeline_text(SCORES_BMM, "fuse-attention,dce")
    assert out == SCORES_BMM_FUSED and records[0].stats == {"attention": 1}
    want, got = run(parse_graph(SCORES_BMM), _attention_feeds())["o"], run(g, _attention_feeds())["o"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # fp32: softmax computed in another order


def test_k_merged_from_other_leading_dims_than_q_is_not_fused():
    # K is [heads=2, batch=3, ...] merged: [6, 4, 5] too, but not the (batch, heads) Q was merged from
    swapped = SCORES_BMM.replace("%k: f32[3, 2, 5, 4]", "%k: f32[2, 3, 5, 4]") \
        .replace("{perm=[0, 1, 3, 2]} : f32[3, 2, 4, 5]", "{perm=[0, 1, 3, 2]} : f32[2, 3, 4, 5]")
    g, _, records = apply_pipeline_text(swapped, "fuse-attention")
    assert "graphopt.Attention" not in ops(g)
    assert [d["reason"] for d in records[0].details] == [
        "with the heads merged into the batch, K or V is not a Reshape of [batch, heads, seq, d] "
        "(K transposed before or after it)"]


def test_q_reshaped_without_merging_its_leading_dims_is_not_fused():
    # [3, 5, 2, 4] -> [6, 5, 4]: the same elements, but no (batch, heads) pair became the first dim
    scrambled = SCORES_BMM.replace("%q: f32[3, 2, 5, 4]", "%q: f32[3, 5, 2, 4]")
    g, _, records = apply_pipeline_text(scrambled, "fuse-attention")
    assert "graphopt.Attention" not in ops(g)
    assert [d["reason"] for d in records[0].details] == [
        "with the heads merged into the batch, Q is not a Reshape of [batch, heads, seq, d]"]
