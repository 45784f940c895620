"""graphopt.Attention: ONNX Attention-23's semantics (grouped-query heads, causal, a mask), 4-D or
3-D, with an optional KV cache (past in, present out, BNSH or BSNH); the reference is ONNX's own
kernel.

kv_layout "static" is the preallocated cache that past and present share (ORT
GroupQueryAttention's past_present_share_buffer): past and present are [batch, kv_heads,
max_seq, head] buffers, the mask's last dimension L is the valid length after this step, the
new keys/values are written at positions [L - new, L) of the buffer, attention reads its first
L positions, and the positions from L on are passed through as they were.

kv_layout "paged" (vLLM's, ORT PagedAttention's): past and present are one pool of fixed-size
blocks, [num_blocks, block_size, kv_heads, head], shared as the static buffer is, and a 7th
input, `block_table [batch, max_blocks]` (int32), says where each row's positions live:
position p of row r is pool[block_table[r, p // block_size], p % block_size]. As for static,
the mask's last dimension L is the valid length, the new keys/values go to positions
[L - new, L) and attention reads positions [0, L); blocks no row's positions name are
passed through as they were.

An 8th input, `sinks [num_heads]` (GPT-OSS's attention sinks), gives each query head one more
logit in its softmax, against no value: p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k)). It is
what a zero key and a zero value placed before the first position would give, with the sink
as that key's bias (what the reference computes), so a head may attend to nothing.
"""
from __future__ import annotations

import math

import numpy as np

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, TensorType, Value
from graphopt.ops.common import BNSH_FROM_BSNH, i64, unsupported
from graphopt.registry import AttrSpec, OpDef, register_op


def _heads_3d(node: Node) -> tuple[int, int]:
    nq = node.attr("num_heads", 0)
    nkv = node.attr("kv_num_heads", 0) or nq
    if not nq:
        raise unsupported(node, "num_heads is required for 3-D inputs")
    return nq, nkv


def _split_heads(node: Node, hidden, heads: int):
    """The head size of a (B, S, heads * head_size) input; None when the hidden size is symbolic."""
    if not isinstance(hidden, int):
        return None
    if hidden % heads:
        raise unsupported(node, f"hidden size {hidden} is not a multiple of {heads} heads")
    return hidden // heads


def _attention_inputs(node: Node):
    q, k, v = node.inputs[:3]
    mask, past_k, past_v = (list(node.inputs[3:]) + [None] * 3)[:3]
    return q, k, v, mask, past_k, past_v


def block_table_of(node: Node) -> Value | None:
    """kv_layout paged's 7th input: [batch, max_blocks] block ids."""
    return node.inputs[6] if len(node.inputs) > 6 else None


def sinks_of(node: Node) -> Value | None:
    """The 8th input: the per-head sink logits [num_heads], or None."""
    return node.inputs[7] if len(node.inputs) > 7 else None


def reads_a_cache(node: Node) -> bool:
    """The node has a past key/value (or a block table): inputs 5 to 7."""
    return any(t is not None for t in node.inputs[4:7])


def attention_operands(q: Value, k: Value, v: Value, mask: Value | None = None, past_k: Value | None = None,
                       past_v: Value | None = None, table: Value | None = None,
                       sinks: Value | None = None) -> list[Value | None]:
    """graphopt.Attention's inputs in their places, without trailing empty ones."""
    ins = [q, k, v, mask, past_k, past_v, table, sinks]
    while len(ins) > 3 and ins[-1] is None:
        ins.pop()
    return ins


def _seq_len_bnsh(node: Node, t: Value | None, cache: bool = False):
    """The sequence length of K/V (3-D or 4-D) or of a past (`cache`, in the node's
    kv_layout): an int, a symbol or None."""
    if t is None or t.type.shape is None:
        return None
    if len(t.type.shape) == 3 or (cache and _kv_layout(node) == "BSNH"):
        return t.type.shape[1]
    return t.type.shape[2]


_KV_LAYOUTS = ("BNSH", "BSNH", "static", "paged")
SHARED_BUFFER_LAYOUTS = ("static", "paged")  # the present is the past buffer, written in place


