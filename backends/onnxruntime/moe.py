"""graphopt.MoE -> com.microsoft.MoE and graphopt.QuantMoE -> com.microsoft.QMoE (CPU): only
the chosen experts run.

ORT's kernel routes by itself: softmax over `router_probs`, top-k, optionally renormalized.
graphopt.MoE carries what the model's own router chose (which differs by family), so the rule
hands the kernel logits that make it choose the same: log(weight) at the chosen experts, a
very negative number elsewhere. Softmax and renormalization then give weight / sum(weights)
over the k chosen, and the output is multiplied back by that sum: exactly the weighted sum,
whatever the router (renormalized or not). Gate and up rows are stored interleaved, the only
SwiGLU layout the CPU kernel takes (`swiglu_fusion=1`).

Measured by benchmarks/moe.py (docs/generation.md, "Mixtures of experts"): a Mixtral-style decode
step 3.4x faster than the decomposition's every-expert form in fp32, 2.6x in int4 (QMoE against
a MatMulNBits per expert).
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, Node
from graphopt.ops.moe import moe_activation, moe_biases, moe_form, moe_shapes
from graphopt.ops.quant_moe import NAMES, quant_moe_dims, quant_moe_parts
from graphopt.pattern import constant_value
from graphopt.registry import register_lowering

from graphopt.backends.onnxruntime.kernels import MS_DOMAIN
from graphopt.backends.onnxruntime.lowering import BACKEND, LoweringContext

# below any log(weight) of a float32 weight (>= log(1.2e-38) = -87.3) and finite, so that
# softmax never sees a row of -inf
NOT_CHOSEN = -1e30
SMALLEST_WEIGHT = float(np.finfo(np.float32).tiny)


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "MoE")
def lower_moe(ctx: LoweringContext, b: Builder, node: Node):
    x, index, weights, up, down = node.inputs[:5]
    dt = x.type.dtype
    declined = _declines(ctx, node, "MoE", dt)
    if declined:
        return declined
    shapes = moe_shapes(node)
    if shapes is None:
        return "the expert count, k, hidden and inner sizes must be static"
    if x.type.rank not in (2, 3) or index.type.rank != x.type.rank:
        return f"X is {x.type}: the kernel takes [tokens, hidden] or [batch, seq, hidden]"
    ups, downs = constant_value(up), constant_value(down)
    if ups is None or downs is None:
        return "the expert weights are not constants"
    experts, k, hidden, inner = shapes
    fc1 = b.const(np.ascontiguousarray(_interleave(ups, inner)), "moe_fc1")
    fc2 = b.const(np.ascontiguousarray(downs), "moe_fc2")
    biases = _expert_biases(b, node, moe_biases(node), inner)
    if isinstance(biases, str):
        return biases

    logits = _router_logits(b, index, weights, experts, x.type.rank == 3)
    y = b.op("MoE", x, logits, fc1, biases[0], fc2, biases[1], domain=MS_DOMAIN, output_types=[x.type], k=k,
             normalize_routing_weights=1, **_swiglu(node))
    total = b.ReduceSum(weights, b.const(np.array([-1], np.int64), "axes"), keepdims=1)
    return [b.Mul(y, total)]


def _swiglu(node: Node) -> dict:
    """The kernels' SwiGLU attributes for the node's (alpha, beta, limit): gate and up rows
    interleaved; swiglu_limit only when there is a limit (MoE/QMoE clamp at any limit they are
    given, zero too)."""
    alpha, beta, limit = moe_form(node)
    return dict(activation_type="swiglu", swiglu_fusion=1, activation_alpha=alpha, activation_beta=beta,
                **({"swiglu_limit": limit} if limit else {}))


def _expert_biases(b: Builder, node: Node, values, inner: int):
    """[fc1_experts_bias (interleaved like the weights) or None, fc2_experts_bias or None] of the
    up and down biases `values`, or why not."""
    arrays = [None if v is None else constant_value(v) for v in values]
    if any(v is not None and a is None for v, a in zip(values, arrays)):
        return "the expert biases are not constants"
    return [None if arrays[0] is None else b.const(np.ascontiguousarray(_interleave(arrays[0], inner)), "moe_fc1_bias"),
            None if arrays[1] is None else b.const(np.ascontiguousarray(arrays[1]), "moe_fc2_bias")]


def _declines(ctx: LoweringContext, node: Node, kernel: str, dt) -> str | None:
    """Why `kernel` cannot run `node` on this target, or None."""
    if ctx.target != "cpu":
        return f"ORT's CUDA {kernel} kernel is not checked against {node.op}"
    if not ctx.has_kernel(MS_DOMAIN, kernel, dt):
        return f"no {ctx.target} {kernel} kernel for {dt.short}"
    if not node.attr("gated", 1) or moe_activation(node) != "silu":
        return "the CPU kernel's only gated activation is SwiGLU"
    return None


def _chosen(b: Builder, index, experts: int):
    """[.., k, experts] bool: index[.., j] == e."""
    return b.Equal(b.Unsqueeze(index, b.const(np.array([-1], np.int64), "axes")),
                   b.const(np.arange(experts, dtype=index.type.dtype.np_dtype), "experts"))


def _router_logits(b: Builder, index, weights, experts: int, flatten: bool):
    """[tokens, experts]: log(weight) at each token's chosen experts, NOT_CHOSEN elsewhere."""
    dt = weights.type.dtype
    logw = b.Log(b.Max(weights, b.const(np.array(SMALLEST_WEIGHT, dt.np_dtype), "smallest_weight")))
    logits = b.ReduceMax(
        b.Where(_chosen(b, index, experts), b.Unsqueeze(logw, b.const(np.array([-1], np.int64), "axes")),
                b.const(np.array(NOT_CHOSEN, dt.np_dtype), "not_chosen")),
        b.const(np.array([-2], np.int64), "axes"), keepdims=0)  # [.., experts]
    return b.Reshape(logits, b.const(np.array([-1, experts], np.int64), "router_shape")) if flatten else logits


