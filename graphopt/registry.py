"""The op registry: every op the IR knows, declared once.

An `OpDef` holds, in one place, an op's attributes, its type/shape inference, its reference
implementation, its decomposition into core ops (for graphopt-domain ops) and the lowering
rules that backends register for it.

Core ops (domain "") follow ONNX semantics at `CANONICAL_OPSET`; their `OpDef`s are made on
first use from the ONNX schema, with inference by ONNX's own shape inference and reference
kernels from `onnx.reference`. graphopt-domain ops are declared in `graphopt.ops`, one module per op.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from graphopt.errors import UserError
from graphopt.plugins import load_entry_points
from graphopt.ir import CANONICAL_OPSET, GRAPHOPT_DOMAIN, AttrKind, Node, TensorType, more_precise_type
from graphopt.onnx_proto import node_to_proto, tensor_type_from_proto, type_to_proto

if TYPE_CHECKING:  # pragma: no cover
    from graphopt.builder import Builder
    from graphopt.ir import Value


class UnknownOpError(UserError):
    """An op that is not in the registry (names the op and, where known, the node)."""


@dataclasses.dataclass(frozen=True)
class AttrSpec:
    kind: AttrKind | None  # None: a kind graphopt cannot hold (graph, sparse tensor, ...)
    required: bool = False
    default: object = None


Inference = Callable[[Node], Sequence["TensorType | None"]]
Reference = Callable[[Node, list], Sequence[np.ndarray]]
Decomposition = Callable[["Builder", Node], Sequence["Value | None"]]


@dataclasses.dataclass
class OpDef:
    domain: str
    name: str
    attrs: dict[str, AttrSpec]
    min_inputs: int
    max_inputs: int  # a large number for variadic ops
    min_outputs: int
    max_outputs: int
    infer: Inference
    reference: Reference
    decompose: Decomposition | None = None
    doc: str = ""
    lowerings: dict[str, Callable] = dataclasses.field(default_factory=dict)

    @property
    def qualified_name(self) -> str:
        return f"{self.domain}.{self.name}" if self.domain else self.name

    def takes_inputs(self) -> str:
        """How many inputs the op takes, as a message says it ("2", "1 to 3", "1 or more")."""
        if self.min_inputs == self.max_inputs:
            return str(self.min_inputs)
        return f"{self.min_inputs} or more" if self.max_inputs >= 1 << 16 else f"{self.min_inputs} to {self.max_inputs}"

    def num_outputs_for(self, attrs: dict) -> int:
        """How many outputs a new node gets when the caller does not say."""
        n = attrs.get("num_outputs")  # Split and friends
        if n is not None:
            return int(n.value if hasattr(n, "value") else n)
        return self.min_outputs if self.min_outputs > 0 else 1

    def attr_value(self, node: Node, name: str):
        """The node's attribute value, or the declared default."""
        a = node.attrs.get(name)
        if a is not None:
            return a.value
        spec = self.attrs.get(name)
        return None if spec is None else spec.default


_OPS: dict[tuple[str, str], OpDef] = {}
_OP_SOURCES: dict[tuple[str, str], str] = {}  # "graphopt" or the module that registered the op
_op_catalogues_loaded = False   # the catalogues of `graphopt.ops` loaded, all of them
_op_catalogues_loading = False  # ... being loaded now (their ops register without loading them again)


def register_op(opdef: OpDef) -> OpDef:
    """Declare an op. Custom ops go in domain "graphopt": every backend decomposes those it has
    no rule for into core ONNX ops, so the model it writes loads anywhere. Any other domain is
    refused (an "acme.Swish" would be written into model.onnx as it is, which no runtime loads),
    and so is "" (ONNX's own ops, made from ONNX's schema). An op from outside graphopt loads
    the built-in catalogue first, so a name a built-in op holds is refused, not replaced."""
    if opdef.domain != GRAPHOPT_DOMAIN:
        raise ValueError(f"op {opdef.qualified_name}: custom ops are registered in domain {GRAPHOPT_DOMAIN!r} "
                         f"(as {GRAPHOPT_DOMAIN}.{opdef.name}), not {opdef.domain!r}; the core domain '' holds "
                         "ONNX's own ops")
    import sys

    caller = sys._getframe(1).f_globals.get("__name__", "")
    source = "graphopt" if caller.startswith("graphopt.") else caller
    if source != "graphopt":
        _load_op_catalogues()
    key = (opdef.domain, opdef.name)
    if key in _OPS:
        owner = _OP_SOURCES.get(key, "graphopt")
        by = "a built-in op" if owner == "graphopt" else f"an op from {owner}"
        raise ValueError(f"op {opdef.qualified_name} is already registered, by {by}; choose another name")
    _OPS[key] = opdef
    _OP_SOURCES[key] = source
    return opdef


