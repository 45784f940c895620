"""`verify(graph)`: the IR's invariants, checked.

SSA (one definition per value, names unique), topological order, use lists that agree with
node inputs, types present and consistent with each op's inference, and ops known to the
registry with legal arity and attributes. The pass manager runs it after every pass.
"""
from __future__ import annotations

from graphopt.errors import UserError, VerificationError
from graphopt.ir import Graph, TensorType, Value
from graphopt.registry import UnknownOpError, get_op, infer_types


def compatible(declared: TensorType, inferred: TensorType) -> bool:
    """True when nothing in `inferred` contradicts `declared` (unknowns are compatible)."""
    if declared.dtype is not inferred.dtype:
        return False
    if declared.shape is None or inferred.shape is None:
        return True
    if len(declared.shape) != len(inferred.shape):
        return False
    return all(not (isinstance(a, int) and isinstance(b, int)) or a == b
               for a, b in zip(declared.shape, inferred.shape))


def verify(graph: Graph, *, check_types: bool = True) -> None:
    """Raise `VerificationError` listing the first problems found."""
    problems = _problems(graph, check_types)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise VerificationError(f"graph {graph.name!r} is invalid: " + "; ".join(problems[:5]) + more)


def _problems(graph: Graph, check_types: bool) -> list[str]:
    errs: list[str] = []
    defined: set[int] = set()
    names: dict[str, Value] = {}

    def define(v: Value, where: str) -> None:
        if id(v) in defined:
            errs.append(f"value {v.name!r} is defined twice ({where})")
        defined.add(id(v))
        if v.name in names and names[v.name] is not v:
            errs.append(f"two values are named {v.name!r}")
        names[v.name] = v
        if v.graph is not graph:
            errs.append(f"value {v.name!r} does not belong to the graph")
        if v.type is None:
            errs.append(f"value {v.name!r} has no type")

    for name, v in graph.initializers.items():
        if v.name != name:
            errs.append(f"initializer key {name!r} names value {v.name!r}")
        if v.const_value is None:
            errs.append(f"initializer {name!r} has no data")
        elif v.type is not None and (v.type.dtype.np_dtype != v.const_value.dtype or v.type.shape != tuple(v.const_value.shape)):
            errs.append(f"initializer {name!r} is typed {v.type} but holds {TensorType.of(v.const_value)}")
        if v.producer() is not None:
            errs.append(f"initializer {name!r} also has a producer")
        define(v, "initializer")
    for v in graph.inputs:
        if v.is_initializer:
            continue
        if v.producer() is not None:
            errs.append(f"graph input {v.name!r} has a producer")
        define(v, "graph input")

    all_nodes = {id(n) for n in graph.nodes}
    for n in graph.nodes:
        where = f"node {n.name!r} ({n.op})"
        if n.graph is not graph:
            errs.append(f"{where} does not belong to the graph")
        for i, v in enumerate(n.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                errs.append(f"{where} input {i} ({v.name!r}) is not defined before the node")
            if sum(1 for u in v._uses if u[0] is n and u[1] == i) != 1:
                errs.append(f"{where} input {i} ({v.name!r}) is missing from the value's use list")
        for i, v in enumerate(n.outputs):
            if v is None:
                continue
            if v.producer() is not n or v.index != i:
                errs.append(f"{where} output {i} ({v.name!r}) does not point back to the node")
            if v.is_initializer:
                errs.append(f"{where} output {v.name!r} is also an initializer")
            define(v, where)
        try:
            opdef = get_op(n.domain, n.op_type)
        except UnknownOpError:
            errs.append(f"{where}: unknown op {n.op}")
            continue
        shaped = len(errs)
        if not opdef.min_inputs <= len(n.inputs) <= opdef.max_inputs:
            errs.append(f"{where} has {len(n.inputs)} inputs; {n.op} takes {opdef.takes_inputs()}")
        if not opdef.min_outputs <= len(n.outputs) <= opdef.max_outputs:
            makes = (str(opdef.min_outputs) if opdef.min_outputs == opdef.max_outputs
                     else f"{opdef.min_outputs} to {opdef.max_outputs}")
            errs.append(f"{where} has {len(n.outputs)} outputs; {n.op} makes {makes}")
        for k, a in n.attrs.items():
            spec = opdef.attrs.get(k)
            if spec is None:
                errs.append(f"{where}: unknown attribute {k!r}")
            elif spec.kind is not None and spec.kind is not a.kind:
                errs.append(f"{where}: attribute {k!r} is {a.kind.value}, expected {spec.kind.value}")
        for k, spec in opdef.attrs.items():
            if spec.required and k not in n.attrs:
                errs.append(f"{where}: required attribute {k!r} is missing")
        # a node of the wrong arity is not typed: its inference would fail on the missing input and
        # say so in Python's words ("not enough values to unpack"), in place of the message above
        if check_types and len(errs) == shaped and all(v is None or v.type is not None for v in n.inputs):
            try:
                inferred = infer_types(n)
            except UserError as e:
                errs.append(f"{where}: type inference failed: {e}")
                continue
            for v, t in zip(n.outputs, inferred):
                if v is not None and v.type is not None and t is not None and not compatible(v.type, t):
                    errs.append(f"{where} output {v.name!r} is typed {v.type} but the op infers {t}")

    for v in graph.values():
        for u, i in v._uses:
            if id(u) not in all_nodes:
                errs.append(f"value {v.name!r} lists a use by node {u.name!r}, which is not in the graph")
            elif i >= len(u.inputs) or u.inputs[i] is not v:
                errs.append(f"value {v.name!r} lists a stale use by node {u.name!r} input {i}")
    for v in graph.outputs:
        if id(v) not in defined:
            errs.append(f"graph output {v.name!r} is not defined")
    return errs

