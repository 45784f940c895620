"""TVM lowering rules for graphopt-domain ops (semantics: graphopt/ops/).

Attention is written out in Relax ops rather than `R.nn.attention`: that op's bottom-right
causal mask fails when the query and key lengths differ symbolically (a KV cache), and it
has no rule for fully-masked rows. The causal mask is built from `arange`, so one compiled
function serves every sequence and cache length.
"""
from __future__ import annotations

import functools
import math

import numpy as np

try:  # every module imports without tvm (the wheel check imports them all); rules run only with it
    from tvm import relax
    from tvm.relax import op as R
except ImportError:  # pragma: no cover
    relax = R = None

from graphopt.backends.tvm import moe_panels, norms, rules_cache, schedules_attention
from graphopt.backends.tvm.lowering import Lowerer, panel_width, relax_op, rule, static_int
from graphopt.ops.moe import moe_biases, moe_form
from graphopt.registry import get_op

_BNSH_FROM_BSNH = [0, 2, 1, 3]


def _neg_inf(dt: str):
    return relax.const(-np.inf, dt)


def _rms_norm_last_axis(lw: Lowerer, x, gamma, eps: float):
    """RMS normalization of `x` over its last axis, scaled by the 1-D `gamma`: on a CPU the
    hand-written kernel (norms.py) over `x` seen as rows, elsewhere Relax's op."""
    *lead, width = lw.shape(x)
    if not (lw.pack_weights and norms.fits(width) and lw.dtype(x) == lw.dtype(gamma) == "float32"):
        return lw.emit(R.nn.rms_norm(x, gamma, axes=[len(lead)], epsilon=eps))
    rows = lw.rows(lead)
    gv = lw.bb.add_func(norms.rms_norm_func(width, eps), "rms_norm_rows")
    y = lw.emit(relax.call_tir(gv, [lw.view(x, [rows, width]), gamma], relax.TensorType([rows, width], "float32")))
    return lw.view(y, [*lead, width])


@rule("RMSNorm", domain="graphopt")
def rms_norm(lw: Lowerer, node, args):
    x, scale = lw.tensor(args[0]), lw.tensor(args[1])
    rank = lw.rank(x)
    axis = node.attr("axis", -1)
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    eps = node.attr("epsilon", 1e-5)
    dt = lw.dtype(x)
    stash = "float64" if dt == "float64" else "float32"
    if dt == stash and lw.rank(scale) == len(axes) and all(
            lw.analyzer.can_prove_equal(a, b) for a, b in zip(lw.shape(scale), lw.shape(x)[axis:])):
        if axis == rank - 1:
            return [_rms_norm_last_axis(lw, x, scale, eps)]
        return [lw.emit(R.nn.rms_norm(x, scale, axes=axes, epsilon=eps))]
    xs = x if dt == stash else lw.emit(R.astype(x, stash))
    mean_square = lw.emit(R.mean(R.multiply(xs, xs), axis=axes, keepdims=True))
    y = lw.emit(R.multiply(xs, R.rsqrt(R.add(mean_square, relax.const(eps, stash)))))
    if dt != stash:
        y = lw.emit(R.astype(y, dt))
    return [lw.emit(R.multiply(y, scale))]


