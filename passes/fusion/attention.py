"""fuse-attention: the decomposed attention that exporters emit -> graphopt.Attention.

The core every exporter agrees on is

    scores = MatMul(Q', K')              Q' = Q (* s1),  K' = layout(K) (* s2)
    scores = scores (* s3 | / s3) (cap * Tanh(scores / cap)) (+ mask)
    probs  = Softmax(scores, axis=-1)    (optionally followed by a NaN guard: Where(IsNaN(p), 0, p))
    out    = MatMul(probs, V)

Attention sinks (GPT-OSS) put one more column in the softmax, each head's sink logit, and drop
it after: Softmax(Concat(scores, Expand(sinks)) (- its row max)) -> Slice(..., :-1); the sinks
become graphopt.Attention's 8th input.

Everything around it varies: the key transpose is one Transpose, or Reshape -> Transpose ->
Reshape computed from the tensor's own shape; the scale is applied to Q, to K, to both (as
sqrt(scale)) or to the scores, by Mul or Div; grouped-query models repeat K/V heads with
Unsqueeze -> Expand -> Reshape. Such layout questions are answered by running the layout
slice on probe tensors (`graphopt.layout.computes`), not by matching one spelling.

The mask may be a sum: a bias (ALiBi's slope per head times the key's position) added next to
it, before or after a masked fill written either way round (`Where(keep, scores, lowest)`,
`Where(hidden, lowest, scores)`). BLOOM and XGLM compute attention with the heads merged into
the batch (`bmm` on [batch * heads, seq, head], the scores split into heads for the mask and
merged back, for the softmax (XGLM, after clamping them at the type's lowest) or for the `bmm`
with V; GPT-2 with reorder_and_upcast_attn for the scores' `baddbmm` only): the merges are read
off the Reshapes' shapes (`_unmerged`, `_split_heads_back`) and the 4-D tensors they merge are
fused.

`match_attention(softmax)` is the procedural matcher: it returns an `AttentionMatch` or a
`Fail(reason, node)`, like a declarative pattern's match. The 3-D form is a pass of its own
(`attention-to-3d`, passes/fusion/attention_3d.py).
"""
from __future__ import annotations

import numpy as np

from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.ops.attention import attention_operands
from graphopt.layout import computes, layout_ancestors, repeat_heads, swap_last_two
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Fail, Rewriter, constant_value, remove_dead, replace_value


class NoMatch(Exception):
    """Raised inside the matcher to leave early; `match_attention` turns it into a `Fail`."""

    def __init__(self, reason: str, node: Node | None = None):
        super().__init__(reason)
        self.reason, self.node = reason, node


def _scalar(v: Value | None) -> float | None:
    c = None if v is None else constant_value(v)
    if c is None or c.size != 1 or c.dtype.kind != "f":
        return None
    return float(c.reshape(()))


def _single_use(v: Value) -> bool:
    return len(v.uses()) == 1 and not v.is_graph_output


def _strip_scale(v: Value, covered: list[Node]) -> tuple[Value, float]:
    """Peel Mul/Div by scalar constants off `v`; returns (inner value, accumulated factor)."""
    factor = 1.0
    while True:
        n = v.producer()
        if n is None or n.domain != "" or n.op_type not in ("Mul", "Div") or not _single_use(v) \
                or (n.op_type == "Mul" and _softcap(n) is not None):  # a softcap's Mul is not a scale
            return v, factor
        a, b = n.inputs
        if n.op_type == "Mul" and _scalar(b) is not None:
            factor *= _scalar(b)
            v = a
        elif n.op_type == "Mul" and _scalar(a) is not None:
            factor *= _scalar(a)
            v = b
        elif n.op_type == "Div" and _scalar(b) is not None and _scalar(b) != 0:
            factor /= _scalar(b)
            v = a
        else:
            return v, factor
        covered.append(n)


def _rank4(v: Value) -> bool:
    return v.type is not None and v.type.rank == 4