def _router_weights(b: Builder, index, weights, experts: int, flatten: bool):
    """[tokens, experts]: each token's weight at its chosen experts, zero elsewhere."""
    dense = b.ReduceSum(
        b.Where(_chosen(b, index, experts), b.Unsqueeze(weights, b.const(np.array([-1], np.int64), "axes")),
                b.const(np.array(0, weights.type.dtype.np_dtype), "zero")),
        b.const(np.array([-2], np.int64), "axes"), keepdims=0)
    return b.Reshape(dense, b.const(np.array([-1, experts], np.int64), "router_shape")) if flatten else dense


def _interleave(a: np.ndarray, inner: int) -> np.ndarray:
    """Rows [gate 0..inner, up 0..inner] of each expert (axis 1) -> gate0, up0, gate1, up1, ..."""
    return np.stack([a[:, :inner], a[:, inner:]], axis=2).reshape(a.shape[0], 2 * inner, *a.shape[2:])


@register_lowering(BACKEND, GRAPHOPT_DOMAIN, "QuantMoE")
def lower_quant_moe(ctx: LoweringContext, b: Builder, node: Node):
    """-> com.microsoft.QMoE: the experts' packed weights, scales and zero points as QuantLinear
    holds them (rows interleaved for SwiGLU); the model's own routing given as the logits that
    make the kernel choose the same experts, and as `router_weights`, the weights it sums with."""
    p = quant_moe_parts(node)
    x, index, weights = p["X"], p["index"], p["weights"]
    dt = x.type.dtype
    bits, bs, hidden, inner, _ = quant_moe_dims(node)
    declined = _declines(ctx, node, "QMoE", dt)
    if declined:
        return declined
    if bits != 4:  # measured on ORT 1.32: the 8-bit kernel is 1-2 % off once a row has two blocks
        return "ORT's 8-bit block-wise QMoE disagrees with the reference (4-bit agrees)"
    if hidden % bs or inner % bs:
        return f"the kernel needs hidden ({hidden}) and inner ({inner}) sizes divisible by the block size {bs}"
    if x.type.rank not in (2, 3) or index.type.rank != x.type.rank or index.type.shape is None \
            or not isinstance(index.type.shape[-1], int):
        return f"X is {x.type}, index {index.type}: the kernel takes [tokens, hidden] or [batch, seq, hidden], k static"
    arrays = {name: constant_value(p[name]) if p[name] is not None else None for name in NAMES[3:]}
    if any(arrays[n] is None for n in NAMES[3:7]) or (p["up_zero_points"] is not None
                                                    and any(arrays[n] is None for n in NAMES[7:9])):
        return "the expert weights are not constants"
    experts, k = arrays["up_packed"].shape[0], index.type.shape[-1]

    def stored(name, interleave):
        a = arrays[name]
        a = _interleave(a, inner) if interleave else a
        return b.const(np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1], -1)), f"qmoe_{name}")
    fc1, fc1_scales, fc2, fc2_scales = (stored(n, n.startswith("up")) for n in NAMES[3:7])
    zps = [None, None] if arrays["up_zero_points"] is None else [stored("up_zero_points", True),
                                                                 stored("down_zero_points", False)]
    flatten = x.type.rank == 3
    biases = _expert_biases(b, node, (p["up_bias"], p["down_bias"]), inner)
    if isinstance(biases, str):
        return biases
    attrs = dict(k=k, normalize_routing_weights=0, expert_weight_bits=bits, block_size=bs, **_swiglu(node))
    level = str(ctx.options.get("quant_accuracy_level", "auto"))
    if level not in ("auto", "0"):  # as MatMulNBits: int8 activations where the measured choice says so
        attrs["accuracy_level"] = int(level)
    y = b.op("QMoE", x, _router_logits(b, index, weights, experts, flatten), fc1, fc1_scales, biases[0], fc2,
             fc2_scales, biases[1], None, None, None, zps[0], zps[1], None,
             _router_weights(b, index, weights, experts, flatten),
             domain=MS_DOMAIN, output_types=[x.type], **attrs)
    return [y]
