"""graphopt-domain ops: each declared once with attributes, inference, a reference
implementation and a decomposition into core ops at the canonical opset.

Their semantics are those of the ONNX opset-23 ops of the same purpose (so imported
`Attention`, `RMSNormalization` and `RotaryEmbedding` nodes map onto them one to one), and
the reference kernels are ONNX's own reference implementations of those ops.
"""
from __future__ import annotations

import math

import numpy as np

from graphopt.builder import Builder
from graphopt.errors import UserError
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, TensorType, Value
from graphopt.registry import AttrSpec, OpDef, register_op

_INT64_MAX = np.iinfo(np.int64).max


def _i64(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def _unsupported(node: Node, why: str) -> UserError:
    return UserError(f"node {node.name!r} ({node.op}): {why}")


# --------------------------------------------------------------------------------------
# RMSNorm


def _rms_infer(node: Node):
    return [node.inputs[0].type]


def _rms_reference(node: Node, inputs):
    x, scale = inputs
    axis = node.attr("axis", -1)
    eps = node.attr("epsilon", 1e-5)
    axes = tuple(range(axis % x.ndim, x.ndim))
    xf = x.astype(np.float32)
    normed = xf / np.sqrt(np.mean(np.square(xf), axis=axes, keepdims=True) + np.float32(eps))
    return [(normed.astype(x.dtype) * scale).astype(x.dtype)]


def _rms_decompose(b: Builder, node: Node):
    x, scale = node.inputs
    axis = node.attr("axis", -1)
    eps = node.attr("epsilon", 1e-5)
    rank = x.type.rank
    if axis < 0:
        axes = list(range(axis, 0))
    elif rank is not None:
        axes = list(range(axis, rank))
    else:
        raise _unsupported(node, "a non-negative axis needs an input of known rank to decompose")
    xf = x if x.type.dtype.np_dtype == np.float32 else b.Cast(x, to=1)
    mean = b.ReduceMean(b.Mul(xf, xf), b.const(_i64(*axes), "rms_axes"), keepdims=1)
    inv = b.Reciprocal(b.Sqrt(b.Add(mean, b.const(np.array(eps, np.float32), "rms_eps"))))
    y = b.Mul(xf, inv)
    if y.type.dtype is not x.type.dtype:
        y = b.Cast(y, to=x.type.dtype.onnx_type)
    return [b.Mul(y, scale)]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "RMSNorm",
    attrs={"axis": AttrSpec(AttrKind.INT, default=-1), "epsilon": AttrSpec(AttrKind.FLOAT, default=1e-5)},
    min_inputs=2, max_inputs=2, min_outputs=1, max_outputs=1,
    infer=_rms_infer, reference=_rms_reference, decompose=_rms_decompose,
    doc="Y = X / sqrt(mean(X^2 over axes [axis, rank)) + epsilon) * scale, normalized in float32.",
))


# --------------------------------------------------------------------------------------
# RotaryEmbedding


def _rope_reference(node: Node, inputs):
    from onnx.reference.ops.op_rotary_embedding import rotary_embedding

    x, cos, sin = inputs[:3]
    pos = inputs[3] if len(inputs) > 3 else None
    return [rotary_embedding(x, cos, sin, pos, interleaved=node.attr("interleaved", 0),
                             rotary_embedding_dim=node.attr("rotary_embedding_dim", 0),
                             num_heads=node.attr("num_heads", 0)).astype(x.dtype)]


