"""Fusion passes: golden IR tests (positive, negative with the reason, already fused), and
real exports of GPT-2, Llama, BERT and other decoder families compared with PyTorch."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.pass_manager import PassManager
from graphopt.testing import apply_pipeline_text
from graphopt.text import parse_graph

W = {}  # weights by name, filled by w()


def w(name, *shape, seed=0):
    W[name] = (np.random.default_rng(seed + len(W)).standard_normal(shape) * 0.3).astype(np.float32)
    return W[name]


def run_text(text, pipeline):
    g, out, records = apply_pipeline_text(text, pipeline, weights=W)
    return g, out, records[0]


def ops(g):
    return [n.op for n in g.nodes]


def reasons(record):
    return [d["reason"] for d in record.details]


# ---- attention -----------------------------------------------------------------------------

ATTENTION = '''graph @attn(%q: f32[batch, 4, seq, 8], %k: f32[batch, 4, seq, 8], %v: f32[batch, 4, seq, 8], %mask: f32[batch, 1, seq, seq]) -> (f32[batch, 4, seq, 8]) {
  %kt = Transpose(%k) {perm=[0, 1, 3, 2]} : f32[batch, 4, 8, seq] loc("kt")
  %s = MatMul(%q, %kt) : f32[batch, 4, seq, seq] loc("qk")
  %c = Constant() {value=dense<f32[]>[2.828427]} : f32[] loc("c")
  %sc = Div(%s, %c) : f32[batch, 4, seq, seq] loc("scale")
  %a = Add(%sc, %mask) : f32[batch, 4, seq, seq] loc("add_mask")
  %p = Softmax(%a) {axis=-1} : f32[batch, 4, seq, seq] loc("softmax")
  %o = MatMul(%p, %v) : f32[batch, 4, seq, 8] loc("pv")
  return %o
}
'''
ATTENTION_FUSED = '''graph @attn(%q: f32[batch, 4, seq, 8], %k: f32[batch, 4, seq, 8], %v: f32[batch, 4, seq, 8], %mask: f32[batch, 1, seq, seq]) -> (f32[batch, 4, seq, 8]) {
  %o = graphopt.Attention(%q, %k, %v, %mask) {kv_num_heads=4, num_heads=4, scale=0.35355338} : f32[batch, 4, seq, 8] loc("pv/Attention")
  return %o
}
'''


def test_attention_positive():
    _, out, rec = run_text(ATTENTION, "fuse-attention,dce")
    assert out == ATTENTION_FUSED and rec.stats == {"attention": 1}


def test_attention_scale_on_q_and_k_and_grouped_heads():
    text = '''graph @attn(%q: f32[batch, 4, seq, 8], %k: f32[batch, 2, seq, 8], %v: f32[batch, 2, seq, 8]) -> (f32[batch, 4, seq, 8]) {
  %r = Constant() {value=dense<i64[5]>[1, 1, 2, 1, 1]} : i64[5] loc("reps")
  %ax = Constant() {value=dense<i64[1]>[2]} : i64[1] loc("ax")
  %sh = Constant() {value=dense<i64[4]>[0, 4, -1, 8]} : i64[4] loc("sh")
  %k5 = Unsqueeze(%k, %ax) : f32[batch, 2, 1, seq, 8] loc("k5")
  %ke = Expand(%k5, %r) : f32[batch, 2, 2, seq, 8] loc("ke")
  %kr = Reshape(%ke, %sh) : f32[batch, 4, seq, 8] loc("kr")
  %v5 = Unsqueeze(%v, %ax) : f32[batch, 2, 1, seq, 8] loc("v5")
  %ve = Expand(%v5, %r) : f32[batch, 2, 2, seq, 8] loc("ve")
  %vr = Reshape(%ve, %sh) : f32[batch, 4, seq, 8] loc("vr")
  %c = Constant() {value=dense<f32[]>[0.59460354]} : f32[] loc("c")
  %qs = Mul(%q, %c) : f32[batch, 4, seq, 8] loc("qs")
  %kt = Transpose(%kr) {perm=[0, 1, 3, 2]} : f32[batch, 4, 8, seq] loc("kt")
  %ks = Mul(%kt, %c) : f32[batch, 4, 8, seq] loc("ks")
  %s = MatMul(%qs, %ks) : f32[batch, 4, seq, seq] loc("qk")
  %p = Softmax(%s) {axis=-1} : f32[batch, 4, seq, seq] loc("softmax")
  %o = MatMul(%p, %vr) : f32[batch, 4, seq, 8] loc("pv")
  return %o
}
'''
    g, _, rec = run_text(text, "fuse-attention,dce")
    assert ops(g) == ["graphopt.Attention"]
    att = g.nodes[0]
    assert att.inputs[1].name == "k" and att.inputs[2].name == "v"
    assert att.attr("num_heads") == 4 and att.attr("kv_num_heads") == 2
    assert att.attr("scale") == pytest.approx(0.59460354 ** 2, rel=1e-6)


def test_attention_negative_reasons():
    relu = ATTENTION.replace("%p = Softmax(%a) {axis=-1}", "%r = Relu(%a) : f32[batch, 4, seq, seq] loc(\"relu\")\n  %p = Softmax(%r) {axis=-1}")
    g, _, rec = run_text(relu, "fuse-attention")
    assert "graphopt.Attention" not in ops(g)
    assert rec.details[0]["reason"] == "unexpected Relu between MatMul(Q, K) and Softmax"
    assert rec.details[0]["node"] == "relu"
    axis = ATTENTION.replace("Softmax(%a) {axis=-1}", "Softmax(%a) {axis=2}")
    _, _, rec = run_text(axis, "fuse-attention")
    assert reasons(rec) == ["softmax is not over the last axis"]
    reused = ATTENTION.replace("-> (f32[batch, 4, seq, 8])", "-> (f32[batch, 4, seq, 8], f32[batch, 4, seq, seq])").replace(
        "return %o", "return %o, %p")
    _, _, rec = run_text(reused, "fuse-attention")
    assert reasons(rec) == ["the attention probabilities are used elsewhere (returned or reused)"]


SOFTCAP = ATTENTION.replace('  %a = Add(%sc, %mask) : f32[batch, 4, seq, seq] loc("add_mask")', '''  %cap = Constant() {value=dense<f32[]>[0.5]} : f32[] loc("cap")
  %d = Div(%sc, %cap) : f32[batch, 4, seq, seq] loc("cap_div")
  %t = Tanh(%d) : f32[batch, 4, seq, seq] loc("cap_tanh")
  %m = Mul(%t, %cap) : f32[batch, 4, seq, seq] loc("cap_mul")
  %a = Add(%m, %mask) : f32[batch, 4, seq, seq] loc("add_mask")''')


def test_attention_with_a_softcap():
    """Gemma 2's attention logit softcapping, cap * tanh(scores / cap) before the mask: one
    graphopt.Attention with `softcap` (checked on sample inputs before and after; a cap of
    0.5 moves every score, so a dropped cap would not pass)."""
    g, _, rec = run_text(SOFTCAP, "fuse-attention,dce")
    assert ops(g) == ["graphopt.Attention"] and rec.stats == {"attention": 1}
    assert g.nodes[0].attr("softcap") == pytest.approx(0.5) and g.nodes[0].attr("scale") == pytest.approx(0.35355338)


SINKS = ATTENTION.replace('''  %p = Softmax(%a) {axis=-1} : f32[batch, 4, seq, seq] loc("softmax")
  %o = MatMul(%p, %v) : f32[batch, 4, seq, 8] loc("pv")''', '''  %sk = Constant() {value=dense<f32[1, 4, 1, 1]>[0.5, -1.0, 3.0, 0.25]} : f32[1, 4, 1, 1] loc("sinks")
  %s4 = Shape(%q) {end=3} : i64[3] loc("s4")
  %one = Constant() {value=dense<i64[1]>[1]} : i64[1] loc("one")
  %shp = Concat(%s4, %one) {axis=0} : i64[4] loc("shp")
  %col = Expand(%sk, %shp) : f32[batch, 4, seq, 1] loc("col")
  %cat = Concat(%a, %col) {axis=-1} : f32[batch, 4, seq, ?] loc("cat")
  %last = Constant() {value=dense<i64[1]>[-1]} : i64[1] loc("last")
  %mx = ReduceMax(%cat, %last) {keepdims=1} : f32[batch, 4, seq, 1] loc("rowmax")
  %sub = Sub(%cat, %mx) : f32[batch, 4, seq, ?] loc("sub")
  %pp = Softmax(%sub) {axis=-1} : f32[batch, 4, seq, ?] loc("softmax")
  %z = Constant() {value=dense<i64[1]>[0]} : i64[1] loc("z")
  %p = Slice(%pp, %z, %last, %last) : f32[batch, 4, seq, seq] loc("drop_sinks")
  %o = MatMul(%p, %v) : f32[batch, 4, seq, 8] loc("pv")''')


def test_attention_sinks_become_the_8th_input():
    """GPT-OSS's sinks, a column of per-head logits concatenated to the scores and dropped after
    the softmax (the row max subtracted first): graphopt.Attention with `sinks` (the pass manager
    checks the outputs before and after on sample inputs; a sink of 3.0 moves every output)."""
    g, _, rec = run_text(SINKS, "fuse-attention,dce")
    assert ops(g) == ["graphopt.Attention"] and rec.stats == {"attention": 1}
    assert list(g.nodes[0].inputs[4:7]) == [None, None, None]
    np.testing.assert_array_equal(g.nodes[0].inputs[7].const_value, np.array([0.5, -1.0, 3.0, 0.25], np.float32))
    # a Slice that keeps the column too (start 1 of ... no: one that drops the first column of an
    # unmatched Concat order) is not the sinks' spelling: left as it is
    first = SINKS.replace("%cat = Concat(%a, %col)", "%cat = Concat(%col, %a)")
    _, _, rec = run_text(first, "fuse-attention")
    assert not rec.changed and reasons(rec)[0].startswith("the column the softmax drops is not a constant logit")


def test_a_masked_fill_of_the_scores_is_a_mask():
    """GPT-Neo's Where(causal, scores, lowest) before the added mask: one graphopt.Attention whose
    mask is Where(causal, 0, lowest) + mask (in float32 the same: a score vanishes in the
    lowest value's rounding)."""
    text = ATTENTION.replace('''  %a = Add(%sc, %mask) : f32[batch, 4, seq, seq] loc("add_mask")''', '''  %tri = Constant() {value=dense<bool[1, 1, 3, 3]>[true, false, false, true, true, false, true, true, true]} : bool[1, 1, 3, 3] loc("tri")
  %low = Constant() {value=dense<f32[]>[-3.4028235e+38]} : f32[] loc("low")
  %fill = Where(%tri, %sc, %low) : f32[batch, 4, 3, 3] loc("fill")
  %a = Add(%fill, %mask) : f32[batch, 4, seq, seq] loc("add_mask")''').replace("seq", "3")
    g, _, rec = run_text(text, "fuse-attention,dce")
    assert rec.stats == {"attention": 1}
    assert sorted(o for o in ops(g) if o != "Constant") == ["Add", "Where", "graphopt.Attention"]
    high = text.replace("[-3.4028235e+38]", "[-100.0]")  # not a fill that masks out: not fused
    _, _, rec = run_text(high, "fuse-attention")
    assert not rec.changed


def _moved(text: str, line_loc: str, before_loc: str) -> str:
    """`text` with the line of loc(`line_loc`) moved before the line of loc(`before_loc`)."""
    lines = text.splitlines()
    line = lines.pop(next(i for i, x in enumerate(lines) if f'loc("{line_loc}")' in x))
    lines.insert(next(i for i, x in enumerate(lines) if f'loc("{before_loc}")' in x), line)
    return "\n".join(lines) + "\n"


def test_a_softcap_after_the_mask_or_the_scale_is_not_fused():
    """graphopt.Attention caps the scaled scores before the mask: a cap over the masked
    scores, or a scale applied to the capped ones, is another function, left unfused."""
    after_mask = (SOFTCAP.replace("%d = Div(%sc, %cap)", "%d = Div(%a, %cap)")
                  .replace("%a = Add(%m, %mask)", "%a = Add(%sc, %mask)").replace("Softmax(%a)", "Softmax(%m)"))
    _, _, rec = run_text(_moved(after_mask, "add_mask", "cap_div"), "fuse-attention")
    assert reasons(rec) == ["the mask is added before the softcap"]
    scaled_after = (SOFTCAP.replace("%d = Div(%sc, %cap)", "%d = Div(%s, %cap)")
                    .replace("%sc = Div(%s, %c)", "%sc = Div(%m, %c)").replace("%a = Add(%m, %mask)", "%a = Add(%sc, %mask)"))
    _, _, rec = run_text(_moved(scaled_after, "scale", "add_mask"), "fuse-attention")
    assert reasons(rec) == ["the scores are scaled after the softcap"]


def test_attention_already_fused_is_a_no_op():
    _, out, rec = run_text(ATTENTION_FUSED, "fuse-attention")
    assert out == ATTENTION_FUSED and not rec.changed


# ---- activations ---------------------------------------------------------------------------

GELU_ERF = '''graph @g(%x: f32[batch, 8]) -> (f32[batch, 8]) {
  %c = Constant() {value=dense<f32[]>[1.4142135]} : f32[] loc("c")
  %one = Constant() {value=dense<f32[]>[1.0]} : f32[] loc("one")
  %half = Constant() {value=dense<f32[]>[0.5]} : f32[] loc("half")
  %d = Div(%x, %c) : f32[batch, 8] loc("d")
  %e = Erf(%d) : f32[batch, 8] loc("erf")
  %a = Add(%e, %one) : f32[batch, 8] loc("a")
  %m = Mul(%x, %a) : f32[batch, 8] loc("m")
  %y = Mul(%m, %half) : f32[batch, 8] loc("y")
  return %y
}
'''
GELU_FUSED = '''graph @g(%x: f32[batch, 8]) -> (f32[batch, 8]) {
  %y = Gelu(%x) {approximate="none"} : f32[batch, 8] loc("y/Gelu")
  return %y
}
'''


def test_gelu_positive_negative_and_already_fused():
    _, out, rec = run_text(GELU_ERF, "fuse-activations,dce")
    assert out == GELU_FUSED and rec.stats == {"gelu": 1}
    wrong = GELU_ERF.replace("[0.5]", "[0.25]")
    g, _, rec = run_text(wrong, "fuse-activations")
    assert "Gelu" not in ops(g) and reasons(rec) == ["the elementwise region around it is not GELU or SiLU"]
    _, out, rec = run_text(GELU_FUSED, "fuse-activations")
    assert out == GELU_FUSED and not rec.changed


def test_gelu_tanh_spelling_from_gpt2():
    text = '''graph @g(%x: f32[batch, 8]) -> (f32[batch, 8]) {
  %half = Constant() {value=dense<f32[]>[0.5]} : f32[] loc("half")
  %three = Constant() {value=dense<f32[]>[3.0]} : f32[] loc("three")
  %k = Constant() {value=dense<f32[]>[0.044715]} : f32[] loc("k")
  %s = Constant() {value=dense<f32[]>[0.7978846]} : f32[] loc("s")
  %one = Constant() {value=dense<f32[]>[1.0]} : f32[] loc("one")
  %h = Mul(%x, %half) : f32[batch, 8] loc("h")
  %p = Pow(%x, %three) : f32[batch, 8] loc("p")
  %pk = Mul(%p, %k) : f32[batch, 8] loc("pk")
  %i = Add(%x, %pk) : f32[batch, 8] loc("i")
  %is = Mul(%i, %s) : f32[batch, 8] loc("is")
  %t = Tanh(%is) : f32[batch, 8] loc("t")
  %t1 = Add(%t, %one) : f32[batch, 8] loc("t1")
  %y = Mul(%h, %t1) : f32[batch, 8] loc("y")
  return %y
}
'''
    g, _, rec = run_text(text, "fuse-activations,dce")
    assert ops(g) == ["Gelu"] and g.nodes[0].attr("approximate") == "tanh" and rec.stats == {"gelu_tanh": 1}


# ---- norms ---------------------------------------------------------------------------------

def rms_text(eps="1e-06", scale=True):
    w("rms_w", 16)
    tail = '  %y = Mul(@rms_w, %n) : f32[batch, seq, 16] loc("scale")\n  return %y' if scale else "  return %n"
    return f'''graph @g(%x: f32[batch, seq, 16]) -> (f32[batch, seq, 16]) {{
  weights {{
    @rms_w: f32[16]
  }}
  %two = Constant() {{value=dense<f32[]>[2.0]}} : f32[] loc("two")
  %ax = Constant() {{value=dense<i64[1]>[-1]}} : i64[1] loc("ax")
  %eps = Constant() {{value=dense<f32[]>[{eps}]}} : f32[] loc("eps")
  %p = Pow(%x, %two) : f32[batch, seq, 16] loc("pow")
  %m = ReduceMean(%p, %ax) {{keepdims=1}} : f32[batch, seq, 1] loc("mean")
  %a = Add(%m, %eps) : f32[batch, seq, 1] loc("add_eps")
  %s = Sqrt(%a) : f32[batch, seq, 1] loc("sqrt")
  %r = Reciprocal(%s) : f32[batch, seq, 1] loc("rsqrt")
  %n = Mul(%x, %r) : f32[batch, seq, 16] loc("norm")
{tail}
}}
'''


def test_rms_norm_positive_negative_and_already_fused():
    g, out, rec = run_text(rms_text(), "fuse-rms-norm,dce")
    assert ops(g) == ["graphopt.RMSNorm"] and g.nodes[0].attr("epsilon") == pytest.approx(1e-6)
    assert g.nodes[0].inputs[1].name == "rms_w" and rec.stats == {"rms-norm": 1}
    g, _, _ = run_text(rms_text(scale=False), "fuse-rms-norm,dce")
    assert ops(g) == ["graphopt.RMSNorm"]  # no scale: a ones vector
    np.testing.assert_array_equal(g.nodes[0].inputs[1].const_value, np.ones(16, np.float32))
    wrong = rms_text().replace("%n = Mul(%x, %r)", "%n = Mul(%r, %r)").replace(
        ': f32[batch, seq, 16] loc("norm")', ': f32[batch, seq, 1] loc("norm")').replace(
        "-> (f32[batch, seq, 16])", "-> (f32[batch, seq, 16])")
    g, _, rec = run_text(wrong, "fuse-rms-norm")
    assert "graphopt.RMSNorm" not in ops(g)
    assert reasons(rec) == ["the region around it is neither LayerNorm nor RMSNorm"]
    again, out2, rec = run_text(out, "fuse-rms-norm")
    assert out2 == out and not rec.changed


def test_rms_norm_without_an_epsilon_add_is_the_norm_of_epsilon_0():
    """Helium's export (rms_norm_eps 1e-8) has no Add before the Sqrt: still one RMSNorm."""
    text = rms_text().replace('  %a = Add(%m, %eps) : f32[batch, seq, 1] loc("add_eps")\n', "").replace(
        "Sqrt(%a)", "Sqrt(%m)")
    g, _, rec = run_text(text, "fuse-rms-norm,dce")
    assert ops(g) == ["graphopt.RMSNorm"] and g.nodes[0].attr("epsilon") == 0.0 and rec.stats == {"rms-norm": 1}


def test_layer_norm_decomposed_and_skip_norm():
    w("ln_g", 16)
    w("ln_b", 16)
    text = '''graph @g(%x: f32[batch, seq, 16], %res: f32[batch, seq, 16]) -> (f32[batch, seq, 16], f32[batch, seq, 16]) {
  weights {
    @ln_g: f32[16]
    @ln_b: f32[16]
  }
  %ax = Constant() {value=dense<i64[1]>[-1]} : i64[1] loc("ax")
  %eps = Constant() {value=dense<f32[]>[1e-05]} : f32[] loc("eps")
  %sum = Add(%x, %res) : f32[batch, seq, 16] loc("residual")
  %mean = ReduceMean(%sum, %ax) {keepdims=1} : f32[batch, seq, 1] loc("mean")
  %d = Sub(%sum, %mean) : f32[batch, seq, 16] loc("center")
  %dd = Mul(%d, %d) : f32[batch, seq, 16] loc("sq")
  %var = ReduceMean(%dd, %ax) {keepdims=1} : f32[batch, seq, 1] loc("var")
  %ve = Add(%var, %eps) : f32[batch, seq, 1] loc("var_eps")
  %sd = Sqrt(%ve) : f32[batch, seq, 1] loc("std")
  %n = Div(%d, %sd) : f32[batch, seq, 16] loc("normalize")
  %sc = Mul(%n, @ln_g) : f32[batch, seq, 16] loc("gamma")
  %y = Add(%sc, @ln_b) : f32[batch, seq, 16] loc("beta")
  return %y, %sum
}
'''
    g, _, rec = run_text(text, "fuse-layer-norm,dce")
    assert sorted(ops(g)) == ["Add", "LayerNormalization"] and rec.stats == {"layer-norm": 1}
    g, out, rec = run_text(text, "fuse-layer-norm,fuse-skip-norm,dce")
    assert ops(g) == ["graphopt.SkipNorm"] and len(g.nodes[0].outputs) == 2
    assert [v.name for v in g.outputs] == ["y", "sum"]  # graph outputs keep their names
    _, out2, rec = run_text(out, "fuse-skip-norm")
    assert out2 == out and not rec.changed
    broadcast = text.replace("%res: f32[batch, seq, 16]", "%res: f32[1, seq, 16]")
    g, _, rec = run_text(broadcast, "fuse-layer-norm,fuse-skip-norm")
    assert "graphopt.SkipNorm" not in ops(g)
    assert rec.details == [] or True
    rec_skip = PassManager("fuse-layer-norm,fuse-skip-norm").run
    g2 = parse_graph(broadcast, weights=W)
    pm = PassManager("fuse-layer-norm,fuse-skip-norm")
    pm.run(g2)
    assert pm.records[1].details[0]["reason"].startswith("the two sides of the residual Add are typed")
    _ = rec_skip


# ---- linear, gated MLP, merged projections ------------------------------------------------

def test_linear_bias_activation_and_reasons():
    w("w1", 8, 16)
    w("b1", 16)
    text = '''graph @g(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 16]) {
  weights {
    @w1: f32[8, 16]
    @b1: f32[16]
  }
  %m = MatMul(%x, @w1) : f32[batch, seq, 16] loc("mm")
  %a = Add(@b1, %m) : f32[batch, seq, 16] loc("bias")
  %y = Relu(%a) : f32[batch, seq, 16] loc("relu")
  return %y
}
'''
    g, out, rec = run_text(text, "fuse-linear,dce")
    assert out == '''graph @g(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 16]) {
  weights {
    @w1: f32[8, 16]
    @b1: f32[16]
  }
  %y = graphopt.Linear(%x, @w1, @b1) {activation="relu", trans_w=0} : f32[batch, seq, 16] loc("relu/Linear")
  return %y
}
'''
    assert rec.stats == {"matmul-add": 1, "activation": 1}
    _, out2, rec = run_text(out, "fuse-linear")
    assert out2 == out and not rec.changed
    dynamic = text.replace("MatMul(%x, @w1)", "MatMul(%x, %x2)").replace(
        "(%x: f32[batch, seq, 8])", "(%x: f32[batch, seq, 8], %x2: f32[8, 16])")
    g, _, rec = run_text(dynamic, "fuse-linear")
    assert "graphopt.Linear" not in ops(g)
    assert "w 'x2' is not a constant" in reasons(rec)


def test_gemm_with_flatten_and_unflatten_becomes_3d_linear():
    w("gw", 8, 12)
    w("gb", 12)
    text = '''graph @g(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 12]) {
  weights {
    @gw: f32[8, 12]
    @gb: f32[12]
  }
  %flat_shape = Constant() {value=dense<i64[2]>[-1, 8]} : i64[2] loc("fs")
  %f = Reshape(%x, %flat_shape) : f32[?, 8] loc("flatten")
  %g = Gemm(%f, @gw, @gb) : f32[?, 12] loc("gemm")
  %s = Shape(%x) {end=2} : i64[2] loc("lead")
  %n = Constant() {value=dense<i64[1]>[12]} : i64[1] loc("n")
  %t = Concat(%s, %n) {axis=0} : i64[3] loc("target")
  %y = Reshape(%g, %t) : f32[batch, seq, 12] loc("unflatten")
  return %y
}
'''
    g, _, rec = run_text(text, "fuse-linear,dce")
    assert ops(g) == ["graphopt.Linear"] and g.nodes[0].inputs[0].name == "x"
    assert rec.stats == {"gemm": 1, "flatten-unflatten": 1}


GATE_AND_UP = '''  %g = MatMul(%x, @wg) : f32[batch, 8] loc("gate")
  %sg = Sigmoid(%g) : f32[batch, 8] loc("sig")
  %silu = Mul(%g, %sg) : f32[batch, 8] loc("silu")
  %u = MatMul(%x, @wu) : f32[batch, 8] loc("up")
'''  # silu(x @ wg) and x @ wu


def test_gated_mlp_and_merged_projections():
    for n in ("wg", "wu", "wq", "wk", "wv"):
        w(n, 8, 8)
    text = '''graph @g(%x: f32[batch, 8]) -> (f32[batch, 8], f32[batch, 8], f32[batch, 8], f32[batch, 8]) {
  weights {
    @wg: f32[8, 8]
    @wu: f32[8, 8]
    @wq: f32[8, 8]
    @wk: f32[8, 8]
    @wv: f32[8, 8]
  }
''' + GATE_AND_UP + '''  %h = Mul(%silu, %u) : f32[batch, 8] loc("gated")
  %q = MatMul(%h, @wq) : f32[batch, 8] loc("q")
  %k = MatMul(%h, @wk) : f32[batch, 8] loc("k")
  %v = MatMul(%h, @wv) : f32[batch, 8] loc("v")
  return %h, %q, %k, %v
}
'''
    g, _, rec = run_text(text, "fuse-linear,fuse-gated-mlp,merge-projections,dce")
    assert ops(g) == ["graphopt.GatedLinear", "graphopt.Linear", "Split"]
    assert g.nodes[1].inputs[1].const_value.shape == (8, 24)
    assert [v.name for v in g.outputs] == ["h", "q", "k", "v"]


def test_gated_mlp_with_the_up_projection_first():
    """Mul(up, silu(gate)): gated-mlp's pattern cannot tell the two Linears apart, so its first
    assignment binds the gate to the plain projection and the check refuses it; the rule is
    then offered the swapped assignment and fuses, computing the same values."""
    from graphopt.interpreter import run

    for n in ("wg", "wu"):
        w(n, 8, 8)
    text = '''graph @g(%x: f32[batch, 8]) -> (f32[batch, 8]) {
  weights {
    @wg: f32[8, 8]
    @wu: f32[8, 8]
  }
''' + GATE_AND_UP + '''  %h = Mul(%u, %silu) : f32[batch, 8] loc("gated")
  return %h
}
'''
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    want = run(parse_graph(text, weights=W), {"x": x})["h"]
    g, _, rec = run_text(text, "fuse-linear,fuse-gated-mlp,dce")
    assert ops(g) == ["graphopt.GatedLinear"]
    assert g.nodes[0].inputs[1].name == "wg" and g.nodes[0].inputs[2].name == "wu"
    np.testing.assert_allclose(run(g, {"x": x})["h"], want, rtol=1e-6, atol=1e-6)


# ---- rotary --------------------------------------------------------------------------------

def test_rotary_positive_and_negative():
    text = '''graph @g(%x: f32[batch, 2, seq, 8], %f: f32[1, seq, 4]) -> (f32[batch, 2, seq, 8]) {
  %one = Constant() {value=dense<i64[1]>[1]} : i64[1] loc("one")
  %z = Constant() {value=dense<i64[1]>[0]} : i64[1] loc("z")
  %h = Constant() {value=dense<i64[1]>[4]} : i64[1] loc("h")
  %e = Constant() {value=dense<i64[1]>[8]} : i64[1] loc("e")
  %last = Constant() {value=dense<i64[1]>[-1]} : i64[1] loc("last")
  %emb = Concat(%f, %f) {axis=-1} : f32[1, seq, 8] loc("emb")
  %cos = Cos(%emb) : f32[1, seq, 8] loc("cos")
  %sin = Sin(%emb) : f32[1, seq, 8] loc("sin")
  %c4 = Unsqueeze(%cos, %one) : f32[1, 1, seq, 8] loc("c4")
  %s4 = Unsqueeze(%sin, %one) : f32[1, 1, seq, 8] loc("s4")
  %x1 = Slice(%x, %z, %h, %last) : f32[batch, 2, seq, 4] loc("x1")
  %x2 = Slice(%x, %h, %e, %last) : f32[batch, 2, seq, 4] loc("x2")
  %n2 = Neg(%x2) : f32[batch, 2, seq, 4] loc("neg")
  %rot = Concat(%n2, %x1) {axis=-1} : f32[batch, 2, seq, 8] loc("rot")
  %a = Mul(%x, %c4) : f32[batch, 2, seq, 8] loc("xc")
  %b = Mul(%rot, %s4) : f32[batch, 2, seq, 8] loc("rs")
  %y = Add(%a, %b) : f32[batch, 2, seq, 8] loc("y")
  return %y
}
'''
    g, _, rec = run_text(text, "fuse-rotary,dce")
    assert sorted(ops(g)) == ["Cos", "Sin", "graphopt.RotaryEmbedding"] and rec.stats == {"rotary": 1}
    swapped = text.replace("%rot = Concat(%n2, %x1)", "%rot = Concat(%x1, %n2)")
    g, _, rec = run_text(swapped, "fuse-rotary")
    assert "graphopt.RotaryEmbedding" not in ops(g) and reasons(rec) == ["not x * cos + rotate_half(x) * sin"]
    _, out, _ = run_text(text, "fuse-rotary,dce")
    _, out2, rec = run_text(out, "fuse-rotary")
    assert out2 == out and not rec.changed


def test_rotary_on_halves():
    """GPT-OSS's spelling: Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin) over the halves of
    x (one Split), with half-size caches unsqueezed at the heads axis: the caches go to
    graphopt.RotaryEmbedding as they are."""
    text = '''graph @g(%x: f32[batch, 2, seq, 8], %cos: f32[batch, seq, 4], %sin: f32[batch, seq, 4]) -> (f32[batch, 2, seq, 8]) {
  %one = Constant() {value=dense<i64[1]>[1]} : i64[1] loc("one")
  %c4 = Unsqueeze(%cos, %one) : f32[batch, 1, seq, 4] loc("c4")
  %s4 = Unsqueeze(%sin, %one) : f32[batch, 1, seq, 4] loc("s4")
  %x1, %x2 = Split(%x) {axis=-1, num_outputs=2} : f32[batch, 2, seq, 4], f32[batch, 2, seq, 4] loc("halves")
  %a = Mul(%x1, %c4) : f32[batch, 2, seq, 4] loc("x1c")
  %b = Mul(%x2, %s4) : f32[batch, 2, seq, 4] loc("x2s")
  %first = Sub(%a, %b) : f32[batch, 2, seq, 4] loc("first")
  %c = Mul(%x2, %c4) : f32[batch, 2, seq, 4] loc("x2c")
  %d = Mul(%x1, %s4) : f32[batch, 2, seq, 4] loc("x1s")
  %second = Add(%c, %d) : f32[batch, 2, seq, 4] loc("second")
  %y = Concat(%first, %second) {axis=-1} : f32[batch, 2, seq, 8] loc("y")
  return %y
}
'''
    g, _, rec = run_text(text, "fuse-rotary,dce")
    assert ops(g) == ["graphopt.RotaryEmbedding"] and rec.stats == {"rotary-halves": 1}
    assert [v.name for v in g.nodes[0].inputs] == ["x", "cos", "sin"]
    swapped = text.replace("%first = Sub(%a, %b)", "%first = Sub(%b, %a)")  # x2 * sin - x1 * cos: not a rotation
    g, _, rec = run_text(swapped, "fuse-rotary")
    assert "graphopt.RotaryEmbedding" not in ops(g)


# GPT-J's / CodeGen's spelling: rotate_every_two on the first 4 of each [batch, seq, heads, 8] head,
# before the permute to [batch, heads, seq, head]; the caches are rows of a constant sin/cos table
# [positions, 2 + 2] (split in two), each entry repeated twice (Unsqueeze, Expand, Reshape)
ROTARY_PAIRS = '''graph @g(%x: f32[batch, seq, 2, 8], %pos: i64[1, seq]) -> (f32[batch, 2, seq, 8]) {
  weights {
    @table: f32[16, 4]
  }
  %z = Constant() {value=dense<i64[1]>[0]} : i64[1] loc("z")
  %one = Constant() {value=dense<i64[1]>[1]} : i64[1] loc("one")
  %two = Constant() {value=dense<i64[1]>[2]} : i64[1] loc("two")
  %r = Constant() {value=dense<i64[1]>[4]} : i64[1] loc("r")
  %e = Constant() {value=dense<i64[1]>[8]} : i64[1] loc("e")
  %last = Constant() {value=dense<i64[1]>[-1]} : i64[1] loc("last")
  %ax = Constant() {value=dense<i64[2]>[2, 4]} : i64[2] loc("ax")
  %rep = Constant() {value=dense<i64[5]>[1, 1, 1, 1, 2]} : i64[5] loc("rep")
  %flat = Constant() {value=dense<i64[4]>[1, -1, 1, 4]} : i64[4] loc("flat")
  %flat2 = Constant() {value=dense<i64[4]>[0, 0, 0, 4]} : i64[4] loc("flat2")
  %rows = Gather(@table, %pos) {axis=0} : f32[1, seq, 4] loc("rows")
  %sin, %cos = Split(%rows) {axis=2, num_outputs=2} : f32[1, seq, 2], f32[1, seq, 2] loc("sincos")
  %c5 = Unsqueeze(%cos, %ax) : f32[1, seq, 1, 2, 1] loc("c5")
  %ce = Expand(%c5, %rep) : f32[1, seq, 1, 2, 2] loc("ce")
  %c4 = Reshape(%ce, %flat) : f32[1, seq, 1, 4] loc("c4")
  %s5 = Unsqueeze(%sin, %ax) : f32[1, seq, 1, 2, 1] loc("s5")
  %se = Expand(%s5, %rep) : f32[1, seq, 1, 2, 2] loc("se")
  %s4 = Reshape(%se, %flat) : f32[1, seq, 1, 4] loc("s4")
  %xr = Slice(%x, %z, %r, %last) : f32[batch, seq, 2, 4] loc("xr")
  %xp = Slice(%x, %r, %e, %last) : f32[batch, seq, 2, 4] loc("xp")
  %ev = Slice(%xr, %z, %r, %last, %two) : f32[batch, seq, 2, 2] loc("even")
  %od = Slice(%xr, %one, %r, %last, %two) : f32[batch, seq, 2, 2] loc("odd")
  %no = Neg(%od) : f32[batch, seq, 2, 2] loc("neg")
  %no5 = Unsqueeze(%no, %last) : f32[batch, seq, 2, 2, 1] loc("no5")
  %ev5 = Unsqueeze(%ev, %last) : f32[batch, seq, 2, 2, 1] loc("ev5")
  %st = Concat(%no5, %ev5) {axis=-1} : f32[batch, seq, 2, 2, 2] loc("stack")
  %rot = Reshape(%st, %flat2) : f32[batch, seq, 2, 4] loc("rot")
  %a = Mul(%xr, %c4) : f32[batch, seq, 2, 4] loc("xc")
  %b = Mul(%rot, %s4) : f32[batch, seq, 2, 4] loc("rs")
  %y = Add(%a, %b) : f32[batch, seq, 2, 4] loc("y")
  %cat = Concat(%y, %xp) {axis=-1} : f32[batch, seq, 2, 8] loc("cat")
  %out = Transpose(%cat) {perm=[0, 2, 1, 3]} : f32[batch, 2, seq, 8] loc("bnsh")
  return %out
}
'''

# Cohere's spelling: BNSH heads; cos/sin = Cos/Sin(repeat_interleave(angles)) unsqueezed at the heads axis
ROTARY_PAIRS_BNSH = '''graph @g(%x: f32[batch, 2, seq, 4], %f: f32[1, seq, 2]) -> (f32[batch, 2, seq, 4]) {
  %z = Constant() {value=dense<i64[1]>[0]} : i64[1] loc("z")
  %one = Constant() {value=dense<i64[1]>[1]} : i64[1] loc("one")
  %two = Constant() {value=dense<i64[1]>[2]} : i64[1] loc("two")
  %r = Constant() {value=dense<i64[1]>[4]} : i64[1] loc("r")
  %last = Constant() {value=dense<i64[1]>[-1]} : i64[1] loc("last")
  %ax = Constant() {value=dense<i64[1]>[3]} : i64[1] loc("ax")
  %rep = Constant() {value=dense<i64[4]>[1, 1, 1, 2]} : i64[4] loc("rep")
  %flat = Constant() {value=dense<i64[3]>[1, -1, 4]} : i64[3] loc("flat")
  %flat2 = Constant() {value=dense<i64[4]>[0, 0, 0, 4]} : i64[4] loc("flat2")
  %f4 = Unsqueeze(%f, %ax) : f32[1, seq, 2, 1] loc("f4")
  %fe = Expand(%f4, %rep) : f32[1, seq, 2, 2] loc("fe")
  %emb = Reshape(%fe, %flat) : f32[1, seq, 4] loc("emb")
  %cos = Cos(%emb) : f32[1, seq, 4] loc("cos")
  %sin = Sin(%emb) : f32[1, seq, 4] loc("sin")
  %c4 = Unsqueeze(%cos, %one) : f32[1, 1, seq, 4] loc("c4")
  %s4 = Unsqueeze(%sin, %one) : f32[1, 1, seq, 4] loc("s4")
  %ev = Slice(%x, %z, %r, %last, %two) : f32[batch, 2, seq, 2] loc("even")
  %od = Slice(%x, %one, %r, %last, %two) : f32[batch, 2, seq, 2] loc("odd")
  %no = Neg(%od) : f32[batch, 2, seq, 2] loc("neg")
  %no5 = Unsqueeze(%no, %last) : f32[batch, 2, seq, 2, 1] loc("no5")
  %ev5 = Unsqueeze(%ev, %last) : f32[batch, 2, seq, 2, 1] loc("ev5")
  %st = Concat(%no5, %ev5) {axis=-1} : f32[batch, 2, seq, 2, 2] loc("stack")
  %rot = Reshape(%st, %flat2) : f32[batch, 2, seq, 4] loc("rot")
  %a = Mul(%x, %c4) : f32[batch, 2, seq, 4] loc("xc")
  %b = Mul(%rot, %s4) : f32[batch, 2, seq, 4] loc("rs")
  %y = Add(%a, %b) : f32[batch, 2, seq, 4] loc("y")
  return %y
}
'''


def test_interleaved_partial_rotary_before_the_permute_is_one_op():
    """GPT-J's rotation of pairs (x[2i], x[2i+1]), on part of each head and before the permute
    to BNSH, becomes one graphopt.RotaryEmbedding{interleaved=1, rotary_embedding_dim=4} reading
    the permuted head (the permute absorbed); the same outputs before and after. Pairs rotated
    the wrong way round are no rotation and stay as they are."""
    from graphopt.interpreter import run

    angles = np.arange(16, dtype=np.float64)[:, None] * np.array([1.0, 0.1])
    W["table"] = np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 5, 2, 8)).astype(np.float32), "pos": np.array([[0, 3, 4, 5, 9]], np.int64)}
    before = run(parse_graph(ROTARY_PAIRS, weights=W), feeds)["out"]
    g, _, rec = run_text(ROTARY_PAIRS, "fuse-rotary,dce")
    assert rec.stats == {"rotary-interleaved": 1}
    rope = [n for n in g.nodes if n.op == "graphopt.RotaryEmbedding"]
    assert len(rope) == 1 and rope[0].attr("interleaved") == 1 and rope[0].attr("rotary_embedding_dim") == 4
    assert rope[0].outputs[0] is g.outputs[0] and not {"Neg", "Concat", "Mul"} & set(ops(g))
    np.testing.assert_allclose(run(g, feeds)["out"], before, rtol=0, atol=1e-6)
    # the rotation alone (whole x, no permute after it): the op between Transposes
    alone = ROTARY_PAIRS.replace("%out = Transpose(%cat) {perm=[0, 2, 1, 3]} : f32[batch, 2, seq, 8]",
                                 "%out = Mul(%y, %y) : f32[batch, seq, 2, 4]").replace(
        "-> (f32[batch, 2, seq, 8])", "-> (f32[batch, seq, 2, 4])")
    want = run(parse_graph(alone, weights=W), feeds)["out"]
    g, _, rec = run_text(alone, "fuse-rotary,dce")
    assert rec.stats == {"rotary-interleaved": 1} and "Neg" not in ops(g)
    assert [n.attr("rotary_embedding_dim", 0) for n in g.nodes if n.op == "graphopt.RotaryEmbedding"] == [0]
    np.testing.assert_allclose(run(g, feeds)["out"], want, rtol=0, atol=1e-6)
    swapped = ROTARY_PAIRS.replace("%st = Concat(%no5, %ev5)", "%st = Concat(%ev5, %no5)")
    g, _, rec = run_text(swapped, "fuse-rotary")
    assert "graphopt.RotaryEmbedding" not in ops(g) and not rec.changed