def _kv_layout(node: Node) -> str:
    """The layout of the past and present key/value: BNSH (default), BSNH or static (a BNSH
    buffer of max_seq positions, of which the mask says how many are valid)."""
    layout = node.attr("kv_layout", "BNSH") or "BNSH"
    if layout not in _KV_LAYOUTS:
        raise unsupported(node, f"kv_layout {layout!r} is not one of {', '.join(_KV_LAYOUTS)}")
    return layout


def _attention_infer(node: Node):
    q, k, v, mask, past_k, past_v = _attention_inputs(node)
    if any(t is not None and t.type is None for t in (q, k, v, mask, past_k, past_v)):
        return [None] * len(node.outputs)
    dt = q.type.dtype
    qs, vs = q.type.shape, v.type.shape
    if qs is not None and len(qs) not in (3, 4):
        raise unsupported(node, f"Q must have rank 3 or 4, got {q.type}")
    three_d = qs is not None and len(qs) == 3
    if three_d:
        nq, nkv = _heads_3d(node)
    if (past_k is None) != (past_v is None):
        raise unsupported(node, "past_key and past_value must be given together")
    static = _kv_layout(node) in SHARED_BUFFER_LAYOUTS
    if static and (past_k is None or mask is None):
        raise unsupported(node, f"kv_layout {_kv_layout(node)} needs the past buffers and a mask (its length is the "
                                "valid length)")
    if (_kv_layout(node) == "paged") != (block_table_of(node) is not None):
        raise unsupported(node, "a block table (input 7) goes with kv_layout paged, and only with it")
    if mask is not None and mask.type.shape and not static:
        # ONNX's reference pads a shorter mask with -inf, ONNX Runtime refuses it: we refuse it.
        past = 0 if past_k is None else _seq_len_bnsh(node, past_k, cache=True)
        new, mlast = _seq_len_bnsh(node, k), mask.type.shape[-1]
        if isinstance(new, int) and isinstance(past, int) and isinstance(mlast, int) and mlast != past + new:
            raise unsupported(node, f"the mask's last dimension is {mlast}, but the total sequence length "
                                     f"is {past + new}")
    if qs is None or vs is None:
        y = TensorType(dt, None)
    elif three_d:
        hv = _split_heads(node, vs[2], nkv)
        y = TensorType(dt, (qs[0], qs[1], nq * hv if hv is not None else None))
    else:
        y = TensorType(dt, (qs[0], qs[1], qs[2], vs[3]))

    def present(new: Value, past: Value | None) -> TensorType:
        if static:  # the buffer itself
            return past.type
        s = new.type.shape
        if s is None:
            return TensorType(new.type.dtype, None)
        if len(s) == 3:
            heads, seq, head = nkv, s[1], _split_heads(node, s[2], nkv)
        else:
            heads, seq, head = s[1], s[2], s[3]
        if past is not None:
            p = _seq_len_bnsh(node, past, cache=True)
            seq = p + seq if isinstance(p, int) and isinstance(seq, int) else (seq if p == 0 else None)
        if _kv_layout(node) == "BSNH":
            return TensorType(new.type.dtype, (s[0], seq, heads, head))
        return TensorType(new.type.dtype, (s[0], heads, seq, head))

    return [y, present(k, past_k), present(v, past_v)][:len(node.outputs)]


