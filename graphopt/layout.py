"""What a chain of layout ops computes, decided by running it.

Exporters spell the same data movement many ways: `k.transpose(-1, -2)` is one Transpose in
one export and Reshape -> Transpose -> Reshape (computed from `Shape` of the tensor itself)
in another; repeating key/value heads is Unsqueeze -> Expand -> Reshape. Matching each
spelling with patterns is brittle. Instead, `computes(src, dst, fn)` takes the slice of the
graph between `src` and `dst`, checks that it is made only of layout and shape-arithmetic
ops fed by `src` and constants, and runs it with the reference kernels on probe inputs (a
numbered tensor, at two different bindings of the symbolic dims) to see whether
`dst == fn(src)`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from graphopt.ir import Node, Value, constant_value
from graphopt.registry import run_reference
from graphopt.symbolic import symbolic_value

LAYOUT_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Flatten", "Identity", "Shape", "Gather",
              "Slice", "Concat", "Cast", "Add", "Sub", "Mul", "Div", "Equal", "Where", "Max", "Min", "Size",
              "ConstantOfShape", "Range", "Split"}
_DATA_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Flatten", "Identity"}  # single-input movers
_MOVES_DATA = _DATA_OPS | {"Slice", "Concat", "Gather", "Split"}  # may carry float data without computing on it
MAX_SLICE = 64
PROBE_DIMS = ((3, 5, 2, 7), (2, 7, 3, 5))  # values for symbolic dims in the two probes


def layout_slice(src: Value, dst: Value, data_ops: frozenset = frozenset()) -> list[Node] | None:
    """The nodes between src and dst, in graph order, if dst depends only on src and
    constants through layout/shape ops (and the extra `data_ops`, e.g. Neg for rotate-half);
    else None."""
    needed: dict[int, Node] = {}
    stack = [dst]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if v is src or id(v) in seen:
            continue
        seen.add(id(v))
        if constant_value(v) is not None and v.producer() is None:
            continue
        if v is not dst and _external_shape(v) is not None:
            continue  # a shape value computed elsewhere, evaluated from the probe's dims
        n = v.producer()
        if n is None or n.domain != "" or (n.op_type not in LAYOUT_OPS and n.op_type not in data_ops):
            return None
        if n.op_type == "Constant":
            continue
        if n.op_type not in _MOVES_DATA and n.op_type not in data_ops and n.op_type not in ("Shape", "Size") \
                and v.type is not None and v.type.dtype.np_dtype.kind == "f":
            return None  # arithmetic on float data is not a layout change
        needed[id(n)] = n
        if len(needed) > MAX_SLICE:
            return None
        stack.extend(x for x in n.inputs if x is not None)
    if not needed:
        return [] if dst is src else None
    graph = dst.graph
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    return sorted(needed.values(), key=lambda n: order[id(n)])


def _external_shape(v: Value):
    """The symbolic content of an integer shape tensor from outside the slice, if known."""
    if v.type is None or v.type.dtype.np_dtype.kind not in "iu" or v.type.rank not in (0, 1):
        return None
    return symbolic_value(v)


def _probe_shape(src: Value, k: int, sym: dict | None = None) -> tuple[int, ...] | None:
    if src.type is None or src.type.shape is None:
        return None
    dims = []
    sym = {} if sym is None else sym
    for d in src.type.shape:
        if isinstance(d, int):
            dims.append(d)
        else:
            key = d if isinstance(d, str) else object()
            if key not in sym:
                sym[key] = PROBE_DIMS[k][len(sym) % len(PROBE_DIMS[k])]
            dims.append(sym[key])
    return tuple(dims)


def computes(src: Value, dst: Value, fn: Callable[[np.ndarray], np.ndarray],
             data_ops: frozenset = frozenset()) -> bool:
    """True when dst == fn(src) for every probe (see module doc)."""
    runs = probe(src, dst, data_ops)
    if runs is None:
        return False
    for x, got in runs:
        try:
            want = fn(x)
        except Exception:
            return False
        if got.shape != want.shape or not np.array_equal(got, want):
            return False
    return True


def probe(src: Value, dst: Value, data_ops: frozenset = frozenset(), make=None,
          limit: int = 1 << 16) -> list[tuple] | None:
    """[(x, dst's value)] for the probes: the layout slice from `src` to `dst` run on `x` =
    `make(shape)` (a numbered tensor of src's shape at each binding of its symbolic dims by
    default, at most `limit` elements); None when dst is not a layout function of src or a
    probe fails."""
    nodes = layout_slice(src, dst, data_ops)
    if nodes is None:
        return None
    runs = []
    for k in range(len(PROBE_DIMS)):
        binding: dict = {}
        shape = _probe_shape(src, k, binding)
        if shape is None or int(np.prod(shape)) > limit:
            return None
        x = (make(shape) if make is not None else np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)) \
            .astype(src.type.dtype.np_dtype)
        env = {id(src): x}
        try:
            for n in nodes:
                args = []
                for v in n.inputs:
                    if v is None:
                        args.append(None)
                    elif id(v) in env:
                        args.append(env[id(v)])
                    elif constant_value(v) is not None:
                        args.append(constant_value(v))
                    else:
                        ext = _bind(_external_shape(v), binding, v)
                        if ext is None:
                            return None
                        args.append(ext)
                with np.errstate(all="ignore"):
                    outs = run_reference(n, args)
                for v, r in zip(n.outputs, outs):
                    if v is not None:
                        env[id(v)] = np.asarray(r)
        except Exception:
            return None
        got = env.get(id(dst), x if dst is src else None)
        if got is None:
            return None
        runs.append((x, got))
    return runs


def _bind(sym_value, binding: dict, v: Value) -> np.ndarray | None:
    """Evaluate a symbolic shape value under the probe's binding of symbols."""
    if sym_value is None:
        return None
    items = sym_value if isinstance(sym_value, list) else [sym_value]
    out = []
    for e in items:
        if isinstance(e, int):
            out.append(e)
        elif isinstance(e, str) and e in binding:
            out.append(binding[e])
        else:
            return None
    arr = np.array(out, dtype=v.type.dtype.np_dtype)
    return arr if isinstance(sym_value, list) else arr.reshape(())


def swap_last_two(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def repeat_heads(group: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.repeat(x, group, axis=1)


def split_heads(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """[B, S, N*H] -> [B, N, S, H]"""
    def fn(x):
        b, s, d = x.shape
        return x.reshape(b, s, num_heads, d // num_heads).transpose(0, 2, 1, 3)
    return fn


def split_heads_bshd(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """[B, S, N*H] -> [B, S, N, H] (the head split before its transpose)"""
    def fn(x):
        return x.reshape(x.shape[0], x.shape[1], num_heads, -1)
    return fn


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[B, N, S, H] -> [B, S, N*H]"""
    b, n, s, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n * h)


def layout_ancestors(v: Value, limit: int = 8) -> list[Value]:
    """Values upstream of v through data-moving layout ops (nearest first)."""
    out = []
    cur = v
    for _ in range(limit):
        n = cur.producer()
        if n is None or n.domain != "" or n.op_type not in _DATA_OPS or not n.inputs or n.inputs[0] is None:
            break
        cur = n.inputs[0]
        out.append(cur)
    return out


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] -> [-x2, x1] over the last axis (the non-interleaved RoPE rotation)."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rotate_pairs(x: np.ndarray) -> np.ndarray:
    """[x0, x1, x2, x3, ..] -> [-x1, x0, -x3, x2, ..] over the last axis (the interleaved RoPE
    rotation: GPT-J's rotate_every_two, Cohere's rotate_half)."""
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out