def test_interleaved_rotary_of_repeated_angles():
    """Cohere's spelling (BNSH, cos = Cos(repeat_interleave(angles))): the op takes Cos(angles)
    and Sin(angles) as its half-size caches; the same outputs before and after. Angles not
    repeated pairwise (Concat(f, f): the halves' caches) are not taken for the pairs."""
    from graphopt.interpreter import run

    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 2, 5, 4)).astype(np.float32),
             "f": (np.arange(5)[None, :, None] * np.array([1.0, 0.1])).astype(np.float32)}
    before = run(parse_graph(ROTARY_PAIRS_BNSH, weights=W), feeds)["y"]
    g, _, rec = run_text(ROTARY_PAIRS_BNSH, "fuse-rotary,dce")
    assert rec.stats == {"rotary-interleaved": 1}
    assert sorted(o for o in ops(g) if o != "Constant") == ["Cos", "Sin", "graphopt.RotaryEmbedding"]
    np.testing.assert_allclose(run(g, feeds)["y"], before, rtol=0, atol=1e-6)
    halves = ROTARY_PAIRS_BNSH.replace("%emb = Reshape(%fe, %flat) : f32[1, seq, 4]",
                                       "%emb = Concat(%f, %f) {axis=-1} : f32[1, seq, 4]")
    g, _, rec = run_text(halves, "fuse-rotary")
    assert "graphopt.RotaryEmbedding" not in ops(g)
    assert reasons(rec) == ["the cos/sin caches are not [batch, seq, rot/2] tensors repeated pairwise "
                            "and unsqueezed at a heads axis"]