class AttentionMatch:
    """What one attention site consists of (produced by `match_attention`)."""

    def __init__(self):
        self.q = self.k = self.v = None
        self.masks: list[tuple[Value, bool]] = []  # each added mask or bias, and whether it is 3-D (heads merged)
        self.bmm = False  # BLOOM's and XGLM's form: 3-D MatMuls on [batch * heads, seq, .]
        self.merged: list[Node] = []  # the bmm form's Reshapes that merge heads into the batch and back
        self.k_needs_transpose: Value | None = None
        self.scale = 1.0
        self.softcap = 0.0
        self.num_heads = self.kv_num_heads = None
        self.sinks: np.ndarray | None = None  # [num_heads]
        # Where(cond, scores, lowest) or Where(cond, lowest, scores): (cond, lowest, cond keeps the scores)
        self.masked_fill: tuple[Value, Value, bool] | None = None
        self.out: Value | None = None
        self.covered: list[Node] = []


def match_attention(softmax: Node) -> AttentionMatch | Fail:
    """The attention around a Softmax node, or why it is none and where that showed."""
    try:
        return _match_attention(softmax)
    except NoMatch as e:
        return Fail(e.reason, e.node or softmax)


def _match_attention(softmax: Node) -> AttentionMatch:
    m = AttentionMatch()
    scores_in = softmax.inputs[0]
    rank = scores_in.type.rank if scores_in.type is not None else None
    axis = softmax.attr("axis", -1)
    if rank is None or axis not in (-1, rank - 1):
        raise NoMatch("softmax is not over the last axis", softmax)
    m.covered.append(softmax)
    # -- downstream: optional NaN guard, then MatMul(probs, V)
    probs = softmax.outputs[0]
    users = probs.consumers()
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
        isnan = next(u for u in users if u.op_type == "IsNaN")
        where = next(u for u in users if u.op_type == "Where")
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or _scalar(where.inputs[1]) != 0.0:
            raise NoMatch("the softmax output feeds an IsNaN/Where that is not a NaN guard", where)
        m.covered += [isnan, where]
        probs = where.outputs[0]
    if probs.is_graph_output or len(probs.uses()) != 1:
        raise NoMatch("the attention probabilities are used elsewhere (returned or reused)", softmax)
    sink_side = _sink_column_dropped(probs.uses()[0][0], rank)
    if sink_side is not None:  # attention sinks: the Slice that drops their column
        m.covered.append(probs.uses()[0][0])
        probs = probs.uses()[0][0].outputs[0]
        if probs.is_graph_output or len(probs.uses()) != 1:
            raise NoMatch("the attention probabilities are used elsewhere (returned or reused)", softmax)
    pv, idx = probs.uses()[0]
    while _op(pv, "Reshape") and idx == 0 and _rank_of(pv.outputs[0]) in (3, 4):
        # heads merged into the batch (BLOOM's and XGLM's bmm form) or split back out of it
        m.merged.append(pv)
        m.covered.append(pv)
        probs = pv.outputs[0]
        if probs.is_graph_output or len(probs.uses()) != 1:
            raise NoMatch("the attention probabilities are used elsewhere (returned or reused)", pv)
        pv, idx = probs.uses()[0]
    if pv.op_type != "MatMul" or pv.domain != "" or idx != 0:
        raise NoMatch(f"the probabilities feed {pv.op}, not MatMul(probs, V)", pv)
    m.covered.append(pv)
    m.v, m.out = pv.inputs[1], pv.outputs[0]
    m.bmm = _rank_of(pv.inputs[0]) == 3 and _rank_of(m.out) == 3
    while m.bmm and _rank_of(m.out) == 3:  # the output's heads split back out of the batch
        split = m.out.uses()[0][0] if len(m.out.uses()) == 1 and not m.out.is_graph_output else None
        if not _op(split, "Reshape") or _rank_of(split.outputs[0]) not in (3, 4):
            raise NoMatch("the heads merged into the batch are not split back after MatMul(probs, V)", pv)
        m.merged.append(split)
        m.covered.append(split)
        m.out = split.outputs[0]
    # -- upstream: ((- row max) Concat(., sinks)) (+ mask) (scale) MatMul(Q', K')
    x = scores_in
    if not _single_use(x):
        raise NoMatch("the attention scores are used elsewhere", x.producer())
    if sink_side is not None:
        x = _strip_row_max(x, m.covered)
        x, m.sinks = _split_sinks(x, sink_side, m.covered)
        if not _single_use(x):
            raise NoMatch("the attention scores are used elsewhere", x.producer())
    while True:
        n = x.producer()
        if n is None:
            raise NoMatch("the softmax input is not computed from MatMul(Q, K)", softmax)
        if n.op_type == "MatMul" and n.domain == "":
            m.covered.append(n)
            qk = n
            break
        if n.op_type == "Add" and n.domain == "" and len(m.masks) < 2:
            if m.softcap:  # the cap would apply to the mask too: not graphopt.Attention's order
                raise NoMatch("the mask is added before the softcap", n)
            sides = [s for s in n.inputs if _leads_to_matmul(s)]
            if len(sides) != 1:
                raise NoMatch("cannot tell the scores from the mask in the Add before softmax", n)
            m.masks.append((n.inputs[1] if sides[0] is n.inputs[0] else n.inputs[0], _rank_of(x) == 3))
            m.covered.append(n)
            x = sides[0]
        elif n.op_type == "Reshape" and n.domain == "" and _rank_of(n.inputs[0]) in (3, 4) \
                and (m.bmm or (_rank_of(n.inputs[0]) == 3 and _rank_of(x) == 4)):
            # the scores' heads merged into the batch or split out of it (BLOOM's, XGLM's bmm form;
            # GPT-2's reorder_and_upcast_attn computes only the scores so, with baddbmm, and V is 4-D)
            m.bmm = True
            m.merged.append(n)
            m.covered.append(n)
            x = n.inputs[0]
        elif n.op_type == "Max" and n.domain == "" and len(n.inputs) == 2 and any(_masks_out(v) for v in n.inputs):
            # XGLM's clamp at the type's lowest: -inf becomes the lowest finite value, as a masked fill's
            m.covered.append(n)
            x = n.inputs[1] if _masks_out(n.inputs[0]) else n.inputs[0]
        elif n.op_type == "Where" and n.domain == "" and m.masked_fill is None and (fill := _masked_fill(n)):
            # GPT-Neo's Where(causal, scores, lowest), MPT's Where(hidden, lowest, scores): in float32
            # the same as adding Where(causal, 0, lowest) to the scores (a score is lost in the
            # lowest value's rounding)
            if m.softcap:
                raise NoMatch("the scores are masked before the softcap", n)
            m.masked_fill = fill
            m.covered.append(n)
            x = n.inputs[1] if fill[2] else n.inputs[2]
        elif n.op_type == "Mul" and n.domain == "" and (capped := _softcap(n)) is not None:
            if m.softcap:
                raise NoMatch("the scores are soft-capped twice", n)
            if m.scale != 1.0:
                raise NoMatch("the scores are scaled after the softcap", n)
            m.softcap, x, nodes = capped
            m.covered += nodes
            continue
        elif n.op_type in ("Mul", "Div") and n.domain == "":
            inner, f = _strip_scale(x, m.covered)
            if inner is x:
                raise NoMatch(f"the scores are scaled by a non-constant {n.op_type}", n)
            m.scale *= f
            x = inner
            continue
        else:
            raise NoMatch(f"unexpected {n.op} between MatMul(Q, K) and Softmax", n)
        if not _single_use(x):
            raise NoMatch("the attention scores are used elsewhere", x.producer())
    q, fq = _strip_scale(qk.inputs[0], m.covered)
    kt, fk = _strip_scale(qk.inputs[1], m.covered)
    m.scale *= fq * fk
    if m.bmm:
        q, kt = _split_heads_back(m, q, kt, qk)
    if not (_rank4(q) and (m.k is not None or _rank4(kt)) and _rank4(m.v)):
        raise NoMatch("Q, K and V are not 4-D (batch, heads, seq, head_size) tensors", qk)
    m.q = q
    # -- K: find the BNSH tensor whose transpose feeds the MatMul
    for cand in [] if m.k is not None else [kt] + layout_ancestors(kt):
        if _rank4(cand) and cand is not kt and computes(cand, kt, swap_last_two):
            m.k = cand
            break
    if m.k is None:
        m.k_needs_transpose = kt  # an explicit Transpose; later cleanup merges it with the exporter's
    nq = q.type.shape[1]
    if not isinstance(nq, int):
        raise NoMatch("the number of query heads is not static", qk)
    m.num_heads = m.kv_num_heads = nq
    # -- grouped-query attention: K/V heads repeated to match Q's
    if m.k is not None:
        small_k = _unrepeat(m.k, nq)
        small_v = _unrepeat(m.v, nq)
        if small_k is not None and small_v is not None and small_k[1] == small_v[1]:
            (m.k, nkv), (m.v, _) = small_k, small_v
            m.kv_num_heads = nkv
    for mask, merged in m.masks:
        if mask.type is None or mask.type.rank is None or mask.type.rank > (3 if merged else 4):
            raise NoMatch("the mask's rank is unknown or over 4 (3 with the heads merged into the batch)",
                          mask.producer())
        if mask.type.dtype.np_dtype.kind != "f":
            raise NoMatch("the mask added to the scores is not a float tensor", mask.producer())
    if m.sinks is not None:
        if m.sinks.size not in (1, nq):
            raise NoMatch(f"{m.sinks.size} sink logits for {nq} query heads", softmax)
        m.sinks = np.broadcast_to(m.sinks.reshape(-1), (nq,)).astype(q.type.dtype.np_dtype)
    return m


