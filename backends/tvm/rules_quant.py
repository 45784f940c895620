"""TVM lowering rules for the quantized ops (semantics: graphopt/ops/quant_*.py).

graphopt.QuantLinear becomes one TIR kernel (schedules_quant.py) that reads the packed weight
and unpacks, centers and scales it inside the reduction: no float copy of the weight is
ever written, so a decode step reads 4 (int4) or 8 (int8) bits a weight plus the scales.
graphopt.QuantGather gathers the packed rows and dequantizes only those, in one stage.
graphopt.QuantMoE on the CPU runs only the chosen experts (quant_panels.moe_gemv_source: the
panel GEMV with an expert axis, indexed by the router's choice); elsewhere it is decomposed into
one QuantLinear per expert projection, every expert on every token.

On CPU targets with pre-packed weights (`Lowerer.pack_weights`), a constant weight is stored
in column panels (quant_panels.py) and QuantLinear at one row or a symbolic row count (decode)
runs the panel GEMV; QuantGather reads the same panels, so a tied LM head and its embedding
share one copy. Elsewhere (CUDA, tuned builds, a weight computed at run time, a static row
count above one) the TE kernels of schedules_quant.py.
"""
from __future__ import annotations

import numpy as np

try:  # every module imports without tvm (the wheel check imports them all); rules run only with it
    from tvm import relax
    from tvm.relax import op as R
except ImportError:  # pragma: no cover
    relax = R = None

from graphopt.backends.tvm import quant_panels, schedules_quant
from graphopt.backends.tvm.lowering import Lowerer, rule, static_int
from graphopt.backends.tvm.rules_graphopt import _activate, _attr, _gated, choice_bias, weigh_choices
from graphopt.dtypes import DType
from graphopt.ir import Node, constant_value
from graphopt.ops.moe import moe_form
from graphopt.ops.quant_format import num_blocks
from graphopt.ops.quant_moe import NAMES, quant_moe_dims, quant_moe_parts


def _gemv_group(rows) -> int | None:
    """The GEMV form for one row (a group of 1) or a symbolic count (decode and prefill
    share one build: groups of GEMV_GROUP rows); the matmul form for a static count > 1."""
    if isinstance(rows, int):
        return 1 if rows == 1 else None
    return schedules_quant.GEMV_GROUP


