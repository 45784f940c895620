"""remove-identities and simplify-chains: rewrite tables over the pattern API."""
from __future__ import annotations

import numpy as np

from graphopt.dtypes import DType
from graphopt.ir import Graph
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import RewriteRule, apply_patterns, const, constant_value, op, var

_INT64_MAX = np.iinfo(np.int64).max


def _same_type(a, b) -> bool:
    return a.type is not None and b.type is not None and a.type == b.type


def _scalar_const(v, value) -> bool:
    c = constant_value(v)
    return c is not None and c.size == 1 and bool(np.all(c == value))


def _broadcast_free(x, c) -> str | None:
    """A size-1 constant combined with x leaves x's shape and dtype as they are."""
    cv = constant_value(c)
    if cv is None or x.type is None or x.type.rank is None or cv.ndim > x.type.rank:
        return "the constant could broadcast x to a larger shape"
    if cv.dtype != x.type.dtype.np_dtype:
        return "the constant has another dtype"
    return None


# ---- remove-identities ---------------------------------------------------------------


class RemoveIdentity(RewriteRule):
    name = "identity"  # Identity(x) -> x
    pattern = op("Identity", var("x"))

    def rewrite(self, rw, m):
        return m["x"]


class RemoveDropout(RewriteRule):
    name = "dropout"  # Dropout(x) -> x at inference (no training_mode, mask unused)
    pattern = op("Dropout", any_inputs=True, capture="n")

    def check(self, m):
        n = m["n"]
        if len(n.inputs) > 2 and n.inputs[2] is not None:
            t = constant_value(n.inputs[2])
            if t is None or bool(t):
                return "training_mode may be on"
        if len(n.outputs) > 1 and n.outputs[1] is not None and (n.outputs[1].uses() or n.outputs[1].is_graph_output):
            return "the mask output is used"
        return None

    def rewrite(self, rw, m):
        return m["n"].inputs[0]


class RemoveCastToSameType(RewriteRule):
    name = "cast-to-same-type"  # Cast(x: T, to=T) -> x
    pattern = op("Cast", var("x"), capture="n")

    def check(self, m):
        x = m["x"]
        return None if x.type is not None and x.type.dtype.onnx_type == m["n"].attr("to") else "the cast changes the type"

    def rewrite(self, rw, m):
        return m["x"]


def _reshape_keeps_shape(x, shape: np.ndarray, allowzero: int) -> bool:
    dims = x.type.shape if x.type is not None else None
    if dims is None or shape.ndim != 1 or len(shape) != len(dims):
        return False
    unknown = 0
    for s, d in zip(shape.tolist(), dims):
        if s == 0 and not allowzero:
            continue
        if s == -1:
            unknown += 1
            continue
        if not (isinstance(d, int) and s == d):
            return False
    return unknown <= 1  # a single -1 must then equal the remaining dimension


class RemoveNoOpReshape(RewriteRule):
    name = "reshape-to-same-shape"  # Reshape(x, shape of x) -> x
    pattern = op("Reshape", var("x"), const("s"), capture="n")

    def check(self, m):
        ok = _reshape_keeps_shape(m["x"], constant_value(m["s"]), m["n"].attr("allowzero", 0))
        return None if ok else "the reshape changes the shape (or it is not known)"

    def rewrite(self, rw, m):
        return m["x"]


class RemoveIdentityTranspose(RewriteRule):
    name = "identity-transpose"  # Transpose(x, perm=[0, 1, ...]) -> x
    pattern = op("Transpose", var("x"), capture="n")

    def check(self, m):
        perm = m["n"].attr("perm")
        if perm is None:
            rank = m["x"].type.rank
            return None if rank is not None and rank <= 1 else "the default perm reverses the axes"
        return None if list(perm) == list(range(len(perm))) else "the perm moves axes"

    def rewrite(self, rw, m):
        return m["x"]


class RemoveSingleConcat(RewriteRule):
    name = "single-input-concat"  # Concat(x) -> x
    pattern = op("Concat", var("x"), capture="n")

    def check(self, m):
        return None if len(m["n"].inputs) == 1 else "more than one input"

    def rewrite(self, rw, m):
        return m["x"]


