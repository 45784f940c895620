"""TVM lowering of the preallocated KV caches: graphopt.Attention{kv_layout=static|paged}.

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

The paged cache is a pool of [num_blocks, block_size, kv_heads, head] blocks per layer and
kind, with `block_table [batch, max_blocks]` placing position p of row r at block
block_table[r, p // block_size], slot p % block_size. The write is the same in-place TIR
function through the table; attention reads the rows' valid past with a `take` of the pool
seen as [num_blocks * block_size, kv_heads, head] (a gather of L - S positions per row).
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


def _write_paged_func(dtype: str, table_dtype: str, block_size: int):
    """pool[table[b, p // block_size], p % block_size, n, h] = new[b, s, n, h] at p = offset + s;
    a position past the table is an error; a block id outside the pool is not written."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def kv_cache_write_paged(var_pool: T.handle, var_new: T.handle, var_table: T.handle, offset: T.int64):
        T.func_attr({"tirx.noalias": True})
        num_blocks, heads, head, batch, seq, width = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        pool = T.match_buffer(var_pool, (num_blocks, block_size, heads, head), dtype)
        new = T.match_buffer(var_new, (batch, seq, heads, head), dtype)
        table = T.match_buffer(var_table, (batch, width), table_dtype)
        assert offset + seq <= width * block_size, "the attention mask covers more positions than the block table holds"
        for b, s, n, h in T.grid(batch, seq, heads, head):
            with T.sblock("write"):
                vb, vs, vn, vh = T.axis.remap("SSSS", [b, s, n, h])
                T.reads(new[vb, vs, vn, vh], table[vb, (offset + vs) // block_size])
                T.writes(pool[T.int64(table[vb, (offset + vs) // block_size]), (offset + vs) % block_size, vn, vh])
                if T.int64(0) <= T.int64(table[vb, (offset + vs) // block_size]) \
                        and T.int64(table[vb, (offset + vs) // block_size]) < num_blocks:
                    pool[T.int64(table[vb, (offset + vs) // block_size]), (offset + vs) % block_size, vn, vh] = \
                        new[vb, vs, vn, vh]
    return kv_cache_write_paged


class _AsBNSHPast:
    """The attention node seen as one over a BNSH past (the static buffer's valid prefix)."""

    def __init__(self, node):
        self._node = node

    def attr(self, name: str, default=None):
        return "BNSH" if name == "kv_layout" else self._node.attr(name, default)

    def __getattr__(self, name: str):
        return getattr(self._node, name)


def cache_attention(lw: Lowerer, node, args, attend):
    """The rule for kv_layout static and paged; `attend(lw, node, args)` is the BNSH
    attention rule."""
    layout = node.attr("kv_layout", "BNSH")
    q, k, v = (lw.tensor(a) for a in args[:3])
    mask, past_k, past_v, table = ([lw.tensor(a) if a is not None else None for a in args[3:]] + [None] * 4)[:4]
    if past_k is None or past_v is None or mask is None:
        raise lw.error(f"kv_layout {layout} needs both past buffers and a mask (its length is the valid length)")
    if (layout == "paged") != (table is not None):
        raise lw.error("a block table goes with kv_layout paged, and only with it")
    nkv = node.attr("kv_num_heads", 0) or node.attr("num_heads", 0)
    total = lw.shape(mask)[-1]

    def as_bsnh(t):  # the new keys/values as [batch, seq, kv_heads, head]: a view of 3-D ones
        dims = lw.shape(t)
        if len(dims) == 4:
            return lw.emit(R.permute_dims(t, _BSNH_FROM_BNSH))
        if not isinstance(dims[2], int) or not nkv or dims[2] % nkv:
            raise lw.error(f"hidden size {dims[2]} is not a static multiple of {nkv} key/value heads")
        return lw.view(t, [dims[0], dims[1], nkv, dims[2] // nkv])

    presents, pasts = [], []
    rows = None
    for buf, new in ((past_k, k), (past_v, v)):
        new_bsnh = as_bsnh(new)
        dtype = lw.dtype(buf)
        if lw.dtype(new_bsnh) != dtype:
            raise lw.error(f"the {layout} cache is {dtype}, the new keys/values {lw.dtype(new_bsnh)}")
        past_len = lw.simplify(total - lw.shape(new_bsnh)[1])
        offset = relax.prim_value(past_len)
        if layout == "static":
            write = lw.bb.add_func(_write_func(dtype), "kv_cache_write")
            present = lw.emit(relax.call_tir_inplace(write, [buf, new_bsnh, offset], [0], buf.ty))
            # (assume_inbound: TVM 0.27's clamping of a symbolic end does not legalize)
            pasts.append(lw.emit(R.strided_slice(present, axes=[2], begin=[0], end=[past_len], assume_inbound=True)))
        else:
            num_blocks, block_size, heads, head = lw.shape(buf)
            if not all(isinstance(d, int) for d in (block_size, heads, head)):
                raise lw.error("kv_layout paged needs a static block size, key/value heads and head size")
            write = lw.bb.add_func(_write_paged_func(dtype, lw.dtype(table), block_size), "kv_cache_write_paged")
            present = lw.emit(relax.call_tir_inplace(write, [buf, new_bsnh, table, offset], [0], buf.ty))
            if rows is None:  # the pool rows of every row's valid past: [batch, past_len]
                pos = lw.emit(R.arange(0, past_len, 1, "int64"))
                blocks = lw.emit(R.astype(R.take(table, R.floor_divide(pos, relax.const(block_size, "int64")),
                                                 axis=1, mode="clip"), "int64"))
                rows = lw.emit(R.add(R.multiply(blocks, relax.const(block_size, "int64")),
                                     R.floor_mod(pos, relax.const(block_size, "int64"))))
            flat = lw.view(present, [lw.simplify(num_blocks * block_size), heads, head])
            past_bsnh = lw.emit(R.take(flat, rows, axis=0, mode="clip"))  # batch, past_len, heads, head
            pasts.append(lw.emit(R.permute_dims(past_bsnh, _BSNH_FROM_BNSH)))
        presents.append(present)
    y = attend(lw, _AsBNSHPast(node), [q, k, v, mask, *pasts, None, *args[7:8]])[0]
    return [y, *presents][:len(node.outputs)]
