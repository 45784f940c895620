"""split-interleaved-heads: a projection whose output interleaves Q, K and V head by head ->
its weight's columns reordered so that each is one block, split off as other models' are.

BLOOM, Falcon, GPT-NeoX (Pythia) and Persimmon compute Q, K and V with one projection laid out
per head, `[batch, seq, heads, 3, head]` (or `[.., heads, 3 * head]`, or Falcon's
`[.., heads + 2, head]` with one key/value head), and take each out with a Slice or Gather of
that view. No attention kernel reads such a view, so their attention stayed 4-D, with a
Transpose per input. Only views that an attention reads whole (directly or through a rotary
embedding: fuse-rotary makes GPT-NeoX's partial rotary one RotaryEmbedding on the whole head)
are taken.
Which column of the projection each element of Q, K and V is, is found by running the layout
ops between them on a probe whose every element names its row and column
(`graphopt.layout.probe`); when the values they take are per-token column selections that
together use every column once, the weight's (and bias's) columns are permuted into
[Q heads, K heads, V heads] order and each becomes `Reshape(Split(projection))` to
[batch, seq, heads, head] (Transposed where it was [batch, heads, seq, head]): the usual head
split, which attention-to-3d then moves into the attention. The projection computes the same
numbers, in another order.

    Before:  %qkv = graphopt.Linear(%x, @w, @b)                    f32[batch, seq, 3 * N * D]
             %q = Transpose(Gather(Reshape(%qkv, [0, 0, N, 3, D]), 0, axis=3), [0, 2, 1, 3])
    After:   %qkv = graphopt.Linear(%x, @w_by_block, @b_by_block)
             %q_3d, %k_3d, %v_3d = Split(%qkv, [N * D, N * D, N * D], axis=-1)
             %q = Transpose(Reshape(%q_3d, [0, 0, N, D]), [0, 2, 1, 3])
"""
from __future__ import annotations

import numpy as np

from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, TensorType, Value
from graphopt.layout import computes, layout_ancestors, probe, split_heads, split_heads_bshd
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Rewriter, constant_value, remove_dead

# ops that move the projection's data into the heads' views (their other inputs: constants, shapes)
_VIEWS = {"Reshape", "Transpose", "Slice", "Gather", "Split", "Squeeze", "Unsqueeze"}
_PROBE_LIMIT = 1 << 22  # elements of a probe: [3, 5, 3 * 4096] fits, for 7B-sized heads


def _views_of(out: Value) -> tuple[list[Node], list[Value]] | None:
    """(the view ops reading `out` through views only, the values they hand to anything else), or
    None when a value on the way is read both by views and by something else (or is an output)."""
    nodes, frontier, todo, seen = [], [], [out], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        uses = v.uses()
        views = [u for u, i in uses if u.domain == "" and u.op_type in _VIEWS and i == 0]
        if views and (len(views) != len(uses) or v.is_graph_output):
            return None
        if not views:
            if v is out:
                return None
            frontier.append(v)
            continue
        for u in views:
            if u not in nodes:
                nodes.append(u)
                todo.extend(o for o in u.outputs if o is not None)
    return nodes, frontier


def _feeds_attention(v: Value) -> bool:
    """`v` is read only as a graphopt.Attention's Q, K or V, directly or through a
    RotaryEmbedding whose output is (what attention-to-3d moves before the head split)."""
    for user, index in v.uses():
        if user.domain != GRAPHOPT_DOMAIN:
            return False
        if user.op_type == "RotaryEmbedding" and index == 0 and len(user.outputs[0].uses()) == 1:
            user, index = user.outputs[0].uses()[0]
            if user.domain != GRAPHOPT_DOMAIN:
                return False
        if user.op_type != "Attention" or index > 2:
            return False
    return bool(v.uses()) and not v.is_graph_output


def _head_split(view: Value, heads: int, heads_first: bool) -> bool:
    """`view` is the usual head split of a 3-D tensor ([batch, seq, heads * head] reshaped, and
    transposed where heads come first), as attention-to-3d finds it."""
    fn = split_heads(heads) if heads_first else split_heads_bshd(heads)
    return any(a.type is not None and a.type.rank == 3 and computes(a, view, fn) for a in layout_ancestors(view))


def _numbered(shape: tuple) -> np.ndarray:
    """[b, s, c] -> (b * seq + s) * cols + c: every element names its token and its column."""
    b, s, c = shape
    return np.arange(b * s * c, dtype=np.float64).reshape(shape)