@rule("RotaryEmbedding", domain="graphopt")
def rotary_embedding(lw: Lowerer, node, args):
    x, cos, sin = (lw.tensor(a) for a in args[:3])
    pos = lw.tensor(args[3]) if len(args) > 3 and args[3] is not None else None
    dims = lw.shape(x)
    four_d = len(dims) == 4
    if four_d:  # B, N, S, H: the caches broadcast as B, 1, S, rot/2
        head, head_axis = dims[3], 1
        xh = x
    else:  # B, S, N*H -> B, S, N, H: the caches broadcast as B, S, 1, rot/2
        num_heads = node.attr("num_heads", 0)
        if not isinstance(dims[2], int):
            raise lw.error("the hidden size must be static")
        head, head_axis = dims[2] // num_heads, 2
        xh = lw.view(x, [dims[0], dims[1], num_heads, head])
    rot = node.attr("rotary_embedding_dim", 0) or head
    if not isinstance(rot, int) or rot % 2 or rot > head:
        raise lw.error(f"rotary_embedding_dim {rot} must be even and at most the head size {head}")
    half = rot // 2

    def tables(cos=cos, sin=sin):  # the same for every layer's queries and keys
        if pos is not None:
            # clip: a position past the table reads its last row, never out of bounds (and TVM warns at
            # every build of a "fast" take)
            cos, sin = lw.emit(R.take(cos, pos, axis=0, mode="clip")), lw.emit(R.take(sin, pos, axis=0, mode="clip"))
        return lw.emit(R.expand_dims(cos, [head_axis])), lw.emit(R.expand_dims(sin, [head_axis]))

    inputs = tuple(v.name if v is not None else None for v in node.inputs[1:4])
    cos, sin = lw.once(("rotary tables", inputs, head_axis), tables)

    def part(start: int, end: int, step: int = 1):  # xh[..., start:end:step]
        return lw.emit(R.strided_slice(xh, axes=[3], begin=[start], end=[end], strides=[step]))

    interleaved = node.attr("interleaved", 0)
    x1, x2 = (part(0, rot, 2), part(1, rot, 2)) if interleaved else (part(0, half), part(half, rot))
    cos, sin, x1, x2 = lw.broadcast(cos, sin, x1, x2)
    real = lw.emit(R.subtract(R.multiply(cos, x1), R.multiply(sin, x2)))
    imag = lw.emit(R.add(R.multiply(sin, x1), R.multiply(cos, x2)))
    if interleaved:  # real and imag back into even and odd positions
        pairs = lw.emit(R.stack([real, imag], axis=4))
        rotated = lw.emit(R.reshape(pairs, lw.shape(xh)[:3] + [rot]))
    else:
        rotated = lw.emit(R.concat([real, imag], axis=3))
    if rot != head:
        rotated = lw.emit(R.concat([rotated, part(rot, head)], axis=3))
    if four_d:
        return [rotated]
    return [lw.view(rotated, dims)]