def _rank_of(v: Value) -> int | None:
    return v.type.rank if v.type is not None else None


def _op(n: Node | None, op_type: str) -> bool:
    return n is not None and n.domain == "" and n.op_type == op_type


def _unmerged(v: Value, heads: tuple | None = None) -> Value | None:
    """The [batch, heads, seq, d] tensor that `v` = Reshape(it) to [batch * heads, seq, d] merges,
    or None. A Reshape keeps the elements' order, so keeping the last two dimensions means the
    first two became one."""
    n = v.producer()
    if not _op(n, "Reshape") or v.type is None or v.type.rank != 3 or n.inputs[0].type is None \
            or n.inputs[0].type.rank != 4:
        return None
    src = n.inputs[0]
    if v.type.shape is None or src.type.shape is None or any(d is None for d in v.type.shape[1:]) \
            or tuple(v.type.shape[1:]) != tuple(src.type.shape[2:]):
        return None
    if heads is not None and tuple(src.type.shape[:2]) != heads:
        return None
    return src


def _split_heads_back(m: AttentionMatch, q3: Value, kt3: Value, qk: Node) -> tuple[Value, Value]:
    """BLOOM's bmm form: (Q, K transposed) as 4-D tensors, V too (in `m`), from the 3-D ones the
    MatMuls read, each a Reshape merging the heads of a [batch, heads, seq, d] tensor; the
    Reshapes of the scores and the output must split [batch * heads] back into the same two.
    V may be 4-D already. K transposed after the merge goes to `m.k` (the second result is None);
    K transposed before it comes back as that 4-D tensor, for the 4-D form's search for K."""
    q = _unmerged(q3)
    if q is None or not isinstance(q.type.shape[1], int):
        raise NoMatch("with the heads merged into the batch, Q is not a Reshape of [batch, heads, seq, d]", qk)
    heads = tuple(q.type.shape[:2])
    tr = kt3.producer()
    k = _unmerged(tr.inputs[0], heads) if _op(tr, "Transpose") and list(tr.attr("perm", [])) == [0, 2, 1] else None
    # K transposed before the merge ([batch, heads, d, seq] merged): found as in the 4-D form, below
    kt = _unmerged(kt3, heads) if k is None else None
    # V merged too, or 4-D already (only the scores computed with the heads merged: GPT-2's baddbmm)
    v = _unmerged(m.v, heads) if _rank_of(m.v) == 3 else m.v
    if (k is None and kt is None) or v is None or _rank_of(v) != 4 or v.type.shape is None \
            or tuple(v.type.shape[:2]) != heads:
        raise NoMatch("with the heads merged into the batch, K or V is not a Reshape of [batch, heads, seq, d] "
                      "(K transposed before or after it)", qk)
    rows = heads + (q.type.shape[2],)  # batch, heads, query positions
    for r in m.merged:  # each Reshape between the forms: [batch * heads, seq, .] <-> [batch, heads, seq, .]
        split = [t for t in (r.inputs[0], r.outputs[0]) if _rank_of(t) == 4]
        if any(t.type.shape is None or tuple(t.type.shape[:3]) != rows for t in split) \
                or any(t.type.shape is None or t.type.shape[1] != rows[2] for t in (r.inputs[0], r.outputs[0])
                       if _rank_of(t) == 3):
            raise NoMatch("a Reshape of the bmm form does not merge or split the same batch, heads and positions", r)
    if _rank_of(m.out) != 4:
        raise NoMatch("the heads merged into the batch are not split back after MatMul(probs, V)", qk)
    m.v = v
    if k is None:
        return q, kt
    m.k = k
    m.covered.append(tr)
    return q, None