def _rope_decompose(b: Builder, node: Node):
    x, cos, sin = node.inputs[:3]
    pos = node.inputs[3] if len(node.inputs) > 3 else None
    num_heads = node.attr("num_heads", 0)
    interleaved = node.attr("interleaved", 0)
    shape = x.type.shape
    if shape is None or len(shape) not in (3, 4):
        raise _unsupported(node, "input must have rank 3 or 4 to decompose")
    if len(shape) == 4:
        head = shape[3]
        xs = b.Transpose(x, perm=[0, 2, 1, 3])  # BNSH -> BSNH
    else:
        if not num_heads:
            raise _unsupported(node, "num_heads is required for 3-D input")
        head = shape[2] // num_heads if isinstance(shape[2], int) else None
        xs = b.Reshape(x, b.const(_i64(0, 0, num_heads, -1), "rope_shape"))
    rot = node.attr("rotary_embedding_dim", 0) or head
    if not isinstance(rot, int):
        raise _unsupported(node, "the head size must be static to decompose")
    half = rot // 2
    if pos is not None:
        cos, sin = b.Gather(cos, pos, axis=0), b.Gather(sin, pos, axis=0)
    axis2 = b.const(_i64(2), "rope_axis")
    cos, sin = b.Unsqueeze(cos, axis2), b.Unsqueeze(sin, axis2)  # B, S, 1, rot/2
    ax3 = b.const(_i64(3), "rope_axis3")
    x_rot = b.Slice(xs, b.const(_i64(0)), b.const(_i64(rot)), ax3) if rot != head else xs
    if interleaved:
        two = b.const(_i64(2), "rope_step")
        x1 = b.Slice(x_rot, b.const(_i64(0)), b.const(_i64(rot)), ax3, two)
        x2 = b.Slice(x_rot, b.const(_i64(1)), b.const(_i64(rot)), ax3, two)
    else:
        x1 = b.Slice(x_rot, b.const(_i64(0)), b.const(_i64(half)), ax3)
        x2 = b.Slice(x_rot, b.const(_i64(half)), b.const(_i64(rot)), ax3)
    real = b.Sub(b.Mul(cos, x1), b.Mul(sin, x2))
    imag = b.Add(b.Mul(sin, x1), b.Mul(cos, x2))
    if interleaved:
        last = b.const(_i64(-1), "rope_last")
        pairs = b.Concat(b.Unsqueeze(real, last), b.Unsqueeze(imag, last), axis=-1)
        rotated = b.Reshape(pairs, b.const(_i64(0, 0, 0, -1), "rope_flat"))
    else:
        rotated = b.Concat(real, imag, axis=-1)
    if rot != head:
        rest = b.Slice(xs, b.const(_i64(rot)), b.const(_i64(_INT64_MAX)), ax3)
        rotated = b.Concat(rotated, rest, axis=-1)
    if len(shape) == 4:
        return [b.Transpose(rotated, perm=[0, 2, 1, 3])]
    return [b.Reshape(rotated, b.const(_i64(0, 0, -1), "rope_merge"))]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "RotaryEmbedding",
    attrs={"interleaved": AttrSpec(AttrKind.INT, default=0), "num_heads": AttrSpec(AttrKind.INT, default=0),
           "rotary_embedding_dim": AttrSpec(AttrKind.INT, default=0)},
    min_inputs=3, max_inputs=4, min_outputs=1, max_outputs=1,
    infer=lambda node: [node.inputs[0].type], reference=_rope_reference, decompose=_rope_decompose,
    doc="Rotary position embedding of X (B,N,S,H or B,S,N*H) with cos/sin caches, as ONNX "
        "RotaryEmbedding-23: caches are (max_pos, rot/2) indexed by position_ids, or (B, S, rot/2).",
))


# --------------------------------------------------------------------------------------
# Attention


def _heads_3d(node: Node) -> tuple[int, int]:
    nq = node.attr("num_heads", 0)
    nkv = node.attr("kv_num_heads", 0) or nq
    if not nq:
        raise _unsupported(node, "num_heads is required for 3-D inputs")
    return nq, nkv


def _attention_infer(node: Node):
    q, k, v = node.inputs[:3]
    past_k = node.inputs[4] if len(node.inputs) > 4 else None
    dt = q.type.dtype
    qs, ks, vs = q.type.shape, k.type.shape, v.type.shape
    if qs is None or vs is None:
        y = TensorType(dt, None)
    elif len(qs) == 3:
        nq, nkv = _heads_3d(node)
        hv = vs[2] // nkv if isinstance(vs[2], int) else None
        y = TensorType(dt, (qs[0], qs[1], nq * hv if hv is not None else None))
    else:
        y = TensorType(dt, (qs[0], qs[1], qs[2], vs[3]))
    types = [y]
    if len(node.outputs) > 1:
        def present(src_shape, past):
            if src_shape is None:
                return TensorType(dt, None)
            if len(src_shape) == 3:
                _, nkv = _heads_3d(node)
                h = src_shape[2] // nkv if isinstance(src_shape[2], int) else None
                new, heads = src_shape[1], nkv
            else:
                new, heads, h = src_shape[2], src_shape[1], src_shape[3]
            total = new
            if past is not None:
                ps = past.type.shape
                p = ps[2] if ps is not None else None
                total = p + new if isinstance(p, int) and isinstance(new, int) else (new if p == 0 else None)
            return TensorType(dt, (src_shape[0], heads, total, h))
        types.append(present(ks, past_k))
        past_v = node.inputs[5] if len(node.inputs) > 5 else None
        types.append(present(vs, past_v))
    return types[:len(node.outputs)]


def _attention_reference(node: Node, inputs):
    from onnx.reference.ops.op_attention import _compute_attention

    q, k, v = inputs[:3]
    rest = list(inputs[3:]) + [None] * (6 - len(inputs))
    mask, past_k, past_v = rest[0], rest[1], rest[2]
    nq = node.attr("num_heads", 0) or None
    nkv = node.attr("kv_num_heads", 0) or nq
    scale = node.attr("scale", 0.0) or None
    softcap = node.attr("softcap", 0.0) or None
    if q.ndim == 4:
        nq = nkv = None
    out = _compute_attention(q, k, v, attn_mask=mask, past_key=past_k, past_value=past_v, scale=scale,
                             is_causal=bool(node.attr("causal", 0)), q_num_heads=nq, kv_num_heads=nkv,
                             softcap=softcap)
    return [np.asarray(o).astype(q.dtype) for o in out[:len(node.outputs)]]