@rule("Attention", domain="graphopt")
def attention(lw: Lowerer, node, args):
    q, k, v = (lw.tensor(a) for a in args[:3])
    mask, past_k, past_v = ([lw.tensor(a) if a is not None else None for a in args[3:6]] + [None] * 3)[:3]
    sinks = lw.tensor(args[7]) if len(args) > 7 and args[7] is not None else None
    if (past_k is None) != (past_v is None):
        raise lw.error("past_key and past_value must be given together")
    if node.attr("kv_layout", "BNSH") in ("static", "paged"):
        return rules_cache.cache_attention(lw, node, args, attention)
    dt = lw.dtype(q)
    q_dims = lw.shape(q)
    three_d = len(q_dims) == 3
    if three_d:
        nq = node.attr("num_heads", 0)
        nkv = node.attr("kv_num_heads", 0) or nq
        if not nq:
            raise lw.error("num_heads is required for 3-D inputs")

        def to_bsnh(t, heads: int):  # a view
            b, s, hidden = lw.shape(t)
            if not isinstance(hidden, int) or hidden % heads:
                raise lw.error(f"hidden size {hidden} is not a static multiple of {heads} heads")
            return lw.view(t, [b, s, heads, hidden // heads])
        q_bsnh, k_bsnh, v_bsnh = to_bsnh(q, nq), to_bsnh(k, nkv), to_bsnh(v, nkv)
        head = lw.shape(q_bsnh)[3]
        appended = None
        if past_k is not None and (node.attr("kv_layout", "BNSH") or "BNSH") == "BNSH":
            appended = schedules_attention.lower_kv_append(lw, past_k, past_v, k_bsnh, v_bsnh)
        if appended is not None:  # CPU: the cache concatenations and transposes in one kernel
            k_bnsh, v_bnsh = appended
        else:
            k_bnsh, v_bnsh = (lw.emit(R.permute_dims(t, _BNSH_FROM_BSNH)) for t in (k_bsnh, v_bsnh))
    else:
        q_bnsh, k_bnsh, v_bnsh, appended = q, k, v, None
        nq, nkv = static_int(q_dims[1]), static_int(lw.shape(k)[1])
        head = lw.shape(q_bnsh)[3]
    if (node.attr("kv_layout", "BNSH") or "BNSH") == "BSNH":
        # The caches are [batch, seq, kv_heads, head]: the new key/value append along axis 1
        # and the attention reads the whole cache in BNSH.
        present = []
        for past, new in ((past_k, k_bnsh), (past_v, v_bnsh)):
            new_bsnh = lw.emit(R.permute_dims(new, _BNSH_FROM_BSNH))
            present.append(lw.emit(R.concat([past, new_bsnh], axis=1)) if past is not None else new_bsnh)
        k_bnsh, v_bnsh = (lw.emit(R.permute_dims(t, _BNSH_FROM_BSNH)) for t in present)
    else:
        if past_k is not None and appended is None:
            k_bnsh = lw.emit(R.concat([past_k, k_bnsh], axis=2))
            v_bnsh = lw.emit(R.concat([past_v, v_bnsh], axis=2))
        present = [k_bnsh, v_bnsh]
    if nq != nkv:
        if not isinstance(nq, int) or not isinstance(nkv, int) or nq % nkv:
            raise lw.error(f"grouped-query attention needs static head counts that divide, got {nq} and {nkv}")
    scale = node.attr("scale", 0.0)
    if not scale:
        if not isinstance(head, int):
            raise lw.error("the head size must be static when no scale is given")
        scale = 1.0 / math.sqrt(head)
    y = schedules_attention.lower_fused(lw, node, q_bsnh if three_d else q, three_d, k_bnsh, v_bnsh, mask, scale,
                                       sinks)
    if y is not None:  # CPU: one kernel from the scores to P.V (schedules_attention.py)
        if three_d:
            b, s, n, h = lw.shape(y)
            y = lw.view(y, [b, s, lw.simplify(n * h)])
        else:
            y = lw.emit(R.permute_dims(y, _BNSH_FROM_BSNH))
        return [y, *present][:len(node.outputs)]
    if three_d:
        q_bnsh = lw.emit(R.permute_dims(q_bsnh, _BNSH_FROM_BSNH))
    # Grouped-query attention without copying the cache `group` times: the `group` query heads
    # of each key/value head (h0, h0, h1, h1, ... as np.repeat) are consecutive, so
    # [b, nq, s, x] is [b, nkv, group * s, x] in place: both matmuls run per key/value head.
    group = nq // nkv if nq != nkv else 1
    q_len = lw.shape(q_bnsh)[2]

    def by_kv_head(t):
        b, _, rows, x = lw.shape(t)
        return t if group == 1 else lw.emit(R.reshape(t, [b, nkv, lw.simplify(group * rows), x]))

    def by_query_head(t):
        b, _, _, x = lw.shape(t)
        return t if group == 1 else lw.emit(R.reshape(t, [b, nq, q_len, x]))

    q_scaled = by_kv_head(lw.emit(R.multiply(q_bnsh, relax.const(scale, dt))))
    scores = by_query_head(lw.emit(R.matmul(q_scaled, R.permute_dims(k_bnsh, [0, 1, 3, 2]))))
    softcap = node.attr("softcap", 0.0)
    if softcap:  # before the mask, so that masked scores stay -inf
        cap = relax.const(softcap, dt)
        scores = lw.emit(R.multiply(R.tanh(R.divide(scores, cap)), cap))

    past_axis = 1 if (node.attr("kv_layout", "BNSH") or "BNSH") == "BSNH" else 2
    past = lw.shape(past_k)[past_axis] if past_k is not None else 0
    kv_len = lw.shape(k_bnsh)[2]

    def mask_bias():  # the additive mask, and whether each query row attends anything
        bias = attends = None
        if mask is not None:
            bias = (lw.emit(R.where(mask, relax.const(0.0, dt), _neg_inf(dt))) if lw.dtype(mask) == "bool"
                    else mask if lw.dtype(mask) == dt else lw.emit(R.astype(mask, dt)))
        if node.attr("causal", 0):
            # Bottom-right aligned: query i (after `past` cached keys) attends key j iff j <= i + past.
            rows = lw.emit(R.expand_dims(R.arange(past, lw.simplify(past + q_len), 1, "int64"), [1]))
            cols = lw.emit(R.expand_dims(R.arange(0, kv_len, 1, "int64"), [0]))
            causal = lw.emit(R.where(R.less_equal(cols, rows), relax.const(0.0, dt), _neg_inf(dt)))
            bias = causal if bias is None else lw.emit(R.add(*lw.broadcast(bias, causal)))
        if mask is not None:
            # A query row that attends nothing gives zeros (softmax alone would give NaN). Not
            # `max(bias) == -inf`: Relax's max starts from the lowest finite value, not -inf.
            attends = lw.emit(R.max(R.astype(R.greater(bias, _neg_inf(dt)), "int8"), axis=[-1], keepdims=True))
        return bias, attends

    # The same for every layer that reads this mask at these lengths: computed once.
    key = ("attention mask", node.inputs[3].name if mask is not None else None, node.attr("causal", 0),
           dt, str(past), str(q_len), str(kv_len))
    bias, attends = lw.once(key, mask_bias)
    if bias is not None:
        scores = lw.emit(R.add(*lw.broadcast(scores, bias)))
    if sinks is not None:  # one more column in each row's softmax, each head's sink, dropped after
        b, _, _, _ = lw.shape(scores)
        column = lw.emit(R.broadcast_to(R.reshape(sinks, [1, nq, 1, 1]), [b, nq, q_len, 1]))
        probs = lw.emit(R.nn.softmax(R.concat([column, scores], axis=-1), axis=-1))
        probs = lw.emit(R.strided_slice(probs, axes=[3], begin=[1], end=[lw.simplify(kv_len + 1)],
                                        assume_inbound=True))
    else:
        probs = lw.emit(R.nn.softmax(scores, axis=-1))
    if attends is not None:
        probs = lw.emit(R.where(R.equal(attends, relax.const(0, "int8")), relax.const(0.0, dt), probs))
    y = by_query_head(lw.emit(R.matmul(by_kv_head(probs), v_bnsh)))
    if three_d:
        b, n, s, h = lw.shape(y)
        y = lw.emit(R.reshape(R.permute_dims(y, _BNSH_FROM_BSNH), [b, s, lw.simplify(n * h)]))
    return [y, *present][:len(node.outputs)]


# --------------------------------------------------------------------------------------
# Fused ops (graphopt/ops/linear.py, skip_norm.py, gated_linear.py)

_ACTIVATIONS = {"": None, "relu": "nn.relu", "gelu": "nn.gelu", "gelu_tanh": "nn.gelu_tanh", "silu": "nn.silu"}


def _attr(node, name: str):
    """An attribute's value, or the default its op declares."""
    return get_op(node.domain, node.op_type).attr_value(node, name)


def _activate(lw: Lowerer, y, act: str):
    if act not in _ACTIVATIONS:
        raise lw.error(f"unknown activation {act!r}")
    if act == "silu" and lw.pack_weights and lw.dtype(y) == "float32":
        # CPU: x * sigmoid(x) with the polynomial exp, which vectorizes; Relax's sigmoid calls
        # `expf` per element (the shipped model's SiLU x up took as long as its MLP down matmul).
        from tvm import te

        def silu(x):
            return te.compute(x.shape, lambda *i: x(*i) / (1 + schedules_attention.fast_exp(-x(*i))), name="silu")
        return lw.bb.emit_te(silu, y, primfunc_name_hint="silu")
    f = _ACTIVATIONS[act]
    return y if f is None else lw.emit(relax_op(f)(y))


@rule("Linear", domain="graphopt")
def linear(lw: Lowerer, node, args):
    y = lw.matmul(lw.tensor(args[0]), node.inputs[1], lw.tensor(args[1]), transposed=bool(node.attr("trans_w", 0)))
    if len(args) > 2 and args[2] is not None:
        y = lw.emit(R.add(y, lw.tensor(args[2])))
    return [_activate(lw, y, _attr(node, "activation"))]


def _gated_panels(lw: Lowerer, node, x):
    """CPU, constant weights, SiLU, no biases: silu(x @ W_gate) * (x @ W_up) as one kernel. The
    two weights are stored as one, each panel holding half a panel of gate columns then the same
    up columns, so a panel's product is its own output columns: the SiLU gate runs in the
    matmul's kernel, after its panels (schedules.Matmul leaves an epilogue that reads the
    product twice to loops of its own; TVM 0.27's reverse_compute_at refuses to place it at the
    tile: "TensorRegion pattern match failed" on the up half's `c + half`), not as a kernel
    launch of its own that slices a [rows, 2N] product. None where this does not apply (the
    caller emits the matmul and the product)."""
    from tvm import te

    gate_w, up_w = (lw.const_array(v) for v in node.inputs[1:3])
    if (not lw.pack_weights or gate_w is None or up_w is None or any(v is not None for v in node.inputs[3:])
            or _attr(node, "activation") != "silu" or lw.dtype(x) != "float32"
            or gate_w.dtype != np.float32 or up_w.dtype != np.float32 or gate_w.shape != up_w.shape
            or gate_w.ndim != 2 or static_int(lw.shape(x)[-1]) != gate_w.shape[0]):
        return None
    k_dim, n = gate_w.shape
    p = panel_width(2 * n)
    if p is None or n % (p // 2):
        return None
    half = p // 2

    def interleave(g):  # [K, N] gate, up -> [N / half, K, p] panels: half gate columns, then up
        gp = g.reshape(k_dim, n // half, half).transpose(1, 0, 2)
        up = up_w.reshape(k_dim, n // half, half).transpose(1, 0, 2)
        return np.concatenate([gp, up], axis=2)
    panels = lw.tensor(lw.weight(node.inputs[1], f"gated_panels{p}:{node.inputs[2].name}", interleave))

    def gated(x, wp):
        k = te.reduce_axis((0, k_dim), "k")
        lead = x.shape[:-1]
        y = te.compute((*lead, n // half, p), lambda *i: te.sum(x(*i[:-2], k) * wp(i[-2], k, i[-1]), axis=k),
                       name="matmul_panels")

        def out(*i):
            g = y(*i[:-1], i[-1] // half, i[-1] % half)
            return g / (1 + schedules_attention.fast_exp(-g)) * y(*i[:-1], i[-1] // half, i[-1] % half + half)
        return te.compute((*lead, n), out, name="silu_gate")
    return lw.bb.emit_te(gated, x, panels, primfunc_name_hint="matmul_panels_silu_gate")


@rule("GatedLinear", domain="graphopt")
def gated_linear(lw: Lowerer, node, args):
    x, w_gate, w_up = (lw.tensor(a) for a in args[:3])
    b_gate, b_up = ([lw.tensor(a) if a is not None else None for a in args[3:]] + [None, None])[:2]
    fused = _gated_panels(lw, node, x)
    if fused is not None:
        return [fused]
    n = lw.shape(w_gate)[1]
    # One matmul over both weights side by side (stored so when they are constants).
    w = y = None
    if node.inputs[1].const_value is not None and node.inputs[2].const_value is not None:
        up = node.inputs[2].const_value
        side_by_side = lambda g: np.concatenate([g, up], axis=1)  # noqa: E731
        y = lw.weight_matmul(x, node.inputs[1], f"gate_up:{node.inputs[2].name}:", side_by_side)
        w = lw.weight(node.inputs[1], f"gate_up:{node.inputs[2].name}", side_by_side) if y is None else None
    if y is None:
        w = w if w is not None else lw.emit(R.concat([w_gate, w_up], axis=1))
        y = lw.emit(R.matmul(x, w))
    gate = lw.emit(R.strided_slice(y, axes=[lw.rank(y) - 1], begin=[0], end=[n]))
    up = lw.emit(R.strided_slice(y, axes=[lw.rank(y) - 1], begin=[n], end=[lw.simplify(n + n)]))
    if b_gate is not None:
        gate = lw.emit(R.add(gate, b_gate))
    if b_up is not None:
        up = lw.emit(R.add(up, b_up))
    return [lw.emit(R.multiply(_activate(lw, gate, _attr(node, "activation")), up))]


@rule("MoE", domain="graphopt")
def moe(lw: Lowerer, node, args):
    """Only the chosen experts where `_moe_sparse` applies (the CPU, float32, outputs that fill
    whole panels); otherwise every expert on every token (graphopt.MoE's decomposition), with
    each expert's projections stored as weights of their own, packed as any linear's: expert
    e's output times the router's weight for e (the sum of `weights` where `index` is e)."""
    x, index, weights = (lw.tensor(a) for a in args[:3])
    up, down = node.inputs[3], node.inputs[4]
    ups, downs = lw.const_array(up), lw.const_array(down)
    if ups is None or downs is None:
        raise lw.error("the expert weights must be constants")
    moe_form(node)  # (checked here: a bad form is refused before anything is built)
    biases = [None if v is None else lw.const_array(v) for v in moe_biases(node)]
    if any(v is not None and c is None for v, c in zip(moe_biases(node), biases)):
        raise lw.error("the expert biases must be constants")
    inner = downs.shape[2]
    dtype = lw.dtype(weights)
    sparse = _moe_sparse(lw, node, x, index, weights, ups, downs, biases)
    if sparse is not None:
        return [sparse]

    def plus_bias(h, which: int, e: int):
        if biases[which] is None:
            return h
        return lw.emit(R.add(h, relax.const(np.ascontiguousarray(biases[which][e]), lw.dtype(h))))
    y = None
    for e in range(ups.shape[0]):
        chosen = lw.emit(R.astype(lw.emit(R.equal(index, relax.const(e, lw.dtype(index)))), dtype))
        w = lw.emit(R.sum(lw.emit(R.multiply(weights, chosen)), axis=[-1], keepdims=True))
        h = lw.weight_matmul(x, up, f"expert{e}:", lambda a, e=e: a[e].T)
        if h is None:
            h = lw.emit(R.matmul(x, lw.weight(up, f"expert{e}", lambda a, e=e: a[e].T)))
        h = _gated(lw, node, plus_bias(h, 0, e), inner)
        d = lw.weight_matmul(h, down, f"expert{e}:", lambda a, e=e: a[e].T)
        if d is None:
            d = lw.emit(R.matmul(h, lw.weight(down, f"expert{e}", lambda a, e=e: a[e].T)))
        d = lw.emit(R.multiply(plus_bias(d, 1, e), w))
        y = d if y is None else lw.emit(R.add(y, d))
    return [y]


def _gated(lw: Lowerer, node, h, inner: int):
    """graphopt.MoE's activation of the up projection's output h [.., n_up] (gated: the two halves,
    with GPT-OSS's clamp where it has one)."""
    act, gated = _attr(node, "activation"), bool(_attr(node, "gated"))
    if not gated:
        return _activate(lw, h, act)
    alpha, beta, limit = moe_form(node)
    last = lw.rank(h) - 1
    gate = lw.emit(R.strided_slice(h, axes=[last], begin=[0], end=[inner]))
    u = lw.emit(R.strided_slice(h, axes=[last], begin=[inner], end=[2 * inner]))
    dt = lw.dtype(h)
    if limit:  # GPT-OSS's clamped SwiGLU
        gate = lw.emit(R.minimum(gate, relax.const(limit, dt)))
        u = lw.emit(R.clip(u, -limit, limit))
    if beta:
        u = lw.emit(R.add(u, relax.const(beta, dt)))
    if alpha != 1.0:
        act_gate = lw.emit(R.multiply(gate, R.sigmoid(R.multiply(gate, relax.const(alpha, dt)))))
    else:
        act_gate = _activate(lw, gate, act)
    return lw.emit(R.multiply(act_gate, u))


def _moe_sparse(lw: Lowerer, node, x, index, weights, ups: np.ndarray, downs: np.ndarray, biases):
    """Only the chosen experts (backends/tvm/moe_panels.py): on the CPU, in float32, where both
    projections' outputs fill whole panels and k is static; else None (the dense form)."""
    if not lw.pack_weights or lw.dtype(x) != "float32" or ups.dtype != np.float32 or downs.dtype != np.float32:
        return None
    experts, n_up, hidden = ups.shape
    inner = downs.shape[2]
    dims = lw.shape(x)
    k = static_int(lw.shape(index)[-1])
    p_up, p_down = panel_width(n_up), panel_width(hidden)
    if p_up is None or p_down is None or not isinstance(k, int) or dims[-1] != hidden:
        return None
    m = lw.simplify(functools.reduce(lambda a, b: a * b, dims[:-1], 1))
    idx = lw.emit(R.reshape(R.astype(index, "int64"), [m, k]))

    def gemv(x3, value, p: int, n: int, kk: int, per_choice: bool):
        w = lw.weight(value, f"moe_panels{p}", lambda a: moe_panels.panels(a, p))
        gv = lw.bb.add_func(moe_panels.gemv_func(experts=experts, n=n, k=kk, p=p, choices=k, per_choice=per_choice),
                            "moe_gemv_panels")
        return lw.emit(relax.call_tir(gv, [x3, idx, w], relax.TensorType([m, k, n], "float32")))

    h = choice_bias(lw, gemv(lw.view(x, [m, 1, hidden]), node.inputs[3], p_up, n_up, hidden, False), biases[0], idx)
    h = _gated(lw, node, h, inner)
    d = choice_bias(lw, gemv(h, node.inputs[4], p_down, hidden, inner, True), biases[1], idx)
    return lw.view(weigh_choices(lw, d, idx, weights, experts, m, k), list(dims))


def choice_bias(lw: Lowerer, h, bias: np.ndarray | None, idx):
    """h [m, k, n] plus each choice's expert's bias (a constant [experts, n]); h as is without one."""
    if bias is None:
        return h
    return lw.emit(R.add(h, R.take(relax.const(np.ascontiguousarray(bias), "float32"), idx, axis=0, mode="clip")))


def weigh_choices(lw: Lowerer, d, idx, weights, experts: int, m, k: int):
    """[m, hidden]: the sum over the k choices of each one's output d [m, k, hidden] times its
    router weight; a choice outside [0, experts) weighs nothing (its row is zero, but a clipped
    bias is not)."""
    valid = lw.emit(R.logical_and(R.greater_equal(idx, relax.const(0, "int64")),
                                  R.less(idx, relax.const(experts, "int64"))))
    w = lw.emit(R.multiply(R.reshape(R.astype(weights, "float32"), [m, k]), R.astype(valid, "float32")))
    return lw.emit(R.sum(R.multiply(d, R.expand_dims(w, [2])), axis=[1]))


@rule("SkipNorm", domain="graphopt")
def skip_norm(lw: Lowerer, node, args):
    gamma = lw.tensor(args[2])
    beta, bias = ([lw.tensor(a) if a is not None else None for a in args[3:]] + [None, None])[:2]
    s = lw.emit(R.add(*lw.broadcast(args[0], args[1])))
    if bias is not None:
        s = lw.emit(R.add(s, bias))
    dt = lw.dtype(s)
    stash = "float64" if dt == "float64" else "float32"
    ss = s if dt == stash else lw.emit(R.astype(s, stash))
    eps = node.attr("epsilon", 1e-5)
    axis = lw.rank(s) - 1
    if node.attr("norm", "layer") == "rms" and dt == stash and lw.rank(gamma) == 1 and \
            lw.analyzer.can_prove_equal(lw.shape(gamma)[0], lw.shape(s)[axis]):
        # One kernel (Relax's rms_norm), where the steps below are two: x * x is not fused
        # into the mean that reads it.
        y = _rms_norm_last_axis(lw, s, gamma, eps)
        return [lw.emit(R.add(y, beta)) if beta is not None else y, s][:len(node.outputs)]
    if node.attr("norm", "layer") == "layer":
        width = lw.shape(s)[axis]
        if not isinstance(width, int):
            raise lw.error("the normalized dimension must be static")
        ones, zeros = relax.const(np.ones([width], stash)), relax.const(np.zeros([width], stash))
        y = lw.emit(R.nn.layer_norm(ss, ones, zeros, axes=[axis], epsilon=eps))
    elif node.attr("norm", "layer") == "rms":
        mean_square = lw.emit(R.mean(R.multiply(ss, ss), axis=[axis], keepdims=True))
        y = lw.emit(R.multiply(ss, R.rsqrt(R.add(mean_square, relax.const(eps, stash)))))
    else:
        raise lw.error("norm must be 'layer' or 'rms'")
    if stash != dt:
        y = lw.emit(R.astype(y, dt))
    y = lw.emit(R.multiply(y, gamma))
    if beta is not None:
        y = lw.emit(R.add(y, beta))
    return [y, s][:len(node.outputs)]
