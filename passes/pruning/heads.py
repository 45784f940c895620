"""prune-heads: remove whole attention heads (for grouped-query attention, whole key/value
groups with their query heads), shrinking the merged Q/K/V projection and the output projection.

    Before:  %qkv = graphopt.Linear(%x, @w_qkv)                      : f32[b, s, 64]   (Q 32 | K 16 | V 16)
             %q, %k, %v = Split(%qkv, @split_sizes) {axis=-1}
             %q_r = graphopt.RotaryEmbedding(%q, %cos, %sin) {num_heads=4}
             %k_r = graphopt.RotaryEmbedding(%k, %cos, %sin) {num_heads=2}
             %a = graphopt.Attention(%q_r, %k_r, %v, %mask) {num_heads=4, kv_num_heads=2} : f32[b, s, 32]
             %y = MatMul(%a, @w_o)
    After (ratio=0.5):
             %qkv = graphopt.Linear(%x, @w_qkv_pruned)               : f32[b, s, 32]   (Q 16 | K 8 | V 8)
             %q, %k, %v = Split(%qkv, @split_sizes_pruned) {axis=-1}
             ... {num_heads=2} ... {num_heads=1} ...
             %a = graphopt.Attention(%q_r, %k_r, %v, %mask) {num_heads=2, kv_num_heads=1} : f32[b, s, 16]
             %y = MatMul(%a, @w_o_pruned)

Sites: graphopt.Attention in its 3-D form (Q, K, V as [batch, seq, heads * head_dim]) after the
default recipe: Q, K and V are the three outputs of one Split (Q and K maybe through
graphopt.RotaryEmbedding) of one graphopt.Linear with a constant weight, and the attention's
output is read only by the output projection (graphopt.Linear or MatMul by a constant matrix).
The unit removed is a KV group: KV head j with the query heads j*G .. j*G+G-1 that read it
(G = num_heads / kv_num_heads, as graphopt.Attention repeats KV heads); for multi-head
attention a group is one head. Removing a group removes its columns of the Q/K/V projection
(and bias) and its rows of the output projection; the Split sizes, the rotary and attention
head counts and the value types follow.

Preconditions (checked per site; a site that fails one is reported in `details`): the
weights are constant initializers, every value between the projection and the attention is
read once, a mask does not vary per head, the attention has no cache inputs.

Options:
  ratio       the fraction of each layer's KV groups to remove (floor), 0 <= ratio < 1; 0 is
              an exact no-op
  importance  magnitude: a group's score is the L2 norm of all its weights (its Q, K, V
              columns and its output-projection rows); wanda: per attention-output column,
              its activations' norm over the calibration data times the L1 norm of its
              output-projection row, summed over the group
  scope       layer: every layer loses floor(ratio * its groups); global: the lowest
              floor(ratio * all groups) of the whole model go, each layer keeping min-keep
  min-keep    the fewest KV groups a layer keeps (at least 1)

Statistics: `layers` pruned, `heads` (query heads) and `kv-heads` removed, `parameters` removed.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from graphopt.passes.pruning.common import (
    StructuredPruning,
    replace_weight,
    set_last_dim,
)

from graphopt.ir import GRAPHOPT_DOMAIN, Attr, Graph, Node, Value
from graphopt.pass_manager import PassResult, register_pass

G = GRAPHOPT_DOMAIN


@dataclasses.dataclass
class HeadSite:
    attention: Node
    qkv: Node                 # the merged projection
    split: Node
    ropes: list[Node]         # RotaryEmbedding nodes on Q and K (0, 1 or 2)
    out: Node                 # the output projection
    num_heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.kv_heads


def _const_matrix(v: Value | None) -> np.ndarray | None:
    if v is None or not v.is_initializer or v.const_value is None or v.const_value.ndim != 2:
        return None
    return v.const_value


def _single_use(v: Value) -> bool:
    return len(v.uses()) == 1 and not v.is_graph_output


def find_site(attn: Node) -> HeadSite | str | None:
    """The prunable attention at `attn`, why it is not one, or None when it is no
    graphopt.Attention (pure: it never mutates)."""
    if attn.domain != G or attn.op_type != "Attention":
        return None
    ins = list(attn.inputs)
    if len(ins) > 4:
        return "the attention has cache inputs"
    q, k, v = ins[:3]
    if q.type is None or q.type.rank != 3 or not isinstance(q.type.shape[-1], int):
        return "not the 3-D form with a static hidden size"
    nq = attn.attr("num_heads", 0)
    nkv = attn.attr("kv_num_heads", 0) or nq
    if nq <= 0 or nq % nkv or q.type.shape[-1] % nq:
        return "the head counts are missing or do not divide"
    if len(ins) > 3 and ins[3] is not None:
        mask = ins[3].type
        if mask is None or mask.shape is None or (mask.rank == 4 and mask.shape[1] != 1):
            return "the mask may vary per head"
    ropes, split_outs = [], []
    for t in (q, k, v):
        p = t.producer()
        if p is not None and p.domain == G and p.op_type == "RotaryEmbedding" and t is not v:
            if not _single_use(t):
                return "a rotary output has other readers"
            ropes.append(p)
            t = p.inputs[0]
        split_outs.append(t)
    split = split_outs[0].producer()
    if split is None or split.op_type != "Split" or split.domain != "" or len(split.outputs) != 3:
        return "Q, K and V are not the three outputs of one Split"
    if [o for o in split.outputs] != split_outs:
        return "Q, K and V are not the Split's outputs in order"
    if any(not _single_use(o) for o in split_outs):
        return "a Split output has other readers"
    if split.attr("axis", 0) not in (-1, 2):
        return "the Split is not over the hidden axis"
    qkv = split.inputs[0].producer()
    if qkv is None or qkv.domain != G or qkv.op_type != "Linear" or qkv.attr("activation", ""):
        return "the Split's input is not a graphopt.Linear without activation"
    if not _single_use(qkv.outputs[0]):
        return "the Q/K/V projection has other readers"
    if _const_matrix(qkv.inputs[1]) is None:
        return "the Q/K/V weight is not a constant matrix"
    if len(qkv.inputs) > 2 and qkv.inputs[2] is not None and not qkv.inputs[2].is_initializer:
        return "the Q/K/V bias is not a constant"
    a = attn.outputs[0]
    if not _single_use(a) or a.uses()[0][1] != 0:
        return "the attention output has other readers than the output projection"
    out = a.uses()[0][0]
    if not ((out.domain == G and out.op_type == "Linear") or (out.domain == "" and out.op_type == "MatMul")):
        return f"the attention output is read by {out.op}, not an output projection"
    if _const_matrix(out.inputs[1]) is None:
        return "the output weight is not a constant matrix"
    return HeadSite(attn, qkv, split, ropes, out, nq, nkv, q.type.shape[-1] // nq)


def _columns(site: HeadSite, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the merged Q|K|V axis, indices into the output projection's input axis)
    of the KV groups `groups`."""
    d, g, nq = site.head_dim, site.group, site.num_heads
    heads = (groups[:, None] * g + np.arange(g)[None, :]).reshape(-1)
    q_cols = (heads[:, None] * d + np.arange(d)[None, :]).reshape(-1)
    kv_cols = (groups[:, None] * d + np.arange(d)[None, :]).reshape(-1)
    nk = site.kv_heads * d
    return np.concatenate([q_cols, nq * d + kv_cols, nq * d + nk + kv_cols]), q_cols


