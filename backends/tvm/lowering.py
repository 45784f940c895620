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
`INLINE_BYTES` become parameters too (after the inputs, in order of first use), so they live
outside the compiled library; smaller constants are inlined. A rule that needs a weight in
another layout (a transposed Linear weight, two projections side by side) asks for it with
`Lowerer.weight`: it is computed here, once, and stored that way -- never on every call.
On CPU targets a constant matmul weight is stored in column panels (`Lowerer.weight_matmul`),
the layout the matmul schedule reads in place. What every layer computes alike from the same
inputs (rotary tables, the attention mask's bias) is emitted once (`Lowerer.once`).
(Relax's LiftTransformParams would do this generically, but it crashes when a lifted
expression uses a symbolic dim, as `rope_cache[:seq]` does.) graphopt-domain ops without a
TVM rule are replaced by their decomposition first.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from graphopt.backends.tvm.build import cpu_target_spec
from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.ir import Graph, Node, Value
from graphopt.lowering import prepare as prepare_for_backend
from graphopt.registry import get_lowering, register_lowering
from graphopt.sample_inputs import sum_dims

BACKEND = "tvm"
INLINE_BYTES = 256  # constants up to this size are compiled into the library
KNOWN_MAX_ELEMS = 64  # integer tensors up to this size are tracked symbolically
PANEL = 32  # columns of a pre-packed weight panel: 2 AVX-512 (4 AVX2) vectors of float32
# On a CPU with 512-bit vectors, where it divides N: 4 vectors a panel, so the matmul tile (4 rows)
# holds 16 accumulators, not 8. Timed interleaved against ORT on the Llama-style model (hidden
# 512, MLP 1408), 2 threads, idle: TVM/ORT 1.25x -> 1.08x at 1 x 128, 1.19x -> 1.08x at 4 x 128
# (6 or 8 rows of 32 columns: 1.19-1.22x). With 256-bit vectors 64 columns would need 32
# accumulators, twice the registers.
WIDE_PANEL = 64


def panel_width(n: int) -> int | None:
    """Columns of the panels a weight with N columns is stored in, None if it cannot be."""
    if n % WIDE_PANEL == 0 and _wide_vectors():
        return WIDE_PANEL
    return PANEL if n % PANEL == 0 else None


@functools.cache
def _wide_vectors() -> bool:
    """Whether the CPU target that builds are made for (this machine's) has 512-bit vectors."""
    import tvm
    from tvm.target.codegen import llvm_get_vector_width

    try:
        return llvm_get_vector_width(tvm.target.Target(cpu_target_spec())) >= 512
    except Exception:  # noqa: BLE001  (no LLVM answer: the narrow panels work everywhere)
        return False


# Constant folding up to 16M elements: a weight's transpose (a tied lm_head) is then
# computed once, here, and stored with the weights instead of on every call.
PRE_LOWERING_PIPELINE = "simplify-shapes,fold-constants{max-size=16777216},eliminate-dead-code"


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
    for n in graph.nodes:
        if get_lowering(BACKEND, n.domain, n.op_type) is None:
            where = f"{graph.metadata.source}: " if graph.metadata.source else ""
            raise LoweringError(f"{where}the tvm backend has no lowering rule for {n.op} (node {n.name!r})")


def prepare(graph: Graph, pack_weights: bool = False) -> Graph:
    """A copy of `graph` ready to lower (graphopt.lowering.prepare): graphopt ops without a
    TVM rule (or whose rule does not take them, see `rule`'s `when`) decomposed, then shape
    simplification so Reshape/Expand targets are constants. `pack_weights`: as `lower_graph`'s."""
    g = prepare_for_backend(graph, lambda n: _has_rule(n, pack_weights), PRE_LOWERING_PIPELINE)
    _check_rules(g)
    return g


class Lowerer:
    """Walks the graph in order, calling each node's rule; holds the BlockBuilder, the
    symbolic dims and the values lowered so far."""

    def __init__(self, graph: Graph, pack_weights: bool = False, int8_activations: bool = False):
        from tvm import relax, sym

        self.graph = graph
        self.pack_weights = pack_weights
        self.int8_activations = int8_activations  # 4-bit weights may take the int8 VNNI GEMV (quant_panels.py)
        self.bb = relax.BlockBuilder()
        self.analyzer = sym.Analyzer()
        self.dims: dict[str, object] = {}  # IR dim symbol -> tirx.Var
        self.env: dict[int, object] = {}  # id(Value) -> relax.Expr | Known
        self.params: list[tuple[str, object, np.ndarray]] = []  # (weight name, relax.Var, array)
        self._derived: dict[str, object] = {}  # "name:transform" -> lowered constant
        self._shared: dict[tuple, object] = {}  # once() key -> the value emitted for it
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

    def rows(self, lead: list):
        """The product of leading dims (ints or TIR expressions): a tensor's rows seen 2-D."""
        rows = 1
        for d in lead:
            rows = self.simplify(rows * d)
        return rows

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

    def _align(self, args, skip_axis: int | None, broadcasting: bool) -> list:
        """Tensors for `args` whose dims Relax can see agree (right-aligned; with
        `broadcasting`, a dim of 1 agrees with anything; `skip_axis` is free).

        Where Relax cannot prove two dims equal -- a mask's `total` against `past + seq` --
        the operand whose dim is a plain symbol is match-cast to the other's dim, which the
        VM checks at run time. Only symbols are cast: in TVM 0.27 a match_cast from an
        expression dim crashes (FuseTIR), so two different expressions are an error here."""
        from tvm import relax, tirx

        xs = [self.tensor(a) for a in args]
        n = max(self.rank(x) for x in xs)
        shapes = [[None] * (n - self.rank(x)) + self.shape(x) for x in xs]
        changed = set()
        for i, col in enumerate(zip(*shapes)):
            wide = [d for d in col if d is not None and not (broadcasting and static_int(d) == 1)]
            if i == skip_axis or all(self.analyzer.can_prove_equal(wide[0], d) for d in wide[1:]):
                continue
            ints = [d for d in wide if isinstance(d, int)]
            exprs = [d for d in wide if not isinstance(d, (int, tirx.Var))]
            target = ints[0] if ints else exprs[0] if exprs else wide[0]
            for j, d in enumerate(col):
                if d is None or (broadcasting and static_int(d) == 1) or self.analyzer.can_prove_equal(d, target):
                    continue
                if not isinstance(d, tirx.Var):
                    raise self.error(f"dims {d} and {target} must be equal, which cannot be checked here")
                shapes[j][i] = target
                changed.add(j)
        for j in sorted(changed):
            xs[j] = self.bb.match_cast(xs[j], relax.TensorType(shapes[j][n - self.rank(xs[j]):], self.dtype(xs[j])))
        return xs

    def view(self, x, shape: list):
        """`x` seen with another shape of the same size (a VM view: no copy). Relax takes
        the new shape as given; the VM refuses, at run time, a view larger than `x`."""
        from tvm import relax

        return self.emit(relax.call_pure_packed("vm.builtin.reshape", x, relax.ShapeExpr(shape),
                                                ty_args=[relax.TensorType(shape, self.dtype(x))]))

    def broadcast(self, *args) -> list:
        """Tensors for the operands of a broadcasting op, made shape-compatible for Relax."""
        return self._align(args, None, broadcasting=True)

    def same_dims(self, args, axis: int) -> list:
        """Tensors whose dims, all but `axis`, must be equal (Concat)."""
        return self._align(args, axis, broadcasting=False)

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

    def _cast_sum_dims(self, inputs) -> None:
        """A cached decoder's attention_mask, whose length is a sum of other inputs' dims
        (`sum_dims`: named so, `past_sequence_length + sequence_length`, or the mask of a decoder
        with a cache, however named), is a symbol of its own in the signature; cast it at once to
        the sum, which the VM checks at run time, so that every use sees the sum.
        Cast where an op first meets it instead, uses before the cast read the symbol and uses
        after it the sum, and TVM's FuseTIR fails on a kernel that reads both."""
        from tvm import relax

        plain = {d for v in inputs for d in v.type.shape if isinstance(d, str) and d.isidentifier()}
        sums = sum_dims(self.graph)
        mask = next((v for v in inputs if v.name == "attention_mask"), None)  # other inputs: cast where met
        if mask is None:
            return
        shape, cast = list(self.shape(self.env[id(mask)])), False
        for i, d in enumerate(mask.type.shape):
            terms = sums.get(d) if isinstance(d, str) else None
            if terms and all(t in plain or t.isdigit() for t in terms):
                shape[i] = sum(int(t) if t.isdigit() else self.dim(t) for t in terms)
                cast = True
        if cast:
            self.env[id(mask)] = self.bb.match_cast(self.env[id(mask)],
                                                    relax.TensorType(shape, relax_dtype(mask.type.dtype)))

    def _constant(self, name: str, a: np.ndarray):
        """A constant: a `Known`, an inlined constant, or a weight parameter."""
        from tvm import relax

        dt = DType.from_numpy(a.dtype)
        if a.dtype.kind in "iub" and a.size <= KNOWN_MAX_ELEMS and a.dtype != np.uint64:
            return Known(a.astype(object).reshape(a.shape) if a.ndim else np.array(int(a), dtype=object), dt)
        if a.nbytes <= INLINE_BYTES:
            return relax.const(np.ascontiguousarray(a), relax_dtype(dt))
        p = relax.Var(name.replace(":", "_"), relax.TensorType(list(a.shape), relax_dtype(dt)))
        self.params.append((name, p, a))
        return p

    def weight(self, value: Value, transform: str, fn: Callable[[np.ndarray], np.ndarray]):
        """`fn(value)` for a constant input, computed now and stored that way (a weight
        parameter like any other); None when `value` is not a constant."""
        a = self.const_array(value)
        if a is None:
            return None
        key = f"{value.name}:{transform}"
        if key not in self._derived:
            self._derived[key] = self._constant(key, np.ascontiguousarray(fn(a)))
        return self._derived[key]

    def once(self, key: tuple, make: Callable[[], object]):
        """`make()`, emitted the first time `key` is asked for and the same value after that:
        for what every layer computes alike from the same inputs (the rotary tables at the
        positions), so that a decode step launches it once instead of once per layer. `main`
        is one straight-line block, so the first emission precedes every later use."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def matmul(self, x, value: Value, w, transposed: bool = False):
        """`x @ W` (`x @ W^T` when `transposed`) for the weight input `value`, lowered as `w`:
        packed when it is a constant (`weight_matmul`), else stored transposed once where it
        is a constant, else transposed on every call."""
        from tvm.relax import op as R

        if static_int(self.shape(x)[-1]) == 1 and self.rank(x) >= 2 and self.rank(w) == 2:
            # a sum of one product is the product: [.., M, 1] * [1, N]. (A K = 1 matmul fused with
            # an elementwise epilogue, a residual Add, computed wrong values: an MLP pruned to one channel)
            w = self.emit(R.permute_dims(w, [1, 0])) if transposed else w
            return self.emit(R.multiply(x, w))
        y = self.weight_matmul(x, value, "T" if transposed else "", np.transpose if transposed else None)
        if y is not None:
            return y
        if transposed:
            stored = self.weight(value, "T", np.transpose)
            w = stored if stored is not None else self.emit(R.permute_dims(w, [1, 0]))
        return self.emit(R.matmul(x, w))

    def weight_matmul(self, x, value: Value, transform: str = "", fn: Callable[[np.ndarray], np.ndarray] | None = None):
        """`x @ W` for a constant float32 weight `W = fn(value)` of shape [K, N], with W
        stored pre-packed in column panels `[N / P, K, P]` (on CPU targets, P = `panel_width(N)`): the
        matmul schedule then reads each panel contiguously, at one row as at many, where
        it would otherwise copy every panel out of W on every call. None when `value` is
        not such a weight (the caller emits a plain matmul)."""
        from tvm import te
        from tvm.relax import op as R

        a = self.const_array(value)
        if not self.pack_weights or a is None or self.dtype(x) != "float32" or a.dtype != np.float32:
            return None
        w = fn(a) if fn is not None else a
        if w.ndim != 2 or w.nbytes <= INLINE_BYTES or static_int(self.shape(x)[-1]) != w.shape[0]:
            return None
        k_dim, n = w.shape
        p = panel_width(n)
        if p is None:
            return None
        panels = self.weight(value, f"{transform}panels{p}", lambda _: w.reshape(k_dim, n // p, p).transpose(1, 0, 2))

        def matmul_panels(x, wp):
            k = te.reduce_axis((0, k_dim), "k")
            lead = x.shape[:-1]
            y = te.compute((*lead, n // p, p), lambda *i: te.sum(x(*i[:-2], k) * wp(i[-2], k, i[-1]), axis=k),
                           name="matmul_panels")
            return te.compute((*lead, n), lambda *i: y(*i[:-1], i[-1] // p, i[-1] % p), name="panels_to_rows")

        return self.bb.emit_te(matmul_panels, x, panels, primfunc_name_hint="matmul_panels")

    def run(self):
        """Lower the whole graph; returns (IRModule, weight names in parameter order)."""
        from tvm import relax

        g = self.graph
        _check_rules(g)
        inputs = [v for v in g.inputs if not v.is_initializer]
        in_vars = [self._input_var(v) for v in inputs]
        for v, var in zip(inputs, in_vars):
            self.env[id(v)] = var
        # Parameters must be known before the function starts: make every weight up front.
        with self.bb.function("main"):
            with self.bb.dataflow():
                self._cast_sum_dims(inputs)
                for node in g.nodes:
                    self.node = node
                    rule: Callable = get_lowering(BACKEND, node.domain, node.op_type)
                    args = [None if v is None else self._lookup(v) for v in node.inputs]
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
                            if not isinstance(out, Known) and getattr(out.ty, "shape", None) is None:
                                raise self.error(f"Relax cannot infer the shape of output {v.name!r} "
                                                 "(symbolic dims it cannot prove equal?)")
                            self.env[id(v)] = out
                self.node = None
                results = [self.tensor(self._lookup(v)) for v in g.outputs]
                results = [self._cast_to_declared(r, v) for r, v in zip(results, g.outputs)]
                out = self.bb.emit_output(relax.Tuple(results))
            # Parameters are known only now: weights are made on first use. A weight that a rule
            # replaced by a derived layout (transposed, packed) is not stored as well.
            self.bb.emit_func_output(out, params=in_vars + [p for _, p, _ in self.params])
        mod = self.bb.get()
        return _drop_unused_weights(mod, len(in_vars), self.params)

    def _lookup(self, v: Value):
        if id(v) not in self.env:  # an initializer, lowered on first use
            self.env[id(v)] = self._constant(v.name, np.asarray(v.const_value))
        return self.env[id(v)]

    def _cast_to_declared(self, expr, v: Value):
        from tvm.relax import op as R

        if v.type is not None and self.dtype(expr) != relax_dtype(v.type.dtype):
            return self.emit(R.astype(expr, relax_dtype(v.type.dtype)))
        return expr


# --------------------------------------------------------------------------------------
# Helpers for rules (rules_core, rules_shapes, rules_graphopt)


def relax_op(path: str):
    """The Relax op `R.<path>` ("add", "nn.softmax"), looked up when a rule runs."""
    from tvm.relax import op as R

    f = R
    for part in path.split("."):
        f = getattr(f, part)
    return f


_WHEN: dict[tuple[str, str], Callable] = {}  # (domain, op) -> when(node, pack_weights): the rule applies


def rule(*ops: str, domain: str = "", when: Callable[[Node, bool], bool] | None = None):
    """Register one function as the TVM rule of several ops; `when(node, pack_weights)` false
    (a graphopt op the rule does not take there): `prepare` decomposes the node instead."""
    def deco(fn):
        for op in ops:
            register_lowering("tvm", domain, op)(fn)
            _WHEN.pop((domain, op), None)  # a rule registered again keeps no predicate of the one before
            if when is not None:
                _WHEN[domain, op] = when
        return fn
    return deco


def _has_rule(node: Node, pack_weights: bool) -> bool:
    if get_lowering(BACKEND, node.domain, node.op_type) is None:
        return False
    when = _WHEN.get((node.domain, node.op_type))
    return when is None or when(node, pack_weights)


def objs(items, shape=None) -> np.ndarray:
    """An object array of ints and TIR expressions (built one entry at a time, so that
    numpy never looks inside an expression)."""
    items = list(items)
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x
    return arr.reshape(shape if shape is not None else (len(items),))


def known_of(lw: "Lowerer", values: np.ndarray, dtype: DType) -> Known:
    """A `Known` from an object array, its entries simplified (`seq + 0` -> `seq`)."""
    flat = [lw.simplify(x) for x in values.flat]
    return Known(objs([static_int(x) if static_int(x) is not None else x for x in flat], values.shape), dtype)


def all_known(args) -> bool:
    return all(a is None or isinstance(a, Known) for a in args)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def is_polynomial(d) -> bool:
    from tvm import tirx

    if isinstance(d, (int, tirx.IntImm, tirx.Var)):
        return True
    if isinstance(d, (tirx.Add, tirx.Sub, tirx.Mul)):
        return is_polynomial(d.a) and is_polynomial(d.b)
    return False


def _drop_unused_weights(mod, n_inputs: int, params: list):
    """`mod` and its weights without the weight parameters that `main` never reads."""
    from tvm import relax

    main = mod["main"]
    used = set(relax.analysis.free_vars(main.body))
    keep = [i for i, p in enumerate(main.params) if i < n_inputs or p in used]
    if len(keep) == len(main.params):
        return mod, [(name, a) for name, _, a in params]
    mod["main"] = relax.Function([main.params[i] for i in keep], main.body, main.ret_ty, main.is_pure, main.attrs)
    return mod, [(params[i - n_inputs][0], params[i - n_inputs][2]) for i in keep if i >= n_inputs]


def lower_graph(graph: Graph, pack_weights: bool = False, int8_activations: bool = False):
    """(IRModule, [(weight name, array)] in parameter order) for a graph that `prepare`
    produced; `pack_weights`: constant matmul weights stored in column panels (for the CPU
    schedules, see `Lowerer.weight_matmul`); `int8_activations`: 4-bit weights with panels may
    multiply X rounded to int8 (the tvm option `quant_accuracy_level` 4, quant_panels.py)."""
    return Lowerer(graph, pack_weights, int8_activations).run()
