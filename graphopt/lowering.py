"""The lowering driver every backend shares: graphopt-domain ops become the backend's kernels
where a rule says so, and core ops through their decompositions everywhere else.

    lower_graphopt_ops(graph, backend, ctx)   try each node's rule; a rule that declines is
                                              rolled back and the node decomposed; rounds
                                              until no graphopt op is left, an error at the bound
    decompose_unsupported(graph, supported)   decompose every graphopt node `supported` refuses
    prepare(graph, supported, cleanup)        a copy with those decomposed, then the cleanup
                                              pipeline a backend asks for (run here, so a
                                              backend holds rules and runtimes only)
    replace_outputs(node, values, b)          the one way to replace a node by what was built
                                              for it (graph outputs keep their names)

A rule is registered with `graphopt.registry.register_lowering(backend, domain, op)` and called
as `rule(ctx, b, node)` with a `Builder` placed before the node. It returns the node's new
outputs (one per output; None where the node has none), or a string saying why it declines.
A decomposition may produce graphopt ops again (SkipNorm{rms} gives RMSNorm), hence rounds.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

from graphopt.builder import Builder
from graphopt.errors import GraphoptError
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.pass_manager import PassManager
from graphopt.registry import TypeInferenceError, UnknownOpError, get_lowering, get_op
from graphopt.verify import compatible

MAX_ROUNDS = 8


class LoweringBoundError(GraphoptError):
    """Decompositions kept producing graphopt ops: a decomposition that does not terminate."""


class DecompositionError(GraphoptError):
    """An op's decomposition builds ill-typed core ops, or computes another type than the op
    declares: a bug in the op (graphopt's or a plugin's), not in the model, so it is reported
    as an internal error naming the op rather than as a user mistake."""


def replace_outputs(node: Node, new_outputs: Sequence[Value | None], b: Builder, *,
                    adopt_types: bool = False) -> list[Value | None]:
    """Replace `node` by the values built for it. Uses of each output move to its new value;
    a graph output keeps its name (through an Identity where the new value cannot take it).
    Types: the new value takes the old one's when it has none, or always with `adopt_types`
    (a decomposition computes exactly the declared type). Returns the values now in place."""
    graph = node.graph
    placed: list[Value | None] = list(new_outputs)
    renames = []
    for i, (old, new) in enumerate(zip(node.outputs, new_outputs)):
        if old is None:
            continue
        if new is None:
            raise GraphoptError(f"the replacement of {node.op} (node {node.name!r}) has no output {old.index}")
        if old.is_graph_output and (new.producer() is None or new.is_graph_output or new.is_graph_input):
            new = b.Identity(new)  # a graph output needs a producer of its own to keep its name
            placed[i] = new
        if old.type is not None and (adopt_types or new.type is None):
            new.type = old.type
        if old.is_graph_output:
            renames.append((new, old.name))
        old.replace_all_uses_with(new)
    graph.remove_node(node)
    for new, name in renames:
        graph.rename_value(new, name)
    return placed


def rollback(graph: Graph, b: Builder, initializers_before: set[str]) -> None:
    """Remove what a declining rule built: its unused nodes, then the constants it added."""
    for n in reversed(b.nodes):
        if n.graph is graph and not any(v is not None and (v.uses() or v.is_graph_output) for v in n.outputs):
            graph.remove_node(n)
    for name in set(graph.initializers) - initializers_before:
        v = graph.initializers[name]
        if not v.uses() and not v.is_graph_output:
            graph.remove_initializer(name)


def decompose_node(node: Node) -> list[Value | None]:
    """Replace a graphopt-domain node in its graph by its decomposition into core ops.
    Returns the new output values."""
    opdef = get_op(node.domain, node.op_type)
    if opdef.decompose is None:
        raise UnknownOpError(f"op {opdef.qualified_name} (node {node.name!r}) has no decomposition")
    graph = node.graph
    before = set(graph.initializers)
    b = Builder(graph, before=node, created_by=f"decompose:{opdef.qualified_name}")
    where = f"the decomposition of {opdef.qualified_name} (node {node.name!r})"
    try:
        outs = list(opdef.decompose(b, node))
    except TypeInferenceError as e:  # the node's inputs fit the op, so the core ops it built are at fault
        rollback(graph, b, before)
        raise DecompositionError(f"{where} builds an ill-typed node: {e}") from e
    # the types are adopted below, so a decomposition that computes another type is caught here
    # (a model written with the declared types would not load, or a backend would run wrong shapes)
    for old, new in zip(node.outputs, outs):
        if old is not None and new is not None and old.type is not None and new.type is not None \
                and not compatible(old.type, new.type):
            rollback(graph, b, before)
            raise DecompositionError(f"{where} computes {new.type} for output {old.index} ({old.name!r}), "
                                     f"which the op types {old.type}")
    return replace_outputs(node, outs, b, adopt_types=True)


def decompose_unsupported(graph: Graph, supported: Callable[[Node], bool] = lambda n: False, *,
                          max_rounds: int = MAX_ROUNDS) -> int:
    """Decompose every graphopt-domain node for which `supported(node)` is false, in rounds
    until none is left; returns how many were decomposed. A node without a decomposition is
    an `UnknownOpError`; still finding some after `max_rounds` is a `LoweringBoundError`."""
    count = 0
    for _ in range(max_rounds):
        pending = [n for n in graph.nodes if n.domain == GRAPHOPT_DOMAIN and not supported(n)]
        if not pending:
            return count
        for n in pending:
            decompose_node(n)
            count += 1
    raise LoweringBoundError(f"decompositions still produce graphopt ops after {max_rounds} rounds")


def prepare(graph: Graph, supported: Callable[[Node], bool], cleanup: str = "") -> Graph:
    """A copy of `graph` ready for a backend that lowers node by node: every graphopt op it
    has no rule for (`supported` false) decomposed, then the `cleanup` pipeline it needs
    (e.g. shape simplification so Reshape targets are constants); verified by the caller."""
    g = graph.copy()
    decompose_unsupported(g, supported)
    return PassManager(cleanup, verify=False).run(g) if cleanup else g


def decompose_graphopt_ops(graph: Graph, keep=frozenset(), max_rounds: int = MAX_ROUNDS) -> int:
    """Decompose every graphopt-domain node except the ops named in `keep`."""
    return decompose_unsupported(graph, lambda n: n.op_type in keep, max_rounds=max_rounds)


class LoweringReport:
    """What a lowering did: kernels emitted (counted by `on_lowered`), and per graphopt op
    the decompositions with the reason each rule gave."""

    def __init__(self):
        self.kernels: collections.Counter = collections.Counter()
        self.decomposed: dict[str, collections.Counter] = {}

    def to_json(self) -> dict:
        return {"kernels": dict(sorted(self.kernels.items())),
                "decomposed": {op: dict(reasons) for op, reasons in sorted(self.decomposed.items())}}


def lower_node(backend: str, ctx: Any, node: Node, report: LoweringReport,
               on_lowered: Callable[[Node, Builder], None] | None = None) -> bool:
    """Try `node`'s rule for `backend`: True when it lowered; when it declines (or there is
    no rule) what it built is rolled back and a graphopt node is decomposed instead."""
    rule = get_lowering(backend, node.domain, node.op_type)
    reason = "no lowering rule"
    if rule is not None:
        graph = node.graph
        before = set(graph.initializers)
        b = Builder(graph, before=node, created_by=f"lower-{backend}:{node.op}")
        result = rule(ctx, b, node)
        if isinstance(result, (list, tuple)):
            replace_outputs(node, result, b)
            if on_lowered is not None:
                on_lowered(node, b)
            return True
        rollback(graph, b, before)
        reason = result or "declined"
    if node.domain == GRAPHOPT_DOMAIN:
        decompose_node(node)
        report.decomposed.setdefault(node.op, collections.Counter())[reason] += 1
    return False


def lower_graphopt_ops(graph: Graph, backend: str, ctx: Any, report: LoweringReport, *,
                       on_lowered: Callable[[Node, Builder], None] | None = None,
                       max_rounds: int = MAX_ROUNDS) -> None:
    """Lower every graphopt-domain node of `graph` (in place) with `backend`'s rules, in
    rounds (a decomposition may produce graphopt ops again); an error at the bound."""
    for _ in range(max_rounds):
        pending = [n for n in graph.nodes if n.domain == GRAPHOPT_DOMAIN]
        if not pending:
            return
        for node in pending:
            lower_node(backend, ctx, node, report, on_lowered)
    raise LoweringBoundError(f"lowering for {backend} still finds graphopt ops after {max_rounds} rounds")
