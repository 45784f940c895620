"""Rotary embedding inside com.microsoft.GroupQueryAttention (`do_rotary=1`) in a decoder that
rewrite-kv-cache made: one node a layer where there were a Split and two RotaryEmbedding nodes.

What positions the kernel uses. ORT's CPU kernel (1.32) rotates the new tokens at their *index*
in the cache: 0..S-1 at the prompt, `seqlens_k[b]` at a one-token step (graphopt feeds
`seqlens_k = total - 1` for every row). It has a `position_ids` input, but at the prompt it reads
only its first element (measured: per-row mask positions given there are wrong from the first
step on), so it is not given. graphopt's positions come from the mask instead: a token's position
is the number of real tokens before it (`Slice(CumSum(attention_mask, exclusive))`, built by
rewrite-kv-cache).

Why the result is still right with left padding. After rotation by angles linear in the
position (`cos/sin[p] = a * (cos, sin)(p * theta_i)`, checked on the tables below), the score
q_m . k_n depends on m - n only. In a left-padded row (zeros, then ones) every real token, cached
or new, has index position = mask position + the row's pad count, one constant per row, so the
scores over the unmasked keys are the same up to float rounding; the pad keys are masked by the
bias anyway. Where it would differ: a mask with a 0 *after* a 1 in the same row (a hole), whose
later tokens would shift their relative positions. graphopt's Generator and onnxruntime-genai
never make one (left padding, then a 1 per step; genai 0.18 feeds all ones); an artifact driven
by hand with such a mask gets index positions, and docs/generation.md says so.

When it applies (else the attention keeps the RotaryEmbedding nodes): a generation graph, Q and
K (3-D) each the output of a com.microsoft.RotaryEmbedding over the whole head (no partial
rotary; head size a multiple of 16, which the kernel's rotary requires), both with the same cos/sin tables ([max_positions, head/2] constants, linear in the
position) and the same position ids, and those are the mask-derived ones.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.ir import Node, Value, constant_value

from graphopt.backends.onnxruntime.kernels import MS_DOMAIN

MASK = "attention_mask"


@dataclasses.dataclass
class RotaryInKernel:
    q: Value  # before rotation
    k: Value
    cos: Value  # [max_positions, head / 2]
    sin: Value
    interleaved: int
    nodes: tuple  # the two RotaryEmbedding nodes the kernel replaces, and the positions' nodes


def rotary_in_kernel(site, generation_graph: bool) -> "RotaryInKernel | str":
    """The rotary that GroupQueryAttention can apply itself for this site, or why not."""
    if not generation_graph:
        return "not a decoder rewrite-kv-cache made (its positions are not the mask's)"
    if site.rank != 3:
        return "Q and K are not 3-D"
    nodes = [_rotary(site.q), _rotary(site.k)]
    if None in nodes:
        return "Q or K is not a RotaryEmbedding's output"
    (xq, pq, cq, sq), (xk, pk, ck, sk) = (n.inputs[:4] for n in nodes)
    if pq is not pk or cq is not ck or sq is not sk:
        return "Q's and K's rotary read different positions or tables"
    if nodes[0].attr("interleaved", 0) != nodes[1].attr("interleaved", 0):
        return "Q's and K's rotary differ in interleaving"
    if (nodes[0].attr("num_heads", 0), nodes[1].attr("num_heads", 0)) != (site.num_heads, site.kv_num_heads):
        return "the rotary's head counts are not the attention's"
    rot = [n.attr("rotary_embedding_dim", 0) for n in nodes]
    cos, sin = constant_value(cq), constant_value(sq)
    if cos is None or sin is None or cos.ndim != 2 or cos.shape != sin.shape or cos.shape[1] * 2 != site.head:
        return "the rotary tables are not constant [max_positions, head/2]"
    if site.head % 16:
        return f"head size {site.head} is not a multiple of 16 (the kernel's rotary refuses it)"
    if any(r not in (0, site.head) for r in rot):
        return "partial rotary (the kernel's rotary covers the whole head)"
    if not _mask_positions(pq):
        return "the position ids are not the mask-derived ones of rewrite-kv-cache"
    if not linear_in_position(cos, sin):
        return "the rotary tables are not rotations linear in the position"
    return RotaryInKernel(xq, xk, cq, sq, int(nodes[0].attr("interleaved", 0)), (*nodes, *_producers(pq)))


def _rotary(v: Value) -> Node | None:
    p = v.producer()
    if p is None or p.domain != MS_DOMAIN or p.op_type != "RotaryEmbedding" or len(p.inputs) < 4:
        return None
    return p


def _producers(pos: Value) -> list[Node]:
    """The position ids' Slice, CumSum and Cast: dead once no rotary reads them."""
    chain, v = [], pos
    while (p := v.producer()) is not None and p.domain == "" and p.op_type in ("Slice", "CumSum", "Cast"):
        chain.append(p)
        v = p.inputs[0]
    return chain


def _mask_positions(pos: Value) -> bool:
    """`pos` is Slice(CumSum(attention_mask [as int64], axis 1, exclusive), ...) along axis 1:
    each token's count of real tokens before it (rewrite-kv-cache's position_ids)."""
    s = pos.producer()
    if s is None or s.domain != "" or s.op_type != "Slice" or len(s.inputs) < 4:
        return False
    axes = constant_value(s.inputs[3])
    c = s.inputs[0].producer()
    if axes is None or axes.reshape(-1).tolist() != [1] or c is None or c.domain != "" or c.op_type != "CumSum":
        return False
    axis = constant_value(c.inputs[1])
    if axis is None or int(axis) != 1 or not c.attr("exclusive", 0) or c.attr("reverse", 0):
        return False
    m = c.inputs[0]
    cast = m.producer()
    if cast is not None and cast.domain == "" and cast.op_type == "Cast":
        m = cast.inputs[0]
    return m.is_graph_input and m.name == MASK


def linear_in_position(cos: np.ndarray, sin: np.ndarray, tol: float = 1e-4) -> bool:
    """cos/sin[p, i] = a_i * (cos, sin)(p * theta_i): a rotation by an angle linear in p (scaled
    rotary variants, linear or per-frequency like Llama 3's, keep this). Only then does a
    constant position offset leave q_m . k_n unchanged. Checked in float64 on the unwrapped
    angle, tolerant of the float32 rounding the tables were made with."""
    z = cos.astype(np.float64) + 1j * sin.astype(np.float64)
    amp = np.abs(z)
    if len(z) < 2 or not np.allclose(amp, amp[:1], rtol=1e-5, atol=0) or np.abs(np.angle(z[0])).max() > tol:
        return False
    angle = np.unwrap(np.angle(z), axis=0)  # consecutive steps below pi: theta_i <= 1 in every rotary
    p = np.arange(len(z), dtype=np.float64)[:, None]
    theta = angle[-1] / p[-1]
    return bool((np.abs(angle - p * theta) <= tol * (1 + np.abs(p * theta))).all())