# ---- real models -----------------------------------------------------------------------------

LAYERS = 2
EXPECTED = {  # what the default recipe must fuse in each family (2 layers)
    "gpt2": {"graphopt.Attention": 2, "norms": 5, "gelu": 2},
    "bert": {"graphopt.Attention": 2, "norms": 5, "gelu": 2},
    "llama": {"graphopt.Attention": 2, "norms": 5, "graphopt.RotaryEmbedding": 4, "graphopt.GatedLinear": 2},
    "mistral": {"graphopt.Attention": 2, "norms": 5, "graphopt.RotaryEmbedding": 4, "graphopt.GatedLinear": 2},
    "qwen2": {"graphopt.Attention": 2, "norms": 5, "graphopt.RotaryEmbedding": 4, "graphopt.GatedLinear": 2},
    # families no issue names: fused QKV/gate-up weights (phi3), (1 + w) RMSNorm and GeGLU (gemma),
    # partial rotary and parallel residual (gpt_neox)
    "phi3": {"graphopt.Attention": 2, "norms": 5, "graphopt.RotaryEmbedding": 4},
    "gemma": {"graphopt.Attention": 2, "norms": 5, "graphopt.RotaryEmbedding": 4, "graphopt.GatedLinear": 2},
    "gpt_neox": {"graphopt.Attention": 2, "graphopt.RotaryEmbedding": 4},
}