def _sink_column_dropped(n: Node, rank: int) -> int | None:
    """Which end of the last axis `n` drops when it is a Slice of one column there: -1 (the
    last, `[..., :-1]`) or 0 (the first, `[..., 1:]`); None for any other node."""
    if n.domain != "" or n.op_type != "Slice" or len(n.inputs) < 4:
        return None
    starts, ends, axes = (constant_value(v) for v in n.inputs[1:4])
    steps = constant_value(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] is not None else np.ones(1)
    if any(c is None or c.size != 1 for c in (starts, ends, axes, steps)) or int(steps.reshape(())) != 1 \
            or int(axes.reshape(())) % rank != rank - 1:
        return None
    start, end = int(starts.reshape(())), int(ends.reshape(()))
    if start == 0 and end == -1:
        return -1
    if start == 1 and end >= np.iinfo(np.int32).max:
        return 0
    return None


def _strip_row_max(x: Value, covered: list[Node]) -> Value:
    """`a` for `x = a - ReduceMax(a, last axis, keepdims)` (a no-op before a softmax, which
    exporters write against overflow); else `x`."""
    sub = x.producer()
    if sub is None or sub.domain != "" or sub.op_type != "Sub":
        return x
    a, mx = sub.inputs
    red = mx.producer()
    if red is None or red.domain != "" or red.op_type != "ReduceMax" or red.inputs[0] is not a \
            or not red.attr("keepdims", 1) or len(mx.uses()) != 1:
        return x
    axes = constant_value(red.inputs[1]) if len(red.inputs) > 1 and red.inputs[1] is not None else None
    if axes is None and red.attr("axes", None) is not None:
        axes = np.asarray(red.attr("axes", None))
    rank = a.type.rank if a.type is not None else None
    if axes is None or axes.size != 1 or rank is None or int(axes.reshape(())) % rank != rank - 1:
        return x
    if len(a.uses()) != 2 or a.is_graph_output:
        return x
    covered += [sub, red]
    return a


