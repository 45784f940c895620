"""Lowering rules for the norms, rotary embeddings, Linear and GELU (attention has its own
module). Each rule checks what the ORT kernel really accepts (not just its schema) and
declines with a reason otherwise:

    graphopt.RMSNorm             -> SimplifiedLayerNormalization (ORT's, ONNX domain)
    graphopt.SkipNorm{layer}     -> cpu: Add + LayerNormalization (measured faster);
                                    cuda: com.microsoft.SkipLayerNormalization
    graphopt.SkipNorm{rms}       -> cpu: Add + SimplifiedLayerNormalization;
                                    cuda: com.microsoft.SkipSimplifiedLayerNormalization (+ Add beta)
    graphopt.RotaryEmbedding     -> com.microsoft.RotaryEmbedding (per-batch caches flattened)
    graphopt.Linear              -> MatMul | FusedMatMul{transB} + Add | BiasGelu | FastGelu | Gelu
    graphopt.GatedLinear         -> its decomposition (ORT has no CPU kernel for it)
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.ir import GRAPHOPT_DOMAIN, Node, TensorType, Value
from graphopt.registry import register_lowering

from graphopt.backends.onnxruntime.attention import same_dim
from graphopt.backends.onnxruntime.kernels import MS_DOMAIN
from graphopt.backends.onnxruntime.lowering import BACKEND, LoweringContext
from graphopt.pattern import constant_value


def _i64(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def _shape(v: Value | None):
    return None if v is None or v.type is None else v.type.shape


def _const(v: Value | None) -> np.ndarray | None:
    return None if v is None else constant_value(v)


# --------------------------------------------------------------------------------------
# Norms


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "RMSNorm")
def lower_rms_norm(ctx: LoweringContext, b: Builder, node: Node):
    x, scale = node.inputs
    dt = x.type.dtype
    if not ctx.has_kernel("", "SimplifiedLayerNormalization", dt):
        return f"no {ctx.target} kernel for {dt.short}"
    xs, ss = _shape(x), _shape(scale)
    if xs is None or ss is None:
        return "the input ranks are unknown"
    axis = node.attr("axis", -1) % len(xs)
    # The kernel broadcasts the scale as numpy does (checked in tests/test_ort_lowering.py,
    # (16,), (5, 1), (1, 16) and () against a (2, 5, 16) input normalized over 2 axes).
    if len(ss) > len(xs):
        return f"scale {list(ss)} has a higher rank than X {list(xs)}"
    y = b.op("SimplifiedLayerNormalization", x, scale, output_types=[x.type], axis=axis,
             epsilon=float(node.attr("epsilon", 1e-5)), stash_type=1)
    return [y]


# SkipNorm on CPU is faster split: Add + LayerNormalization runs 5-9x faster than ORT's CPU
# SkipLayerNormalization kernel, Add + SimplifiedLayerNormalization about 2x faster than
# SkipSimplifiedLayerNormalization (docs/ort_lowering.md). The split form still has one ORT
# norm kernel per site. On CUDA the fused kernels save a pass over the activations.
# A decoder rewrite-kv-cache made spends its time in one-token steps, where a node costs about
# as much as its work: there the RMS form is fused (one node a site, not two; about 2x slower
# at 128 rows, so prefill pays a little), the LayerNorm form stays split (5-9x slower fused).
def skip_norm_is_split(ctx: LoweringContext, node: Node | None = None) -> bool:
    choice = ctx.options.get("skip_norm", "auto")
    if choice != "auto":
        return choice == "split"
    if ctx.target != "cpu":
        return False
    return not (node is not None and node.attr("norm", "layer") == "rms" and ctx.generation_graph())


def _split_skip_norm(ctx: LoweringContext, b: Builder, node: Node):
    """S = X + skip (+ bias); Y = LayerNormalization(S) or SimplifiedLayerNormalization(S) (+ beta)."""
    x, skip, gamma, beta, bias = (list(node.inputs) + [None] * 5)[:5]
    dt = x.type.dtype
    rms = node.attr("norm", "layer") == "rms"
    norm_op = "SimplifiedLayerNormalization" if rms else "LayerNormalization"
    if not ctx.has_kernel("", norm_op, dt):
        return f"no {ctx.target} {norm_op} kernel for {dt.short}"
    eps = float(node.attr("epsilon", 1e-5))
    s = b.Add(x, skip)
    if bias is not None:
        s = b.Add(s, bias)
    if rms:
        y = b.op(norm_op, s, gamma, output_types=[x.type], axis=-1, epsilon=eps, stash_type=1)
        if beta is not None:
            y = b.Add(y, beta)
    else:
        y = b.LayerNormalization(s, gamma, beta, axis=-1, epsilon=eps)
    return [y, s][:len(node.outputs)]


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "SkipNorm")
def lower_skip_norm(ctx: LoweringContext, b: Builder, node: Node):
    if skip_norm_is_split(ctx, node):
        return _split_skip_norm(ctx, b, node)
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    x, skip, gamma, beta, bias = ins
    dt = x.type.dtype
    rms = node.attr("norm", "layer") == "rms"
    op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
    if not ctx.has_kernel(MS_DOMAIN, op, dt):
        return f"no {ctx.target} {op} kernel for {dt.short}"
    xs, ks = _shape(x), _shape(skip)
    if xs is None or len(xs) not in (2, 3):
        return "the input must have rank 2 or 3"
    # The kernel broadcasts skip only as (1, S, D) or (S, D) against (B, S, D).
    if ks != xs and not (len(xs) == 3 and ks is not None and len(ks) in (2, 3)
                         and tuple(ks[-2:]) == tuple(xs[-2:]) and (len(ks) == 2 or ks[0] == 1)):
        return f"skip {ks} is not X's shape {xs} (nor (1, S, D) or (S, D))"
    if any(d is None for d in xs):
        return "X's shape has unknown dimensions"
    for t, name in ((gamma, "gamma"), (beta, "beta"), (bias, "bias")):
        if t is not None and (_shape(t) is None or len(_shape(t)) != 1 or not same_dim(_shape(t)[0], xs[-1])):
            return f"{name} is not a vector of the hidden size"
        if t is not None and t.type.dtype is not dt:
            return f"{name} is {t.type.dtype.short}, X is {dt.short}"
    eps = float(node.attr("epsilon", 1e-5))
    stat = TensorType(DType.FLOAT32, None)
    want_sum = len(node.outputs) > 1
    types = [x.type, stat, stat, x.type] if want_sum else [x.type]
    if rms:
        outs = b.op(op, x, skip, gamma, bias, domain=MS_DOMAIN, output_types=types, epsilon=eps)
    else:
        outs = b.op(op, x, skip, gamma, beta, bias, domain=MS_DOMAIN, output_types=types, epsilon=eps)
    outs = outs if isinstance(outs, tuple) else (outs,)
    y = outs[0]
    if rms and beta is not None:
        y = b.Add(y, beta)
    return [y, outs[3] if want_sum else None][:len(node.outputs)]


# --------------------------------------------------------------------------------------
# Rotary embedding


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "RotaryEmbedding")
def lower_rotary(ctx: LoweringContext, b: Builder, node: Node):
    x, cos, sin = node.inputs[:3]
    pos = node.inputs[3] if len(node.inputs) > 3 else None
    dt = x.type.dtype
    if not ctx.has_kernel(MS_DOMAIN, "RotaryEmbedding", dt):
        return f"no {ctx.target} kernel for {dt.short}"
    xs, cs = _shape(x), _shape(cos)
    if xs is None or len(xs) not in (3, 4) or cs is None or _shape(sin) is None:
        return "the input ranks are unknown"
    num_heads = node.attr("num_heads", 0) if len(xs) == 3 else xs[1]
    rot = node.attr("rotary_embedding_dim", 0)
    if not isinstance(num_heads, int) or not num_heads:
        return "the head count is not static"
    if pos is None:
        # com.microsoft.RotaryEmbedding indexes (max_pos, rot/2) caches by position_ids. Caches
        # per batch and position, (B|1, S, rot/2), are the same thing flattened: row b*S + s,
        # so position_ids = arange(B_cache * S) reshaped to (B_cache, S), broadcast to X's batch.
        if len(cs) != 3:
            return "caches without position_ids must be (batch, seq, rot/2)"
        seq_axis = 2 if len(xs) == 4 else 1
        cos, sin = b.Flatten(cos, axis=2), b.Flatten(sin, axis=2)  # (B_cache * S, rot/2)
        cache_batch_seq = b.Shape(node.inputs[1], start=0, end=2)
        n = b.ReduceProd(cache_batch_seq, keepdims=0)
        start, step = b.const(np.array(0, np.int64), "range_start"), b.const(np.array(1, np.int64), "range_step")
        ids = b.Reshape(b.Range(start, n, step), cache_batch_seq)
        batch_seq = b.Concat(ctx.dim(b, x, 0), ctx.dim(b, x, seq_axis), axis=0)
        pos = b.Expand(ids, batch_seq)
    elif len(cs) != 2:
        return "caches with position_ids must be (max_pos, rot/2)"
    elif _shape(pos) is None or len(_shape(pos)) != 2:
        return "position_ids must be (batch, seq)"
    elif not same_dim(_shape(pos)[0], xs[0]):
        # graphopt broadcasts position_ids (1, S) over the batch; the kernel wants (B, S)
        seq_axis = 2 if len(xs) == 4 else 1
        pos = b.Expand(pos, b.Concat(ctx.dim(b, x, 0), ctx.dim(b, x, seq_axis), axis=0))
    attrs = {"interleaved": node.attr("interleaved", 0), "num_heads": num_heads}
    if rot:
        attrs["rotary_embedding_dim"] = rot
    return [b.op("RotaryEmbedding", x, pos, cos, sin, domain=MS_DOMAIN, output_types=[x.type], **attrs)]


# --------------------------------------------------------------------------------------
# Linear and GELU


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "Linear")
def lower_linear(ctx: LoweringContext, b: Builder, node: Node):
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    act = node.attr("activation", "")
    dt = x.type.dtype
    out_type = node.outputs[0].type
    if node.attr("trans_w", 0):
        wv = _const(w)
        if wv is not None and len(w.uses()) == 1 and w.is_initializer:
            # A weight only this node reads: store it transposed, and MatMul reads it as is.
            y = b.MatMul(x, b.const(np.ascontiguousarray(wv.T), f"{w.name}_T"))
        elif ctx.has_kernel(MS_DOMAIN, "FusedMatMul", dt):
            # A shared weight (tied embeddings): transpose inside the GEMM, never copy it.
            y = b.op("FusedMatMul", x, w, domain=MS_DOMAIN, output_types=[out_type], transB=1)
        else:
            return f"no {ctx.target} FusedMatMul kernel for {dt.short} and the weight is not a private constant"
    else:
        y = b.MatMul(x, w)
    return [bias_activation(ctx, b, y, bias, act, out_type)]


def bias_activation(ctx: LoweringContext, b: Builder, y: Value, bias: Value | None, act: str,
                    out_type: TensorType) -> Value:
    """act(y + bias) with ORT's fused kernels where the target has them."""
    dt = y.type.dtype if y.type is not None else out_type.dtype
    if act == "gelu" and bias is not None and _is_vector(bias) and ctx.has_kernel(MS_DOMAIN, "BiasGelu", dt):
        return b.op("BiasGelu", y, bias, domain=MS_DOMAIN, output_types=[out_type])
    if act == "gelu_tanh" and ctx.has_kernel(MS_DOMAIN, "FastGelu", dt) and (bias is None or _is_vector(bias)):
        ins = [y] if bias is None else [y, bias]
        return b.op("FastGelu", *ins, domain=MS_DOMAIN, output_types=[out_type])
    if bias is not None:
        y = b.Add(y, bias)
    if act == "relu":
        return b.Relu(y)
    if act == "silu":
        return b.Mul(y, b.Sigmoid(y))
    if act in ("gelu", "gelu_tanh"):
        return b.Gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return y


def _is_vector(v: Value) -> bool:
    s = _shape(v)
    return s is not None and len(s) == 1
