"""TVM lowering rules for core (ONNX) ops, elementwise to reductions:
`rule(lw, node, args) -> [outputs]`. Shapes and data movement are in `rules_shapes`.

Integer arithmetic on `Known` values (shape computations: `Add`, `Mul`, `Equal`, ...) is
evaluated while compiling, over the symbolic dims; everything else becomes Relax ops.
"""
from __future__ import annotations

import numpy as np

try:  # every module imports without tvm (the wheel check imports them all); rules run only with it
    from tvm import relax, tirx
    from tvm.relax import op as R
except ImportError:  # pragma: no cover
    relax = tirx = R = None

from graphopt.backends.tvm.lowering import (Known, Lowerer, all_known, known_of, norm_axis, objs, relax_dtype, relax_op,
                                            rule, static_int)
from graphopt.dtypes import DType


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
    "Add": "add", "Sub": "subtract", "Mul": "multiply", "Pow": "power",
    "Equal": "equal", "Less": "less", "LessOrEqual": "less_equal", "Greater": "greater",
    "GreaterOrEqual": "greater_equal", "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
    "Max": "maximum", "Min": "minimum", "BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or",
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
    return known_of(lw, objs(out, xs.shape), dt)


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
    return [lw.emit(relax_op(_BINARY[op])(x, y))]


@rule("Max", "Min", "Sum", "Mean")
def variadic(lw: Lowerer, node, args):
    args = [a for a in args if a is not None]
    if node.op_type in ("Max", "Min") and len(args) == 2 and all_known(args):
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
    "Neg": "negative", "Abs": "abs", "Sqrt": "sqrt", "Exp": "exp", "Log": "log", "Tanh": "tanh",
    "Sigmoid": "sigmoid", "Relu": "nn.relu", "Erf": "erf", "Sin": "sin", "Cos": "cos",
    "Floor": "floor", "Ceil": "ceil", "Round": "round", "Sign": "sign", "Not": "logical_not",
    "Softplus": "nn.softplus", "IsNaN": "isnan", "IsInf": "isinf",
}


@rule(*_UNARY)
def unary(lw: Lowerer, node, args):
    (a,) = args
    if isinstance(a, Known) and node.op_type in ("Neg", "Abs"):
        f = (lambda v: -v) if node.op_type == "Neg" else (lambda v: abs(v) if isinstance(v, int) else None)
        vals = [f(v) for v in a.values.flat]
        if all(v is not None for v in vals):
            return [known_of(lw, objs(vals, a.values.shape), a.dtype)]
    return [lw.emit(relax_op(_UNARY[node.op_type])(lw.tensor(a)))]


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
    if all_known(args) and c.is_static:
        cs, xs, ys = np.broadcast_arrays(c.values, a.values, b.values)
        vals = [x if int(cc) else y for cc, x, y in zip(cs.flat, xs.flat, ys.flat)]
        return [known_of(lw, objs(vals, cs.shape), a.dtype)]
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
    return [lw.matmul(lw.tensor(args[0]), node.inputs[1], lw.tensor(args[1]))]


@rule("Gemm")
def gemm(lw: Lowerer, node, args):
    a, b = lw.tensor(args[0]), lw.tensor(args[1])
    c = args[2] if len(args) > 2 else None
    if node.attr("transA", 0):
        a = lw.emit(R.permute_dims(a, [1, 0]))
    y = lw.matmul(a, node.inputs[1], b, transposed=bool(node.attr("transB", 0)))
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
    axis = norm_axis(node.attr("axis", -1), rank)
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


_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min",
           "ReduceProd": "prod"}


@rule(*_REDUCE, "ReduceSumSquare", "ReduceL2", "ReduceL1", "ReduceLogSum")
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
    axes = sorted(norm_axis(a, rank) for a in axes)
    keep = bool(node.attr("keepdims", 1))
    if node.op_type in ("ReduceSumSquare", "ReduceL2"):
        s = lw.emit(R.sum(lw.emit(R.multiply(x, x)), axis=axes, keepdims=keep))
        return [s if node.op_type == "ReduceSumSquare" else lw.emit(R.sqrt(s))]
    if node.op_type == "ReduceL1":  # DBRX's router normalizes its top-k weights by their L1 norm
        return [lw.emit(R.sum(lw.emit(R.abs(x)), axis=axes, keepdims=keep))]
    if node.op_type == "ReduceLogSum":
        return [lw.emit(R.log(lw.emit(R.sum(x, axis=axes, keepdims=keep))))]
    return [lw.emit(relax_op(_REDUCE[node.op_type])(x, axis=axes, keepdims=keep))]


@rule("ArgMax", "ArgMin")
def arg_reduce(lw: Lowerer, node, args):
    if node.attr("select_last_index", 0):
        raise lw.error("select_last_index=1 is not supported")
    f = R.argmax if node.op_type == "ArgMax" else R.argmin
    y = lw.emit(f(lw.tensor(args[0]), axis=node.attr("axis", 0), keepdims=bool(node.attr("keepdims", 1))))
    return [y if lw.dtype(y) == "int64" else lw.emit(R.astype(y, "int64"))]


@rule("TopK")
def topk(lw: Lowerer, node, args):
    """ONNX TopK (k a constant: a mixture-of-experts router's). Ties keep the lower index
    first, as ONNX asks; `sorted=0` leaves the order open, so the sorted one is a valid answer."""
    x, axis, largest = lw.tensor(args[0]), node.attr("axis", -1), bool(node.attr("largest", 1))
    k = lw.known(args[1])
    if k is not None and k.values.size == 1 and not k.is_static:
        length = lw.shape(x)[axis]
        if static_int(lw.simplify(k.values.flat[0] - length)) == 0:  # k is the axis' length: a full sort
            # (JetMoE's router sorts its tokens); TVM's argsort is stable, so ties keep the lower index first
            order = lw.emit(R.argsort(x, axis=axis, descending=largest, dtype="int64"))
            return [lw.emit(R.gather_elements(x, order, axis)), order]
    (k,) = lw.const_ints(args[1], "k")
    both = lw.emit(R.topk(x, k=int(k), axis=axis, ret_type="both", largest=largest, dtype="int64"))
    return [lw.emit(relax.TupleGetItem(both, 0)), lw.emit(relax.TupleGetItem(both, 1))]


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