def _axes(node: Node) -> tuple[int, int]:
    """(input axis, output axis) of a Linear/MatMul weight."""
    return (1, 0) if node.attr("trans_w", 0) else (0, 1)


def group_importance(site: HeadSite) -> np.ndarray:
    """Magnitude: the L2 norm of every weight of each KV group (Q, K, V columns, output rows)."""
    w_qkv = site.qkv.inputs[1].const_value.astype(np.float64)
    w_out = site.out.inputs[1].const_value.astype(np.float64)
    scores = np.zeros(site.kv_heads)
    for j in range(site.kv_heads):
        cols, rows = _columns(site, np.array([j]))
        scores[j] = np.sqrt((np.take(w_qkv, cols, axis=_axes(site.qkv)[1]) ** 2).sum()
                            + (np.take(w_out, rows, axis=_axes(site.out)[0]) ** 2).sum())
    return scores


def group_wanda(site: HeadSite, sq_norm: np.ndarray) -> np.ndarray:
    """Wanda (structured): the summed |W| * ||x|| of the output-projection weights a KV group
    takes with it -- per attention-output column r, ||a_r|| over the calibration tokens times
    the L1 norm of row r, summed over the group's columns."""
    w = np.abs(site.out.inputs[1].const_value.astype(np.float64))
    per_column = np.sqrt(sq_norm) * w.sum(axis=_axes(site.out)[1])
    return np.array([per_column[_columns(site, np.array([j]))[1]].sum() for j in range(site.kv_heads)])


