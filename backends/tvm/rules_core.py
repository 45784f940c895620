"""TVM lowering rules for core (ONNX) ops: `rule(lw, node, args) -> [outputs]`.

Integer shape arithmetic (`Shape`, `Gather`, `Concat`, `Add`, ...) on `Known` values is
evaluated while compiling, over the symbolic dims; everything else becomes Relax ops.
"""
from __future__ import annotations

import math

import numpy as np
from tvm import relax, tirx
from tvm.relax import op as R

from graphopt.dtypes import DType
from graphopt.registry import register_lowering

from graphopt.backends.tvm.lowering import Known, Lowerer, _is_polynomial, relax_dtype, static_int

_INT64_MAX = np.iinfo(np.int64).max


def rule(*ops: str, domain: str = ""):
    """Register one function as the TVM rule of several ops."""
    def deco(fn):
        for op in ops:
            register_lowering("tvm", domain, op)(fn)
        return fn
    return deco


def _objs(items, shape=None) -> np.ndarray:
    """An object array of ints and TIR expressions (built one entry at a time, so that
    numpy never looks inside an expression)."""
    items = list(items)
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr.reshape(shape if shape is not None else (len(items),))


def _known(lw: Lowerer, values: np.ndarray, dtype: DType) -> Known:
    """A `Known` from an object array, its entries simplified (`seq + 0` -> `seq`)."""
    flat = [lw.simplify(x) for x in values.flat]
    return Known(_objs([static_int(x) if static_int(x) is not None else x for x in flat], values.shape), dtype)


def _all_known(args) -> bool:
    return all(a is None or isinstance(a, Known) for a in args)


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------------------
# Elementwise


def _sym_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return int(a / b) if b else None  # ONNX integer Div truncates toward zero
    return tirx.floordiv(a, b)  # shape values are not negative


def _sym_equal(lw: Lowerer, a, b):
    if lw.analyzer.can_prove_equal(a, b):
        return 1
    if lw.analyzer.can_prove(tirx.const(a, "int64") != b if isinstance(a, int) else a != b):
        return 0
    return None


_KNOWN_BINARY = {
    "Add": lambda lw, a, b: a + b,
    "Sub": lambda lw, a, b: a - b,
    "Mul": lambda lw, a, b: a * b,
    "Div": lambda lw, a, b: _sym_div(a, b),
    "Max": lambda lw, a, b: max(a, b) if isinstance(a, int) and isinstance(b, int) else tirx.max(a, b),
    "Min": lambda lw, a, b: min(a, b) if isinstance(a, int) and isinstance(b, int) else tirx.min(a, b),
    "Equal": _sym_equal,
}

_BINARY = {
    "Add": R.add, "Sub": R.subtract, "Mul": R.multiply, "Pow": R.power,
    "Equal": R.equal, "Less": R.less, "LessOrEqual": R.less_equal, "Greater": R.greater,
    "GreaterOrEqual": R.greater_equal, "And": R.logical_and, "Or": R.logical_or, "Xor": R.logical_xor,
    "Max": R.maximum, "Min": R.minimum, "BitwiseAnd": R.bitwise_and, "BitwiseOr": R.bitwise_or,
}


def _known_binary(lw: Lowerer, node, a: Known, b: Known):
    f = _KNOWN_BINARY.get(node.op_type)
    if f is None:
        return None
    xs, ys = np.broadcast_arrays(a.values, b.values)
    out = []
    for x, y in zip(xs.flat, ys.flat):
        r = f(lw, x, y)
        if r is None:
            return None
        out.append(r)
    dt = DType.BOOL if node.op_type == "Equal" else a.dtype
    return _known(lw, _objs(out, xs.shape), dt)


@rule("Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
      "And", "Or", "Xor", "BitwiseAnd", "BitwiseOr")
def binary(lw: Lowerer, node, args):
    a, b = args
    if isinstance(a, Known) and isinstance(b, Known):
        k = _known_binary(lw, node, a, b)
        if k is not None:
            return [k]
    x, y = lw.broadcast(a, b)
    op = node.op_type
    if op == "Div":
        if lw.dtype(x).startswith(("int", "uint")):
            # ONNX integer division truncates toward zero; TOPI's divide floors.
            dt, zero = lw.dtype(x), relax.const(0, lw.dtype(x))
            q = lw.emit(R.floor_divide(x, y))
            inexact = R.not_equal(R.subtract(x, R.multiply(q, y)), zero)
            fix = lw.emit(R.logical_and(inexact, R.logical_xor(R.less(x, zero), R.less(y, zero))))
            return [lw.emit(R.add(q, R.astype(fix, dt)))]
        return [lw.emit(R.divide(x, y))]
    if op == "Pow":
        c = lw.const_array(node.inputs[1])
        if c is not None and c.size == 1 and float(c.reshape(())) == 2.0:
            return [lw.emit(R.multiply(x, x))]  # x ** 2 as one multiply (exact, and fast)
        if lw.dtype(y) != lw.dtype(x):
            y = lw.emit(R.astype(y, lw.dtype(x)))
    return [lw.emit(_BINARY[op](x, y))]


