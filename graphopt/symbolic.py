"""Symbolic values of integer shape tensors: what `Shape -> Gather -> Concat -> ...` chains
compute over symbolic dims (`batch`, `seq`), evaluated without running the graph.

The analysis behind simplify-shapes, the layout probes and the fusions that need to know a
Reshape's target: `symbolic_value(v)` is a list of ints/symbols (or a scalar) or None.
"""
from __future__ import annotations


from graphopt.ir import Graph, Node, TensorType, Value, constant_value, more_precise_type

Elem = "int | str | None"  # a dim value: known int, a symbol, or unknown
MAX_ELEMS = 16


def _elems(v: Value, env: dict[int, object]):
    """The symbolic content of `v`: an int/str/None (scalar), a list of them (1-D), or
    the sentinel `_UNKNOWN`."""
    if id(v) in env:
        return env[id(v)]
    c = constant_value(v)
    if c is not None and c.dtype.kind in "iu" and c.ndim <= 1 and c.size <= MAX_ELEMS:
        return int(c) if c.ndim == 0 else [int(x) for x in c]
    return _UNKNOWN


_UNKNOWN = object()


def _dim_token(v: Value, i: int, d):
    if isinstance(d, (int, str)):
        return d
    return f"?{v.name}[{i}]"  # an unknown dim, equal only to itself


def _binary(op: str, a, b):
    if isinstance(a, int) and isinstance(b, int):
        if op == "Add":
            return a + b
        if op == "Sub":
            return a - b
        if op == "Mul":
            return a * b
        if op == "Div":
            return a // b if b and a >= 0 and b > 0 else None
        if op == "Max":
            return max(a, b)
        if op == "Min":
            return min(a, b)
        if op == "Equal":
            return int(a == b)
    if op == "Mul" and (a == 1 or b == 1):
        return b if a == 1 else a
    if op in ("Add", "Sub") and b == 0:
        return a
    if op == "Add" and a == 0:
        return b
    if op == "Div" and b == 1:
        return a
    if op == "Equal" and a is not None and a == b:
        return 1
    if op == "Equal" and isinstance(a, str) and isinstance(b, int) and b < 0:
        return 0  # a dimension is never negative
    if op == "Equal" and isinstance(b, str) and isinstance(a, int) and a < 0:
        return 0
    return None


def _broadcast(op: str, a, b):
    if isinstance(a, list) and isinstance(b, list):
        if len(a) == len(b):
            return [_binary(op, x, y) for x, y in zip(a, b)]
        if len(a) == 1:
            return [_binary(op, a[0], y) for y in b]
        if len(b) == 1:
            return [_binary(op, x, b[0]) for x in a]
        return _UNKNOWN
    if isinstance(a, list):
        return [_binary(op, x, b) for x in a]
    if isinstance(b, list):
        return [_binary(op, a, y) for y in b]
    return _binary(op, a, b)