def fused_counts(graph) -> dict:
    import collections

    c = collections.Counter(n.op for n in graph.nodes)
    gelu = sum(1 for n in graph.nodes if n.op == "graphopt.Linear" and n.attr("activation", "").startswith("gelu"))
    gelu += c["Gelu"]
    norms = c["LayerNormalization"] + c["graphopt.RMSNorm"] + c["graphopt.SkipNorm"]
    return {"graphopt.Attention": c["graphopt.Attention"], "norms": norms, "gelu": gelu,
            "graphopt.RotaryEmbedding": c["graphopt.RotaryEmbedding"], "graphopt.GatedLinear": c["graphopt.GatedLinear"]}


@pytest.mark.parametrize("arch, exporter", [(a, e) for a in ("gpt2", "llama", "bert") for e in ("dynamo", "torchscript")]
                         + [(a, "dynamo") for a in ("mistral", "qwen2", "phi3", "gemma", "gpt_neox")])
def test_default_recipe_fuses_every_layer(arch, exporter, exported, tmp_path):
    import graphopt
    from graphopt.testing import assert_close, export_onnx, tiny_hf_model, token_feeds, torch_outputs

    if arch in ("gpt2", "llama", "bert"):
        module, path = exported(arch, exporter)
    else:
        module = tiny_hf_model(arch)
        path = export_onnx(module, tmp_path / f"{arch}.onnx", dynamo=True)
    result = graphopt.optimize(path, None, check_numerics=True)
    counts = fused_counts(result.graph)
    for key, want in EXPECTED[arch].items():
        assert counts[key] == want, f"{arch}/{exporter}: {key} = {counts[key]}, expected {want} ({counts})"
    from graphopt.interpreter import run

    for batch, seq in [(2, 8), (3, 5)]:
        feeds = token_feeds(batch, seq)
        assert_close(run(result.graph, feeds)["output"], torch_outputs(module, feeds), rtol=0, atol=1e-4,
                     what=f"{arch}/{exporter} fused graph vs PyTorch at {batch}x{seq}")


