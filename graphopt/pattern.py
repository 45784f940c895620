"""Declarative rewrite patterns over the IR.

    x, w, b = var("x"), const("w"), const("b")
    pattern = op("Add", op("MatMul", x, w, capture="mm", single_use=True), b, commute=True)

    class MatMulAddToLinear(RewriteRule):
        name = "matmul-add-to-linear"
        pattern = pattern
        def check(self, m):                       # optional; returns a reason or None
            return None if m["b"].type.rank == 1 else "bias is not a vector"
        def rewrite(self, rw, m):
            return rw.op("Linear", m["x"], m["w"], m["b"], domain="graphopt")

`match(pattern, value)` is pure: it returns a `Match` with the captures, or the reason it
failed and the node where it failed. `apply_patterns` is a bounded fixed-point driver; it
counts how often each rule fired and remembers near misses (the root op matched, a later
constraint failed) so fusion passes can explain themselves. Reaching the iteration bound is
an error, not a silent stop.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, ClassVar, Sequence


from graphopt.builder import Builder
from graphopt.errors import GraphoptError
from graphopt.ir import Graph, Node, Value, constant_value  # noqa: F401  (constant_value: part of the rewrite API)
from graphopt.pass_manager import NearMiss, PassResult  # noqa: F401  (NearMiss: part of the rewrite API)

# --------------------------------------------------------------------------------------
# Patterns


class Pattern:
    capture: str | None = None


@dataclasses.dataclass
class VarPattern(Pattern):
    """Any value, optionally constrained. The same name used twice must bind the same value."""

    capture: str | None = None
    constant: bool | None = None         # True: an initializer or Constant output
    dtype: Any = None                    # a DType or a set of them
    rank: int | None = None
    where: Callable[[Value], bool | str] | None = None  # extra check: True/False or a reason


@dataclasses.dataclass
class OpPattern(Pattern):
    op_type: str | frozenset[str]
    inputs: Sequence[Pattern] | None     # None: any inputs
    domain: str = ""
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)  # value, or callable(value) -> bool
    capture: str | None = None           # captures the node
    commute: bool = False                # also try the first two inputs swapped
    single_use: bool = False             # its output feeds only this match
    output: int = 0                      # which output of the node the pattern stands for

    def matches_type(self, node: Node) -> bool:
        ops = self.op_type if isinstance(self.op_type, frozenset) else frozenset([self.op_type])
        return node.op_type in ops and node.domain == self.domain


def var(name: str | None = None, **constraints) -> VarPattern:
    return VarPattern(capture=name, **constraints)


def const(name: str | None = None, **constraints) -> VarPattern:
    return VarPattern(capture=name, constant=True, **constraints)


def op(op_type: str | Sequence[str], *inputs: Pattern, domain: str = "", capture: str | None = None,
       commute: bool = False, single_use: bool = False, output: int = 0, any_inputs: bool = False,
       **attrs) -> OpPattern:
    ops = op_type if isinstance(op_type, str) else frozenset(op_type)
    # Listed inputs match a prefix of the node's inputs; with none listed and any_inputs,
    # the inputs are not looked at.
    return OpPattern(ops, None if any_inputs and not inputs else list(inputs), domain=domain, attrs=attrs, capture=capture,
                     commute=commute, single_use=single_use, output=output)


# --------------------------------------------------------------------------------------
# Matching


@dataclasses.dataclass(frozen=True)
class Fail:
    """Why a match failed, and the node where it did (None: at a graph input or weight).
    Declarative patterns (`Match.failure`) and procedural matchers return it alike."""

    reason: str
    node: Node | None = None

    def __bool__(self) -> bool:  # `if not (m := match_x(...))` reads as "did not match"
        return False


@dataclasses.dataclass
class Match:
    ok: bool
    captures: dict[str, Any] = dataclasses.field(default_factory=dict)
    nodes: list[Node] = dataclasses.field(default_factory=list)  # every node the pattern covered
    reason: str = ""
    at: Node | None = None               # the node where matching failed
    depth: int = 0                       # how many pattern ops matched before it failed

    @property
    def failure(self) -> Fail | None:
        return None if self.ok else Fail(self.reason, self.at)

    def __getitem__(self, key: str):
        return self.captures[key]

    def __bool__(self) -> bool:
        return self.ok


class _Fail(Exception):
    def __init__(self, reason: str, at: Node | None, depth: int = 0):
        self.reason, self.at, self.depth = reason, at, depth


class _Furthest:
    """The failure of the attempt that got furthest (ties: the one that failed at an op), which
    `match` reports when no way of matching succeeds."""

    def __init__(self):
        self.fail: _Fail | None = None
        self.key = (-1, False)

    def note(self, f: _Fail, depth: int) -> None:
        key = (max(f.depth, depth), f.at is not None)
        if key > self.key:
            f.depth = key[0]
            self.fail, self.key = f, key


def match(pattern: Pattern, value: Value) -> Match:
    """Match `pattern` against the computation producing `value`. Pure: never mutates.
    A search with backtracking: a commuted operand order is tried again whenever anything
    matched after it fails (a capture bound twice, a later operand), so a pattern matches
    if any assignment of the commuted operands does."""
    return next(matches(pattern, value))


def matches(pattern: Pattern, value: Value):
    """Every distinct way `pattern` matches `value` (commuted operands assigned differently),
    as successful `Match`es in search order; where there is none, one failed `Match` with the
    reason of the attempt that got furthest."""
    furthest = _Furthest()
    found = False
    for caps, nodes in _solutions(pattern, value, {}, [], furthest, root=True):
        found = True
        yield Match(True, caps, nodes, depth=len(nodes))
    if not found:
        f = furthest.fail
        yield Match(False, reason=f.reason, at=f.at, depth=f.depth)


def _solutions(p: Pattern, v: Value | None, caps: dict, nodes: list, furthest: _Furthest, root: bool = False):
    """Every (captures, nodes) with which `p` matches `v`, extending `caps` and `nodes` (never
    changed in place); each failure goes to `furthest`."""
    if isinstance(p, VarPattern):
        trial = dict(caps)
        try:
            _match_var(p, v, trial)
        except _Fail as f:
            furthest.note(f, len(nodes))
            return
        yield trial, nodes
        return
    assert isinstance(p, OpPattern)
    try:
        n = _match_node(p, v, caps, root)
    except _Fail as f:
        furthest.note(f, len(nodes))
        return
    caps = {**caps, p.capture: n} if p.capture else caps
    nodes = nodes + [n]
    if p.inputs is None:
        yield caps, nodes
        return
    if len(n.inputs) < len(p.inputs):
        furthest.note(_Fail(f"{n.op} has {len(n.inputs)} inputs, the pattern needs {len(p.inputs)}", n), len(nodes))
        return
    orders = [list(range(len(p.inputs)))]
    if p.commute and len(p.inputs) >= 2 and n.inputs[0] is not n.inputs[1]:
        orders.append([1, 0] + list(range(2, len(p.inputs))))
    # each distinct solution once: orders that bind the same captures and cover the same nodes
    # are one match (a tree of commuted ops with anonymous operands would otherwise multiply
    # its solutions, and a later failure would retry them all)
    seen = set()
    for order in orders:
        for caps1, nodes1 in _operands(p.inputs, [n.inputs[i] for i in order], caps, nodes, furthest):
            key = (frozenset((k, id(bound)) for k, bound in caps1.items()), frozenset(map(id, nodes1)))
            if key not in seen:
                seen.add(key)
                yield caps1, nodes1


def _operands(pats: Sequence[Pattern], values: list, caps: dict, nodes: list, furthest: _Furthest):
    if not pats:
        yield caps, nodes
        return
    for caps1, nodes1 in _solutions(pats[0], values[0], caps, nodes, furthest):
        yield from _operands(pats[1:], values[1:], caps1, nodes1, furthest)


def _match_node(p: OpPattern, v: Value | None, caps: dict, root: bool) -> Node:
    """The node producing `v`, if it fits `p` itself (its op, output, uses, attributes, capture)."""
    if v is None:
        raise _Fail(f"expected {p.op_type}, found a missing input", None)
    n = v.producer()
    if n is None:
        raise _Fail(f"expected {_op_name(p)}, found {'a weight' if v.is_initializer else 'a graph input'} {v.name!r}", None)
    if not p.matches_type(n):
        raise _Fail(f"expected {_op_name(p)}, found {n.op}", n)
    if v.index != p.output:
        raise _Fail(f"{n.op} output {v.index} is used, the pattern needs output {p.output}", n)
    if p.single_use and not root and (len(v.uses()) != 1 or v.is_graph_output):
        raise _Fail(f"{n.op} output {v.name!r} has other uses", n)
    for k, want in p.attrs.items():
        have = n.attr(k)
        ok = want(have) if callable(want) else have == want
        if not ok:
            raise _Fail(f"{n.op} attribute {k}={have!r} does not fit the pattern", n)
    if p.capture and p.capture in caps and caps[p.capture] is not n:
        raise _Fail(f"capture {p.capture!r} binds two different nodes", n)
    return n


def _match_var(p: VarPattern, v: Value | None, caps: dict) -> None:
    if v is None:
        raise _Fail(f"input {p.capture or '_'} is missing", None)
    where = v.producer()
    if p.capture:
        if p.capture in caps and caps[p.capture] is not v:
            raise _Fail(f"{p.capture!r} must be the same value in both places", where)
    if p.constant is not None and (constant_value(v) is not None) != p.constant:
        raise _Fail(f"{p.capture or 'value'} {v.name!r} is {'not ' if p.constant else ''}a constant", where)
    if p.dtype is not None and v.type is not None:
        allowed = p.dtype if isinstance(p.dtype, (set, frozenset, tuple)) else {p.dtype}
        if v.type.dtype not in allowed:
            raise _Fail(f"{p.capture or 'value'} {v.name!r} has dtype {v.type.dtype.short}", where)
    if p.rank is not None and (v.type is None or v.type.rank != p.rank):
        raise _Fail(f"{p.capture or 'value'} {v.name!r} does not have rank {p.rank}", where)
    if p.where is not None:
        res = p.where(v)
        if res is not True and res is not None:
            raise _Fail(res if isinstance(res, str) else f"{p.capture or 'value'} {v.name!r} fails a constraint", where)
    if p.capture:
        caps[p.capture] = v


def _op_name(p: OpPattern) -> str:
    ops = sorted(p.op_type) if isinstance(p.op_type, frozenset) else [p.op_type]
    pre = f"{p.domain}." if p.domain else ""
    return " or ".join(pre + o for o in ops)


# --------------------------------------------------------------------------------------
# Rules, the rewriter and the driver


class Decline(str):
    """A `check` result meaning "not a site for this rule" (another rule takes it): not
    reported as a near miss."""


class RewriteRule:
    """`pattern` + `check` + `rewrite`. `rewrite` returns the replacement value (or a list,
    one per output of the root node; None keeps an output as it is)."""

    name: ClassVar[str] = ""
    pattern: ClassVar[OpPattern]

    def check(self, m: Match) -> str | None:
        return None

    def rewrite(self, rw: "Rewriter", m: Match):  # pragma: no cover - abstract
        raise NotImplementedError


class Rewriter(Builder):
    """A builder placed before the matched root; new nodes are tagged with the rule."""

    def __init__(self, graph: Graph, root: Node, rule: str):
        super().__init__(graph, before=root, created_by=rule, name_prefix=root.name)
        self.root = root


def replaceable(old: Value, new: Value) -> bool:
    """Can `old` be replaced by `new` everywhere? A graph output keeps its name, so the
    replacement must be a node output that is not itself a graph output."""
    if not old.is_graph_output:
        return True
    return new.producer() is not None and not new.is_graph_output and not new.is_graph_input


# Graph outputs replaced by `replace_value` whose names are still taken by the old value: the
# new value takes the name when `remove_dead` removes the old producer. Kept here, per graph,
# rather than on the Graph: it is state of a rewrite in progress, not of the IR.
_PENDING_RENAMES: "weakref.WeakKeyDictionary[Graph, list[tuple[Value, str]]]" = weakref.WeakKeyDictionary()


def replace_value(graph: Graph, old: Value, new: Value) -> None:
    """Replace `old` by `new`; when `old` is a graph output, `new` takes over its name once
    `old`'s producer is removed (see `remove_dead`)."""
    keep_name = old.name if old.is_graph_output else None
    if new.type is None:
        new.type = old.type
    old.replace_all_uses_with(new)
    if keep_name is not None:
        _PENDING_RENAMES.setdefault(graph, []).append((new, keep_name))


