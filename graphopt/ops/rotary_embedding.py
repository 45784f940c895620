"""graphopt.RotaryEmbedding: ONNX RotaryEmbedding-23's semantics, on 4-D (BNSH) or 3-D ([batch,
seq, hidden] with num_heads) inputs, with ONNX's reference kernel.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, AttrKind, Node, Value
from graphopt.ops.common import BNSH_FROM_BSNH, i64, unsupported
from graphopt.registry import AttrSpec, OpDef, register_op

_INT64_MAX = np.iinfo(np.int64).max


def _rope_infer(node: Node):
    x, cos, sin = node.inputs[:3]
    if any(t.type is None for t in (x, cos, sin)):
        return [None if x.type is None else x.type]
    shape = x.type.shape
    if shape is not None and len(shape) not in (3, 4):
        raise unsupported(node, f"input must have rank 3 or 4, got {x.type}")
    if shape is not None and len(shape) == 3 and not node.attr("num_heads", 0):
        raise unsupported(node, "num_heads is required for 3-D input")
    for cache in (cos, sin):
        if cache.type.dtype is not x.type.dtype:
            raise unsupported(node, f"{cache.name!r} is {cache.type.dtype.short}, input is {x.type.dtype.short}")
    return [x.type]


def _rope_reference(node: Node, inputs):
    from onnx.reference.ops.op_rotary_embedding import rotary_embedding

    x, cos, sin = inputs[:3]
    pos = inputs[3] if len(inputs) > 3 else None
    return [rotary_embedding(x, cos, sin, pos, interleaved=node.attr("interleaved", 0),
                             rotary_embedding_dim=node.attr("rotary_embedding_dim", 0),
                             num_heads=node.attr("num_heads", 0)).astype(x.dtype)]


def _rope_head_size(node: Node) -> int | None:
    shape = node.inputs[0].type.shape
    if len(shape) == 4:
        return shape[3] if isinstance(shape[3], int) else None
    num_heads = node.attr("num_heads", 0)
    if not isinstance(shape[2], int):
        return None
    if shape[2] % num_heads:
        raise unsupported(node, f"hidden size {shape[2]} is not a multiple of num_heads={num_heads}")
    return shape[2] // num_heads


def _rope_decompose(b: Builder, node: Node):
    x, cos, sin = node.inputs[:3]
    pos = node.inputs[3] if len(node.inputs) > 3 else None
    shape = x.type.shape
    if shape is None:
        raise unsupported(node, "the input's rank must be known to decompose")
    _rope_infer(node)
    head = _rope_head_size(node)
    rot = node.attr("rotary_embedding_dim", 0) or head
    if rot is None:
        raise unsupported(node, "the head size must be static to decompose (or give rotary_embedding_dim)")
    if rot % 2 or (head is not None and rot > head):
        raise unsupported(node, f"rotary_embedding_dim {rot} must be even and at most the head size {head}")
    half = rot // 2
    # Work in BSNH so that the caches, (B, S, rot/2), broadcast as (B, S, 1, rot/2).
    if len(shape) == 4:
        x_bsnh = b.Transpose(x, perm=BNSH_FROM_BSNH)
    else:
        x_bsnh = b.Reshape(x, b.const(i64(0, 0, node.attr("num_heads", 0), -1), "rope_bsnh_shape"))
    if pos is not None:
        cos, sin = b.Gather(cos, pos, axis=0), b.Gather(sin, pos, axis=0)
    head_axis = b.const(i64(2), "rope_head_axis")
    cos, sin = b.Unsqueeze(cos, head_axis), b.Unsqueeze(sin, head_axis)

    last = b.const(i64(-1), "rope_last_axis")

    def part(start: int, end: int, step: int = 1) -> Value:  # x_bsnh[..., start:end:step]
        steps = [b.const(i64(step), "rope_step")] if step != 1 else []
        return b.Slice(x_bsnh, b.const(i64(start), "rope_start"), b.const(i64(end), "rope_end"), last, *steps)

    interleaved = node.attr("interleaved", 0)
    if interleaved:  # rotate the pairs (x[2i], x[2i+1])
        x1, x2 = part(0, rot, 2), part(1, rot, 2)
    else:  # rotate the pairs (x[i], x[i + rot/2])
        x1, x2 = part(0, half), part(half, rot)
    real = b.Sub(b.Mul(cos, x1), b.Mul(sin, x2))
    imag = b.Add(b.Mul(sin, x1), b.Mul(cos, x2))
    if interleaved:  # real and imag back into even and odd positions
        pairs = b.Concat(b.Unsqueeze(real, last), b.Unsqueeze(imag, last), axis=-1)  # B, S, N, rot/2, 2
        rotated = b.Reshape(pairs, b.const(i64(0, 0, 0, -1), "rope_pairs_shape"))
    else:
        rotated = b.Concat(real, imag, axis=-1)
    if rot != head:  # partial rotation: the rest of each head passes through
        rotated = b.Concat(rotated, part(rot, _INT64_MAX), axis=-1)
    if len(shape) == 4:
        return [b.Transpose(rotated, perm=BNSH_FROM_BSNH)]
    return [b.Reshape(rotated, b.const(i64(0, 0, -1), "rope_bsd_shape"))]


register_op(OpDef(
    GRAPHOPT_DOMAIN, "RotaryEmbedding",
    attrs={"interleaved": AttrSpec(AttrKind.INT, default=0), "num_heads": AttrSpec(AttrKind.INT, default=0),
           "rotary_embedding_dim": AttrSpec(AttrKind.INT, default=0)},
    min_inputs=3, max_inputs=4, min_outputs=1, max_outputs=1,
    infer=_rope_infer, reference=_rope_reference, decompose=_rope_decompose,
    doc="Rotary position embedding of X (B,N,S,H or B,S,N*H with num_heads) with cos/sin caches, as ONNX "
        "RotaryEmbedding-23: caches are (max_pos, rot/2) indexed by position_ids (B,S), or (B,S,rot/2); "
        "the first rotary_embedding_dim (default: all) entries of each head rotate, in halves or, "
        "with interleaved=1, in even/odd pairs.",
))
