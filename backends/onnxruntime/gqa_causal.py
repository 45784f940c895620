"""The causal half of rewrite-kv-cache's bias, left to GroupQueryAttention's own `causal=1`.

rewrite-kv-cache builds one bias for every layer (passes/kvcache/rewrite.py `causal_bias`):

    %cols = Range(0, Squeeze(%total), 1)                       %total = Shape(%attention_mask)[1:2]
    %rows = Unsqueeze(Slice(%cols, %past, end, axes=[0]), [1])  %past = %total - Shape(%input_ids)[1:2]
    %bias = Where(And(%real, LessOrEqual(%cols, %rows)), 0, lowest)

Key j is visible to new query i iff it is real and j <= past + i: the causal part is exactly
GroupQueryAttention's own causal mask, which puts query i at cache index past + i (with
graphopt's `seqlens_k = total - 1` for every row, prefill and step, BNSH and static). So the
kernel takes `causal=1` and a bias of the padding alone, `Where(%real, 0, lowest)` expanded
over the query rows (the kernel takes no broadcast along them): six nodes a step fewer
(Range, Slice, two Unsqueeze-or-Sub, LessOrEqual, And), the same mask.
"""
from __future__ import annotations

import numpy as np

from graphopt.ir import Node, Value, constant_value

MASK, INPUT_IDS = "attention_mask", "input_ids"


def _op(v: Value | None, op_type: str) -> Node | None:
    p = v.producer() if v is not None else None
    return p if p is not None and p.domain == "" and p.op_type == op_type else None


def _const(v: Value | None):
    return None if v is None else constant_value(v)


def _shape_of(v: Value | None, name: str) -> bool:
    """v = Shape(graph input `name`, start=1, end=2): that input's sequence length."""
    s = _op(v, "Shape")
    return (s is not None and s.inputs[0].is_graph_input and s.inputs[0].name == name
            and s.attr("start", 0) == 1 and s.attr("end", None) == 2)


def padding_of_causal_bias(bias: Value) -> tuple[Value, list[Node]] | None:
    """(%real, the bias's own nodes) when `bias` is rewrite-kv-cache's causal-and-padding
    bias with finite constants; None otherwise."""
    where = _op(bias, "Where")
    if where is None:
        return None
    zero, lowest = _const(where.inputs[1]), _const(where.inputs[2])
    if zero is None or lowest is None or zero.size != 1 or lowest.size != 1 or float(zero.reshape(())) != 0.0 \
            or not np.isfinite(lowest).all():
        return None
    both = _op(where.inputs[0], "And")
    if both is None:
        return None
    real, le = both.inputs
    causal = _op(le, "LessOrEqual")
    if causal is None:
        return None
    cols, rows = causal.inputs
    rng, unsq = _op(cols, "Range"), _op(rows, "Unsqueeze")
    if rng is None or unsq is None or _const(rng.inputs[0]) is None or _const(rng.inputs[2]) is None:
        return None
    if int(_const(rng.inputs[0])) != 0 or int(_const(rng.inputs[2])) != 1:
        return None
    total = _op(rng.inputs[1], "Squeeze")
    axes = _const(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
    sl = _op(unsq.inputs[0], "Slice")
    if total is None or axes is None or axes.reshape(-1).tolist() != [1] or sl is None or sl.inputs[0] is not cols:
        return None
    end, sl_axes = _const(sl.inputs[2]), _const(sl.inputs[3]) if len(sl.inputs) > 3 else None
    steps = _const(sl.inputs[4]) if len(sl.inputs) > 4 and sl.inputs[4] is not None else np.array([1])
    if end is None or sl_axes is None or sl_axes.reshape(-1).tolist() != [0] or steps is None \
            or steps.reshape(-1).tolist() != [1] or int(end.reshape(-1)[0]) < np.iinfo(np.int32).max:
        return None
    past = _op(sl.inputs[1], "Sub")
    if past is None or past.inputs[0] is not total.inputs[0] or not _shape_of(total.inputs[0], MASK) \
            or not _shape_of(past.inputs[1], INPUT_IDS):
        return None
    if real.type is None or real.type.rank != 4:
        return None
    shapes = [v.producer() for v in (past.inputs[1], total.inputs[0])]
    return real, [where, both, causal, unsq, sl, rng, total, past, *shapes]  # consumers first