def remove_dead(graph: Graph, candidates: Sequence[Node]) -> int:
    """Remove the candidate nodes that have become dead (in reverse topological order)."""
    removed = 0
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    alive = set(position)
    for n in sorted({id(c): c for c in candidates}.values(), key=lambda c: -position.get(id(c), -1)):
        if id(n) in alive and all(v is None or (not v.uses() and not v.is_graph_output) for v in n.outputs):
            graph.remove_node(n)
            alive.discard(id(n))
            removed += 1
    for new, name in _PENDING_RENAMES.pop(graph, []):
        if name not in graph._names:
            graph.rename_value(new, name)
    return removed


def apply_patterns(graph: Graph, rules: Sequence[RewriteRule], ctx=None, *, max_iterations: int = 64,
                   explain: bool = False):
    """Apply `rules` until none fires. Returns a PassResult: counts per rule, and (with
    `explain`) near misses in `result.details`."""
    result = PassResult()
    for it in range(max_iterations):
        fired = False
        for node in list(graph.nodes):
            if node.graph is not graph:
                continue  # removed by an earlier rewrite this sweep
            for rule in rules:
                root = rule.pattern
                if not root.matches_type(node):
                    continue
                value = node.outputs[root.output] if root.output < len(node.outputs) else None
                if value is None:
                    continue
                m, reason = _checked_match(rule, value)
                if reason:
                    # A near miss: more than the root op matched (or only a check failed).
                    if explain and it == 0 and not isinstance(reason, Decline) and (m.ok or m.depth >= 2):
                        result.near_miss(rule.name, m.at or node, reason)
                    continue
                if _apply(graph, rule, node, m):
                    result.count(rule.name)
                    fired = True
                    break
        if not fired:
            return result
    raise GraphoptError(f"pattern rewriting did not converge in {max_iterations} iterations "
                        f"(rules: {', '.join(r.name for r in rules)})")