@rule("Max", "Min", "Sum", "Mean")
def variadic(lw: Lowerer, node, args):
    args = [a for a in args if a is not None]
    if node.op_type in ("Max", "Min") and len(args) == 2 and _all_known(args):
        k = _known_binary(lw, node, *args)
        if k is not None:
            return [k]
    f = {"Max": R.maximum, "Min": R.minimum, "Sum": R.add, "Mean": R.add}[node.op_type]
    xs = lw.broadcast(*args)
    acc = xs[0]
    for x in xs[1:]:
        acc = lw.emit(f(acc, x))
    if node.op_type == "Mean":
        acc = lw.emit(R.divide(acc, relax.const(len(args), lw.dtype(acc))))
    return [acc]


_UNARY = {
    "Neg": R.negative, "Abs": R.abs, "Sqrt": R.sqrt, "Exp": R.exp, "Log": R.log, "Tanh": R.tanh,
    "Sigmoid": R.sigmoid, "Relu": R.nn.relu, "Erf": R.erf, "Sin": R.sin, "Cos": R.cos,
    "Floor": R.floor, "Ceil": R.ceil, "Round": R.round, "Sign": R.sign, "Not": R.logical_not,
    "Softplus": R.nn.softplus, "IsNaN": R.isnan, "IsInf": R.isinf,
}


@rule(*_UNARY)
def unary(lw: Lowerer, node, args):
    (a,) = args
    if isinstance(a, Known) and node.op_type in ("Neg", "Abs"):
        f = (lambda v: -v) if node.op_type == "Neg" else (lambda v: abs(v) if isinstance(v, int) else None)
        vals = [f(v) for v in a.values.flat]
        if all(v is not None for v in vals):
            return [_known(lw, _objs(vals, a.values.shape), a.dtype)]
    return [lw.emit(_UNARY[node.op_type](lw.tensor(a)))]


@rule("Reciprocal")
def reciprocal(lw: Lowerer, node, args):
    x = lw.tensor(args[0])
    return [lw.emit(R.divide(relax.const(1, lw.dtype(x)), x))]


@rule("LeakyRelu")
def leaky_relu(lw: Lowerer, node, args):
    return [lw.emit(R.nn.leakyrelu(lw.tensor(args[0]), node.attr("alpha", 0.01)))]


@rule("Gelu")
def gelu(lw: Lowerer, node, args):
    x = lw.tensor(args[0])
    approx = node.attr("approximate", "none")
    return [lw.emit(R.nn.gelu_tanh(x) if approx == "tanh" else R.nn.gelu(x))]


@rule("Clip")
def clip(lw: Lowerer, node, args):
    x = lw.tensor(args[0])
    for bound, f in ((args[1] if len(args) > 1 else None, R.maximum), (args[2] if len(args) > 2 else None, R.minimum)):
        if bound is not None:
            x = lw.emit(f(x, lw.tensor(bound)))
    return [x]


@rule("Where")
def where(lw: Lowerer, node, args):
    c, a, b = args
    if _all_known(args) and c.is_static:
        cs, xs, ys = np.broadcast_arrays(c.values, a.values, b.values)
        vals = [x if int(cc) else y for cc, x, y in zip(cs.flat, xs.flat, ys.flat)]
        return [_known(lw, _objs(vals, cs.shape), a.dtype)]
    return [lw.emit(R.where(*lw.broadcast(c, a, b)))]


@rule("Cast")
def cast(lw: Lowerer, node, args):
    (a,) = args
    to = DType.from_onnx(node.attr("to"))
    if isinstance(a, Known) and to.np_dtype.kind in "iu" and to is not DType.BOOL:
        return [Known(a.values, to)]
    x = lw.tensor(a)
    if lw.dtype(x) == relax_dtype(to):
        return [x]
    return [lw.emit(R.astype(x, relax_dtype(to)))]


@rule("Identity", "Dropout")
def identity(lw: Lowerer, node, args):
    if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1] is not None:
        raise lw.error("the mask output of Dropout is not supported")
    return [args[0]]