def _split_sinks(x: Value, side: int, covered: list[Node]) -> tuple[Value, np.ndarray]:
    """(the scores, the sink logits) of `x = Concat(scores, sinks)` along the last axis, the
    sinks at the end `side` that the Slice drops: a constant [.., heads|1, 1, 1], expanded or not."""
    cat = x.producer()
    rank = x.type.rank if x.type is not None else None
    if cat is None or cat.domain != "" or cat.op_type != "Concat" or len(cat.inputs) != 2 or rank != 4 \
            or cat.attr("axis", 0) % 4 != 3:
        raise NoMatch("the softmax's dropped column is not a Concat of the scores and the sinks", cat)
    scores, column = (cat.inputs[1], cat.inputs[0]) if side == 0 else (cat.inputs[0], cat.inputs[1])
    covered.append(cat)
    src = column.producer()
    if src is not None and src.domain == "" and src.op_type == "Expand" and len(column.uses()) == 1:
        covered.append(src)
        column = src.inputs[0]
    sinks = constant_value(column)
    shape = (1,) * (4 - sinks.ndim) + sinks.shape if sinks is not None and sinks.ndim <= 4 else None
    if shape is None or shape[0] != 1 or shape[2:] != (1, 1) or sinks.dtype.kind != "f":
        raise NoMatch("the column the softmax drops is not a constant logit per head (attention sinks)", cat)
    return scores, sinks.reshape(-1)