def evaluate(node: Node, env: dict[int, object]):
    """Symbolic value of node's first output, or _UNKNOWN."""
    t = node.op_type
    ins = [None if v is None else _elems(v, env) for v in node.inputs]
    if t == "Shape":
        x = node.inputs[0]
        if x.type is None or x.type.shape is None:
            return _UNKNOWN
        dims = [_dim_token(x, i, d) for i, d in enumerate(x.type.shape)]
        r = len(dims)
        start, end = node.attr("start", 0), node.attr("end", r)
        start = min(max(start + r if start < 0 else start, 0), r)
        end = min(max(end + r if end < 0 else end, 0), r)
        return dims[start:end]
    if any(i is _UNKNOWN for i in ins if i is not None):
        return _UNKNOWN
    if t in ("Identity", "Cast") and node.outputs[0].type is not None and node.outputs[0].type.dtype.np_dtype.kind in "iu":
        return ins[0]
    if t == "Gather" and node.attr("axis", 0) == 0 and isinstance(ins[0], list):
        idx = ins[1]
        n = len(ins[0])
        if isinstance(idx, int):
            return ins[0][idx % n] if -n <= idx < n else _UNKNOWN
        if isinstance(idx, list) and all(isinstance(i, int) and -n <= i < n for i in idx):
            return [ins[0][i % n] for i in idx]
        return _UNKNOWN
    if t == "Slice" and isinstance(ins[0], list) and len(ins) >= 3:
        starts, ends = ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else [0]
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1]
        if not all(isinstance(x, list) and len(x) == 1 and isinstance(x[0], int) for x in (starts, ends, axes, steps)):
            return _UNKNOWN
        if axes[0] not in (0, -1) or steps[0] == 0:
            return _UNKNOWN
        return ins[0][slice(max(starts[0], -2**62), min(ends[0], 2**62), steps[0])]
    if t == "Concat" and all(isinstance(i, list) for i in ins):
        return [e for i in ins for e in i]
    if t == "Unsqueeze" and not isinstance(ins[0], list) and ins[1] in ([0], 0, [-1]):
        return [ins[0]]
    if t == "Squeeze" and isinstance(ins[0], list) and len(ins[0]) == 1:
        return ins[0][0]
    if t == "Reshape" and ins[1] in ([-1], [1]) and not isinstance(ins[0], list):
        return [ins[0]]
    if t == "Reshape" and isinstance(ins[0], list) and ins[1] in ([-1], [len(ins[0])]):
        return ins[0]
    if t in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Equal") and len(ins) == 2:
        return _broadcast(t, ins[0], ins[1])
    if t == "Where" and len(ins) == 3:
        c, a, b = ins
        if isinstance(c, list):
            n = len(c)
            a = a if isinstance(a, list) else [a] * n
            b = b if isinstance(b, list) else [b] * n
            if len(a) != n or len(b) != n or any(x is None for x in c):
                return _UNKNOWN
            return [x if cc else y for cc, x, y in zip(c, a, b)]
        if c is None:
            return _UNKNOWN
        return a if c else b
    return _UNKNOWN


def _is_int_shape_value(v: Value) -> bool:
    t = v.type
    return t is not None and t.dtype.np_dtype.kind in "iu" and t.rank is not None and t.rank <= 1


def symbolic_value(v: Value, _memo: dict | None = None, _depth: int = 0):
    """The symbolic content of an integer shape tensor (a list of ints/symbols, or a
    scalar), evaluated through its producers; None when unknown. Dims of unknown size are
    tokens equal only to themselves (see `_dim_token`)."""
    memo = {} if _memo is None else _memo
    if id(v) in memo:
        return memo[id(v)]
    val = _elems(v, {})
    if val is _UNKNOWN and _depth < 32:
        n = v.producer()
        if n is not None and n.domain == "" and len(n.outputs) == 1 and _is_int_shape_value(v):
            env: dict[int, object] = {}
            for x in n.inputs:
                if x is not None:
                    sub = symbolic_value(x, memo, _depth + 1)
                    if sub is not None:
                        env[id(x)] = sub
            val = evaluate(n, env)
    result = None if val is _UNKNOWN else val
    memo[id(v)] = result
    return result


def dim_tokens(v: Value) -> list | None:
    """v's shape as tokens comparable with `symbolic_value` results."""
    if v.type is None or v.type.shape is None:
        return None
    return [_dim_token(v, i, d) for i, d in enumerate(v.type.shape)]


def type_reshapes(graph: Graph) -> int:
    """Give Reshape/Expand outputs the symbolic dims their (symbolically known) targets
    spell, where inference could not: `[batch, seq, 4, 8]` instead of `[unk__3, unk__4, 4, 8]`.
    Returns how many types got more precise."""
    count = 0
    memo: dict = {}
    for node in graph.nodes:
        if node.domain != "" or node.op_type not in ("Reshape", "Expand") or node.outputs[0] is None:
            continue
        out, data = node.outputs[0], node.inputs[0]
        target = symbolic_value(node.inputs[1], memo)
        if not isinstance(target, list) or data.type is None or out.type is None:
            continue
        in_dims = data.type.shape
        dims = []
        for i, e in enumerate(target):
            if node.op_type == "Reshape" and e == 0 and not node.attr("allowzero", 0):
                e = in_dims[i] if in_dims is not None and i < len(in_dims) else None
            if node.op_type == "Expand":
                j = i - (len(target) - len(in_dims)) if in_dims is not None else -1
                if e == 1 and in_dims is not None and j >= 0:
                    e = in_dims[j]
            if isinstance(e, int) and e < 0 or (isinstance(e, str) and e.startswith("?")):
                e = None
            dims.append(e)
        better = more_precise_type(out.type, TensorType(out.type.dtype, tuple(dims)))
        if better is not None:
            out.type = better
            count += 1
    return count