# --------------------------------------------------------------------------------------
# Linear algebra, normalization, reductions


@rule("MatMul")
def matmul(lw: Lowerer, node, args):
    return [lw.emit(R.matmul(lw.tensor(args[0]), lw.tensor(args[1])))]


@rule("Gemm")
def gemm(lw: Lowerer, node, args):
    a, b = lw.tensor(args[0]), lw.tensor(args[1])
    c = args[2] if len(args) > 2 else None
    if node.attr("transA", 0):
        a = lw.emit(R.permute_dims(a, [1, 0]))
    if node.attr("transB", 0):  # a weight is stored transposed
        b = lw.weight(node.inputs[1], "T", np.transpose) or lw.emit(R.permute_dims(b, [1, 0]))
    y = lw.emit(R.matmul(a, b))
    dt = lw.dtype(y)
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    if alpha != 1.0:
        y = lw.emit(R.multiply(y, relax.const(alpha, dt)))
    if c is not None and beta != 0.0:
        c = lw.tensor(c)
        if beta != 1.0:
            c = lw.emit(R.multiply(c, relax.const(beta, dt)))
        y = lw.emit(R.add(y, c))
    return [y]


@rule("Softmax", "LogSoftmax")
def softmax(lw: Lowerer, node, args):
    f = R.nn.softmax if node.op_type == "Softmax" else R.nn.log_softmax
    return [lw.emit(f(lw.tensor(args[0]), axis=node.attr("axis", -1)))]


@rule("LayerNormalization")
def layer_norm(lw: Lowerer, node, args):
    if any(v is not None for v in node.outputs[1:]):
        raise lw.error("the Mean and InvStdDev outputs are not supported")
    x, scale = lw.tensor(args[0]), lw.tensor(args[1])
    rank = lw.rank(x)
    axis = _axis(node.attr("axis", -1), rank)
    bias = lw.tensor(args[2]) if len(args) > 2 and args[2] is not None else None
    dt = lw.dtype(x)
    compute = "float32" if dt in ("float16", "bfloat16") and node.attr("stash_type", 1) == 1 else dt
    xs = x if compute == dt else lw.emit(R.astype(x, compute))
    norm_shape = lw.shape(x)[axis:]
    if not all(isinstance(d, int) for d in norm_shape):
        raise lw.error("the normalized dimensions must be static")
    ones, zeros = (relax.const(f([int(d) for d in norm_shape], compute)) for f in (np.ones, np.zeros))
    y = lw.emit(R.nn.layer_norm(xs, ones, zeros,
                                axes=list(range(axis, rank)), epsilon=node.attr("epsilon", 1e-5)))
    if compute != dt:
        y = lw.emit(R.astype(y, dt))
    y = lw.emit(R.multiply(y, scale))
    if bias is not None:
        y = lw.emit(R.add(y, bias))
    return [y]


_REDUCE = {"ReduceMean": R.mean, "ReduceSum": R.sum, "ReduceMax": R.max, "ReduceMin": R.min,
           "ReduceProd": R.prod}


@rule(*_REDUCE, "ReduceSumSquare", "ReduceL2")
def reduce(lw: Lowerer, node, args):
    x = lw.tensor(args[0])
    rank = lw.rank(x)
    axes = node.attr("axes")  # opset < 18 style, should the IR carry one
    if len(args) > 1 and args[1] is not None:
        axes = lw.const_ints(args[1], "axes")
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(rank))
    axes = sorted(_axis(a, rank) for a in axes)
    keep = bool(node.attr("keepdims", 1))
    if node.op_type in ("ReduceSumSquare", "ReduceL2"):
        s = lw.emit(R.sum(lw.emit(R.multiply(x, x)), axis=axes, keepdims=keep))
        return [s if node.op_type == "ReduceSumSquare" else lw.emit(R.sqrt(s))]
    return [lw.emit(_REDUCE[node.op_type](x, axis=axes, keepdims=keep))]


@rule("ArgMax", "ArgMin")
def arg_reduce(lw: Lowerer, node, args):
    if node.attr("select_last_index", 0):
        raise lw.error("select_last_index=1 is not supported")
    f = R.argmax if node.op_type == "ArgMax" else R.argmin
    y = lw.emit(f(lw.tensor(args[0]), axis=node.attr("axis", 0), keepdims=bool(node.attr("keepdims", 1))))
    return [y if lw.dtype(y) == "int64" else lw.emit(R.astype(y, "int64"))]