def _attention_decompose(b: Builder, node: Node):
    q, k, v = node.inputs[:3]
    extra = list(node.inputs[3:]) + [None] * (6 - len(node.inputs))
    mask, past_k, past_v = extra[0], extra[1], extra[2]
    dt = q.type.dtype
    qs = q.type.shape
    if qs is None or len(qs) not in (3, 4):
        raise _unsupported(node, "Q must have rank 3 or 4 to decompose")
    three_d = len(qs) == 3
    perm = [0, 2, 1, 3]
    if three_d:
        nq, nkv = _heads_3d(node)
        q4 = b.Transpose(b.Reshape(q, b.const(_i64(0, 0, nq, -1), "attn_q_shape")), perm=perm)
        kv_shape = b.const(_i64(0, 0, nkv, -1), "attn_kv_shape")
        k4 = b.Transpose(b.Reshape(k, kv_shape), perm=perm)
        v4 = b.Transpose(b.Reshape(v, kv_shape), perm=perm)
        head = qs[2] // nq if isinstance(qs[2], int) else None
    else:
        q4, k4, v4 = q, k, v
        nq, nkv = qs[1], (k.type.shape[1] if k.type.shape is not None else None)
        head = qs[3]
    if past_k is not None:
        k4 = b.Concat(past_k, k4, axis=2)
    if past_v is not None:
        v4 = b.Concat(past_v, v4, axis=2)
    present_k, present_v = k4, v4
    if nq != nkv:
        if not isinstance(nq, int) or not isinstance(nkv, int) or nq % nkv:
            raise _unsupported(node, "grouped-query attention needs static head counts that divide")
        group = nq // nkv
        reps = b.const(_i64(1, 1, group, 1, 1), "attn_gqa_reps")
        ax2 = b.const(_i64(2), "attn_gqa_axis")

        def repeat_heads(t: Value) -> Value:
            tiled = b.Expand(b.Unsqueeze(t, ax2), reps)
            shape = b.Concat(b.Shape(t, start=0, end=1), b.const(_i64(nq), "attn_nq"), b.Shape(t, start=2), axis=0)
            return b.Reshape(tiled, shape)
        k4, v4 = repeat_heads(k4), repeat_heads(v4)
    scale = node.attr("scale", 0.0)
    if not scale:
        if not isinstance(head, int):
            raise _unsupported(node, "the head size must be static when no scale is given")
        scale = 1.0 / math.sqrt(head)
    scores = b.Mul(b.MatMul(q4, b.Transpose(k4, perm=[0, 1, 3, 2])), b.const(np.array(scale, dt.np_dtype), "attn_scale"))
    softcap = node.attr("softcap", 0.0)
    if softcap:
        cap = b.const(np.array(softcap, dt.np_dtype), "attn_softcap")
        scores = b.Mul(b.Tanh(b.Div(scores, cap)), cap)
    zero = b.const(np.array(0, dt.np_dtype), "attn_zero")
    neg_inf = b.const(np.array(-np.inf, dt.np_dtype), "attn_neg_inf")
    if mask is not None:
        bias = b.Where(mask, zero, neg_inf) if mask.type.dtype.np_dtype == np.bool_ else mask
        scores = b.Add(scores, bias)
    if node.attr("causal", 0):
        one = b.const(_i64(1), "attn_one")
        zero_i = b.const(_i64(0), "attn_zero_i")
        sq = b.Squeeze(b.Shape(q4, start=2, end=3), zero_i)
        skv = b.Squeeze(b.Shape(k4, start=2, end=3), zero_i)
        rows = b.Unsqueeze(b.Range(b.const(np.array(0, np.int64), "attn_start"), sq, b.Squeeze(one, zero_i)), one)
        cols = b.Unsqueeze(b.Range(b.const(np.array(0, np.int64), "attn_start"), skv, b.Squeeze(one, zero_i)), zero_i)
        if past_k is not None:
            rows = b.Add(rows, b.Squeeze(b.Shape(past_k, start=2, end=3), zero_i))
        scores = b.Add(scores, b.Where(b.LessOrEqual(cols, rows), zero, neg_inf))
    y4 = b.MatMul(b.Softmax(scores, axis=-1), v4)
    y = b.Reshape(b.Transpose(y4, perm=perm), b.const(_i64(0, 0, -1), "attn_merge")) if three_d else y4
    return [y, present_k, present_v][:len(node.outputs)]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "Attention",
    attrs={"num_heads": AttrSpec(AttrKind.INT, default=0), "kv_num_heads": AttrSpec(AttrKind.INT, default=0),
           "scale": AttrSpec(AttrKind.FLOAT, default=0.0), "causal": AttrSpec(AttrKind.INT, default=0),
           "softcap": AttrSpec(AttrKind.FLOAT, default=0.0)},
    min_inputs=3, max_inputs=6, min_outputs=1, max_outputs=3,
    infer=_attention_infer, reference=_attention_reference, decompose=_attention_decompose,
    doc="Scaled dot-product attention as ONNX Attention-23: Q, K, V in BNSH (4-D) or BSD (3-D, with "
        "num_heads/kv_num_heads); optional additive or boolean mask, past key/value (BNSH) and "
        "present outputs; causal masking is bottom-right aligned with the past; grouped-query "
        "aware; scale 0 means 1/sqrt(head_size).",
))
