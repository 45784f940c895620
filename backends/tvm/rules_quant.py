"""TVM lowering rules for the quantized ops (semantics: graphopt/ops/quant_*.py).

graphopt.QuantLinear keeps its weight packed in the module's parameters (4 bits a weight
for int4) and dequantizes it in Relax at each call -- unpack (shift, mask), subtract the zero
point, scale -- before the matmul. That is correct everywhere and halves (int8: quarters)
the weight bytes of the artifact, but it materializes a float weight per call: the
dequantize-fused GEMV schedule (unpacking in registers) is left to do (docs/quantization.md).
"""
from __future__ import annotations

try:  # every module imports without tvm (the wheel check imports them all); rules run only with it
    from tvm import relax
    from tvm.relax import op as R
except ImportError:  # pragma: no cover
    relax = R = None

from graphopt.backends.tvm.lowering import Lowerer, rule
from graphopt.backends.tvm.rules_graphopt import _activate, _attr


def _unpack(lw: Lowerer, packed, bits: int):
    """u8 [..., m] -> u8 [..., 2m] for 4 bits (low nibble first), as is for 8."""
    if bits == 8:
        return packed
    low = lw.emit(R.bitwise_and(packed, relax.const(0x0F, "uint8")))
    high = lw.emit(R.right_shift(packed, relax.const(4, "uint8")))
    rank = lw.rank(packed)
    pairs = lw.emit(R.concat([R.expand_dims(low, [rank]), R.expand_dims(high, [rank])], axis=rank))
    shape = lw.shape(packed)
    return lw.emit(R.reshape(pairs, shape[:-1] + [2 * shape[-1]]))


@rule("QuantLinear", domain="graphopt")
def quant_linear(lw: Lowerer, node, args):
    args = list(args) + [None] * (5 - len(args))
    x, packed, scales = (lw.tensor(a) for a in args[:3])
    bits, block_size = _attr(node, "bits"), _attr(node, "block_size")
    k, n = node.attr("K"), node.attr("N")
    nb = -(-k // block_size)
    dt = lw.dtype(x)
    q = lw.emit(R.astype(_unpack(lw, packed, bits), dt))  # [N, nb, block_size]
    if args[3] is None:
        zero = relax.const(2 ** (bits - 1), dt)
    else:
        zq = _unpack(lw, lw.tensor(args[3]), bits)
        zq = lw.emit(R.strided_slice(zq, axes=[1], begin=[0], end=[nb]))
        zero = lw.emit(R.expand_dims(R.astype(zq, dt), [2]))
    w = lw.emit(R.multiply(R.subtract(q, zero), R.expand_dims(scales, [2])))
    w = lw.emit(R.reshape(w, [n, nb * block_size]))
    if nb * block_size != k:
        w = lw.emit(R.strided_slice(w, axes=[1], begin=[0], end=[k]))
    y = lw.emit(R.matmul(x, R.permute_dims(w, [1, 0])))
    if args[4] is not None:
        y = lw.emit(R.add(y, lw.tensor(args[4])))
    return [_activate(lw, y, _attr(node, "activation"))]


@rule("QuantGather", domain="graphopt")
def quant_gather(lw: Lowerer, node, args):
    packed, indices, scales = (lw.tensor(a) for a in args[:3])
    zp = lw.tensor(args[3]) if len(args) > 3 and args[3] is not None else None
    bits, block_size, k = _attr(node, "bits"), _attr(node, "block_size"), node.attr("K")
    nb = -(-k // block_size)
    dt = lw.dtype(scales)
    lead = lw.shape(indices)
    r = len(lead)
    q = lw.emit(R.astype(_unpack(lw, lw.emit(R.take(packed, indices, axis=0)), bits), dt))  # [..., nb, bs]
    if zp is None:
        zero = relax.const(2 ** (bits - 1), dt)
    else:
        zq = _unpack(lw, lw.emit(R.take(zp, indices, axis=0)), bits)
        zq = lw.emit(R.strided_slice(zq, axes=[r], begin=[0], end=[nb]))
        zero = lw.emit(R.expand_dims(R.astype(zq, dt), [r + 1]))
    w = lw.emit(R.multiply(R.subtract(q, zero), R.expand_dims(R.take(scales, indices, axis=0), [r + 1])))
    w = lw.emit(R.reshape(w, lead + [nb * block_size]))
    if nb * block_size != k:
        w = lw.emit(R.strided_slice(w, axes=[r], begin=[0], end=[k]))
    return [w]


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