def _masked_fill(where: Node) -> tuple[Value, Value, bool] | None:
    """(cond, lowest, whether cond keeps the scores) when `where` fills the scores where masked
    with a masked-out constant, on either side; else None."""
    cond, a, b = where.inputs
    if _leads_to_matmul(a) and _masks_out(b):
        return cond, b, True
    if _leads_to_matmul(b) and _masks_out(a):
        return cond, a, False
    return None


def _masks_out(v: Value) -> bool:
    """`v` is a float constant at or below -1e30 (a masked fill: -inf or the type's lowest)."""
    c = constant_value(v)
    return c is not None and c.size == 1 and c.dtype.kind == "f" and float(c.reshape(())) <= -1e30


def _leads_to_matmul(v: Value, depth: int = 6) -> bool:
    """`v` is computed from a MatMul through at most `depth` scales, softcaps, masked fills and
    additions (of a mask or a bias: the Add's other side must not lead to one too)."""
    for _ in range(depth):
        n = v.producer()
        if n is None or n.domain != "":
            return False
        if n.op_type == "MatMul":
            return True
        if n.op_type == "Add":  # a bias added before the masked fill (MPT's ALiBi)
            sides = [_leads_to_matmul(s, depth - 1) for s in n.inputs]
            return sides.count(True) == 1
        if n.op_type in ("Tanh", "Reshape"):  # a softcap's; the bmm form's merge or split of the heads
            v = n.inputs[0]
            continue
        if n.op_type == "Max" and len(n.inputs) == 2 and any(_masks_out(t) for t in n.inputs):  # a clamp (XGLM)
            v = n.inputs[1] if _masks_out(n.inputs[0]) else n.inputs[0]
            continue
        if n.op_type == "Where" and (_masks_out(n.inputs[2]) or _masks_out(n.inputs[1])):  # a masked fill's
            v = n.inputs[1] if _masks_out(n.inputs[2]) else n.inputs[2]
            continue
        if n.op_type not in ("Mul", "Div"):
            return False
        v = n.inputs[0] if _scalar(n.inputs[1]) is not None else n.inputs[1]
    return False


def _softcap(mul: Node) -> tuple[float, Value, list[Node]] | None:
    """(cap, the scores it caps, its nodes) when `mul` is `cap * Tanh(scores / cap)` (Gemma 2's
    attention logit softcapping; the division may be a Mul by 1 / cap); else None."""
    a, b = mul.inputs
    cap, t = (_scalar(b), a) if _scalar(b) is not None else (_scalar(a), b)
    tanh = t.producer() if cap else None
    if tanh is None or tanh.domain != "" or tanh.op_type != "Tanh" or not _single_use(t):
        return None
    inner = tanh.inputs[0]
    div = inner.producer()
    if div is None or div.domain != "" or div.op_type not in ("Mul", "Div") or not _single_use(inner):
        return None
    x, c = div.inputs
    if _scalar(c) is None:
        return None
    scaled = 1.0 / _scalar(c) if div.op_type == "Div" else _scalar(c)
    if not np.isclose(scaled * cap, 1.0, rtol=1e-6):
        return None
    return cap, x, [mul, tanh, div]