@rule("QuantLinear", domain="graphopt")
def quant_linear(lw: Lowerer, node, args):
    from tvm import te

    args = list(args) + [None] * (5 - len(args))
    x, packed, scales = (lw.tensor(a) for a in args[:3])
    zp = None if args[3] is None else lw.tensor(args[3])
    bits, block_size = _attr(node, "bits"), _attr(node, "block_size")
    k, n = node.attr("K"), node.attr("N")
    lead = lw.shape(x)[:-1]
    rows = lw.rows(lead)
    x2 = lw.view(x, [rows, k]) if len(lead) != 1 else x
    # The kernel's row count is a variable of its own (defined by X's shape), whatever
    # expression of `batch` and `seq` it is here: one kernel serves every length.
    m = rows if isinstance(rows, int) else te.var("rows", "int64")
    group = _gemv_group(rows)
    if group is not None and _panel_weights(lw, node) is not None and lw.dtype(x) == "float32":
        return [_activate(lw, _panel_gemv(lw, node, args, x2, rows, lead), _attr(node, "activation"))]

    def holder(t, name, shape=None):
        return None if t is None else te.placeholder(shape or lw.shape(t), lw.dtype(t), name)

    func = schedules_quant.quant_linear_func(holder(x2, "x", [m, k]), holder(packed, "packed"), holder(scales, "scales"),
                                             holder(zp, "zero_points"), bits=bits, block_size=block_size, k=k,
                                             gemv_group=group)
    gv = lw.bb.add_func(func, f"quant_linear_int{bits}")
    operands = [x2, packed, scales] + ([zp] if zp is not None else [])
    if group is None:
        y = lw.emit(relax.call_tir(gv, operands, relax.TensorType([rows, n], lw.dtype(x))))
    else:  # whole groups of rows come back: the first `rows` of them, seen as lead + [N] (a view, no copy)
        groups = lw.simplify((rows + group - 1) // group)
        y = lw.emit(relax.call_tir(gv, operands, relax.TensorType([groups, group, n], lw.dtype(x))))
    if len(lead) != 1 or group is not None:
        y = lw.view(y, lead + [n])
    if args[4] is not None:
        y = lw.emit(R.add(y, lw.tensor(args[4])))
    return [_activate(lw, y, _attr(node, "activation"))]


def _vnni(lw: Lowerer, bits: int, block_size: int) -> bool:
    """Whether 4-bit weights take the int8 VNNI path (quant_panels.py) in this lowering."""
    return bits == 4 and block_size % 8 == 0 and lw.int8_activations


def _panel_weights(lw: Lowerer, node, packed_at: int = 1):
    """The weight stored in column panels (packed, scales, zero points or None), for a constant
    weight on a CPU target with pre-packed weights; None otherwise. The packed bytes are in the
    VNNI layout where `_vnni` holds, else in plain panels."""
    if not lw.pack_weights:
        return None
    ins = list(node.inputs) + [None] * 4
    values = [ins[packed_at], ins[2], ins[3]]
    arrays = [None if v is None else lw.const_array(v) for v in values]
    if arrays[0] is None or arrays[1] is None or (values[2] is not None and arrays[2] is None):
        return None
    if arrays[1].dtype != np.float32:
        return None
    bits, block_size, n_blocks = _attr(node, "bits"), _attr(node, "block_size"), arrays[1].shape[1]
    tag = f"panels{quant_panels.PANEL}"
    if _vnni(lw, bits, block_size):
        packed = lw.weight(values[0], f"vnni{quant_panels.PANEL}", lambda q: quant_panels.vnni_panels(q, block_size))
    else:
        packed = lw.weight(values[0], tag, quant_panels.packed_panels)
    out = [packed, lw.weight(values[1], tag, quant_panels.scales_panels)]
    out.append(None if values[2] is None else
               lw.weight(values[2], tag, lambda z: quant_panels.zero_panels(z, bits, n_blocks)))
    return [None if t is None else lw.tensor(t) for t in out]  # a small integer constant is a `Known`


def _panel_gemv(lw: Lowerer, node, args, x2, rows, lead: list):
    """Y = x2 @ W^T (+ bias) by the panel GEMV, seen as lead + [N]."""
    packed, scales, zp = _panel_weights(lw, node)
    bits, block_size, k, n = _attr(node, "bits"), _attr(node, "block_size"), node.attr("K"), node.attr("N")
    n_panels, n_blocks = quant_panels.panel_count(n), lw.shape(scales)[1]
    width = n_panels * quant_panels.PANEL
    weights = [packed, scales] + ([zp] if zp is not None else [])
    out = relax.TensorType([rows, width], lw.dtype(x2))
    if _vnni(lw, bits, block_size):  # x as int8 per block (once, shared by every output), then the int8 GEMV
        quantize = lw.bb.add_func(quant_panels.prim_func(quant_panels.quantize_rows_source(
            k=k, n_blocks=n_blocks, block_size=block_size)), "quantize_rows_int8")
        x8 = lw.emit(relax.call_tir(quantize, [x2], [relax.TensorType([rows, n_blocks * block_size], "int8"),
                                                     relax.TensorType([rows, n_blocks], "float32"),
                                                     relax.TensorType([rows, n_blocks], "int32")]))
        gemv = lw.bb.add_func(quant_panels.prim_func(quant_panels.gemv_vnni_source(
            k=k, n_panels=n_panels, n_blocks=n_blocks, block_size=block_size, symmetric=zp is None)),
            f"quant_gemv_vnni_int{bits}")
        y = lw.emit(relax.call_tir(gemv, [lw.emit(relax.TupleGetItem(x8, i)) for i in range(3)] + weights, out))
    else:
        func = quant_panels.gemv_func(k=k, n_panels=n_panels, n_blocks=n_blocks, bits=bits, block_size=block_size,
                                      symmetric=zp is None, group=1 if rows == 1 else quant_panels.GROUP)
        y = lw.emit(relax.call_tir(lw.bb.add_func(func, f"quant_gemv_panels_int{bits}"), [x2] + weights, out))
    if width != n:  # the padding outputs of the last panel
        y = lw.emit(R.strided_slice(y, axes=[1], begin=[0], end=[n]))
    y = lw.view(y, lead + [n]) if len(lead) != 1 else y
    if len(args) > 4 and args[4] is not None:
        y = lw.emit(R.add(y, lw.tensor(args[4])))
    return y


@rule("QuantGather", domain="graphopt")
def quant_gather(lw: Lowerer, node, args):
    bits, block_size, k = _attr(node, "bits"), _attr(node, "block_size"), node.attr("K")
    indices = lw.tensor(args[1])
    lead = lw.shape(indices)
    flat = lw.emit(R.reshape(indices, [lw.rows(lead)]))
    panels = _panel_weights(lw, node, packed_at=0)
    if panels is not None:  # the layout of the panel GEMV: a tied LM head reads the same copy
        table_rows = lw.const_array(node.inputs[0]).shape[0]
        rows = lw.bb.emit_te(quant_panels.gather_te, panels[0], flat, panels[1], panels[2], bits=bits,
                             block_size=block_size, k=k, rows=table_rows, vnni=_vnni(lw, bits, block_size),
                             primfunc_name_hint=f"quant_gather_int{bits}")
        return [lw.emit(R.reshape(rows, lead + [k]))]
    packed, scales = lw.tensor(args[0]), lw.tensor(args[2])
    zp = lw.tensor(args[3]) if len(args) > 3 and args[3] is not None else None
    rows = lw.bb.emit_te(schedules_quant.quant_gather_te, packed, flat, scales, zp, bits=bits,
                         block_size=block_size, k=k, primfunc_name_hint=f"quant_gather_int{bits}")
    return [lw.emit(R.reshape(rows, lead + [k]))]


def _quant_moe_sparse(node: Node, pack_weights: bool) -> bool:
    """Whether `quant_moe` takes the node: on the CPU (weights in panels), X float32, k (the
    choices a token) static, every expert weight and bias a constant; else it is decomposed."""
    p = quant_moe_parts(node)
    x, index = p["X"], p["index"]
    shape = index.type.shape if index.type is not None else None
    return (pack_weights and x.type is not None and x.type.dtype == DType.FLOAT32 and bool(shape)
            and isinstance(shape[-1], int)
            and all(p[n] is None or constant_value(p[n]) is not None for n in NAMES[3:])
            and all(constant_value(p[n]).dtype == np.float32 for n in ("up_scales", "down_scales")))


@rule("QuantMoE", domain="graphopt", when=_quant_moe_sparse)
def quant_moe(lw: Lowerer, node, args):
    """Only the chosen experts: each projection one kernel over the stacked experts' panels,
    [m, k, N] (a row per token and choice), then graphopt.MoE's activation, biases and the
    router's weights as `moe`'s sparse form."""
    if not lw.pack_weights:
        raise lw.error("QuantMoE's rule needs weights in panels (prepare with pack_weights decomposes it elsewhere)")
    p = quant_moe_parts(node)
    bits, block_size, hidden, inner, n_up = quant_moe_dims(node)
    moe_form(node)
    x, index, weights = (lw.tensor(a) for a in args[:3])
    experts = lw.const_array(p["up_packed"]).shape[0]
    k = static_int(lw.shape(index)[-1])
    dims = lw.shape(x)
    m = lw.rows(dims[:-1])
    idx = lw.emit(R.reshape(R.astype(index, "int64"), [m, k]))
    tag = f"moe_panels{quant_panels.PANEL}"

    def stacked(fn):
        return lambda a: np.stack([fn(e) for e in a])

    vnni = _vnni(lw, bits, block_size)

    def gemv(x3, proj: str, n: int, width: int, per_choice: bool):
        n_blocks, n_panels = num_blocks(width, block_size), quant_panels.panel_count(n)
        symmetric, rows = p[f"{proj}_zero_points"] is None, k if per_choice else 1
        if vnni:
            packed = lw.weight(p[f"{proj}_packed"], f"moe_vnni{quant_panels.PANEL}",
                               stacked(lambda q: quant_panels.vnni_panels(q, block_size)))
        else:
            packed = lw.weight(p[f"{proj}_packed"], tag, stacked(quant_panels.packed_panels))
        w = [packed, lw.weight(p[f"{proj}_scales"], tag, stacked(quant_panels.scales_panels))]
        if not symmetric:
            w.append(lw.weight(p[f"{proj}_zero_points"], tag,
                               stacked(lambda z: quant_panels.zero_panels(z, bits, n_blocks))))
        w = [lw.tensor(t) for t in w]
        out = relax.TensorType([m, k, n_panels * quant_panels.PANEL], "float32")
        if vnni:  # each row of X as int8 per block (once, shared by every expert and output), then the int8 GEMV
            flat = lw.simplify(m * rows)
            quantize = lw.bb.add_func(quant_panels.prim_func(quant_panels.quantize_rows_source(
                k=width, n_blocks=n_blocks, block_size=block_size)), "quantize_rows_int8")
            x8 = lw.emit(relax.call_tir(quantize, [lw.view(x3, [flat, width])],
                                        [relax.TensorType([flat, n_blocks * block_size], "int8"),
                                         relax.TensorType([flat, n_blocks], "float32"),
                                         relax.TensorType([flat, n_blocks], "int32")]))
            parts = [lw.view(lw.emit(relax.TupleGetItem(x8, i)), [m, rows, size])
                     for i, size in enumerate((n_blocks * block_size, n_blocks, n_blocks))]
            func = quant_panels.prim_func(quant_panels.moe_gemv_vnni_source(
                experts=experts, n_panels=n_panels, n_blocks=n_blocks, block_size=block_size, symmetric=symmetric,
                choices=k, per_choice=per_choice))
            y = lw.emit(relax.call_tir(lw.bb.add_func(func, "quant_moe_gemv_vnni"), parts + [idx] + w, out))
        else:
            func = quant_panels.prim_func(quant_panels.moe_gemv_source(
                experts=experts, k=width, n_panels=n_panels, n_blocks=n_blocks, bits=bits, block_size=block_size,
                symmetric=symmetric, choices=k, per_choice=per_choice))
            y = lw.emit(relax.call_tir(lw.bb.add_func(func, f"quant_moe_gemv_int{bits}"), [x3, idx] + w, out))
        if n_panels * quant_panels.PANEL != n:  # the padding outputs of the last panel
            y = lw.emit(R.strided_slice(y, axes=[2], begin=[0], end=[n]))
        return y

    biases = [None if p[name] is None else lw.const_array(p[name]) for name in ("up_bias", "down_bias")]
    h = choice_bias(lw, gemv(lw.view(x, [m, 1, hidden]), "up", n_up, hidden, False), biases[0], idx)
    h = _gated(lw, node, h, inner)
    d = choice_bias(lw, gemv(h, "down", hidden, inner, True), biases[1], idx)
    return [lw.view(weigh_choices(lw, d, idx, weights, experts, m, k), list(dims))]


@rule("DynamicQuantLinear", domain="graphopt")
def dynamic_quant_linear(lw: Lowerer, node, args):
    """ONNX DynamicQuantizeLinear on X (u8, per tensor), then an int32 matmul (exact)."""
    args = list(args) + [None] * (5 - len(args))
    x, w, w_scale = (lw.tensor(a) for a in args[:3])
    f32 = "float32"
    zero = relax.const(0.0, f32)
    lo = lw.emit(R.minimum(R.min(x), zero))
    hi = lw.emit(R.maximum(R.max(x), zero))
    scale = lw.emit(R.where(R.greater(hi, lo), R.divide(R.subtract(hi, lo), relax.const(255.0, f32)),
                            relax.const(1.0, f32)))
    zp = lw.emit(R.clip(R.round(R.divide(R.negative(lo), scale)), 0, 255))
    xq = lw.emit(R.clip(R.add(R.round(R.divide(x, scale)), zp), 0, 255))
    xi = lw.emit(R.astype(R.subtract(xq, zp), "int32"))
    wi = lw.emit(R.astype(w, "int32"))
    if args[3] is not None:
        wi = lw.emit(R.subtract(wi, R.astype(lw.tensor(args[3]), "int32")))
    acc = lw.emit(R.matmul(xi, wi, out_dtype="int32"))
    y = lw.emit(R.multiply(R.astype(acc, f32), R.multiply(scale, w_scale)))
    if args[4] is not None:
        y = lw.emit(R.add(y, lw.tensor(args[4])))
    return [_activate(lw, y, _attr(node, "activation"))]


def _along(lw: Lowerer, v, x, axis: int):
    """A per-tensor (scalar) or per-axis ([C]) scale or zero point, shaped to broadcast against x."""
    if lw.rank(v) == 0 or lw.shape(v) == [1]:
        return v
    rank = lw.rank(x)
    shape = [1] * rank
    shape[axis % rank] = -1
    return lw.emit(R.reshape(v, shape))


@rule("QuantizeLinear")
def quantize_linear(lw: Lowerer, node, args):
    """ONNX QuantizeLinear (opset 20): saturate(round_half_even(x / scale) + zero_point), u8 or i8."""
    x, scale = lw.tensor(args[0]), lw.tensor(args[1])
    zp = lw.tensor(args[2]) if len(args) > 2 and args[2] is not None else None
    out = lw.dtype(zp) if zp is not None else "uint8"
    if out not in ("uint8", "int8"):
        return f"QuantizeLinear to {out} (u8 and i8 only)"
    axis = node.attr("axis", 1)
    dt = lw.dtype(x)
    q = lw.emit(R.round(R.divide(x, _along(lw, scale, x, axis))))
    if zp is not None:
        q = lw.emit(R.add(q, _along(lw, lw.emit(R.astype(zp, dt)), x, axis)))
    lo, hi = (0, 255) if out == "uint8" else (-128, 127)
    return [lw.emit(R.astype(R.clip(q, lo, hi), out))]


@rule("DequantizeLinear")
def dequantize_linear(lw: Lowerer, node, args):
    """ONNX DequantizeLinear (opset 20): (x - zero_point) * scale, per tensor or per axis."""
    x, scale = lw.tensor(args[0]), lw.tensor(args[1])
    zp = lw.tensor(args[2]) if len(args) > 2 and args[2] is not None else None
    axis = node.attr("axis", 1)
    dt = lw.dtype(scale)
    xf = lw.emit(R.astype(x, dt))
    if zp is not None:
        xf = lw.emit(R.subtract(xf, _along(lw, lw.emit(R.astype(zp, dt)), x, axis)))
    return [lw.emit(R.multiply(xf, _along(lw, scale, x, axis)))]
