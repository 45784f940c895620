"""A fused CPU attention kernel: one launch per layer for scores, mask, softmax and P.V.

The Relax form of attention (rules_graphopt.attention) is, per layer, transposes of q/k/v to
BNSH, a transpose of K, the scores matmul, the mask add, a four-pass softmax whose `exp` is a
scalar `expf` call per element, and the P.V matmul, with a [seq x total] score tensor written
to memory between them. On CPU targets the rule calls this kernel instead:

    out[b, i, n, :] = softmax_t(scale * q[b, i, n, :] . k[b, n // group, t, :] + bias[b, n, i, t]) @ v

- q and out are [batch, seq, num_heads, head]: a view of the 3-D q / attention output, so
  no transpose either way. k and v are the whole BNSH cache [batch, kv_heads, total, head]
  (past and new, as the present outputs hold it).
- One parallel task per (batch, kv head, block of ROWS query rows), where the rows of a KV
  head are its `group` query heads' rows one after the other (as the Relax rule's GQA view):
  the group shares every K/V read. The task keeps its q block transposed in registers
  (`[head, ROWS]`, ROWS lanes = one AVX-512 vector) and walks the keys in blocks of KEYS: the
  scores of a block are KEYS x ROWS multiply-adds per head element, like the matmul tile;
  the softmax is online (a running max and sum per row, the accumulator rescaled once per key
  block), so no score tensor is written; `exp` is a polynomial (Cephes' expf, the one TVM's
  `fast_exp` uses: within 2 ulp) that vectorizes, where `tir.exp` calls `expf` per element.
- The mask is an additive bias broadcast as [1 | batch, 1 | heads, 1 | seq, total], read in
  place (`min(index, dim - 1)` on broadcast dims). Causal attention stops each row at its
  last visible key (bottom-right aligned: key j for query i when j <= i + total - seq), and
  a task skips the key blocks that none of its rows sees.
- A row that sees no key (every bias -inf) gives zeros, as the reference does.
"""
from __future__ import annotations

import numpy as np

from graphopt.backends.tvm.lowering import static_int

ROWS = 16  # query rows per task: the vector lanes (16 float32 in an AVX-512 register)
KEYS = 8   # keys per online-softmax step: the score tile is KEYS x ROWS

# Cephes expf, as TVM's fast_exp: x = n ln2 + f, |f| <= ln2 / 2, exp(f) by a degree-7 polynomial
_EXP_LO, _EXP_HI = -88.3762626647949, 88.3762626647950
_LOG2E, _LN2_HI, _LN2_LO = 1.44269504088896341, 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def fast_exp(x):
    """exp(x) for float32 `x` as TIR arithmetic that LLVM vectorizes (no `expf` call);
    exp(-inf) and anything below -88.38 is 0."""
    from tvm import tirx

    f32 = "float32"

    def c(v):
        return tirx.const(v, f32)

    x = tirx.max(tirx.min(x, c(_EXP_HI)), c(_EXP_LO))
    n = tirx.floor(x * c(_LOG2E) + c(0.5))
    f = x - n * c(_LN2_HI) - n * c(_LN2_LO)
    p = c(_EXP_POLY[0])
    for coeff in _EXP_POLY[1:]:
        p = p * f + c(coeff)
    y = p * f * f + f + c(1.0)
    two_n = tirx.reinterpret(f32, tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"),
                                                  tirx.const(23, "int32")))
    return y * two_n


