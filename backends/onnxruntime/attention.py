"""graphopt.Attention -> com.microsoft.GroupQueryAttention or MultiHeadAttention.

The choice, per site (measured and explained in docs/ort_lowering.md):

- GroupQueryAttention where it runs the site: self-attention (query and key sequences the
  same), head size a multiple of 8, V's head size equal to K's, and with a past only when
  batch or query length is statically 1 (the CPU kernel refuses a multi-token step over a
  batched cache), or in a decoder rewrite-kv-cache made (prefill with an empty past and
  one-token steps, which is how it is driven). It takes grouped-query K/V as they are, a 4-D additive bias, softcap, and
  (ORT >= 1.2x) causal=0.
- MultiHeadAttention (float32 on CPU) otherwise, but not with softcap: grouped K/V heads are
  repeated first, and a past is concatenated in the graph (so that the presents keep the
  grouped heads).
- Otherwise the decomposition.

What both kernels need that graphopt.Attention does not:
- query (and for GQA key/value) in BSD: a 4-D BNSH input is transposed to BSD, and the BSD
  output back to BNSH (the fusion pass can avoid both by producing 3-D Attention);
- an additive float bias of shape (B|1, N|1, S, T): a boolean mask becomes 0 / -inf, a mask of
  lower rank is unsqueezed, and one broadcast along S (e.g. (B, 1, 1, T)) is expanded;
- causal masking together with a mask is folded into the bias (the kernels' own causal flag is
  used only without a mask), because
- a query row whose bias is -inf everywhere gives NaN in both kernels, where graphopt (and the
  ONNX spec) give zeros: with a mask, the output is guarded by `Where(rowmax(bias) > -inf, Y, 0)`,
  unless the bias is a Where between finite constants (rewrite-kv-cache's), where no row can be
  -inf everywhere.

In a decoder rewrite-kv-cache made, GroupQueryAttention also takes over the causal half of its
bias (`causal=1`, the padding alone as the bias: gqa_causal.py) and, where provably the same,
the rotary of Q and K (`do_rotary=1`: gqa_rotary.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.ir import GRAPHOPT_DOMAIN, Node, TensorType, Value, constant_value
from graphopt.ops.attention import sinks_of
from graphopt.registry import register_lowering

from graphopt.backends.onnxruntime.gqa_causal import padding_of_causal_bias
from graphopt.backends.onnxruntime.gqa_rotary import RotaryInKernel, rotary_in_kernel
from graphopt.backends.onnxruntime.kernels import MS_DOMAIN, schema_has_attr, schema_inputs
from graphopt.backends.onnxruntime.lowering import BACKEND, LoweringContext

GQA, MHA = "GroupQueryAttention", "MultiHeadAttention"
_BNSH_FROM_BSNH = [0, 2, 1, 3]


def _i64(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def same_dim(a, b) -> bool:
    """Provably equal: the same int or the same symbol."""
    return a is not None and a == b


@dataclasses.dataclass
class Site:
    """One Attention node, read into the terms the kernels use."""

    q: Value
    k: Value
    v: Value
    mask: Value | None
    past_k: Value | None
    past_v: Value | None
    rank: int
    dtype: DType
    batch: object
    q_seq: object
    kv_seq: object
    num_heads: int
    kv_num_heads: int
    head: int | None
    v_head: int | None
    causal: bool
    scale: float
    softcap: float
    want_present: bool
    sinks: Value | None = None  # [num_heads]: GroupQueryAttention's head_sink

    @staticmethod
    def read(node: Node) -> "Site | str":
        q, k, v = node.inputs[:3]
        mask, past_k, past_v = (list(node.inputs[3:]) + [None] * 3)[:3]
        for t, name in ((q, "Q"), (k, "K"), (v, "V")):
            if t.type is None or t.type.shape is None:
                return f"{name}'s rank is unknown"
        rank = q.type.rank
        if k.type.rank != rank or v.type.rank != rank:
            return f"Q, K and V have ranks {rank}, {k.type.rank}, {v.type.rank}"
        qs, ks, vs = q.type.shape, k.type.shape, v.type.shape
        if rank == 4:
            nq, nkv, head, v_head = qs[1], ks[1], qs[3], vs[3]
            batch, q_seq, kv_seq = qs[0], qs[2], ks[2]
        elif rank == 3:
            nq = node.attr("num_heads", 0)
            nkv = node.attr("kv_num_heads", 0) or nq
            head = qs[2] // nq if isinstance(qs[2], int) and nq else None
            v_head = vs[2] // nkv if isinstance(vs[2], int) and nkv else None
            batch, q_seq, kv_seq = qs[0], qs[1], ks[1]
        else:
            return f"Q has rank {rank}"
        if not isinstance(nq, int) or not isinstance(nkv, int) or not nq or not nkv:
            return "the head counts are not static"
        if nq % nkv:
            return f"{nq} query heads are not a multiple of {nkv} key/value heads"
        if past_k is not None and (past_k.type is None or past_k.type.rank != 4):
            return "the past's rank is not 4"
        return Site(q, k, v, mask, past_k, past_v, rank, q.type.dtype, batch, q_seq, kv_seq, nq, nkv,
                    head, v_head, bool(node.attr("causal", 0)), float(node.attr("scale", 0.0)),
                    float(node.attr("softcap", 0.0)), len(node.outputs) > 1, sinks_of(node))


# --------------------------------------------------------------------------------------
# Which kernel


def why_not_gqa(ctx: LoweringContext, s: Site) -> str | None:
    if not ctx.has_kernel(MS_DOMAIN, GQA, s.dtype):
        return f"no {ctx.target} kernel for {s.dtype.short}"
    if s.mask is not None and "attention_bias" not in schema_inputs(MS_DOMAIN, GQA):
        return "this ORT's GroupQueryAttention takes no attention_bias"
    if not s.causal and not schema_has_attr(MS_DOMAIN, GQA, "causal"):
        return "this ORT's GroupQueryAttention is always causal"
    if s.sinks is not None and "head_sink" not in schema_inputs(MS_DOMAIN, GQA):
        return "this ORT's GroupQueryAttention takes no head_sink (attention sinks)"
    if not isinstance(s.head, int) or s.head % 8:
        return f"head size {s.head} is not a multiple of 8"
    if s.v_head != s.head:
        return f"V's head size {s.v_head} differs from K's {s.head}"
    if not same_dim(s.q_seq, s.kv_seq):
        return f"query length {s.q_seq} and key length {s.kv_seq} are not provably equal"
    if s.past_k is not None and s.q_seq != 1 and s.batch != 1 and not _generation_graph(ctx):
        return "a past with more than one query token needs batch size 1"
    if s.mask is not None and (why := why_not_bias(s)):
        return why
    return None


def _generation_graph(ctx: LoweringContext) -> bool:
    """A decoder that rewrite-kv-cache made (its metadata says the cache layout). It is driven
    by prefill with an empty past and one-token decode steps, both of which the CPU kernel
    runs at any batch size; a multi-token step over a batched cache is the one call it
    refuses, with an error (never a wrong answer)."""
    return "graphopt.kv_layout" in ctx.graph.metadata.metadata_props


def why_not_mha(ctx: LoweringContext, s: Site) -> str | None:
    if not ctx.has_kernel(MS_DOMAIN, MHA, s.dtype):
        return f"no {ctx.target} kernel for {s.dtype.short}"
    if s.softcap:
        return "no softcap"
    if s.sinks is not None:
        return "no attention sinks"
    if s.num_heads != s.kv_num_heads and not (isinstance(s.head, int) and isinstance(s.v_head, int)):
        return "repeating grouped K/V heads needs static head sizes"
    if s.mask is not None and (why := why_not_bias(s)):
        return why
    return None


def why_not_bias(s: Site) -> str | None:
    shape = s.mask.type.shape if s.mask.type is not None else None
    if shape is None or not 1 <= len(shape) <= 4:
        return "the mask's rank is unknown or above 4"
    if not (s.mask.type.dtype.is_float or s.mask.type.dtype in (DType.BOOL, DType.INT64, DType.INT32)):
        return f"a {s.mask.type.dtype.short} mask"
    # A valid mask broadcasts to (B, N, S, T), so an unknown dimension is 1 or the full size
    # at run time, both of which the kernels take; only S needs care (see `_bias`).
    heads = ((1, 1, 1, 1) + tuple(shape))[-3]
    if isinstance(heads, int) and heads not in (1, s.num_heads):
        return f"the mask's head dimension is {heads}, not 1 or {s.num_heads}"
    return None


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "Attention")
def lower_attention(ctx: LoweringContext, b: Builder, node: Node):
    choice = ctx.options["attention_kernel"]
    if choice == "decompose":
        return "attention_kernel=decompose"
    layout = node.attr("kv_layout", "BNSH") or "BNSH"
    if layout == "static":
        return _lower_static(ctx, b, node, choice)
    if layout == "paged":  # this ORT registers no CPU kernel for com.microsoft.PagedAttention (tested)
        return "kv_layout paged: no ORT CPU kernel; decomposed (Gather on the block table, ScatterND)"
    if layout != "BNSH":
        return f"kv_layout {layout} (ORT's attention kernels take BNSH caches)"
    if choice == "onnx":
        return _build_onnx_attention(ctx, b, node)
    s = Site.read(node)
    if isinstance(s, str):
        return s
    if choice == "auto" and _decode_site_without_kernel_rotary(ctx, s) and not (
            _shared_cache_pays(ctx) and why_not_gqa(ctx, s) is None):
        built = _build_onnx_attention(ctx, b, node)
        if not isinstance(built, str):
            return built
    no_gqa = why_not_gqa(ctx, s) if choice in ("auto", "gqa") else "attention_kernel=mha"
    if no_gqa is None:
        return _build(ctx, b, node, s, GQA)
    no_mha = why_not_mha(ctx, s) if choice in ("auto", "mha") else "attention_kernel=gqa"
    if no_mha is None:
        return _build(ctx, b, node, s, MHA)
    return f"{GQA}: {no_gqa}; {MHA}: {no_mha}"


def _decode_site_without_kernel_rotary(ctx: LoweringContext, s: Site) -> bool:
    """A growing-cache site of a generation-ready decoder whose rotary (if any) GroupQueryAttention
    could not apply itself: opset-23 Attention is the faster kernel there. ORT 1.32's CPU
    GroupQueryAttention spends ~6 us a head at a one-token step (GPT-2 small, 128 cached: 119 us a
    layer growing, 73 us sharing a static buffer, against opset-23 Attention's 65 us with the
    concatenation); with the rotary inside GQA (Llama-style) the two tie, and GQA saves two
    RotaryEmbedding nodes a layer, so those sites stay GQA."""
    return (_generation_graph(ctx) and s.past_k is not None
            and isinstance(rotary_in_kernel(s, True), str))


def _shared_cache_pays(ctx: LoweringContext) -> bool:
    """A CPU decoder whose linears hold 4- or 8-bit weights (MatMulNBits): its growing cache is
    a large part of the bytes a step moves, and GroupQueryAttention, whose presents graphopt's
    Generator and onnxruntime-genai bind to the pasts' buffers (written in place: no copy of the
    whole past a step), beats opset-23 Attention's concatenation there. Measured on GPT-2 small,
    128 cached (benchmarks/attention_choice.py, two runs each): int4 block 32 with the embeddings,
    GQA shared 1.08-1.16x faster than Attention growing (GQA driven growing, as Optimum drives
    it, 0.81-0.87x); int8 block 128 (`--quantize int8`), GQA shared 1.075-1.11x over three
    runs (growing 0.83-0.84x); in fp32 GQA shared was 0.99-1.01x, so fp32 keeps Attention (docs/ort_lowering.md).
    Only where the artifact will be marked shared: the driver marks a decoder whose maximum
    context it knows (rewrite-kv-cache's metadata)."""
    positions = ctx.graph.metadata.metadata_props.get("graphopt.max_positions", "")
    return (ctx.target == "cpu" and bool(ctx.weight_bits & {4, 8}) and positions.isdigit()
            and int(positions) > 0)


def _lower_static(ctx: LoweringContext, b: Builder, node: Node, choice: str):
    """kv_layout static: GroupQueryAttention with the buffers as past and present, the
    mask's length as the total sequence length (past_present_share_buffer when the caller
    binds each present to its past, as onnxruntime-genai and graphopt's Generator do).
    MultiHeadAttention has no such mode: without GQA the decomposition runs the site."""
    if choice not in ("auto", "gqa"):
        return f"kv_layout static runs on {GQA} only (attention_kernel={choice})"
    s = Site.read(node)
    if isinstance(s, str):
        return s
    if s.causal or s.mask is None:
        return "kv_layout static takes its causal mask as a bias (as rewrite-kv-cache builds it)"
    why = why_not_gqa(ctx, s)
    if why is not None:
        return f"{GQA}: {why}"
    return _build(ctx, b, node, s, GQA, static=True)


# --------------------------------------------------------------------------------------
# Building


def _to_bsd(b: Builder, t_BNSH: Value) -> Value:
    return b.Reshape(b.Transpose(t_BNSH, perm=_BNSH_FROM_BSNH), b.const(_i64(0, 0, -1), "bsd_shape"))


def _to_bnsh(b: Builder, t_BSD: Value, heads: int) -> Value:
    return b.Transpose(b.Reshape(t_BSD, b.const(_i64(0, 0, heads, -1), "bsnh_shape")), perm=_BNSH_FROM_BSNH)


def _repeat_heads(b: Builder, t_BNSH: Value, s: Site, head: int) -> Value:
    """(B, Nkv, T, H) -> (B, Nq, T, H), each head next to its copies (as graphopt's reference)."""
    if s.num_heads == s.kv_num_heads:
        return t_BNSH
    tiled = b.Expand(b.Unsqueeze(t_BNSH, b.const(_i64(2), "group_axis")),
                     b.const(_i64(1, 1, s.num_heads // s.kv_num_heads, 1, 1), "group_reps"))
    return b.Reshape(tiled, b.const(_i64(0, s.num_heads, -1, head), "heads_shape"))


def _seq_of(s: Site, t: Value) -> int:
    """The sequence axis of Q/K/V in the site's layout."""
    return 2 if s.rank == 4 else 1


def _bias(ctx: LoweringContext, b: Builder, s: Site, explicit_causal: bool) -> Value | None:
    """The additive bias (B|1, N|1, S, T) in the query's type; None without mask and causal."""
    dt = s.dtype
    neg_inf = b.const(np.array(-np.inf, dt.np_dtype), "neg_inf")
    zero = b.const(np.array(0, dt.np_dtype), "zero")
    bias = None
    if s.mask is not None:
        m = s.mask
        if m.type.dtype is DType.BOOL:
            bias = b.Where(m, zero, neg_inf)
        elif m.type.dtype is not dt:
            bias = _cast_mask(b, m, dt)
        else:
            bias = m
        rank = m.type.rank
        if rank < 4:
            bias = b.Unsqueeze(bias, b.const(_i64(*range(4 - rank)), "bias_axes"))
        rows = bias.type.shape[2] if bias.type is not None and bias.type.shape is not None else None
        if not explicit_causal and not same_dim(rows, s.q_seq):
            # The kernels take no broadcast along the query axis: (B, 1, 1, T) -> (B, 1, S, T).
            one = b.const(_i64(1, 1), "ones")
            shape = b.Concat(one, ctx.dim(b, s.q, _seq_of(s, s.q)), b.const(_i64(1), "one"), axis=0)
            bias = b.Expand(bias, shape)
    if explicit_causal:
        # Query i attends key j iff j <= i + past_sequence_length (bottom-right with the past).
        scalar = b.const(_i64(0), "scalar_axis")
        start, step = b.const(np.array(0, np.int64), "range_start"), b.const(np.array(1, np.int64), "range_step")
        q_len = b.Squeeze(ctx.dim(b, s.q, _seq_of(s, s.q)), scalar)
        kv_len = b.Squeeze(ctx.dim(b, s.k, _seq_of(s, s.k)), scalar)
        rows = b.Unsqueeze(b.Range(start, q_len, step), b.const(_i64(1), "col_axis"))
        total = kv_len
        if s.past_k is not None:
            past_len = b.Squeeze(ctx.dim(b, s.past_k, 2), scalar)
            rows = b.Add(rows, past_len)
            total = b.Add(kv_len, past_len)
        cols = b.Unsqueeze(b.Range(start, total, step), scalar)
        causal = b.Where(b.LessOrEqual(cols, rows), zero, neg_inf)  # S, T
        if bias is None:
            bias = b.Unsqueeze(causal, b.const(_i64(0, 1), "bias_axes"))
        else:
            bias = b.Add(bias, causal)
    return bias


def _padding_bias(ctx: LoweringContext, b: Builder, s: Site, real: Value, nodes: list[Node]) -> Value:
    """Where(%real, 0, lowest) [batch, 1, 1, total] expanded to [batch, 1, seq, total], once
    for all layers; the causal bias's own nodes go when no layer reads them."""
    where = nodes[0]
    key = ("padding_bias", id(where.outputs[0]))
    if key not in _shared(ctx):
        padding = b.Where(real, where.inputs[1], where.inputs[2])
        rows = b.Concat(ctx.dim(b, s.q, 1), b.const(_i64(1), "one"), axis=0)  # [seq, 1]: broadcast from the right
        bias = b.Expand(padding, rows)
        bias.type = TensorType(s.dtype, (real.type.shape[0], 1, s.q_seq, real.type.shape[3]))
        _shared(ctx)[key] = bias
        ctx.maybe_dead.extend(nodes)
    return _shared(ctx)[key]


def _cast_mask(b: Builder, m: Value, dt: DType) -> Value:
    """The mask in the query's type. A wider float mask is saturated first (-inf stays -inf):
    an overflowing Cast is not even seen consistently, since ORT on CPU drops the float32 ->
    float16 -> float32 Cast pair it makes around the guard's ReduceMax, so the guard would see
    float32's lowest where the kernel sees -inf (and gives NaN)."""
    src = m.type.dtype
    if src.is_float and src.itemsize > dt.itemsize:
        lowest = b.const(np.array(np.finfo(dt.np_dtype).min, src.np_dtype), "lowest")
        m = b.Where(b.IsInf(m), m, b.Max(m, lowest))
    return b.Cast(m, to=dt.onnx_type)


def _shared(ctx: LoweringContext) -> dict:
    """Values one rule built that the next sites can reuse (the layers of a decoder share
    their mask and cache lengths): built once, before the first site that needs them."""
    return ctx.__dict__.setdefault("_attention_shared", {})


def _finite_bias(bias: Value) -> bool:
    """The bias is a Where between finite constants (rewrite-kv-cache's: 0 or the lowest
    value): no row is -inf everywhere, so no row needs the guard."""
    p = bias.producer()
    if p is not None and p.domain == "" and p.op_type == "Expand":  # a padding bias over the rows
        p = p.inputs[0].producer()
    if p is None or p.domain != "" or p.op_type != "Where":
        return False
    branches = [constant_value(v) for v in p.inputs[1:3]]
    return all(c is not None and np.issubdtype(c.dtype, np.floating) and np.isfinite(c).all() for c in branches)


def _guard(ctx: LoweringContext, b: Builder, s: Site, y: Value, bias: Value, y_rank: int) -> Value:
    """Zero the query rows whose bias is -inf everywhere (the kernels give NaN there). Which
    rows attend is computed once per bias: the layers of a decoder with a KV cache share one."""
    dt = s.dtype
    heads = bias.type.shape[1] if bias.type is not None and bias.type.shape is not None else None
    shared = _shared(ctx)
    key = ("attends", id(bias), y_rank == 3 and heads == 1)
    if key in shared and shared[key][0] is bias:
        attends = shared[key][1]
    else:
        row_max = b.ReduceMax(bias, b.const(_i64(-1), "last_axis"), keepdims=1)  # B|1, N|1, S, 1
        attends = b.Greater(row_max, b.const(np.array(-np.inf, dt.np_dtype), "neg_inf"))
        if y_rank == 3 and heads == 1:
            attends = b.Squeeze(attends, b.const(_i64(1), "head_axis"))  # B|1, S, 1
        shared[key] = (bias, attends)
    zero = b.const(np.array(0, dt.np_dtype), "zero")
    if y_rank == 4 or heads == 1:  # BNSH, or one mask for every head
        return b.Where(attends, y, zero)
    y_BSNH = b.Reshape(y, b.const(_i64(0, 0, s.num_heads, -1), "bsnh_shape"))
    guarded = b.Where(b.Transpose(attends, perm=_BNSH_FROM_BSNH), y_BSNH, zero)
    return b.Reshape(guarded, b.const(_i64(0, 0, -1), "bsd_shape"))


def _input_dim(ctx: LoweringContext, b: Builder, value: Value, axis: int) -> Value | None:
    """`value.shape[axis]` read off a graph input with the same symbolic dimension; None when
    no input carries it (never a Shape of `value` itself, which may be what is being built)."""
    shape = value.type.shape if value.type is not None else None
    d = shape[axis] if shape is not None and len(shape) > axis else None
    if not isinstance(d, str) or not any(v.type is not None and v.type.shape is not None and d in v.type.shape
                                         for v in ctx.graph.inputs):
        return None
    return ctx.dim(b, value, axis)


def packed_qkv(s: Site) -> Value | None:
    """The tensor (B, S, (Nq + 2 Nkv) * H) that Q, K and V (3-D) are the three parts of, in that
    order, split along the hidden axis by one Split (a fused QKV projection); None otherwise.
    GroupQueryAttention takes it as its query ("packed QKV") with no key and value, which saves
    the Split node (one per layer; at one token a decode step's small nodes cost about as much as
    their work)."""
    split = s.q.producer()
    if s.rank != 3 or split is None or split.domain != "" or split.op_type != "Split" or len(split.outputs) != 3:
        return None
    if s.k.producer() is not split or s.v.producer() is not split or (s.q.index, s.k.index, s.v.index) != (0, 1, 2):
        return None
    x = split.inputs[0]
    shape = x.type.shape if x.type is not None else None
    if shape is None or len(shape) != 3 or split.attr("axis", 0) % 3 != 2 or x.type.dtype is not s.dtype:
        return None
    want = (s.num_heads * s.head, s.kv_num_heads * s.head, s.kv_num_heads * s.head)
    if tuple(t.type.shape[2] for t in (s.q, s.k, s.v)) != want or shape[2] != sum(want):
        return None
    return x


def _build(ctx: LoweringContext, b: Builder, node: Node, s: Site, kernel: str, static: bool = False):
    dt = s.dtype
    # The kernels' causal flag aligns like graphopt only for self-attention; with a mask,
    # causal goes into the bias so that the guard sees fully masked rows.
    kernel_causal = s.causal and s.mask is None and same_dim(s.q_seq, s.kv_seq) and (
        kernel == GQA or s.past_k is None)
    padding = padding_of_causal_bias(s.mask) if kernel == GQA and s.mask is not None and s.rank == 3 \
        and _generation_graph(ctx) and schema_has_attr(MS_DOMAIN, GQA, "causal") else None
    if padding is not None:  # the kernel's causal mask is the bias's causal half (gqa_causal.py)
        kernel_causal = True
        bias = _padding_bias(ctx, b, s, *padding)
    else:
        bias = _bias(ctx, b, s, explicit_causal=s.causal and not kernel_causal)
    q = _to_bsd(b, s.q) if s.rank == 4 else s.q
    y_type = TensorType(dt, (s.batch, s.q_seq, s.num_heads * s.v_head if s.v_head else None))
    present_types = [o.type for o in node.outputs[1:]]
    attrs = {"num_heads": s.num_heads}
    if s.scale:
        attrs["scale"] = s.scale
    presents: list[Value | None] = [None, None]

    if kernel == GQA:
        # the kernel rotates Q and K itself where that is provably the same (gqa_rotary.py)
        rotary = rotary_in_kernel(s, _generation_graph(ctx))
        if isinstance(rotary, RotaryInKernel):
            s = dataclasses.replace(s, q=rotary.q, k=rotary.k)
            q = s.q
            ctx.maybe_dead.extend(rotary.nodes)
        packed = packed_qkv(s)
        if packed is not None:  # the kernel splits the heads itself: the Split goes dead
            q, k, v = packed, None, None
            ctx.maybe_dead.append(s.q.producer())
        else:
            k = _to_bsd(b, s.k) if s.rank == 4 else s.k
            v = _to_bsd(b, s.v) if s.rank == 4 else s.v
        past_dim = s.past_k.type.shape[2] if s.past_k is not None else 0
        if static:  # the valid length is the mask's; the past is a buffer of max_seq positions
            past_dim = ("static", s.mask.type.shape[-1])
        key = ("gqa_lengths", s.kv_seq, past_dim, s.batch)
        symbolic = all(isinstance(d, (int, str, tuple)) for d in key[1:])
        if symbolic and key in _shared(ctx):
            seqlens_k, total_scalar = _shared(ctx)[key]
        else:
            # the lengths are read off the packed tensor when there is one (same batch and
            # sequence), so that nothing else keeps its Split alive
            total = ctx.dim(b, packed if packed is not None else s.k, _seq_of(s, s.k))
            if static:
                total = ctx.dim(b, s.mask, s.mask.type.rank - 1)
            elif s.past_k is not None:
                # a graph input that carries the present's length (rewrite-kv-cache's mask,
                # `past_seq + seq`) gives it in one Shape, shared with the rest of the step
                carried = _input_dim(ctx, b, node.outputs[1], 2) if s.want_present else None
                total = carried if carried is not None else b.Add(total, ctx.dim(b, s.past_k, 2))
            total_i32 = b.Cast(total, to=DType.INT32.onnx_type)
            seqlens_k = b.Expand(b.Sub(total_i32, b.const(np.array([1], np.int32), "one_i32")),
                                 ctx.dim(b, packed if packed is not None else s.q, 0))
            total_scalar = b.Squeeze(total_i32, b.const(_i64(0), "scalar_axis"))
            if symbolic:
                _shared(ctx)[key] = (seqlens_k, total_scalar)
        attrs["kv_num_heads"] = s.kv_num_heads
        if s.softcap:
            attrs["softcap"] = s.softcap
        if schema_has_attr(MS_DOMAIN, GQA, "causal"):
            attrs["causal"] = int(kernel_causal)
        inputs = [q, k, v, s.past_k, s.past_v, seqlens_k, total_scalar]
        if isinstance(rotary, RotaryInKernel):
            attrs.update(do_rotary=1, rotary_interleaved=rotary.interleaved)
            inputs += [rotary.cos, rotary.sin]  # no position_ids: the kernel's own (see gqa_rotary.py)
        if bias is not None:
            inputs += [None] * (10 - len(inputs)) + [bias]  # [cos_cache, sin_cache, position_ids,] attention_bias
        if s.sinks is not None:
            inputs += [None] * (11 - len(inputs)) + [s.sinks]  # head_sink
        want = 3 if s.want_present else 1
        outs = b.op(GQA, *inputs, domain=MS_DOMAIN, output_types=[y_type, *present_types][:want], **attrs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        y = outs[0]
        presents = list(outs[1:]) + [None] * (3 - len(outs))
    else:
        if s.past_k is None and s.num_heads == s.kv_num_heads:
            k, v = s.k, s.v  # BSD or BNSH: the kernel takes both
            if s.want_present:
                presents = [b.Identity(s.k) if s.rank == 4 else _to_bnsh(b, s.k, s.kv_num_heads),
                            b.Identity(s.v) if s.rank == 4 else _to_bnsh(b, s.v, s.kv_num_heads)]
        else:
            k_BNSH = s.k if s.rank == 4 else _to_bnsh(b, s.k, s.kv_num_heads)
            v_BNSH = s.v if s.rank == 4 else _to_bnsh(b, s.v, s.kv_num_heads)
            if s.past_k is not None:
                k_BNSH = b.Concat(s.past_k, k_BNSH, axis=2)
                v_BNSH = b.Concat(s.past_v, v_BNSH, axis=2)
            if s.want_present:
                presents = [k_BNSH if k_BNSH is not s.k else b.Identity(k_BNSH),
                            v_BNSH if v_BNSH is not s.v else b.Identity(v_BNSH)]
            k, v = _repeat_heads(b, k_BNSH, s, s.head), _repeat_heads(b, v_BNSH, s, s.v_head)
            if s.v_head != s.head:  # BNSH key/value must have one shape; BSD ones need not
                k, v = _to_bsd(b, k), _to_bsd(b, v)
        if kernel_causal:
            attrs["unidirectional"] = 1
        inputs = [q, k, v] + ([None, None, bias] if bias is not None else [])
        y = b.op(MHA, *inputs, domain=MS_DOMAIN, output_types=[y_type], **attrs)

    if s.rank == 4:
        y = b.Transpose(b.Reshape(y, b.const(_i64(0, 0, s.num_heads, -1), "bsnh_shape")), perm=_BNSH_FROM_BSNH)
    if s.mask is not None and not _finite_bias(bias):
        y = _guard(ctx, b, s, y, bias, s.rank)
    return [y, *presents][:len(node.outputs)]


# --------------------------------------------------------------------------------------
# ONNX opset-23 Attention (attention_kernel="onnx"; the default only at the growing-cache sites of
# a generation-ready decoder that GQA cannot rotate itself, see docs/ort_lowering.md)

# Ops whose semantics changed between opset 20 and 23 (the rest changed only type lists):
# a graph holding one cannot simply declare opset 23.
_CHANGED_SINCE_20 = frozenset({"GroupNormalization"})


def _build_onnx_attention(ctx: LoweringContext, b: Builder, node: Node):
    """graphopt.Attention is ONNX Attention-23 (same inputs, outputs and semantics), so this
    is one node, in a model whose default-domain opset becomes 23. One difference to mend: ORT's
    CPU kernel zeroes a query row whose float mask is the type's lowest value everywhere
    (transformers' padded rows), where the spec (and graphopt) attend uniformly; the lowest
    value is nudged up by one step first."""
    q = node.inputs[0]
    dt = q.type.dtype if q.type is not None else None
    if dt is None or not ctx.has_kernel("", "Attention", dt):
        return f"no {ctx.target} opset-23 Attention kernel for {dt.short if dt else 'this type'}"
    if sinks_of(node) is not None:
        return "ONNX's Attention has no attention sinks"
    changed = sorted({n.op_type for n in ctx.graph.nodes if n.domain == "" and n.op_type in _CHANGED_SINCE_20})
    if changed:
        return f"the graph holds {', '.join(changed)}, whose semantics changed after opset 20"
    inputs = list(node.inputs)[:6]
    mask = inputs[3] if len(inputs) > 3 else None
    if mask is not None:
        mdt = mask.type.dtype
        if not mdt.is_float and mdt is not DType.BOOL:
            mask = b.Cast(mask, to=dt.onnx_type)
        elif mdt.is_float and mdt is not dt:
            mask = _cast_mask(b, mask, dt)
        rank, rows = mask.type.rank, mask.type.shape[-2] if mask.type.rank and mask.type.rank >= 2 else None
        q_seq = q.type.shape[-2 if q.type.rank == 4 else 1]
        if rank and rank >= 2 and not same_dim(rows, q_seq):
            # ORT's kernel takes no broadcast along the query axis either: (B, 1, 1, T) -> (B, 1, S, T)
            shape = b.Concat(*([b.const(_i64(*([1] * (rank - 2))), "ones")] if rank > 2 else []),
                             ctx.dim(b, q, q.type.rank - 2 if q.type.rank == 4 else 1), b.const(_i64(1), "one"),
                             axis=0)
            mask = b.Expand(mask, shape)
        if mask.type.dtype.is_float:
            lowest = np.finfo(dt.np_dtype).min
            nudged = np.nextafter(lowest, 0, dtype=dt.np_dtype)
            mask = b.Where(b.Equal(mask, b.const(np.array(lowest, dt.np_dtype), "lowest")),
                           b.const(np.array(nudged, dt.np_dtype), "lowest_nudged"), mask)
        inputs[3] = mask
    attrs = {"is_causal": int(node.attr("causal", 0))}
    if q.type.rank == 3:
        nq = node.attr("num_heads", 0)
        attrs["q_num_heads"] = nq
        attrs["kv_num_heads"] = node.attr("kv_num_heads", 0) or nq
    if node.attr("scale", 0.0):
        attrs["scale"] = float(node.attr("scale", 0.0))
    if node.attr("softcap", 0.0):
        attrs["softcap"] = float(node.attr("softcap", 0.0))
    types = [o.type for o in node.outputs]
    if len(inputs) > 4 and inputs[4] is not None and len(types) < 3:
        types += [None] * (3 - len(types))  # ORT's kernel wants the presents whenever a past is given
    outs = b.op("Attention", *inputs, output_types=types, **attrs)
    ctx.graph.opset[""] = max(ctx.graph.opset.get("", 20), 23)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    return outs[:len(node.outputs)]