def _load_op_catalogues() -> None:
    """The ops declared outside this module -- graphopt's own domain (`graphopt.ops`) and any
    plugin's -- register themselves when their module is imported; the modules are named by the
    entry point group `graphopt.ops`, so the registry imports none of them."""
    global _op_catalogues_loaded, _op_catalogues_loading
    if _op_catalogues_loaded or _op_catalogues_loading:
        return
    _op_catalogues_loading = True
    try:
        load_entry_points("graphopt.ops", "op")
        _op_catalogues_loaded = True  # only once it succeeded: a failed load is not a whole catalogue
    finally:
        _op_catalogues_loading = False


def get_op(domain: str, name: str) -> OpDef:
    domain = "" if domain == "ai.onnx" else domain
    key = (domain, name)
    if key in _OPS:
        return _OPS[key]
    if domain != "" and not _op_catalogues_loaded:
        _load_op_catalogues()
        if key in _OPS:
            return _OPS[key]
    if domain == "":
        opdef = _core_opdef(name)
        if opdef is not None:
            _OPS[key] = opdef
            return opdef
    qual = f"{domain}.{name}" if domain else name
    raise UnknownOpError(f"unknown op {qual}")


def is_known_op(domain: str, name: str) -> bool:
    try:
        get_op(domain, name)
        return True
    except UnknownOpError:
        return False


def all_graphopt_ops() -> list[OpDef]:
    _load_op_catalogues()
    return [d for (dom, _), d in sorted(_OPS.items()) if dom == GRAPHOPT_DOMAIN]


# Lowering rules that backends register: (backend, domain, op) -> rule. Kept beside the
# OpDefs so `OpDef.lowerings` shows every backend's rule for an op in one place.
_LOWERINGS: dict[tuple[str, str, str], Callable] = {}


def register_lowering(backend: str, domain: str, name: str):
    """Decorator: `@register_lowering("tvm", "", "MatMul")` registers a backend's rule."""
    def deco(fn):
        _LOWERINGS[(backend, domain, name)] = fn
        get_op(domain, name).lowerings[backend] = fn
        return fn
    return deco


def get_lowering(backend: str, domain: str, name: str) -> Callable | None:
    return _LOWERINGS.get((backend, "" if domain == "ai.onnx" else domain, name))


def infer_types(node: Node) -> list[TensorType | None]:
    """Output types of `node` from its op's inference rule."""
    return list(get_op(node.domain, node.op_type).infer(node))


def refine_types(graph) -> int:
    """Re-run inference over the graph and adopt inferred types that know more (a rank or
    a dimension that was unknown) and agree with what was known. Returns how many values
    got a more precise type."""
    refined = 0
    for node in graph.nodes:
        if any(v is not None and v.type is None for v in node.inputs):
            continue
        try:
            inferred = infer_types(node)
        except UserError:
            continue
        if node.domain == "" and node.op_type in _BROADCASTING and inferred and inferred[0] is not None:
            inferred = [_broadcast_type(node, inferred[0])] + list(inferred[1:])
        for v, t in zip(node.outputs, inferred):
            if v is None or t is None:
                continue
            better = more_precise_type(v.type, t)
            if better is not None:
                v.type = better
                refined += 1
    return refined


_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "And", "Or", "Less",
                 "LessOrEqual", "Greater", "GreaterOrEqual", "Mod", "BitShift", "PRelu"}


def _real_symbol(d) -> bool:
    return isinstance(d, str) and not d.startswith("unk__")


def _broadcast_type(node: Node, inferred: TensorType) -> TensorType:
    """Broadcast the inputs' dims ourselves: where one input has a real symbol (`batch`) and
    the others only 1, an unknown, or an `unk__N` that ONNX invented, the result is that
    symbol (an unknown is either 1 or equal to it; anything else would not broadcast)."""
    shapes = [v.type.shape for v in node.inputs if v is not None and v.type is not None]
    if inferred.shape is None or any(s is None for s in shapes) or len(shapes) != len([v for v in node.inputs if v]):
        return inferred
    rank = len(inferred.shape)
    out = list(inferred.shape)
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        if out[i] is None or (isinstance(out[i], str) and not _real_symbol(out[i])):
            real = {d for d in dims if _real_symbol(d)}
            big = {d for d in dims if isinstance(d, int) and d != 1}
            if len(real) == 1 and not big:
                out[i] = real.pop()
            elif len(big) == 1 and not real:
                out[i] = big.pop()
    return TensorType(inferred.dtype, tuple(out))


def run_reference(node: Node, inputs: list) -> list[np.ndarray]:
    return list(get_op(node.domain, node.op_type).reference(node, inputs))


# --------------------------------------------------------------------------------------
# Core ops from the ONNX schema


_ONNX_ATTR_KINDS = {
    1: AttrKind.FLOAT, 2: AttrKind.INT, 3: AttrKind.STRING, 4: AttrKind.TENSOR,
    6: AttrKind.FLOATS, 7: AttrKind.INTS, 8: AttrKind.STRINGS,
}