@rule("CumSum")
def cumsum(lw: Lowerer, node, args):
    x = lw.tensor(args[0])
    (axis,) = lw.const_ints(args[1], "axis")
    if node.attr("reverse", 0):
        x = lw.emit(R.flip(x, axis))
    y = lw.emit(R.cumsum(x, axis=axis, exclusive=bool(node.attr("exclusive", 0))))
    if node.attr("reverse", 0):
        y = lw.emit(R.flip(y, axis))
    return [y]


@rule("Trilu")
def trilu(lw: Lowerer, node, args):
    k = lw.const_ints(args[1], "k")[0] if len(args) > 1 and args[1] is not None else 0
    f = R.triu if node.attr("upper", 1) else R.tril
    return [lw.emit(f(lw.tensor(args[0]), k))]


# --------------------------------------------------------------------------------------
# Shapes and data movement


@rule("Shape")
def shape(lw: Lowerer, node, args):
    dims = lw.shape(args[0])
    rank = len(dims)
    start = node.attr("start", 0)
    end = node.attr("end", rank)
    start, end = (max(0, min(rank, _axis(i, rank))) for i in (start, end))
    return [_known(lw, _objs(dims[start:end]), DType.INT64)]


@rule("Size")
def size(lw: Lowerer, node, args):
    n = 1
    for d in lw.shape(args[0]):
        n = n * d
    return [_known(lw, _objs([n], ()), DType.INT64)]


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
    axis = _axis(node.attr("axis", 1), len(dims))
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
    axes = sorted(_axis(a, rank) for a in axes)
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
        axes = sorted(_axis(a, rank) for a in lw.const_ints(args[1], "axes"))
    else:
        axes = [i for i, d in enumerate(lw.shape(x)) if static_int(d) == 1]
    if isinstance(x, Known):
        return [Known(np.squeeze(x.values, axis=tuple(axes)), x.dtype)]
    return [lw.emit(R.squeeze(x, axes))]


@rule("Concat")
def concat(lw: Lowerer, node, args):
    args = [a for a in args if a is not None]
    axis = node.attr("axis")
    if _all_known(args):
        return [Known(np.concatenate([a.values for a in args], axis=axis), args[0].dtype)]
    axis = axis + lw.rank(args[0]) if axis < 0 else axis
    return [lw.emit(R.concat(lw.same_dims(args, axis), axis=axis))]


@rule("Split")
def split(lw: Lowerer, node, args):
    x = lw.tensor(args[0])
    dims = lw.shape(x)
    axis = _axis(node.attr("axis", 0), len(dims))
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
    axes = [_axis(a, rank) for a in axes]
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
        if length is not None and not _is_polynomial(out[a]) and _is_polynomial(length):
            out[a], clamped = length, True
    return [lw.view(y, out) if clamped else y]


@rule("Gather")
def gather(lw: Lowerer, node, args):
    data, idx = args
    axis = node.attr("axis", 0)
    if _all_known(args) and data.values.ndim == 1 and idx.is_static:
        picks = np.asarray(idx.ints(), dtype=np.int64).reshape(idx.values.shape) % data.values.shape[0]
        return [Known(_objs([data.values[i] for i in picks.flat], picks.shape), data.dtype)]
    data = lw.tensor(data)
    rank = lw.rank(data)
    axis = _axis(axis, rank)
    if isinstance(idx, Known) and idx.is_static:
        n = lw.shape(data)[axis]
        vals = np.array(idx.ints(), dtype=np.int64).reshape(idx.values.shape)
        if isinstance(n, int):
            vals = np.where(vals < 0, vals + n, vals)
        if (vals >= 0).all():
            return [lw.emit(R.take(data, relax.const(vals, "int64"), axis=axis, mode="fast"))]
    # Negative indices count from the end (as in ONNX): "wrap" takes them modulo the size.
    return [lw.emit(R.take(data, lw.tensor(idx), axis=axis, mode="wrap"))]


@rule("GatherElements")
def gather_elements(lw: Lowerer, node, args):
    data, idx = lw.tensor(args[0]), lw.tensor(args[1])
    axis = _axis(node.attr("axis", 0), lw.rank(data))
    n = lw.shape(data)[axis]
    n = relax.const(n, lw.dtype(idx)) if isinstance(n, int) else None
    if n is not None:  # negative indices count from the end
        idx = lw.emit(R.where(R.less(idx, relax.const(0, lw.dtype(idx))), R.add(idx, n), idx))
    return [lw.emit(R.gather_elements(data, idx, axis=axis))]


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
            return [Known(_objs(vals.tolist(), vals.shape), node.outputs[0].type.dtype)]
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
    return [lw.emit(R.full(shape, relax.const(value.reshape(()), relax_dtype(dt)), relax_dtype(dt)))]