class RemoveNoOpExpand(RewriteRule):
    name = "expand-by-ones"  # Expand(x, [1, 1]) -> x when rank(x) >= 2
    pattern = op("Expand", var("x"), const("s"))

    def check(self, m):
        s, rank = constant_value(m["s"]), m["x"].type.rank
        return None if rank is not None and s.size <= rank and bool(np.all(s == 1)) else "the expand broadcasts"

    def rewrite(self, rw, m):
        return m["x"]


class RemoveFullSlice(RewriteRule):
    name = "full-slice"  # Slice(x, 0, INT_MAX) -> x
    pattern = op("Slice", var("x"), const("starts"), const("ends"), any_inputs=False, capture="n")

    def check(self, m):
        n = m["n"]
        starts, ends = constant_value(m["starts"]), constant_value(m["ends"])
        steps = constant_value(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] is not None else None
        if len(n.inputs) > 4 and n.inputs[4] is not None and steps is None:
            return "the steps are not constant"
        axes = constant_value(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] is not None else np.arange(len(starts))
        if axes is None:
            return "the axes are not constant"
        dims = m["x"].type.shape
        if dims is None or np.any(starts != 0) or (steps is not None and np.any(steps != 1)):
            return "the slice starts late or steps"
        for a, e in zip(axes.tolist(), ends.tolist()):
            d = dims[a]
            if not (e >= np.iinfo(np.int32).max or (isinstance(d, int) and e >= d)):
                return "the slice ends early"
        return None

    def rewrite(self, rw, m):
        return m["x"]


class RemoveNeutralArith(RewriteRule):
    name = "neutral-element"  # x+0, x-0, x*1, x/1, x**1 -> x
    pattern = op(("Add", "Sub", "Mul", "Div", "Pow"), var("x"), const("c"), capture="n")

    def check(self, m):
        neutral = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1, "Pow": 1}[m["n"].op_type]
        if not _scalar_const(m["c"], neutral):
            return "the constant is not the neutral element"
        return _broadcast_free(m["x"], m["c"])

    def rewrite(self, rw, m):
        return m["x"]


class RemoveNeutralArithLeft(RemoveNeutralArith):
    name = "neutral-element-left"  # 0+x, 1*x -> x
    pattern = op(("Add", "Mul"), const("c"), var("x"), capture="n")


