"""TVM lowering of the preallocated KV caches: graphopt.Attention{kv_layout=static}.

The static cache is one [batch, kv_heads, max_positions, head] buffer per layer and kind
that the past input and the present output share (as ORT GroupQueryAttention's
past_present_share_buffer): the mask's last dimension L is the valid length after this step,
the S new keys/values go to positions [L - S, L), and attention reads positions [0, L).

    %present_k = call_tir_inplace(kv_cache_write, (%past_k, %k_BSNH, L - S))   (aliases %past_k)
    %y         = attention(%q, %k, %v, %mask, past = %present_k[:, :, :L - S])  (the BNSH rule)

The write is a TIR function run in place (`call_tir_inplace`): the buffer the caller passed
is the one the present comes back in, so a decode loop that keeps the returned tensor and
feeds it back (runtime.BoundRunner) copies nothing of the cache between steps. Attention
then reads the valid prefix like a BNSH past. A step whose L would pass the buffer is an
error of the write (before anything reads past it); the artifact and the Generator refuse it
before running, in one line.
"""
from __future__ import annotations

try:  # every module imports without tvm (the wheel check imports them all); rules run only with it
    from tvm import relax
    from tvm.relax import op as R
except ImportError:  # pragma: no cover
    relax = R = None

from graphopt.backends.tvm.lowering import Lowerer

_BSNH_FROM_BNSH = [0, 2, 1, 3]


def _write_func(dtype: str):
    """buf[b, n, offset + s, h] = new[b, s, n, h]; a write past the buffer is an error."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def kv_cache_write(var_buf: T.handle, var_new: T.handle, offset: T.int64):
        T.func_attr({"tirx.noalias": True})
        batch, heads, positions, head, seq = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        buf = T.match_buffer(var_buf, (batch, heads, positions, head), dtype)
        new = T.match_buffer(var_new, (batch, seq, heads, head), dtype)
        assert offset + seq <= positions, "the attention mask covers more positions than the static KV cache holds"
        for b, s, n, h in T.grid(batch, seq, heads, head):
            with T.sblock("write"):
                vb, vs, vn, vh = T.axis.remap("SSSS", [b, s, n, h])
                T.reads(new[vb, vs, vn, vh])
                T.writes(buf[vb, vn, offset + vs, vh])
                buf[vb, vn, offset + vs, vh] = new[vb, vs, vn, vh]
    return kv_cache_write


class _AsBNSHPast:
    """The attention node seen as one over a BNSH past (the static buffer's valid prefix)."""

    def __init__(self, node):
        self._node = node

    def attr(self, name: str, default=None):
        return "BNSH" if name == "kv_layout" else self._node.attr(name, default)

    def __getattr__(self, name: str):
        return getattr(self._node, name)


def static_attention(lw: Lowerer, node, args, attend):
    """The rule for kv_layout static; `attend(lw, node, args)` is the BNSH attention rule."""
    q, k, v = (lw.tensor(a) for a in args[:3])
    mask, past_k, past_v = ([lw.tensor(a) if a is not None else None for a in args[3:]] + [None] * 3)[:3]
    if past_k is None or past_v is None or mask is None:
        raise lw.error("kv_layout static needs both past buffers and a mask (its length is the valid length)")
    nkv = node.attr("kv_num_heads", 0) or node.attr("num_heads", 0)
    total = lw.shape(mask)[-1]

    def as_bsnh(t):  # the new keys/values as [batch, seq, kv_heads, head]: a view of 3-D ones
        dims = lw.shape(t)
        if len(dims) == 4:
            return lw.emit(R.permute_dims(t, _BSNH_FROM_BNSH))
        if not isinstance(dims[2], int) or not nkv or dims[2] % nkv:
            raise lw.error(f"hidden size {dims[2]} is not a static multiple of {nkv} key/value heads")
        return lw.emit(R.reshape(t, [dims[0], dims[1], nkv, dims[2] // nkv]))

    presents, pasts = [], []
    for buf, new in ((past_k, k), (past_v, v)):
        new_bsnh = as_bsnh(new)
        dtype = lw.dtype(buf)
        if lw.dtype(new_bsnh) != dtype:
            raise lw.error(f"the static cache is {dtype}, the new keys/values {lw.dtype(new_bsnh)}")
        past_len = lw.simplify(total - lw.shape(new_bsnh)[1])
        write = lw.bb.add_func(_write_func(dtype), "kv_cache_write")
        present = lw.emit(relax.call_tir_inplace(write, [buf, new_bsnh, relax.prim_value(past_len)], [0],
                                                 buf.ty))
        presents.append(present)
        # (assume_inbound: TVM 0.27's clamping of a symbolic end does not legalize)
        pasts.append(lw.emit(R.strided_slice(present, axes=[2], begin=[0], end=[past_len], assume_inbound=True)))
    y = attend(lw, _AsBNSHPast(node), [q, k, v, mask, *pasts])[0]
    return [y, *presents][:len(node.outputs)]