def _attention_reference(node: Node, inputs):
    from onnx.reference.ops.op_attention import _compute_attention

    q, k, v = inputs[:3]
    mask, past_k, past_v = (list(inputs[3:]) + [None] * 3)[:3]
    sinks = inputs[7] if len(inputs) > 7 else None
    bsnh = _kv_layout(node) == "BSNH"
    if bsnh and past_k is not None:  # the kernel below takes BNSH
        past_k, past_v = past_k.transpose(0, 2, 1, 3), past_v.transpose(0, 2, 1, 3)
    buffers = None
    if _kv_layout(node) == "paged":
        return _paged_reference(node, inputs)
    if _kv_layout(node) == "static":  # the kernel below takes the valid past; the rest is kept
        valid, new = mask.shape[-1], k.shape[-2 if k.ndim == 4 else 1]
        if not new <= valid <= past_k.shape[2]:
            raise unsupported(node, f"the mask says {valid} valid positions after {new} new ones; the static "
                                     f"cache holds {past_k.shape[2]}")
        buffers, past_k, past_v = (past_k, past_v), past_k[:, :, :valid - new], past_v[:, :, :valid - new]
    if mask is not None:
        total = k.shape[-2 if k.ndim == 4 else 1] + (0 if past_k is None else past_k.shape[2])
        if mask.shape[-1] != total:
            raise unsupported(node, f"the mask's last dimension is {mask.shape[-1]}, but the total "
                                     f"sequence length is {total}")
    nq, nkv = _heads_3d(node) if q.ndim == 3 else (None, None)
    if mask is not None and node.attr("causal", 0) and mask.ndim >= 2 and mask.shape[-2] == 1:
        # ONNX's reference builds the causal mask from the mask's own query length: give the
        # mask its full query axis first (broadcasting says it means the same).
        q_len = q.shape[-2] if q.ndim == 4 else q.shape[1]
        mask = np.broadcast_to(mask, mask.shape[:-2] + (q_len, mask.shape[-1]))
    if sinks is not None:
        k, past_k, past_v, mask = _with_sink_key(node, q, k, v, mask, past_k, past_v, sinks)
    out = _compute_attention(q, k, v, attn_mask=mask, past_key=past_k, past_value=past_v,
                             scale=node.attr("scale", 0.0) or None, is_causal=bool(node.attr("causal", 0)),
                             q_num_heads=nq, kv_num_heads=nkv, softcap=node.attr("softcap", 0.0) or None)
    out = [np.asarray(o).astype(q.dtype) for o in out[:len(node.outputs)]]
    if sinks is not None:  # the zero key and value in front of the presents go
        out = [o if i == 0 else np.ascontiguousarray(o[:, :, 1:]) for i, o in enumerate(out)]
    if buffers is not None:
        for i, buf in zip((1, 2), buffers):
            if i < len(out):
                full = buf.copy()
                full[:, :, :out[i].shape[2]] = out[i]
                out[i] = full
    return [o if i == 0 or not bsnh else np.ascontiguousarray(o.transpose(0, 2, 1, 3)) for i, o in enumerate(out)]


def _with_sink_key(node: Node, q, k, v, mask, past_k, past_v, sinks):
    """(k, past_k, past_v, mask) with a zero key and value in front of the past, and a mask
    column giving that key each head's sink: the softmax then has the sink's term in its sum,
    and the output nothing of it. Causal masking stays right: every query sees position 0."""
    sinks = np.asarray(sinks)
    nq = q.shape[1] if q.ndim == 4 else _heads_3d(node)[0]
    if sinks.shape != (nq,):
        raise unsupported(node, f"the sinks have shape {list(sinks.shape)}, not [{nq}] (one per query head)")
    if q.ndim == 4:
        batch, q_len, nkv, hk, hv = q.shape[0], q.shape[2], k.shape[1], k.shape[3], v.shape[3]
        total = k.shape[2]
    else:
        nkv = _heads_3d(node)[1]
        batch, q_len, hk, hv, total = q.shape[0], q.shape[1], k.shape[2] // nkv, v.shape[2] // nkv, k.shape[1]
    total += 0 if past_k is None else past_k.shape[2]
    zero_k, zero_v = (np.zeros((batch, nkv, 1, h), q.dtype) for h in (hk, hv))
    past_k = zero_k if past_k is None else np.concatenate([zero_k, past_k], axis=2)
    past_v = zero_v if past_v is None else np.concatenate([zero_v, past_v], axis=2)
    if mask is None:
        bias = np.zeros((1, 1, q_len, total), q.dtype)
    elif mask.dtype == np.bool_:
        bias = np.where(mask, q.dtype.type(0), q.dtype.type(-np.inf))
    else:
        bias = mask.astype(q.dtype)
    bias = np.broadcast_to(bias, (batch, nq, q_len, total))
    column = np.broadcast_to(sinks.astype(q.dtype).reshape(1, nq, 1, 1), (batch, nq, q_len, 1))
    return k, past_k, past_v, np.concatenate([column, bias], axis=-1)