_SAME_VALUES = ("Expand", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity")  # zeros in, zeros out
_NOT_ZEROS = "not provably all zeros"


def _all_zeros(v, depth: int = 4) -> bool:
    """`v` is zero everywhere, whatever the inputs: a constant of zeros, moved or broadcast
    (Expand of torch.empty's zeros), or a product of zeros with zeros or finite constants
    (0 * inf is NaN, so a factor that is not a constant must be zeros too)."""
    c = constant_value(v)
    if c is not None:
        return bool(np.all(c == 0))
    n = v.producer()
    if depth == 0 or n is None or n.domain != "" or not n.inputs or n.inputs[0] is None:
        return False
    if n.op_type in _SAME_VALUES:
        return _all_zeros(n.inputs[0], depth - 1)
    if n.op_type == "Mul" and len(n.inputs) == 2:
        zero = [_all_zeros(t, depth - 1) for t in n.inputs]
        finite = [_finite_constant(t) for t in n.inputs]
        return (zero[0] and (zero[1] or finite[1])) or (zero[1] and finite[0])
    return False


def _finite_constant(v) -> bool:
    c = constant_value(v)
    return c is not None and c.dtype.kind in "biuf" and bool(np.all(np.isfinite(c)))


def _broadcasts_into(z, x) -> str | None:
    """z's shape broadcasts into x's without enlarging it: each of z's dims (right-aligned)
    is 1 or the same (symbolic) dim as x's, so x + z has x's shape."""
    zs, xs = (z.type.shape if z.type is not None else None), (x.type.shape if x.type is not None else None)
    if zs is None or xs is None or len(zs) > len(xs):
        return "the zeros could broadcast x to a larger shape (or a shape is unknown)"
    if z.type.dtype != x.type.dtype:
        return "the zeros have another dtype"
    for zd, xd in zip(reversed(zs), reversed(xs)):
        if zd != 1 and (zd is None or zd != xd):
            return f"the zeros' dim {zd!r} could broadcast x's {xd!r}"
    return None


def _computed_zeros(v) -> bool | str:
    """Zeros a node computes: a weight that happens to be zero (a freshly initialized bias) is
    the model's parameter, kept where the fusions expect it."""
    return (not v.is_initializer and _all_zeros(v)) or _NOT_ZEROS


class RemoveAddZeros(RewriteRule):
    name = "add-zeros"  # x + zeros -> x, zeros + x -> x, when the zeros do not broadcast x
    pattern = op("Add", var("x"), var("z", where=_computed_zeros), commute=True)

    def check(self, m):
        return _broadcasts_into(m["z"], m["x"])

    def rewrite(self, rw, m):
        return m["x"]


class RemoveSubZeros(RemoveAddZeros):
    name = "sub-zeros"  # x - zeros -> x (exact: -0.0 - 0.0 is -0.0)
    pattern = op("Sub", var("x"), var("z", where=_computed_zeros))


IDENTITY_RULES = [RemoveIdentity(), RemoveDropout(), RemoveCastToSameType(), RemoveNoOpReshape(),
                  RemoveIdentityTranspose(), RemoveSingleConcat(), RemoveNoOpExpand(), RemoveFullSlice(),
                  RemoveNeutralArith(), RemoveNeutralArithLeft(), RemoveAddZeros(), RemoveSubZeros()]


@register_pass("remove-identities")
class RemoveIdentities(Pass):
    """Remove ops that return their input unchanged: Identity, inference Dropout, Cast to the
    same type, Reshape to the same shape, identity Transpose, single-input Concat, Expand by
    ones, full Slice, x+0, x-0, x*1, x/1, x**1 (when the constant cannot broadcast), and x + zeros,
    x - zeros where a node computes the zeros (torch.baddbmm's `beta * empty` term; a weight that
    is zero, a fresh bias, stays) and they broadcast
    into x's shape (x + 0 is x exactly; only -0.0 becomes +0.0, which compares equal).

    Before:  %y = Identity(%x)         After:  %z = Relu(%x)
             %z = Relu(%y)
    """

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return apply_patterns(graph, IDENTITY_RULES, ctx)


# ---- simplify-chains ---------------------------------------------------------------

_LOSSLESS = {  # from -> the dtypes that hold every value of it exactly
    DType.BOOL: set(DType),
    DType.UINT8: {DType.UINT16, DType.UINT32, DType.UINT64, DType.INT16, DType.INT32, DType.INT64,
                  DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32, DType.FLOAT64},
    DType.INT8: {DType.INT16, DType.INT32, DType.INT64, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32, DType.FLOAT64},
    DType.UINT16: {DType.UINT32, DType.UINT64, DType.INT32, DType.INT64, DType.FLOAT32, DType.FLOAT64},
    DType.INT16: {DType.INT32, DType.INT64, DType.FLOAT32, DType.FLOAT64},
    DType.UINT32: {DType.UINT64, DType.INT64, DType.FLOAT64},
    DType.INT32: {DType.INT64, DType.FLOAT64},
    DType.FLOAT16: {DType.FLOAT32, DType.FLOAT64},
    DType.BFLOAT16: {DType.FLOAT32, DType.FLOAT64},
    DType.FLOAT32: {DType.FLOAT64},
}


class MergeCasts(RewriteRule):
    name = "cast-cast"  # Cast(Cast(x, A), B) -> Cast(x, B) when x -> A is exact
    pattern = op("Cast", op("Cast", var("x"), capture="inner"), capture="outer")

    def check(self, m):
        src = m["x"].type.dtype
        mid = DType.from_onnx(m["inner"].attr("to"))
        return None if mid == src or mid in _LOSSLESS.get(src, ()) else "the first cast can lose information"

    def rewrite(self, rw, m):
        to = m["outer"].attr("to")
        return m["x"] if m["x"].type.dtype.onnx_type == to else rw.Cast(m["x"], to=to)


class MergeReshapes(RewriteRule):
    name = "reshape-reshape"  # Reshape(Reshape(x, a), b) -> Reshape(x, b) when b has no 0
    pattern = op("Reshape", op("Reshape", var("x")), const("b"), capture="outer")

    def check(self, m):
        b = constant_value(m["b"])
        return None if m["outer"].attr("allowzero", 0) or not np.any(b == 0) else "the outer shape copies dims with 0"

    def rewrite(self, rw, m):
        return rw.Reshape(m["x"], m["b"], allowzero=m["outer"].attr("allowzero"))


class MergeTransposes(RewriteRule):
    name = "transpose-transpose"  # Transpose(Transpose(x, p), q) -> Transpose(x, p[q])
    pattern = op("Transpose", op("Transpose", var("x"), capture="inner"), capture="outer")

    def check(self, m):
        return None if m["inner"].attr("perm") is not None and m["outer"].attr("perm") is not None else "a default perm"

    def rewrite(self, rw, m):
        p, q = m["inner"].attr("perm"), m["outer"].attr("perm")
        perm = [p[i] for i in q]
        return m["x"] if perm == list(range(len(perm))) else rw.Transpose(m["x"], perm=perm)


def _axes(v, rank) -> list[int] | None:
    a = constant_value(v)
    return None if a is None or rank is None else sorted(int(i) % rank for i in np.atleast_1d(a))


class SqueezeUnsqueeze(RewriteRule):
    name = "unsqueeze-squeeze"  # Squeeze(Unsqueeze(x, a), a) -> x
    pattern = op("Squeeze", op("Unsqueeze", var("x"), const("a"), capture="u"), const("b"), capture="s")

    def check(self, m):
        rank = m["u"].outputs[0].type.rank
        a, b = _axes(m["a"], rank), _axes(m["b"], rank)
        return None if a is not None and a == b else "the axes differ"

    def rewrite(self, rw, m):
        return m["x"]


class UnsqueezeSqueeze(RewriteRule):
    name = "squeeze-unsqueeze"  # Unsqueeze(Squeeze(x, a), a) -> x when those dims are 1
    pattern = op("Unsqueeze", op("Squeeze", var("x"), const("a")), const("b"))

    def check(self, m):
        dims = m["x"].type.shape
        if dims is None:
            return "the rank of x is unknown"
        a, b = _axes(m["a"], len(dims)), _axes(m["b"], len(dims))
        if a is None or a != b or any(dims[i] != 1 for i in a):
            return "the axes differ or are not static ones"
        return None

    def rewrite(self, rw, m):
        return m["x"]


class MergeUnsqueezes(RewriteRule):
    name = "unsqueeze-unsqueeze"  # Unsqueeze(Unsqueeze(x, a), b) -> Unsqueeze(x, a+b)
    pattern = op("Unsqueeze", op("Unsqueeze", var("x"), const("a")), const("b"))

    def check(self, m):
        return None if m["x"].type.rank is not None else "the rank of x is unknown"

    def rewrite(self, rw, m):
        r = m["x"].type.rank
        a = np.atleast_1d(constant_value(m["a"])).tolist()
        b = np.atleast_1d(constant_value(m["b"])).tolist()
        marks = ["x"] * r
        for axes in (a, b):  # insert markers exactly as the two ops would
            n = len(marks) + len(axes)
            for ax in sorted(int(i) % n for i in axes):
                marks.insert(ax, "u")
        merged = [i for i, t in enumerate(marks) if t == "u"]
        return rw.Unsqueeze(m["x"], rw.const(np.array(merged, np.int64), "axes"))


CHAIN_RULES = [MergeCasts(), MergeReshapes(), MergeTransposes(), SqueezeUnsqueeze(), UnsqueezeSqueeze(),
               MergeUnsqueezes()]


@register_pass("simplify-chains")
class SimplifyChains(Pass):
    """Collapse chains of layout and type ops: Cast->Cast (when the first is exact),
    Reshape->Reshape, Transpose->Transpose, Unsqueeze->Squeeze, Squeeze->Unsqueeze (of
    ones), Unsqueeze->Unsqueeze.

    Before:  %t = Transpose(%x) {perm=[0, 2, 1]}     After:  (uses of %u now use %x)
             %u = Transpose(%t) {perm=[0, 2, 1]}
    """

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return apply_patterns(graph, CHAIN_RULES, ctx)


__all__ = ["RemoveIdentities", "SimplifyChains", "IDENTITY_RULES", "CHAIN_RULES"]
