"""The graphopt IR -> a Relax `IRModule`, one registered rule per op.

    mod, params = lower_graph(graph)   # main(inputs..., weights...) -> (outputs...)

Each rule is `rule(lw: Lowerer, node, args) -> [outputs]`, registered with
`graphopt.registry.register_lowering("tvm", domain, op)`. An argument (and an output) is
either a Relax expression or a `Known`: a small integer tensor whose entries are known when
compiling, as ints or as TIR expressions over the symbolic dims (`batch`, `seq`). Exporters
compute shapes at run time (`Shape -> Gather -> Concat -> Reshape`); keeping those values
symbolic gives Relax static or symbolic shapes instead of data-dependent ones, and a
symbolic `seq` compiles once and runs at any length.

Graph inputs become Relax parameters with one `tirx.Var` per named dim. Weights larger than
`INLINE_BYTES` become parameters too (after the inputs; the function attribute `num_input`
says where they start), so they live outside the compiled library; smaller constants are
inlined. graphopt-domain ops without a TVM rule are replaced by their decomposition first.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value

BACKEND = "tvm"
INLINE_BYTES = 256  # constants up to this size are compiled into the library
KNOWN_MAX_ELEMS = 64  # integer tensors up to this size are tracked symbolically
PRE_LOWERING_PIPELINE = "simplify-shapes,fold-constants,eliminate-dead-code"


class LoweringError(UserError):
    """A node the TVM backend cannot lower (names the op and the node)."""


@dataclasses.dataclass
class Known:
    """An integer tensor known when compiling: `values` is an object array of ints and TIR
    expressions (over the symbolic dims) with the tensor's shape."""

    values: np.ndarray
    dtype: DType

    @property
    def is_static(self) -> bool:
        return all(isinstance(x, (int, np.integer)) for x in self.values.flat)

    def ints(self) -> list[int]:
        return [int(x) for x in self.values.flat]


def static_int(x) -> int | None:
    """`x` as a Python int when it is a constant (an int or an `IntImm`), else None."""
    from tvm import tirx

    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, tirx.IntImm):
        return int(x.value)
    return None


def relax_dtype(dt: DType) -> str:
    return "bool" if dt is DType.BOOL else str(dt.np_dtype)


def _check_rules(graph: Graph) -> None:
    from graphopt.registry import get_lowering

    for n in graph.nodes:
        if get_lowering(BACKEND, n.domain, n.op_type) is None:
            where = f"{graph.metadata.source}: " if graph.metadata.source else ""
            raise LoweringError(f"{where}the tvm backend has no lowering rule for {n.op} (node {n.name!r})")


def prepare(graph: Graph) -> Graph:
    """A copy of `graph` ready to lower: graphopt ops without a TVM rule decomposed, then
    shape simplification so Reshape/Expand targets are constants where they can be."""
    from graphopt.pass_manager import PassManager
    from graphopt.registry import decompose_node, get_lowering, get_op

    g = graph.copy()
    for _ in range(8):  # a decomposition may (in principle) produce graphopt ops again
        pending = [n for n in g.nodes if n.domain == GRAPHOPT_DOMAIN and get_lowering(BACKEND, n.domain, n.op_type) is None
                   and get_op(n.domain, n.op_type).decompose is not None]
        if not pending:
            break
        for n in pending:
            decompose_node(n)
    _check_rules(g)
    return PassManager(PRE_LOWERING_PIPELINE, verify=False).run(g)