def _core_opdef(name: str) -> OpDef | None:
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(name, CANONICAL_OPSET, "")
    except onnx.defs.SchemaError:
        return None
    if schema.deprecated:
        return None
    attrs = {}
    for aname, a in schema.attributes.items():
        kind = _ONNX_ATTR_KINDS.get(int(a.type))
        default = None
        if a.default_value is not None and a.default_value.name:
            import onnx.helper

            default = onnx.helper.get_attribute_value(a.default_value)
            if isinstance(default, bytes):
                default = default.decode()
            elif isinstance(default, list):
                default = tuple(x.decode() if isinstance(x, bytes) else x for x in default)
        attrs[aname] = AttrSpec(kind, bool(a.required), default)
    return OpDef(
        domain="", name=name, attrs=attrs,
        min_inputs=schema.min_input, max_inputs=schema.max_input,
        min_outputs=schema.min_output, max_outputs=schema.max_output,
        infer=_core_infer, reference=_core_reference, doc=(schema.doc or "").strip(),
    )


def _core_infer(node: Node) -> list[TensorType | None]:
    import onnx
    import onnx.defs
    import onnx.shape_inference

    proto = node_to_proto(node)
    input_types = {}
    input_data = {}
    for v in node.inputs:
        if v is None or v.type is None:
            continue
        input_types[v.name] = type_to_proto(v.type)
        data = _small_constant(v)
        if data is not None:
            input_data[v.name] = onnx.numpy_helper.from_array(np.asarray(data), v.name)
    schema = onnx.defs.get_schema(node.op_type, CANONICAL_OPSET, "")
    try:
        out = onnx.shape_inference.infer_node_outputs(
            schema, proto, input_types, input_data,
            opset_imports=[onnx.helper.make_opsetid("", CANONICAL_OPSET)])
    except Exception as e:  # onnx raises InferenceError and RuntimeError alike
        raise TypeInferenceError(f"node {node.name!r} ({node.op}): {str(e).strip().splitlines()[0]}") from None
    result: list[TensorType | None] = []
    for v in node.outputs:
        if v is None or v.name not in out:
            result.append(None)
        else:
            result.append(tensor_type_from_proto(out[v.name], what=f"output {v.name!r} of node {node.name!r}"))
    return result


class TypeInferenceError(UserError):
    """Type inference rejected a node (its inputs do not fit the op)."""


def _small_constant(v) -> np.ndarray | None:
    """The value of `v` if it is a small constant (for shape inference of Reshape & co.)."""
    if v.const_value is not None:
        return v.const_value if v.const_value.size <= 64 else None
    p = v.producer()
    if p is not None and p.op_type == "Constant" and p.domain == "" and "value" in p.attrs:
        val = p.attrs["value"].value
        return val if val.size <= 64 else None
    return None


_RUNTIME_PARAMS = None


def _gather_elements(node: Node, inputs: list) -> list[np.ndarray]:
    # onnx.reference uses np.choose, which fails beyond 64 entries along the axis.
    data, idx = inputs
    axis = node.attr("axis", 0) % data.ndim
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return [np.take_along_axis(data, idx, axis=axis)]


# Core ops whose onnx.reference kernel is wrong or limited: (why) -> our kernel.
_CORE_REFERENCE_OVERRIDES: dict[str, Reference] = {
    "GatherElements": _gather_elements,
}


def _core_reference(node: Node, inputs: list) -> list[np.ndarray]:
    override = _CORE_REFERENCE_OVERRIDES.get(node.op_type)
    if override is not None:
        return override(node, inputs)
    from onnx.reference.op_run import RuntimeContextError
    from onnx.reference.ops import load_op
    from onnx.reference.reference_evaluator import ReferenceEvaluator

    proto = node_to_proto(node)
    params = {
        "log": lambda *a: None, "opsets": {"": CANONICAL_OPSET}, "verbose": 0,
        "new_ops": None, "existing_functions": {}, "evaluator_cls": ReferenceEvaluator,
    }
    try:
        cls = load_op("", node.op_type, CANONICAL_OPSET, evaluator_cls=ReferenceEvaluator)
    except RuntimeContextError:
        types = [type_to_proto(v.type) if v is not None and v.type is not None else None for v in node.inputs]
        cls = load_op("", node.op_type, CANONICAL_OPSET, node=proto, input_types=types,
                      evaluator_cls=ReferenceEvaluator)
    inst = cls(proto, params)
    outs = inst.run(*inputs)
    # in the declared types: onnx.reference returns some in the input's (LayerNormalization's
    # Mean and InvStdDev in X's float16, which ONNX types float32 by stash_type)
    return [None if o is None else _as_declared(np.asarray(o), v) for o, v in zip(outs, node.outputs)]


def _as_declared(a: np.ndarray, v) -> np.ndarray:
    if v is None or v.type is None or a.dtype == v.type.dtype.np_dtype:
        return a
    return a.astype(v.type.dtype.np_dtype)