def attention_func(num_heads: int, kv_num_heads: int, head: int, scale: float, causal: bool,
                   dtype: str = "float32"):
    """The fused kernel as a TIR function of (q, k, v, bias) -> out (shapes above)."""
    from tvm.script import tirx as T

    group = num_heads // kv_num_heads
    neg_inf = float("-inf")

    @T.prim_func(private=True)
    def fused_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_bias: T.handle,
                        var_sinks: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, seq, total = T.int64(), T.int64(), T.int64()
        bb, bn, bs, bt = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (batch, seq, num_heads, head), dtype)
        k = T.match_buffer(var_k, (batch, kv_num_heads, total, head), dtype)
        v = T.match_buffer(var_v, (batch, kv_num_heads, total, head), dtype)
        bias = T.match_buffer(var_bias, (bb, bn, bs, bt), dtype)
        sinks = T.match_buffer(var_sinks, (num_heads,), dtype)  # -inf: no sink
        out = T.match_buffer(var_out, (batch, seq, num_heads, head), dtype)
        bias_flat = T.decl_buffer((bb * bn * bs * bt,), dtype, data=bias.data)
        assert T.Or(bb == 1, bb == batch), "the attention mask's batch is neither 1 nor the batch"
        assert T.Or(bn == 1, bn == num_heads), "the attention mask's heads are neither 1 nor num_heads"
        assert T.Or(bs == 1, bs == seq), "the attention mask's rows are neither 1 nor the query length"
        assert T.Or(bt == 1, bt == total), "the attention mask's length is neither 1 nor past + seq"
        rows = seq * group
        blocks = (rows + ROWS - 1) // ROWS
        for task in T.parallel(batch * kv_num_heads * blocks):
            qt = T.alloc_local((head, ROWS), dtype)
            acc = T.alloc_local((head, ROWS), dtype)
            sc = T.alloc_local((KEYS, ROWS), dtype)
            run_max = T.alloc_local((ROWS,), dtype)
            run_sum = T.alloc_local((ROWS,), dtype)
            new_max = T.alloc_local((ROWS,), dtype)
            safe_max = T.alloc_local((ROWS,), dtype)
            last = T.alloc_local((ROWS,), "int64")
            bias_row = T.alloc_local((ROWS,), "int64")
            b = task // (kv_num_heads * blocks)
            kvh = task // blocks % kv_num_heads
            r0 = task % blocks * ROWS
            # Per row, once per task (integer division does not vectorize): its last visible
            # key and where its bias row starts. Rows past the end repeat the last one (never stored).
            for r in range(ROWS):
                last[r] = total - T.int64(1) - T.int64(causal) * (seq - T.int64(1) - T.min(r0 + r, rows - 1) % seq)
                bias_row[r] = ((T.min(b, bb - 1) * bn + T.min(kvh * group + T.min(r0 + r, rows - 1) // seq, bn - 1))
                               * bs + T.min(T.min(r0 + r, rows - 1) % seq, bs - 1)) * bt
            # the softmax starts from the row's head's sink: one term exp(sink - max) in the sum,
            # against no value (no sink: -inf, an empty sum)
            for r in range(ROWS):
                run_max[r] = sinks[kvh * group + T.min(r0 + r, rows - 1) // seq]
                run_sum[r] = T.if_then_else(run_max[r] == T.float32(neg_inf), T.float32(0), T.float32(1))
            for r in range(ROWS):
                for h in range(head):
                    qt[h, r] = q[b, T.min(r0 + r, rows - 1) % seq, kvh * group + T.min(r0 + r, rows - 1) // seq,
                                 h] * T.float32(scale)
            for h in range(head):
                for r in T.vectorized(ROWS):
                    acc[h, r] = T.float32(0)
            # keys up to the last one any row of the block sees: the causal limit of its last row
            # (a block that spans two query heads holds both ends of the sequence: all keys)
            last_row = T.min(r0 + ROWS - 1, rows - 1)
            key_blocks = (total - T.int64(causal) * T.if_then_else(
                r0 // seq == last_row // seq, seq - T.int64(1) - last_row % seq, T.int64(0)) + KEYS - 1) // KEYS
            for kb in range(key_blocks):
                for t in T.unroll(KEYS):
                    for r in T.vectorized(ROWS):
                        sc[t, r] = T.float32(0)
                for h in range(head):
                    for t in T.unroll(KEYS):
                        for r in T.vectorized(ROWS):
                            sc[t, r] = sc[t, r] + qt[h, r] * k[b, kvh, T.min(kb * KEYS + t, total - 1), h]
                for r in T.vectorized(ROWS):
                    new_max[r] = run_max[r]
                for t in T.unroll(KEYS):
                    for r in T.vectorized(ROWS):
                        sc[t, r] = T.if_then_else(
                            kb * KEYS + t <= last[r],
                            sc[t, r] + bias_flat[bias_row[r] + T.min(kb * KEYS + t, bt - 1)],
                            T.float32(neg_inf))
                        new_max[r] = T.max(new_max[r], sc[t, r])
                for r in T.vectorized(ROWS):
                    safe_max[r] = T.if_then_else(new_max[r] == T.float32(neg_inf), T.float32(0), new_max[r])
                    run_max[r] = fast_exp(run_max[r] - safe_max[r])  # the rescale of what came before
                    run_sum[r] = run_sum[r] * run_max[r]
                for h in range(head):
                    for r in T.vectorized(ROWS):
                        acc[h, r] = acc[h, r] * run_max[r]
                for t in T.unroll(KEYS):
                    for r in T.vectorized(ROWS):
                        sc[t, r] = fast_exp(sc[t, r] - safe_max[r])
                        run_sum[r] = run_sum[r] + sc[t, r]
                for h in range(head):
                    for t in T.unroll(KEYS):
                        for r in T.vectorized(ROWS):
                            acc[h, r] = acc[h, r] + sc[t, r] * v[b, kvh, T.min(kb * KEYS + t, total - 1), h]
                for r in T.vectorized(ROWS):
                    run_max[r] = new_max[r]
            for r in range(ROWS):
                if r0 + r < rows:
                    for h in T.vectorized(head):
                        out[b, (r0 + r) % seq, kvh * group + (r0 + r) // seq, h] = T.if_then_else(
                            run_sum[r] > T.float32(0), acc[h, r] / run_sum[r], T.float32(0))

    return fused_attention


def lower_fused(lw, node, q, q_is_bsnh: bool, k_bnsh, v_bnsh, mask, scale: float, sinks=None):
    """The attention output as [batch, seq, num_heads, head] from the fused kernel, or None
    where it does not apply (then the rule writes attention out in Relax ops): targets other
    than the CPU (the kernel is a CPU loop nest; CUDA keeps dlight's schedules), dtypes other
    than float32, softcap, head sizes or head counts that are not static, and masks whose
    dims cannot be shown to broadcast to [batch, num_heads, seq, total]."""
    from tvm import relax
    from tvm.relax import op as R

    if not lw.pack_weights or node.attr("softcap", 0.0):  # pack_weights: built for the CPU schedules
        return None
    if lw.dtype(q) != "float32" or lw.dtype(k_bnsh) != "float32" or lw.dtype(v_bnsh) != "float32":
        return None
    batch, num_heads, seq, head = (lw.shape(q)[i] for i in ((0, 2, 1, 3) if q_is_bsnh else (0, 1, 2, 3)))
    _, kv_heads, total, kv_head = lw.shape(k_bnsh)
    if not all(isinstance(d, int) for d in (num_heads, head, kv_heads, kv_head)) or head != kv_head \
            or num_heads % kv_heads:
        return None
    bias = _mask_bias(lw, node, mask, [batch, num_heads, seq, total])
    if bias is False:
        return None
    if bias is None:  # no mask: a zero bias that broadcasts everywhere
        bias = relax.const(np.zeros((1, 1, 1, 1), np.float32))
    q_bsnh = q if q_is_bsnh else lw.emit(R.permute_dims(q, [0, 2, 1, 3]))
    if sinks is None:
        sinks = relax.const(np.full((num_heads,), -np.inf, np.float32))
    elif lw.dtype(sinks) != "float32":
        return None
    func = attention_func(num_heads, kv_heads, head, float(scale), bool(node.attr("causal", 0)))
    gv = lw.bb.add_func(func, "fused_attention")
    return lw.emit(relax.call_tir(gv, [q_bsnh, k_bnsh, v_bnsh, bias, sinks],
                                  relax.TensorType(lw.shape(q_bsnh), "float32")))


def _mask_bias(lw, node, mask, scores_dims: list):
    """The mask as a float32 additive bias of rank 4 (computed once for all layers that read
    it), None without a mask, False when its dims may not broadcast to `scores_dims`."""
    from tvm import relax, tirx
    from tvm.relax import op as R

    if mask is None:
        return None
    dims = lw.shape(mask)
    if len(dims) > 4:
        return False
    dims = [1] * (4 - len(dims)) + list(dims)
    for d, want in zip(dims, scores_dims):
        # a plain symbol (a graph input's `mask_dim3`) is checked by the kernel at run time
        if not (static_int(d) == 1 or isinstance(d, tirx.Var) or lw.analyzer.can_prove_equal(d, want)):
            return False

    def make():
        if lw.dtype(mask) == "bool":
            bias = lw.emit(R.where(mask, relax.const(0.0, "float32"), relax.const(-np.inf, "float32")))
        else:
            bias = mask if lw.dtype(mask) == "float32" else lw.emit(R.astype(mask, "float32"))
        return bias if len(lw.shape(mask)) == 4 else lw.emit(R.reshape(bias, dims))

    return lw.once(("attention mask bias", node.inputs[3].name, str(scores_dims)), make)


def kv_append_func(kv_heads: int, head: int, dtype: str = "float32"):
    """present_k, present_v [batch, kv_heads, past + seq, head] (BNSH) from the BNSH pasts and
    the new keys/values as [batch, seq, kv_heads, head] (a view of the 3-D projections): one
    launch for the two concatenations and the two transposes that Relax would run."""
    from tvm.script import tirx as T

    @T.macro
    def append(present, past_buf, new, b, n, past, seq):  # present[b, n] = past_buf[b, n] ++ new[b, :, n]
        for t in range(past):
            for h in T.vectorized(head):
                present[b, n, t, h] = past_buf[b, n, t, h]
        for t in range(seq):
            for h in T.vectorized(head):
                present[b, n, past + t, h] = new[b, t, n, h]

    @T.prim_func(private=True)
    def kv_append(var_past_k: T.handle, var_past_v: T.handle, var_k: T.handle, var_v: T.handle,
                  var_present_k: T.handle, var_present_v: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, past, seq = T.int64(), T.int64(), T.int64()
        past_k = T.match_buffer(var_past_k, (batch, kv_heads, past, head), dtype)
        past_v = T.match_buffer(var_past_v, (batch, kv_heads, past, head), dtype)
        k = T.match_buffer(var_k, (batch, seq, kv_heads, head), dtype)
        v = T.match_buffer(var_v, (batch, seq, kv_heads, head), dtype)
        present_k = T.match_buffer(var_present_k, (batch, kv_heads, past + seq, head), dtype)
        present_v = T.match_buffer(var_present_v, (batch, kv_heads, past + seq, head), dtype)
        for task in T.parallel(batch * kv_heads * 2):  # (row, kv head, key or value)
            b = task // (kv_heads * 2)
            n = task // 2 % kv_heads
            if task % 2 == 0:
                append(present_k, past_k, k, b, n, past, seq)
            else:
                append(present_v, past_v, v, b, n, past, seq)

    return kv_append


def lower_kv_append(lw, past_k, past_v, k_bsnh, v_bsnh):
    """(present_k, present_v) in BNSH from the fused append kernel, or None where it does not
    apply (not the CPU, not float32, head counts or sizes not static)."""
    from tvm import relax

    tensors = (past_k, past_v, k_bsnh, v_bsnh)
    if not lw.pack_weights or any(lw.dtype(t) != "float32" for t in tensors):
        return None
    batch, seq, kv_heads, head = lw.shape(k_bsnh)
    past_dims = lw.shape(past_k)
    if not isinstance(kv_heads, int) or not isinstance(head, int) \
            or [static_int(past_dims[1]), static_int(past_dims[3])] != [kv_heads, head]:
        return None
    present = relax.TensorType([batch, kv_heads, lw.simplify(lw.shape(past_k)[2] + seq), head], "float32")
    gv = lw.bb.add_func(kv_append_func(kv_heads, head), "kv_append")
    both = lw.emit(relax.call_tir(gv, list(tensors), [present, present]))
    return lw.emit(relax.TupleGetItem(both, 0)), lw.emit(relax.TupleGetItem(both, 1))