class Lowerer:
    """Walks the graph in order, calling each node's rule; holds the BlockBuilder, the
    symbolic dims and the values lowered so far."""

    def __init__(self, graph: Graph):
        from tvm import relax, sym

        self.graph = graph
        self.bb = relax.BlockBuilder()
        self.analyzer = sym.Analyzer()
        self.dims: dict[str, object] = {}  # IR dim symbol -> tirx.Var
        self.env: dict[int, object] = {}  # id(Value) -> relax.Expr | Known
        self.params: list[tuple[str, object]] = []  # (weight name, relax.Var)
        self.node: Node | None = None

    # -- helpers for rules ----------------------------------------------------------

    def error(self, why: str) -> LoweringError:
        n = self.node
        return LoweringError(f"node {n.name!r} ({n.op}): {why}" if n is not None else why)

    def emit(self, expr):
        return self.bb.emit(expr)

    def dim(self, name: str):
        from tvm import tirx

        if name not in self.dims:
            from tvm import sym

            var = self.dims[name] = tirx.Var(name, "int64")
            # A dim is never negative: lets shape arithmetic prove `seq != -1` and the like.
            self.analyzer.update(var, sym.ConstIntBound(0, sym.ConstIntBound.POS_INF))
        return self.dims[name]

    def simplify(self, x):
        return x if isinstance(x, (int, np.integer)) else self.analyzer.simplify(x)

    def known(self, arg) -> Known | None:
        return arg if isinstance(arg, Known) else None

    def const_ints(self, arg, what: str = "input") -> list[int]:
        """An input that must be a compile-time list of ints (axes, perm, repeats)."""
        k = self.known(arg)
        if k is None or not k.is_static:
            raise self.error(f"{what} must be a constant")
        return k.ints()

    def const_array(self, value: Value | None) -> np.ndarray | None:
        """The constant value of an IR input (an initializer), or None."""
        if value is None:
            return None
        if value.const_value is not None:
            return np.asarray(value.const_value)
        p = value.producer()
        if p is not None and p.op_type == "Constant" and "value" in p.attrs:
            return np.asarray(p.attrs["value"].value)
        return None

    def tensor(self, arg):
        """A Relax tensor expression for `arg` (a `Known` is materialized)."""
        from tvm import relax
        from tvm.relax import op as R

        if not isinstance(arg, Known):
            return arg
        if arg.is_static:
            return relax.const(np.array(arg.ints(), dtype=arg.dtype.np_dtype).reshape(arg.values.shape),
                               relax_dtype(arg.dtype))
        flat = [self.simplify(x) for x in arg.values.flat]
        t = self.emit(R.shape_to_tensor(relax.ShapeExpr(flat)))
        if arg.dtype is not DType.INT64:
            t = self.emit(R.astype(t, relax_dtype(arg.dtype)))
        if arg.values.shape != (len(flat),):
            t = self.emit(R.reshape(t, list(arg.values.shape)))
        return t

    def shape(self, arg) -> list:
        """The shape of a lowered value: ints and TIR expressions."""
        if isinstance(arg, Known):
            return list(arg.values.shape)
        sinfo = arg.ty if hasattr(arg, "ty") else arg.struct_info
        if getattr(sinfo, "shape", None) is None:
            raise self.error("an input's shape is unknown to Relax (a data-dependent shape?)")
        return [static_int(d) if static_int(d) is not None else d for d in sinfo.shape.values]

    def rank(self, arg) -> int:
        if isinstance(arg, Known):
            return arg.values.ndim
        sinfo = arg.ty if hasattr(arg, "ty") else arg.struct_info
        if sinfo.ndim < 0:
            raise self.error("an input's rank is unknown")
        return sinfo.ndim

    def dtype(self, arg) -> str:
        if isinstance(arg, Known):
            return relax_dtype(arg.dtype)
        sinfo = arg.ty if hasattr(arg, "ty") else arg.struct_info
        return str(sinfo.dtype)

    # -- the walk --------------------------------------------------------------------

    def _input_var(self, v: Value):
        from tvm import relax

        if v.type is None or v.type.shape is None:
            raise LoweringError(f"graph input {v.name!r} needs a known rank for the tvm backend")
        shape = []
        for i, d in enumerate(v.type.shape):
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and d.isidentifier():
                shape.append(self.dim(d))
            else:  # an unknown or composite dim: a symbol of its own
                shape.append(self.dim(f"{v.name}_dim{i}"))
        return relax.Var(v.name, relax.TensorType(shape, relax_dtype(v.type.dtype)))

    def _constant(self, v: Value):
        """An initializer: a `Known`, an inlined constant, or a weight parameter."""
        from tvm import relax

        a = np.asarray(v.const_value)
        dt = DType.from_numpy(a.dtype)
        if a.dtype.kind in "iub" and a.size <= KNOWN_MAX_ELEMS and a.dtype != np.uint64:
            return Known(a.astype(object).reshape(a.shape) if a.ndim else np.array(int(a), dtype=object), dt)
        if a.nbytes <= INLINE_BYTES:
            return relax.const(np.ascontiguousarray(a), relax_dtype(dt))
        p = relax.Var(v.name, relax.TensorType(list(a.shape), relax_dtype(dt)))
        self.params.append((v.name, p))
        return p

    def run(self):
        """Lower the whole graph; returns (IRModule, weight names in parameter order)."""
        from graphopt.registry import get_lowering
        from tvm import relax

        g = self.graph
        _check_rules(g)
        inputs = [v for v in g.inputs if not v.is_initializer]
        in_vars = [self._input_var(v) for v in inputs]
        for v, var in zip(inputs, in_vars):
            self.env[id(v)] = var
        # Parameters must be known before the function starts: make every weight up front.
        consts = {id(v): self._constant(v) for v in g.initializers.values()}
        for v in g.initializers.values():
            self.env[id(v)] = consts[id(v)]
        with self.bb.function("main", in_vars + [p for _, p in self.params],
                              attrs={"num_input": len(in_vars)}):
            with self.bb.dataflow():
                for node in g.nodes:
                    self.node = node
                    rule: Callable = get_lowering(BACKEND, node.domain, node.op_type)
                    args = [None if v is None else self.env[id(v)] for v in node.inputs]
                    try:
                        outs = rule(self, node, args)
                    except UserError:
                        raise
                    except Exception as e:  # a TVM error: name the node that caused it
                        msg = str(e).strip().splitlines()
                        raise self.error(f"lowering to Relax failed: {msg[-1] if msg else type(e).__name__}") from e
                    for v, out in zip(node.outputs, outs):
                        if v is not None:
                            if out is None:
                                raise self.error(f"the rule gave no value for output {v.name!r}")
                            self.env[id(v)] = out
                self.node = None
                results = [self.tensor(self.env[id(v)]) for v in g.outputs]
                results = [self._cast_to_declared(r, v) for r, v in zip(results, g.outputs)]
                out = self.bb.emit_output(relax.Tuple(results))
            self.bb.emit_func_output(out)
        return self.bb.get(), [name for name, _ in self.params]

    def _cast_to_declared(self, expr, v: Value):
        from tvm.relax import op as R

        if v.type is not None and self.dtype(expr) != relax_dtype(v.type.dtype):
            return self.emit(R.astype(expr, relax_dtype(v.type.dtype)))
        return expr


def lower_graph(graph: Graph):
    """(IRModule, weight names in parameter order) for a graph that `prepare` produced."""
    return Lowerer(graph).run()
