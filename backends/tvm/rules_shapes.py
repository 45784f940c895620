"""TVM lowering rules for core (ONNX) ops that compute shapes and move data: Shape,
Reshape, Transpose, Concat, Slice, Gather, Expand, Range, ...

`Shape` gives a `Known` (the dims as ints and TIR expressions); Gather, Concat, Slice,
Unsqueeze and friends on `Known` values stay `Known`, so a Reshape or Expand target that an
exporter computes at run time is a symbolic shape here.
"""
from __future__ import annotations

import math

import numpy as np

try:  # every module imports without tvm (the wheel check imports them all); rules run only with it
    from tvm import relax, tirx
    from tvm.relax import op as R
except ImportError:  # pragma: no cover
    relax = tirx = R = None

from graphopt.backends.tvm.lowering import (Known, Lowerer, all_known, is_polynomial, known_of, norm_axis, objs,
                                            relax_dtype, rule, static_int)
from graphopt.dtypes import DType

_INT64_MAX = np.iinfo(np.int64).max


@rule("Shape")
def shape(lw: Lowerer, node, args):
    dims = lw.shape(args[0])
    rank = len(dims)
    start = node.attr("start", 0)
    end = node.attr("end", rank)
    start, end = (max(0, min(rank, norm_axis(i, rank))) for i in (start, end))
    return [known_of(lw, objs(dims[start:end]), DType.INT64)]


@rule("Size")
def size(lw: Lowerer, node, args):
    n = 1
    for d in lw.shape(args[0]):
        n = n * d
    return [known_of(lw, objs([n], ()), DType.INT64)]


@rule("Constant")
def constant(lw: Lowerer, node, args):
    a = lw.const_array(node.outputs[0]) if "value" in node.attrs else None
    if a is None:
        for k, f in (("value_float", np.float32), ("value_int", np.int64), ("value_floats", np.float32),
                     ("value_ints", np.int64)):
            if k in node.attrs:
                a = np.array(node.attr(k), f)
        if a is None:
            raise lw.error("only value, value_float(s) and value_int(s) constants are supported")
    if a.dtype.kind in "iub" and a.size <= 64:
        return [Known(a.astype(object).reshape(a.shape) if a.ndim else np.array(int(a), dtype=object),
                      DType.from_numpy(a.dtype))]
    return [relax.const(np.ascontiguousarray(a))]