def _unrepeat(v: Value, nq: int) -> tuple[Value, int] | None:
    """(the tensor with fewer heads, their count) if v repeats its heads; else None."""
    for cand in layout_ancestors(v):
        if cand.type is None or cand.type.rank != 4:
            continue
        nkv = cand.type.shape[1]
        if isinstance(nkv, int) and 0 < nkv < nq and nq % nkv == 0 and computes(cand, v, repeat_heads(nq // nkv)):
            return cand, nkv
    return None


def rewrite_attention(graph: Graph, m: AttentionMatch, rule: str = "fuse-attention") -> Node:
    pv = m.out.producer()
    rw = Rewriter(graph, pv, rule)
    k = m.k if m.k is not None else rw.Transpose(m.k_needs_transpose, perm=[0, 1, 3, 2])
    sinks = rw.const(m.sinks, "attention_sinks") if m.sinks is not None else None
    mask = None
    for extra, merged in m.masks:  # the masks and biases as one, 4-D
        rank = extra.type.rank
        if merged and rank == 3 and extra.type.shape[0] != 1:  # [batch * heads, ., total] -> [batch, heads, ., total]
            extra = rw.Reshape(extra, rw.Concat(rw.const(np.array([-1, m.num_heads], np.int64), "merged_heads"),
                                                rw.Shape(extra, start=1), axis=0))
        elif merged:  # broadcast over the merged batch and heads: over both
            extra = rw.Unsqueeze(extra, rw.const(np.arange(4 - rank, dtype=np.int64), "axes"))
        mask = extra if mask is None else rw.Add(mask, extra)
    if m.masked_fill is not None:  # the fill as an additive mask, before the model's own
        cond, lowest, keeps = m.masked_fill
        dt = m.q.type.dtype.np_dtype
        zero = rw.const(np.array(0, dt), "masked_fill_zero")
        lowest = rw.Cast(lowest, to=m.q.type.dtype.onnx_type) if constant_value(lowest).dtype != dt else lowest
        fill = rw.Where(cond, zero, lowest) if keeps else rw.Where(cond, lowest, zero)
        mask = fill if mask is None else rw.Add(fill, mask)
    inputs = attention_operands(m.q, k, m.v, mask, sinks=sinks)
    y = rw.op("Attention", *inputs, domain=GRAPHOPT_DOMAIN, num_heads=m.num_heads, kv_num_heads=m.kv_num_heads,
              scale=float(np.float32(m.scale)), softcap=float(m.softcap) if m.softcap else None)
    replace_value(graph, m.out, y)
    remove_dead(graph, m.covered)
    return y.producer()


@register_pass("fuse-attention")
class FuseAttention(Pass):
    """Fuse decomposed scaled-dot-product attention into graphopt.Attention.

    Before:  %s = MatMul(%q, %kt)                      After:
             %t = Mul(%s, @scale)                        %o = graphopt.Attention(%q, %k, %v, %mask)
             %a = Add(%t, %mask)                              {num_heads=12, kv_num_heads=12, scale=0.125}
             %p = Softmax(%a) {axis=-1}
             %o = MatMul(%p, %v)
    Handles scale on Q, K or the scores, key transposes however spelled, grouped-query K/V
    head repeats (kv_num_heads) and the NaN guard of torch's SDPA decomposition. Near misses
    (a Softmax that is not attention, and why) are reported.
    """

    category = "fusion"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(graph.nodes):
            if node.graph is not graph or node.op_type != "Softmax" or node.domain != "":
                continue
            m = match_attention(node)
            if isinstance(m, Fail):
                result.near_miss("attention", m.node, m.reason)
                continue
            rewrite_attention(graph, m)
            result.count("attention")
        return result


__all__ = ["FuseAttention", "AttentionMatch", "match_attention", "rewrite_attention"]