def _columns(out: Value, view: Value) -> tuple[np.ndarray, bool] | None:
    """(columns [heads, head] of `out` that `view` holds at every token, whether `view` is
    [batch, heads, seq, head] rather than [batch, seq, heads, head]); None when it is neither."""
    if view.type is None or view.type.rank != 4:
        return None
    runs = probe(out, view, make=_numbered, limit=_PROBE_LIMIT)
    if runs is None:
        return None
    found = None
    for x, got in runs:
        batch, seq, cols = x.shape
        if got.ndim != 4:
            return None
        values = got.astype(np.int64)
        for heads_first in (True, False):
            v = values.transpose(0, 2, 1, 3) if heads_first else values  # -> [batch, seq, heads, head]
            if v.shape[:2] != (batch, seq):
                continue
            tokens = np.arange(batch * seq).reshape(batch, seq)[:, :, None, None]
            if not (v // cols == tokens).all() or not (v % cols == v[:1, :1] % cols).all():
                continue
            mine = (v[0, 0] % cols, heads_first)
            if found is not None and (found[1] != mine[1] or not np.array_equal(found[0], mine[0])):
                return None
            found = mine
            break
        else:
            return None
    return found


@register_pass("split-interleaved-heads")
class SplitInterleavedHeads(Pass):
    """Reorder a projection's weight columns so that the heads it interleaves (Q, K and V per
    head: BLOOM, Falcon, GPT-NeoX) come out as blocks, split off by one Split and the
    usual head split; the projection computes the same numbers in another order.

    Before:  %q = Transpose(Gather(Reshape(%qkv, [0, 0, N, 3, D]), 0, axis=3), [0, 2, 1, 3])
    After:   %q_3d, %k_3d, %v_3d = Split(%qkv', [N * D] * 3, axis=-1)
             %q = Transpose(Reshape(%q_3d, [0, 0, N, D]), [0, 2, 1, 3])
    """

    category = "fusion"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(graph.nodes):
            if node.graph is not graph or node.domain != GRAPHOPT_DOMAIN or node.op_type != "Linear":
                continue
            why = _split(graph, node)
            if why is None:
                result.count("projections-split")
            elif why:
                result.near_miss("interleaved-heads", node, why)
        return result


def _split(graph: Graph, linear: Node) -> str | None:
    """Rewrite `linear`'s heads as blocks; None when done, "" when it has nothing interleaved, or
    why not."""
    out = linear.outputs[0]
    if out.type is None or out.type.rank != 3 or not isinstance(out.type.shape[-1], int) \
            or out.type.dtype.np_dtype not in (np.float32, np.float64):  # the probe's numbers exact (< 2^24)
        return ""
    found = _views_of(out)
    if found is None or len(found[1]) < 2 or not found[0]:
        return ""
    nodes, views = found
    if not all(_feeds_attention(v) for v in views):
        return ""  # the gain is a 3-D attention; views of part of a head (a partial rotary's) do not give one
    maps = [_columns(out, v) for v in views]
    if any(m is None for m in maps):
        return ""
    # in the order the projection interleaves them (Q, K, V in every family here): the blocks keep
    # it, so a kernel that takes Q, K and V packed (ORT's GroupQueryAttention) reads the projection
    ranked = sorted(range(len(views)), key=lambda i: int(maps[i][0].min()))
    views, maps = [views[i] for i in ranked], [maps[i] for i in ranked]
    cols = out.type.shape[-1]
    order = np.concatenate([m[0].reshape(-1) for m in maps])
    in_order = np.array_equal(order, np.arange(cols))
    if in_order and all(_head_split(v, m[0].shape[0], m[1]) for v, m in zip(views, maps)):
        return ""  # blocks in order, each view already the usual head split: nothing to gain
    if len(order) != cols or not np.array_equal(np.sort(order), np.arange(cols)):
        return "the heads' views do not use every column of the projection once"
    w = constant_value(linear.inputs[1])
    bias = constant_value(linear.inputs[2]) if len(linear.inputs) > 2 and linear.inputs[2] is not None else None
    if not in_order and (w is None or (len(linear.inputs) > 2 and linear.inputs[2] is not None and bias is None)):
        return "its weight is not a constant"
    if not in_order:  # (Falcon's one key/value head is in order already: only the views change)
        trans = linear.attr("trans_w", 0)
        graph.rename_value(out, graph.fresh_name(f"{out.name}_by_block"))  # another value now: its columns moved
        rw = Rewriter(graph, linear, "split-interleaved-heads")
        linear.set_input(1, rw.const(np.ascontiguousarray(w[order] if trans else w[:, order]), "w_by_block"))
        if bias is not None:
            linear.set_input(2, rw.const(np.ascontiguousarray(bias[order]), "b_by_block"))
    sizes = [m[0].size for m in maps]
    rw = Rewriter(graph, nodes[0], "split-interleaved-heads")
    pieces = rw.op("Split", out, rw.const(np.array(sizes, np.int64), "head_blocks"), axis=-1, n_out=len(sizes)) \
        if len(sizes) > 1 else (out,)
    batch, seq = out.type.shape[:2]
    for piece, size, view, (columns, heads_first) in zip(pieces, sizes, views, maps):
        heads, head = columns.shape
        piece.type = TensorType(out.type.dtype, (batch, seq, size))
        new = rw.Reshape(piece, rw.const(np.array([0, 0, heads, head], np.int64), "heads_shape"))
        new.type = TensorType(out.type.dtype, (batch, seq, heads, head))
        if heads_first:
            new = rw.Transpose(new, perm=[0, 2, 1, 3])
            new.type = TensorType(out.type.dtype, (batch, heads, seq, head))
        view.replace_all_uses_with(new)
    remove_dead(graph, nodes)
    return None


__all__ = ["SplitInterleavedHeads"]