MAX_SOLUTIONS = 64  # solutions of one root offered to a rule's check before its first refusal stands


def _checked_match(rule: RewriteRule, value: Value) -> tuple[Match, str | None]:
    """The first match of `rule.pattern` that `rule.check` accepts (reason None); else the
    first match with the reason its check gave, or the failed match with the pattern's reason.
    A check that refuses one assignment of commuted operands is offered the next."""
    refused = None
    for i, m in enumerate(matches(rule.pattern, value)):
        if not m.ok:
            return m, m.reason
        reason = rule.check(m)
        if not reason:
            return m, None
        refused = refused or (m, reason)
        if i + 1 >= MAX_SOLUTIONS:
            break
    return refused


def _apply(graph: Graph, rule: RewriteRule, node: Node, m: Match) -> bool:
    rw = Rewriter(graph, node, rule.name)
    new = rule.rewrite(rw, m)
    if new is None:
        _undo(graph, rw)
        return False
    new_list = list(new) if isinstance(new, (list, tuple)) else [new]
    olds = list(node.outputs) if isinstance(new, (list, tuple)) else [node.outputs[rule.pattern.output]]
    pairs = [(o, n) for o, n in zip(olds, new_list) if o is not None and n is not None and o is not n]
    if not pairs or not all(replaceable(o, n) for o, n in pairs):
        _undo(graph, rw)
        return False
    for o, n in pairs:
        replace_value(graph, o, n)
    remove_dead(graph, m.nodes + [node])
    return True


def _undo(graph: Graph, rw: Rewriter) -> None:
    for n in reversed(rw.nodes):
        if n.graph is graph:
            graph.remove_node(n)


__all__ = ["Decline", "Fail", "NearMiss", "Pattern", "VarPattern", "OpPattern", "var", "const", "op", "match", "matches", "Match", "RewriteRule",
           "Rewriter", "apply_patterns", "constant_value", "replace_value", "remove_dead", "replaceable"]