@rule("Reshape")
def reshape(lw: Lowerer, node, args):
    x, target = args
    if not isinstance(target, Known):
        raise lw.error("the target shape depends on data (it must be known when compiling)")
    want = list(target.values.flat)
    allowzero = node.attr("allowzero", 0)
    if isinstance(x, Known):
        have = list(x.values.shape)
    else:
        have = lw.shape(x)
    out = []
    for i, d in enumerate(want):
        if static_int(d) == 0 and not allowzero:
            d = have[i]
        out.append(d)
    if sum(1 for d in out if static_int(d) == -1) > 1:
        raise lw.error("more than one -1 in the target shape")
    if any(static_int(d) == -1 for d in out):
        total = 1
        for d in have:
            total = total * d
        rest = 1
        for d in out:
            if static_int(d) != -1:
                rest = rest * d
        out = [tirx.floordiv(total, rest) if static_int(d) == -1 and not (isinstance(total, int) and isinstance(rest, int))
               else (total // rest if static_int(d) == -1 else d) for d in out]
    out = [lw.simplify(d) for d in out]
    if isinstance(x, Known):
        return [Known(x.values.reshape([int(static_int(d)) for d in out]), x.dtype)]
    return [lw.emit(R.reshape(x, out))]


@rule("Flatten")
def flatten(lw: Lowerer, node, args):
    x = lw.tensor(args[0])
    dims = lw.shape(x)
    axis = norm_axis(node.attr("axis", 1), len(dims))
    outer, inner = 1, 1
    for d in dims[:axis]:
        outer = outer * d
    for d in dims[axis:]:
        inner = inner * d
    return [lw.emit(R.reshape(x, [lw.simplify(outer), lw.simplify(inner)]))]


@rule("Transpose")
def transpose(lw: Lowerer, node, args):
    x = args[0]
    rank = lw.rank(x)
    perm = list(node.attr("perm", tuple(reversed(range(rank)))))
    if isinstance(x, Known):
        return [Known(x.values.transpose(perm), x.dtype)]
    stored = lw.weight(node.inputs[0], f"perm{''.join(map(str, perm))}", lambda a: np.transpose(a, perm))
    return [stored if stored is not None else lw.emit(R.permute_dims(x, perm))]


@rule("Unsqueeze")
def unsqueeze(lw: Lowerer, node, args):
    x = args[0]
    axes = lw.const_ints(args[1], "axes")
    rank = lw.rank(x) + len(axes)
    axes = sorted(norm_axis(a, rank) for a in axes)
    if isinstance(x, Known):
        v = x.values
        for a in axes:
            v = np.expand_dims(v, a)
        return [Known(v, x.dtype)]
    return [lw.emit(R.expand_dims(x, axes))]


@rule("Squeeze")
def squeeze(lw: Lowerer, node, args):
    x = args[0]
    rank = lw.rank(x)
    if len(args) > 1 and args[1] is not None:
        axes = sorted(norm_axis(a, rank) for a in lw.const_ints(args[1], "axes"))
    else:
        axes = [i for i, d in enumerate(lw.shape(x)) if static_int(d) == 1]
    if isinstance(x, Known):
        return [Known(np.squeeze(x.values, axis=tuple(axes)), x.dtype)]
    return [lw.emit(R.squeeze(x, axes))]


@rule("Concat")
def concat(lw: Lowerer, node, args):
    args = [a for a in args if a is not None]
    axis = node.attr("axis")
    if all_known(args):
        return [Known(np.concatenate([a.values for a in args], axis=axis), args[0].dtype)]
    axis = axis + lw.rank(args[0]) if axis < 0 else axis
    return [lw.emit(R.concat(lw.same_dims(args, axis), axis=axis))]


@rule("Split")
def split(lw: Lowerer, node, args):
    x = lw.tensor(args[0])
    dims = lw.shape(x)
    axis = norm_axis(node.attr("axis", 0), len(dims))
    n = len(node.outputs)
    if len(args) > 1 and args[1] is not None:
        sizes = lw.const_ints(args[1], "split")
    elif isinstance(dims[axis], int):
        chunk = -(-dims[axis] // n)
        sizes = [min(chunk, dims[axis] - i * chunk) for i in range(n)]
    else:
        sizes = None  # a symbolic dim: n equal parts
    if sizes is None:
        parts = lw.emit(R.split(x, n, axis=axis))
    else:
        parts = lw.emit(R.split(x, [int(s) for s in np.cumsum(sizes)[:-1]], axis=axis))
    return [lw.emit(relax.TupleGetItem(parts, i)) for i in range(n)]


def _slice_bound(v, dim, step: int):
    """An ONNX start/end, made non-negative where it can be, as Relax expects."""
    s = static_int(v)
    if s is None:
        return v
    if s >= _INT64_MAX // 2:
        return dim
    if s < 0 and step > 0:
        return dim + s if s > -(_INT64_MAX // 2) else 0
    return s


@rule("Slice")
def slice_(lw: Lowerer, node, args):
    x = args[0]
    starts, ends = lw.known(args[1]), lw.known(args[2])
    if starts is None or ends is None:
        raise lw.error("starts and ends must be known when compiling")
    rank = lw.rank(x)
    axes = lw.const_ints(args[3], "axes") if len(args) > 3 and args[3] is not None else list(range(starts.values.size))
    steps = lw.const_ints(args[4], "steps") if len(args) > 4 and args[4] is not None else [1] * len(axes)
    axes = [norm_axis(a, rank) for a in axes]
    if isinstance(x, Known) and x.values.ndim == 1 and starts.is_static and ends.is_static:
        s, e = starts.ints()[0], ends.ints()[0]
        return [Known(x.values[slice(s, e, steps[0])], x.dtype)]
    if any(st < 0 for st in steps):
        raise lw.error("negative steps are not supported")
    x = lw.tensor(x)
    dims = lw.shape(x)
    begin = [_slice_bound(v, dims[a], st) for v, a, st in zip(starts.values.flat, axes, steps)]
    end = [_slice_bound(v, dims[a], st) for v, a, st in zip(ends.values.flat, axes, steps)]
    y = lw.emit(R.strided_slice(x, axes=axes, begin=begin, end=end, strides=steps))
    # `cache[:seq]` of a static cache has the dim `min(seq, 64)` (clamped, as ONNX says),
    # which Relax cannot relate to `seq` downstream. Seen as `seq` rows instead (a view the
    # VM refuses when seq > 64, where the model's shapes would not fit anyway).
    out, clamped = lw.shape(y), False
    for a, b, e, st in zip(axes, begin, end, steps):
        length = lw.simplify(e - b) if st == 1 else None
        if length is not None and not is_polynomial(out[a]) and is_polynomial(length):
            out[a], clamped = length, True
    return [lw.view(y, out) if clamped else y]


@rule("Gather")
def gather(lw: Lowerer, node, args):
    data, idx = args
    axis = node.attr("axis", 0)
    if all_known(args) and data.values.ndim == 1 and idx.is_static:
        n = data.values.shape[0]
        picks = np.asarray(idx.ints(), dtype=np.int64).reshape(idx.values.shape)
        if ((picks < -n) | (picks >= n)).any():  # ONNX: an error, not an index taken modulo the size
            raise lw.error(f"index {int(picks[(picks < -n) | (picks >= n)].flat[0])} is outside an axis of {n}")
        picks = picks % n
        return [Known(objs([data.values[i] for i in picks.flat], picks.shape), data.dtype)]
    data = lw.tensor(data)
    rank = lw.rank(data)
    axis = norm_axis(axis, rank)
    if isinstance(idx, Known) and idx.is_static:
        n = lw.shape(data)[axis]
        vals = np.array(idx.ints(), dtype=np.int64).reshape(idx.values.shape)
        if isinstance(n, int):
            outside = (vals < -n) | (vals >= n)
            if outside.any():  # ONNX: an error (a clipped take would read the edge row silently)
                raise lw.error(f"index {int(vals[outside].flat[0])} is outside an axis of {n}")
            vals = np.where(vals < 0, vals + n, vals)
        if (vals >= 0).all():
            return [lw.emit(R.take(data, relax.const(vals, "int64"), axis=axis, mode="clip"))]  # in range: as fast
    # Negative indices count from the end (as in ONNX): "wrap" takes them modulo the size.
    return [lw.emit(R.take(data, lw.tensor(idx), axis=axis, mode="wrap"))]


@rule("GatherElements")
def gather_elements(lw: Lowerer, node, args):
    data, idx = lw.tensor(args[0]), lw.tensor(args[1])
    axis = norm_axis(node.attr("axis", 0), lw.rank(data))
    n = lw.shape(data)[axis]
    n = relax.const(n, lw.dtype(idx)) if isinstance(n, int) else None
    if n is not None:  # negative indices count from the end
        idx = lw.emit(R.where(R.less(idx, relax.const(0, lw.dtype(idx))), R.add(idx, n), idx))
    return [lw.emit(R.gather_elements(data, idx, axis=axis))]


@rule("ScatterElements")
def scatter_elements(lw: Lowerer, node, args):
    """ONNX ScatterElements (a router's [tokens, experts] mask built by scattering ones)."""
    data, idx, updates = lw.tensor(args[0]), lw.tensor(args[1]), lw.tensor(args[2])
    axis = norm_axis(node.attr("axis", 0), lw.rank(data))
    reduction = node.attr("reduction", "none")
    if reduction not in ("none", "add", "mul", "max", "min"):
        raise lw.error(f"reduction {reduction!r} is not supported")
    n = lw.shape(data)[axis]
    n = relax.const(n, lw.dtype(idx)) if isinstance(n, int) else None
    if n is not None:  # negative indices count from the end
        idx = lw.emit(R.where(R.less(idx, relax.const(0, lw.dtype(idx))), R.add(idx, n), idx))
    return [lw.emit(R.scatter_elements(data, idx, updates, axis=axis,
                                       reduction="update" if reduction == "none" else reduction))]


@rule("ScatterND")
def scatter_nd(lw: Lowerer, node, args):
    """ONNX ScatterND (a group-limited router's mask: DeepSeek-V3, JetMoE)."""
    reduction = node.attr("reduction", "none")
    if reduction not in ("none", "add", "mul", "max", "min"):
        raise lw.error(f"reduction {reduction!r} is not supported")
    data, idx, updates = lw.tensor(args[0]), lw.tensor(args[1]), lw.tensor(args[2])
    return [lw.emit(R.scatter_nd(data, idx, updates, "update" if reduction == "none" else reduction))]


@rule("GatherND")
def gather_nd(lw: Lowerer, node, args):
    data, idx = lw.tensor(args[0]), lw.tensor(args[1])
    return [lw.emit(R.gather_nd(data, idx, batch_dims=node.attr("batch_dims", 0)))]


def _broadcast_shapes(lw: Lowerer, a: list, b: list) -> list:
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + list(a), [1] * (n - len(b)) + list(b)
    out = []
    for x, y in zip(a, b):
        if static_int(x) == 1:
            out.append(y)
        elif static_int(y) == 1 or lw.analyzer.can_prove_equal(x, y):
            out.append(x)
        else:
            out.append(lw.simplify(tirx.max(x, y)))
    return out


@rule("Expand")
def expand(lw: Lowerer, node, args):
    x, target = args
    if not isinstance(target, Known):
        raise lw.error("the target shape depends on data (it must be known when compiling)")
    want = list(target.values.flat)
    if isinstance(x, Known):
        if all(static_int(d) is not None for d in want):
            return [Known(np.broadcast_to(x.values, _broadcast_shapes(lw, x.values.shape, want)).copy(), x.dtype)]
        x = lw.tensor(x)
    shape = _broadcast_shapes(lw, lw.shape(x), want)
    return [lw.emit(R.broadcast_to(x, shape))]


@rule("Tile")
def tile(lw: Lowerer, node, args):
    return [lw.emit(R.tile(lw.tensor(args[0]), lw.const_ints(args[1], "repeats")))]


@rule("Range")
def range_(lw: Lowerer, node, args):
    bounds = []
    for a, v in zip(args, node.inputs):
        k, c = lw.known(a), lw.const_array(v)
        if k is not None and k.values.ndim == 0:
            bounds.append(k.values.reshape(()).item())
        elif c is not None and c.ndim == 0:
            bounds.append(c.item())
        else:
            raise lw.error("start, limit and delta must be scalars known when compiling")
    start, limit, delta = bounds
    dt = relax_dtype(node.outputs[0].type.dtype)
    if all(static_int(v) is not None for v in bounds) and dt.startswith("int"):
        vals = np.arange(static_int(start), static_int(limit), static_int(delta), dtype=np.int64)
        if vals.size <= 64:
            return [Known(objs(vals.tolist(), vals.shape), node.outputs[0].type.dtype)]
    return [lw.emit(R.arange(start, limit, delta, dt))]


@rule("ConstantOfShape")
def constant_of_shape(lw: Lowerer, node, args):
    target = lw.known(args[0])
    if target is None:
        raise lw.error("the shape depends on data (it must be known when compiling)")
    value = node.attr("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value)
    dt = DType.from_numpy(value.dtype)
    shape = [lw.simplify(d) for d in target.values.flat]
    if value.dtype.kind in "iub" and all(static_int(d) is not None for d in shape) and math.prod(shape) <= 64:
        return [Known(np.full([int(d) for d in shape], int(value.reshape(-1)[0]), dtype=object), dt)]
    fill = relax.const(value.reshape(()), relax_dtype(dt))
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        # Relax's legalization of full fails on an infinite fill (a router's -inf scores)
        return [lw.emit(R.broadcast_to(fill, relax.ShapeExpr(shape)))]
    return [lw.emit(R.full(shape, fill, relax_dtype(dt)))]
