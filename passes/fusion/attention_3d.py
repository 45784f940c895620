"""attention-to-3d: 4-D (BNSH) graphopt.Attention with the head split and merge around it ->
3-D (BSD) attention, the form fused kernels take.

When Q, K and V come from 3-D projections through the usual head split (Reshape -> Transpose
to BNSH, checked by running the slice on probe tensors) and the output goes straight back to
3-D (Transpose -> Reshape), the split and merge move into the op; a RotaryEmbedding on the
heads moves before the split (graphopt.RotaryEmbedding takes [batch, seq, hidden] with
num_heads). So does an RMSNorm over each head (Qwen3's, OLMo 2's norm on Q and K), which is over
the last axis whether the heads come before the sequence or after it: it runs on
[batch, seq, heads, head_size], a view of the projection. Layout chains that fuse-attention
left dead count as other uses of Q/K/V: the default recipe runs eliminate-dead-code between
the two.
"""
from __future__ import annotations

import numpy as np

from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.layout import computes, layout_ancestors, merge_heads, split_heads, split_heads_bshd
from graphopt.ops.attention import attention_operands, reads_a_cache, sinks_of
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Fail, Rewriter, constant_value, remove_dead, replace_value


def match_3d(node: Node):
    """(q3, k3, v3, y3, mask, ropes) when the attention's Q/K/V come from 3-D tensors through
    the usual head split and its output goes straight back to 3-D; else a `Fail`."""
    q, k, v = node.inputs[:3]
    nq, nkv = node.attr("num_heads"), node.attr("kv_num_heads")
    if reads_a_cache(node) or len(node.outputs) > 1 or q.type is None or q.type.rank != 4:
        return Fail("not a 4-D attention without cache", node)
    found, ropes = [], []
    for t, heads in ((q, nq), (k, nkv), (v, nkv)):
        rope = _rope_on_heads(t)
        base = rope.inputs[0] if rope is not None else t
        norm, src = _normed_split(base, heads)
        if norm is None:
            src = next((a for a in layout_ancestors(base) if a.type is not None and a.type.rank == 3
                        and computes(a, base, split_heads(heads))), None)
        if src is None:
            return Fail(f"{base.name!r} is not a head split of a 3-D tensor", node)
        found.append(src)
        ropes.append((rope, heads, norm))
    y = node.outputs[0]
    cur, y3 = y, None
    for _ in range(3):
        if len(cur.uses()) != 1 or cur.is_graph_output:
            break
        nxt = cur.uses()[0][0]
        if nxt.domain != "" or nxt.op_type not in ("Transpose", "Reshape"):
            break
        cur = nxt.outputs[0]
        if cur.type is not None and cur.type.rank == 3 and computes(y, cur, merge_heads):
            y3 = cur
            break
        if cur.type is not None and cur.type.rank == 2 and computes(y, cur, _merge_heads_2d):
            y3 = cur  # merged and flattened to [batch * seq, hidden] (GPT-2's Conv1D does this)
            break
    if y3 is None:
        return Fail("the output is not merged back to 3-D", node)
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    return found + [y3, mask, ropes]


def _rope_on_heads(t: Value) -> Node | None:
    """The RotaryEmbedding producing t from a 4-D tensor, when nothing else reads t (rotary is
    per position and head, so it can move before the head split: graphopt.RotaryEmbedding takes
    [batch, seq, heads * head_size] with num_heads)."""
    n = t.producer()
    if n is None or n.op_type != "RotaryEmbedding" or n.domain != GRAPHOPT_DOMAIN:
        return None
    x = n.inputs[0]
    if x.type is None or x.type.rank != 4 or len(t.uses()) != 1 or t.is_graph_output:
        return None
    return n


def _to_bnsh(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 1, 3)