def _paged_slots(node: Node, block_table: np.ndarray, block_size: int, length: int):
    """(block ids, slots) [batch, length] of each row's first `length` positions."""
    if length > block_table.shape[1] * block_size:
        raise unsupported(node, f"the mask says {length} valid positions; the block table holds "
                                f"{block_table.shape[1]} blocks of {block_size}")
    p = np.arange(length)
    return block_table[:, p // block_size].astype(np.int64), np.broadcast_to(p % block_size, (len(block_table), length))


def _paged_reference(node: Node, inputs):
    """BNSH attention over the rows' positions gathered from the pools; the new keys/values
    then scattered into copies of the pools."""
    q, k, v, mask, pool_k, pool_v, table = inputs[:7]
    block_size = pool_k.shape[1]
    valid, new = mask.shape[-1], k.shape[-2 if k.ndim == 4 else 1]
    blocks, slots = _paged_slots(node, np.asarray(table), block_size, valid)
    past = [np.ascontiguousarray(pool[blocks[:, :valid - new], slots[:, :valid - new]].transpose(0, 2, 1, 3))
            for pool in (pool_k, pool_v)]
    out = _attention_reference(_LayoutView(node, "BNSH"), [q, k, v, mask, *past, None, *inputs[7:]])
    for i, pool in ((1, pool_k), (2, pool_v)):
        if i < len(out):
            full = pool.copy()
            full[blocks[:, valid - new:], slots[:, valid - new:]] = out[i][:, :, valid - new:].transpose(0, 2, 1, 3)
            out[i] = full
    return out


class _LayoutView:
    """`node` read as if its kv_layout were another (a paged site is BNSH attention over the
    positions gathered from its pools)."""

    def __init__(self, node: Node, layout: str):
        self._node, self._layout = node, layout

    def attr(self, name: str, default=None):
        return self._layout if name == "kv_layout" else self._node.attr(name, default)

    def __getattr__(self, name: str):
        return getattr(self._node, name)


def _repeat_kv_heads(b: Builder, node: Node, t_BNSH: Value, nq, nkv) -> Value:
    """Repeat each KV head nq/nkv times, next to itself (h0, h0, h1, h1, ...), as np.repeat."""
    if nq == nkv and nq is not None:
        return t_BNSH
    if not isinstance(nq, int) or not isinstance(nkv, int) or nq % nkv:
        raise unsupported(node, f"grouped-query attention needs static head counts that divide, "
                                 f"got {nq} query and {nkv} key/value heads")
    grouped = b.Unsqueeze(t_BNSH, b.const(i64(2), "attn_group_axis"))  # B, Nkv, 1, S, H
    tiled = b.Expand(grouped, b.const(i64(1, 1, nq // nkv, 1, 1), "attn_group_reps"))
    shape = b.Concat(b.Shape(t_BNSH, start=0, end=1), b.const(i64(nq), "attn_num_heads"),
                     b.Shape(t_BNSH, start=2), axis=0)
    return b.Reshape(tiled, shape)


def _attention_bias(b: Builder, node: Node, mask: Value | None, q_BNSH: Value, k_BNSH: Value,
                    past_k: Value | None, zero: Value, neg_inf: Value) -> Value:
    """The additive bias: the mask (a boolean one as 0 / -inf) plus, when causal, the
    bottom-right causal mask: query i attends key j iff j <= i + past_sequence_length."""
    dt = q_BNSH.type.dtype
    bias = None
    if mask is not None:
        if mask.type.dtype.np_dtype == np.bool_:
            bias = b.Where(mask, zero, neg_inf)
        else:
            bias = mask if mask.type.dtype is dt else b.Cast(mask, to=dt.onnx_type)
    if node.attr("causal", 0):
        scalar = b.const(i64(0), "attn_scalar_axis")

        def length(t: Value, axis: int) -> Value:  # a scalar int64
            return b.Squeeze(b.Shape(t, start=axis, end=axis + 1), scalar)

        start = b.const(np.array(0, np.int64), "attn_range_start")
        step = b.const(np.array(1, np.int64), "attn_range_step")
        rows = b.Unsqueeze(b.Range(start, length(q_BNSH, 2), step), b.const(i64(1), "attn_col_axis"))
        if past_k is not None:
            rows = b.Add(rows, length(past_k, 2))
        cols = b.Unsqueeze(b.Range(start, length(k_BNSH, 2), step), scalar)
        causal = b.Where(b.LessOrEqual(cols, rows), zero, neg_inf)  # Sq, Skv_total
        bias = causal if bias is None else b.Add(bias, causal)
    return bias


def _paged_decompose(b: Builder, node: Node, mask: Value, k_BNSH: Value, v_BNSH: Value):
    """((past_k, past_v) in BNSH gathered from the pools, (present_k, present_v): the pools
    with the new positions scattered in). Core ONNX: Gather on the block table, then on the
    pool seen as [num_blocks * block_size, kv_heads, head]; ScatterND of the new keys/values
    at their (block, slot) pairs straight into the pool. The present is that ScatterND's own
    output, so a runtime that is handed the past pool's buffer for it (ORT's IO binding)
    writes the new positions in place and copies nothing; otherwise it is a copy of the pool."""
    pools, table = node.inputs[4:6], block_table_of(node)
    block_size = pools[0].type.shape[1] if pools[0].type.shape else None
    if not isinstance(block_size, int):
        raise unsupported(node, "kv_layout paged needs a static block size (the pool's dimension 1)")
    scalar, axis1 = b.const(i64(0), "attn_scalar_axis"), b.const(i64(1), "attn_seq_axis_bsnh")
    valid = b.Shape(mask, start=-1)
    start = b.Sub(valid, b.Shape(k_BNSH, start=2, end=3))
    bs = b.const(np.array(block_size, np.int64), "attn_block_size")
    pos = b.Range(b.const(np.array(0, np.int64), "attn_range_start"), b.Squeeze(valid, scalar),
                  b.const(np.array(1, np.int64), "attn_range_step"))
    blocks = b.Cast(b.Gather(table, b.Div(pos, bs), axis=1), to=DType.INT64.onnx_type)  # batch, L
    slots = b.Mod(pos, bs)  # L
    flat = b.Add(b.Mul(blocks, bs), slots)  # batch, L: rows of the pool seen flat
    past_rows = b.Slice(flat, b.const(i64(0), "attn_start"), start, axis1)
    last = b.const(i64(-1), "attn_last_axis")
    new_blocks = b.Unsqueeze(b.Slice(blocks, start, valid, axis1), last)  # batch, new, 1
    new_slots = b.Unsqueeze(b.Slice(slots, start, valid, scalar), last)  # new, 1: alike in every row
    new_slots = b.Expand(new_slots, b.Shape(new_blocks))
    new_at = b.Concat(new_blocks, new_slots, axis=-1)  # batch, new, 2: (block, slot)
    flat_shape = b.const(i64(-1, *pools[0].type.shape[2:]), "attn_pool_rows") if all(
        isinstance(d, int) for d in pools[0].type.shape[2:]) else None
    if flat_shape is None:
        raise unsupported(node, "kv_layout paged needs static key/value heads and head sizes")
    pasts, presents = [], []
    for pool, new_BNSH in zip(pools, (k_BNSH, v_BNSH)):
        rows = b.Reshape(pool, flat_shape)
        pasts.append(b.Transpose(b.Gather(rows, past_rows, axis=0), perm=BNSH_FROM_BSNH))
        presents.append(b.ScatterND(pool, new_at, b.Transpose(new_BNSH, perm=BNSH_FROM_BSNH)))
    return pasts, presents


def _softmax(b: Builder, scores: Value, sinks: Value | None) -> Value:
    """Softmax over the last axis; with sinks, over the scores and one more column, each
    head's sink, which is then dropped."""
    if sinks is None:
        return b.Softmax(scores, axis=-1)
    column = b.Reshape(sinks, b.const(i64(1, -1, 1, 1), "attn_sink_shape"))  # 1, N, 1, 1
    shape = b.Concat(b.Shape(scores, start=0, end=3), b.const(i64(1), "attn_one"), axis=0)
    probs = b.Softmax(b.Concat(b.Expand(column, shape), scores, axis=-1), axis=-1)
    return b.Slice(probs, b.const(i64(1), "attn_one"), b.const(i64(np.iinfo(np.int64).max), "attn_end"),
                   b.const(i64(-1), "attn_last_axis"))


def _attention_decompose(b: Builder, node: Node):
    q, k, v, mask, past_k, past_v = _attention_inputs(node)
    dt = q.type.dtype
    qs = q.type.shape
    if qs is None or len(qs) not in (3, 4):
        raise unsupported(node, "Q must have rank 3 or 4 to decompose")
    if len(qs) == 3:
        nq, nkv = _heads_3d(node)
        head = _split_heads(node, qs[2], nq)

        def to_bnsh(t: Value, heads: int) -> Value:
            bsnh = b.Reshape(t, b.const(i64(0, 0, heads, -1), "attn_bsnh_shape"))
            return b.Transpose(bsnh, perm=BNSH_FROM_BSNH)
        q_BNSH, k_BNSH, v_BNSH = to_bnsh(q, nq), to_bnsh(k, nkv), to_bnsh(v, nkv)
    else:
        q_BNSH, k_BNSH, v_BNSH = q, k, v
        nq, head = qs[1], qs[3]
        nkv = k.type.shape[1] if k.type.shape is not None else None

    bsnh = _kv_layout(node) == "BSNH"
    if bsnh and past_k is not None:
        past_k, past_v = b.Transpose(past_k, perm=BNSH_FROM_BSNH), b.Transpose(past_v, perm=BNSH_FROM_BSNH)
    rest = paged = None
    if _kv_layout(node) == "paged":
        paged = _paged_decompose(b, node, mask, k_BNSH, v_BNSH)
        past_k, past_v = paged[0]
    if _kv_layout(node) == "static":
        # valid = the mask's length: the buffers' first valid - new positions are the past, the
        # new keys/values go after them, and the positions from valid on stay as they were
        axis, end = b.const(i64(2), "attn_seq_axis"), b.const(i64(np.iinfo(np.int64).max), "attn_end")
        valid = b.Shape(mask, start=-1)
        start = b.Sub(valid, b.Shape(k_BNSH, start=2, end=3))
        zero_start = b.const(i64(0), "attn_start")
        rest = [b.Slice(t, valid, end, axis) for t in (past_k, past_v)]
        past_k, past_v = (b.Slice(t, zero_start, start, axis) for t in (past_k, past_v))
    k_BNSH = b.Concat(past_k, k_BNSH, axis=2) if past_k is not None else k_BNSH
    v_BNSH = b.Concat(past_v, v_BNSH, axis=2) if past_v is not None else v_BNSH

    def present(index: int, t_BNSH: Value, new: Value) -> Value | None:
        if index >= len(node.outputs) or node.outputs[index] is None:
            return None
        if rest is not None:
            return b.Concat(t_BNSH, rest[index - 1], axis=2)
        if paged is not None:
            return paged[1][index - 1]
        if bsnh:
            return b.Transpose(t_BNSH, perm=BNSH_FROM_BSNH)
        # Without a past, present is K or V itself: an Identity keeps the output a value of its
        # own (decompose_node would otherwise rename the graph input to the output's name).
        return b.Identity(t_BNSH) if t_BNSH is new else t_BNSH

    presents = [present(1, k_BNSH, k), present(2, v_BNSH, v)]
    k_BNSH, v_BNSH = _repeat_kv_heads(b, node, k_BNSH, nq, nkv), _repeat_kv_heads(b, node, v_BNSH, nq, nkv)

    scale = node.attr("scale", 0.0)
    if not scale:
        if not isinstance(head, int):
            raise unsupported(node, "the head size must be static when no scale is given")
        scale = 1.0 / math.sqrt(head)
    # As the spec (and its reference): Q and K each scaled by sqrt(scale), against overflow.
    sqrt_scale = b.const(np.array(math.sqrt(scale), dt.np_dtype), "attn_sqrt_scale")
    k_t = b.Transpose(k_BNSH, perm=[0, 1, 3, 2])
    scores = b.MatMul(b.Mul(q_BNSH, sqrt_scale), b.Mul(k_t, sqrt_scale))
    softcap = node.attr("softcap", 0.0)
    if softcap:  # before the mask, so that masked scores stay -inf
        cap = b.const(np.array(softcap, dt.np_dtype), "attn_softcap")
        scores = b.Mul(b.Tanh(b.Div(scores, cap)), cap)
    sinks = sinks_of(node)
    if mask is None and not node.attr("causal", 0):
        probs = _softmax(b, scores, sinks)
    else:
        zero = b.const(np.array(0, dt.np_dtype), "attn_zero")
        neg_inf = b.const(np.array(-np.inf, dt.np_dtype), "attn_neg_inf")
        bias = _attention_bias(b, node, mask, q_BNSH, k_BNSH, past_k, zero, neg_inf)
        probs = _softmax(b, b.Add(scores, bias), sinks)
        if mask is not None and sinks is None:  # (with a sink no row is empty: its output is 0)
            # A query row whose bias is -inf everywhere attends nothing: its output is zero
            # (the spec's rule), where Softmax alone gives NaN. Causal masking alone always
            # leaves key 0, so only a mask can do this.
            row_max = b.ReduceMax(bias, b.const(i64(-1), "attn_last_axis"), keepdims=1)
            probs = b.Where(b.Equal(row_max, neg_inf), zero, probs)
    y_BNSH = b.MatMul(probs, v_BNSH)
    if len(qs) == 3:
        y = b.Reshape(b.Transpose(y_BNSH, perm=BNSH_FROM_BSNH), b.const(i64(0, 0, -1), "attn_bsd_shape"))
    else:
        y = y_BNSH
    return [y, *presents][:len(node.outputs)]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "Attention",
    attrs={"num_heads": AttrSpec(AttrKind.INT, default=0), "kv_num_heads": AttrSpec(AttrKind.INT, default=0),
           "scale": AttrSpec(AttrKind.FLOAT, default=0.0), "causal": AttrSpec(AttrKind.INT, default=0),
           "softcap": AttrSpec(AttrKind.FLOAT, default=0.0), "kv_layout": AttrSpec(AttrKind.STRING, default="BNSH")},
    min_inputs=3, max_inputs=8, min_outputs=1, max_outputs=3,
    infer=_attention_infer, reference=_attention_reference, decompose=_attention_decompose,
    doc="Scaled dot-product attention as ONNX Attention-23 (q_num_heads -> num_heads, is_causal -> "
        "causal): Q, K, V in BNSH (4-D) or BSD (3-D, with num_heads and kv_num_heads, which defaults to "
        "num_heads); grouped-query aware; optional mask, boolean (True attends) or additive, whose last "
        "dimension must be the total sequence length past + kv; past key/value and present outputs in kv_layout "
        "BNSH (default) or BSNH, or static (BNSH buffers of max_seq positions shared by past and present: the "
        "mask's last dimension L is the valid length, the new keys/values go to positions [L - new, L)), or paged (pools of [num_blocks, block_size, "
        "kv_heads, head] shared by past and present, a 7th input block_table [batch, max_blocks] placing "
        "position p of row r at block block_table[r, p // block_size], slot p % block_size); "
        "an optional 8th input, sinks [num_heads], adds each head's sink logit to its softmax's sum (attention "
        "sinks: a head may attend to nothing); "
        "causal masking is bottom-right aligned with the past; a fully masked query row gives zeros; "
        "softcap (0: none) is applied before the mask; scale 0 means 1/sqrt(head_size).",
))