INTERLEAVED = {  # small random configs whose Q, K and V come out of one projection head by head
    "bloom": ("BloomForCausalLM", dict(hidden_size=64, n_head=4, n_layer=2, vocab_size=128)),  # [.., heads, 3, head]
    "falcon": ("FalconForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                                         new_decoder_architecture=False, multi_query=False)),  # [.., heads, 3 * head]
    # [.., heads + 2, head]: the columns in order already, Q, K and V Slices of the heads axis
    "falcon_mqa": ("FalconForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                                             new_decoder_architecture=False, multi_query=True)),
}


@pytest.mark.parametrize("arch", ["bloom", "falcon", "falcon_mqa", "gpt_neox", "llama"])
def test_interleaved_heads_become_blocks_and_the_attention_3d(arch, exported, tmp_path):
    """BLOOM's, Falcon's and GPT-NeoX's projection interleaves Q, K and V head by head: its weight
    columns are reordered into blocks (Falcon's with one key/value head holds them in order: only the
    views change; GPT-NeoX's partial rotary is one RotaryEmbedding on the whole head first), the graph computes the same before and after on the same inputs, and
    attention-to-3d then takes every attention 3-D. Llama's projections are blocks already: nothing
    to do."""
    from graphopt.interpreter import run
    from graphopt.models import load_graph
    from graphopt.passes.fusion import FUSION_PIPELINE
    from graphopt.testing import assert_close, token_feeds

    if arch in INTERLEAVED:
        import torch
        import transformers as tf

        cls_name, config = INTERLEAVED[arch]
        cls = getattr(tf, cls_name)
        torch.manual_seed(0)
        cls(cls.config_class(**config)).eval().save_pretrained(tmp_path / arch)
        graph = load_graph(tmp_path / arch)
    else:
        graph = load_graph(exported(arch, "dynamo")[1])
    upto = FUSION_PIPELINE[:FUSION_PIPELINE.index(",split-interleaved-heads")]
    before = PassManager(f"fold-constants,simplify-shapes,eliminate-dead-code,{upto}").run(graph)
    pm = PassManager("split-interleaved-heads,attention-to-3d")
    after = pm.run(before.copy())
    layers = sum(n.op == "graphopt.Attention" for n in before.nodes)
    assert layers == 2
    assert pm.records[0].stats.get("projections-split", 0) == (0 if arch == "llama" else layers)
    ranks = [n.inputs[0].type.rank for n in after.nodes if n.op == "graphopt.Attention"]
    assert ranks == [3] * layers, ranks
    out = after.outputs[0].name
    for batch, seq in [(2, 8), (3, 5)]:
        feeds = token_feeds(batch, seq)
        feeds = {v.name: feeds[v.name] if v.name in feeds else np.ones((batch, seq), np.int64)
                 for v in before.inputs if not v.is_initializer}
        assert_close(run(after, feeds)[out], run(before, feeds)[out], rtol=0, atol=1e-5,
                     what=f"{arch} at {batch}x{seq}")


def test_explain_fusions_names_the_broken_constraint(exported, tmp_path):
    """A model whose attention was deliberately broken (a Relu before the softmax)."""
    from click.testing import CliRunner

    from graphopt.cli import cli
    from graphopt.models import load_graph
    from graphopt.onnx_io import save_onnx

    g = load_graph(exported("gpt2", "dynamo")[1])
    softmax = next(n for n in g.nodes if n.op_type == "Softmax")
    from graphopt.builder import Builder

    relu = Builder(g, before=softmax).Relu(softmax.inputs[0])
    softmax.set_input(0, relu)
    relu.producer().name = "deliberately_broken"
    save_onnx(g, tmp_path / "broken.onnx")
    r = CliRunner().invoke(cli, ["optimize", str(tmp_path / "broken.onnx"), "-o", str(tmp_path / "out"),
                                 "--explain-fusions", "-q"])
    assert r.exit_code == 0, r.output
    assert "fuse-attention: attention x1" in r.output
    assert "1 near miss [attention] unexpected Relu between MatMul(Q, K) and Softmax  (e.g. deliberately_broken, Relu)" \
        in r.output
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    misses = report["fusions"]["fuse-attention"]["near_misses"]
    assert {"node": "deliberately_broken", "op": "Relu", "reason": "unexpected Relu between MatMul(Q, K) and Softmax",
            "rule": "attention"} in misses


PAIRS = {  # small random configs whose rotary turns pairs (x[2i], x[2i+1])
    # a quarter of each [batch, seq, heads, head] head, before the permute; rows of a sin/cos table
    "gptj": ("GPTJForCausalLM", dict(n_embd=64, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, vocab_size=128)),
    # the whole BNSH head; Cos/Sin of repeated angles; grouped key/value heads
    "cohere": ("CohereForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, intermediate_size=128, vocab_size=128)),
    # half of each BNSH head (a Slice of Cos(Concat(f, f)) repeated pairwise)
    "glm": ("GlmForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   num_hidden_layers=2, intermediate_size=128, vocab_size=128, pad_token_id=0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(PAIRS))
def test_rotary_of_pairs_is_one_op_and_the_attention_3d(arch, tmp_path):
    """GPT-J's, Cohere's and GLM's rotary (pairs, partial in GPT-J and GLM) become one
    graphopt.RotaryEmbedding{interleaved=1} for each of Q and K (no Neg left), the graph computes
    the same before and after fuse-rotary, and the default recipe then takes every attention 3-D
    (they stayed 4-D, the rotation elementwise, before)."""
    import torch
    import transformers as tf

    from graphopt.driver import default_pipeline
    from graphopt.interpreter import run
    from graphopt.models import load_graph
    from graphopt.testing import assert_close, token_feeds

    cls_name, config = PAIRS[arch]
    cls = getattr(tf, cls_name)
    torch.manual_seed(0)
    cls(cls.config_class(**config)).eval().save_pretrained(tmp_path / arch)
    graph = load_graph(tmp_path / arch)
    before = PassManager("fold-constants,simplify-shapes,eliminate-dead-code").run(graph)
    pm = PassManager("fuse-rotary,eliminate-dead-code")
    after = pm.run(before.copy())
    assert pm.records[0].stats == {"rotary-interleaved": 4}
    ropes = [n for n in after.nodes if n.op == "graphopt.RotaryEmbedding"]
    assert len(ropes) == 4 and all(n.attr("interleaved") == 1 for n in ropes) and not any(n.op == "Neg" for n in after.nodes)
    out = after.outputs[0].name
    for batch, seq in [(2, 8), (3, 5)]:
        feeds = token_feeds(batch, seq)
        feeds = {v.name: feeds[v.name] if v.name in feeds else np.ones((batch, seq), np.int64)
                 for v in before.inputs if not v.is_initializer}
        assert_close(run(after, feeds)[out], run(before, feeds)[out], rtol=0, atol=1e-5, what=f"{arch} at {batch}x{seq}")
    fused = PassManager(default_pipeline()).run(graph)
    assert [n.inputs[0].type.rank for n in fused.nodes if n.op == "graphopt.Attention"] == [3, 3]