def _normed_split(base: Value, heads: int) -> tuple[Node | None, Value | None]:
    """(the RMSNorm, the 3-D tensor) when `base` is a head split of a 3-D tensor with an RMSNorm
    over each head on the way, before the transpose to [batch, heads, seq, head] (Qwen3's) or
    after it (the norm's scale a constant of the head size, nothing else reading its output);
    else (None, None). The norm is over the last axis either way, so it moves to the view."""
    n, v = None, base
    for _ in range(3):  # up through the layout ops that follow the norm
        p = v.producer()
        if p is None or len(v.uses()) != 1 or v.is_graph_output:
            return None, None
        if p.domain == GRAPHOPT_DOMAIN and p.op_type == "RMSNorm":
            n = p
            break
        if p.domain != "" or p.op_type not in ("Transpose", "Reshape"):
            return None, None
        v = p.inputs[0]
    if n is None:
        return None, None
    x = n.inputs[0]
    scale = constant_value(n.inputs[1]) if len(n.inputs) > 1 else None
    if x.type is None or x.type.rank != 4 or not isinstance(x.type.shape[-1], int) or n.attr("axis", -1) not in (-1, 3) \
            or scale is None or scale.size != x.type.shape[-1]:
        return None, None
    y = n.outputs[0]
    for before, after in ((split_heads(heads), None), (split_heads_bshd(heads), _to_bnsh)):
        if (after is None and y is not base) or (after is not None and not computes(y, base, after)):
            continue
        src = next((a for a in layout_ancestors(x) if a.type is not None and a.type.rank == 3
                    and computes(a, x, before)), None)
        if src is not None:
            return n, src
    return None, None


def _merge_heads_2d(x: np.ndarray) -> np.ndarray:
    m = merge_heads(x)
    return m.reshape(-1, m.shape[-1])


def rewrite_3d(graph: Graph, node: Node, found) -> None:
    q3, k3, v3, y3, mask, ropes = found
    rw = Rewriter(graph, y3.producer(), "attention-to-3d")
    attrs = {k: a.value for k, a in node.attrs.items()}
    moved = []
    for i, (rope, heads, norm) in enumerate(ropes):
        if norm is not None:  # each head's norm on [batch, seq, heads, head_size], a view of the 3-D tensor
            t3 = (q3, k3, v3)[i]
            head = norm.inputs[0].type.shape[-1]
            t4 = rw.Reshape(t3, rw.const(np.array([0, 0, heads, head], np.int64), "heads_shape"))
            normed = rw.op("RMSNorm", t4, *norm.inputs[1:], domain=GRAPHOPT_DOMAIN,
                           **{k: a.value for k, a in norm.attrs.items()})
            new = rw.Reshape(normed, rw.const(np.array([0, 0, heads * head], np.int64), "hidden_shape"))
            q3, k3, v3 = [new if j == i else t for j, t in enumerate((q3, k3, v3))]
            moved.append(norm)
        if rope is None:
            continue
        rattrs = {k: a.value for k, a in rope.attrs.items()}
        rattrs["num_heads"] = heads
        src = (q3, k3, v3)[i]
        new = rw.op("RotaryEmbedding", src, *rope.inputs[1:], domain=GRAPHOPT_DOMAIN, **rattrs)
        q3, k3, v3 = [new if j == i else t for j, t in enumerate((q3, k3, v3))]
        moved.append(rope)
    ins = attention_operands(q3, k3, v3, mask, sinks=sinks_of(node))
    y = rw.op("Attention", *ins, domain=GRAPHOPT_DOMAIN, **attrs)
    if y3.type is not None and y3.type.rank == 2:
        y = rw.Reshape(y, rw.const(np.array([-1, y.type.shape[-1]], np.int64), "flatten"))
    replace_value(graph, y3, y)
    chain = []
    cur = node.outputs[0]
    while cur is not y3:
        nxt = cur.uses()[0][0] if cur.uses() else None
        if nxt is None:
            break
        chain.append(nxt)
        cur = nxt.outputs[0]
    producers = [t.producer() for t in node.inputs[:3] if t.producer() is not None]
    producers += [r.inputs[0].producer() for r in moved if r.inputs[0].producer() is not None]
    remove_dead(graph, [node] + chain + moved + producers)


@register_pass("attention-to-3d")
class AttentionTo3D(Pass):
    """Absorb the head split and merge around a 4-D graphopt.Attention into a 3-D one.

    Before:  %q4 = Transpose(Reshape(%q, @[0, 0, 4, 8])) {perm=[0, 2, 1, 3]}  (and k, v)
             %o4 = graphopt.Attention(%q4, %k4, %v4) {num_heads=4}
             %o = Reshape(Transpose(%o4) {perm=[0, 2, 1, 3]}, @[0, 0, 32])
    After:   %o = graphopt.Attention(%q, %k, %v) {num_heads=4}
    """

    category = "fusion"
    requires = ("fuse-attention",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(graph.nodes):
            if node.graph is not graph or node.op_type != "Attention" or node.domain != GRAPHOPT_DOMAIN:
                continue
            found = match_3d(node)
            if isinstance(found, Fail):
                result.near_miss("attention-to-3d", found.node, found.reason)
                continue
            rewrite_3d(graph, node, found)
            result.count("attention-to-3d")
        return result


__all__ = ["AttentionTo3D", "match_3d", "rewrite_3d"]