def prune_site(graph: Graph, site: HeadSite, keep: np.ndarray) -> None:
    cols, rows = _columns(site, keep)
    qkv, split, attn = site.qkv, site.split, site.attention
    replace_weight(graph, qkv, 1, np.take(qkv.inputs[1].const_value, cols, axis=_axes(qkv)[1]))
    if len(qkv.inputs) > 2 and qkv.inputs[2] is not None:
        replace_weight(graph, qkv, 2, np.take(qkv.inputs[2].const_value, cols, axis=-1))
    replace_weight(graph, site.out, 1, np.take(site.out.inputs[1].const_value, rows, axis=_axes(site.out)[0]))
    nq, nkv, d = len(keep) * site.group, len(keep), site.head_dim
    set_last_dim(qkv.outputs[0], len(cols))
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        replace_weight(graph, split, 1, np.array([nq * d, nkv * d, nkv * d], np.int64))
    for o, n in zip(split.outputs, (nq * d, nkv * d, nkv * d)):
        set_last_dim(o, n)
    for rope in site.ropes:
        heads = nq if rope.outputs[0] is attn.inputs[0] else nkv
        rope.attrs["num_heads"] = Attr.int(heads)
        set_last_dim(rope.outputs[0], heads * d)
    attn.attrs["num_heads"] = Attr.int(nq)
    attn.attrs["kv_num_heads"] = Attr.int(nkv)
    set_last_dim(attn.outputs[0], nq * d)


@register_pass("prune-heads")
class PruneHeads(StructuredPruning):
    """Remove the least important attention heads (whole KV groups) of every attention layer.

    Before:  %a = graphopt.Attention(%q, %k, %v, %mask) {num_heads=4, kv_num_heads=2} : f32[b, s, 32]
    After:   %a = graphopt.Attention(%q, %k, %v, %mask) {num_heads=2, kv_num_heads=1} : f32[b, s, 16]
    """

    requires = ("attention-to-3d", "merge-projections")  # the 3-D attention over one merged Q/K/V Linear

    def find_site(self, node: Node):
        return find_site(node)

    def scores(self, site: HeadSite) -> np.ndarray:
        return group_importance(site)

    def activation(self, site: HeadSite) -> Value:
        return site.attention.outputs[0]

    def wanda_scores(self, site: HeadSite, sq_norm: np.ndarray) -> np.ndarray:
        return group_wanda(site, sq_norm)

    def shrink(self, graph: Graph, site: HeadSite, keep: np.ndarray) -> None:
        prune_site(graph, site, keep)

    def record(self, result: PassResult, node: Node, site: HeadSite, n_remove: int, keep: np.ndarray) -> None:
        result.count("heads", n_remove * site.group)
        result.count("kv-heads", n_remove)
        result.details.append({"node": node.name, "op": node.op, "kv_heads": site.kv_heads,
                               "kept": len(keep), "keep": keep.tolist()})
