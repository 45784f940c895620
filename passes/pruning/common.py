"""What the structured pruning passes share: the options, importance of units (magnitude, or
Wanda on calibration activations), choosing the kept ones per layer or globally, putting a
sliced weight in place of the one a node reads, and counting what went."""
from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.errors import UserError
from graphopt.interpreter import run as interpret
from graphopt.ir import Graph, Node, Value
from graphopt.pass_manager import CALIBRATION_HINT, Pass, PassContext, PassResult
from graphopt.passes.pruning.flops import FLOPS_SEQ_LEN, block_flops

IMPORTANCE = ("magnitude", "wanda")
SCOPES = ("layer", "global")


def check_options(pass_name: str, ratio: float, min_keep: int, importance: str, scope: str = "layer") -> None:
    """The options every structured pruning pass takes, checked when the pipeline is parsed."""
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"{pass_name}: ratio must be in [0, 1), not {ratio}")
    if min_keep < 1:
        raise UserError(f"{pass_name}: min-keep must be at least 1, not {min_keep}")
    if importance == "taylor":
        raise UserError(f"{pass_name}: importance=taylor needs gradients, which graphopt's IR does not compute; "
                        "use magnitude or wanda")
    if importance not in IMPORTANCE:
        raise UserError(f"{pass_name}: importance must be one of {', '.join(IMPORTANCE)}, not {importance!r}")
    if scope not in SCOPES:
        raise UserError(f"{pass_name}: scope must be layer or global, not {scope!r}")


def count_to_remove(total: int, ratio: float, min_keep: int) -> int:
    """floor(ratio * total), but never below `min_keep` kept (and never all)."""
    return max(0, min(int(np.floor(ratio * total + 1e-9)), total - max(min_keep, 1)))


def global_removals(scores: list[np.ndarray], ratio: float, min_keep: int) -> list[int]:
    """How many units each layer loses when the floor(ratio * all units) lowest scores of the
    whole model go, no layer keeping fewer than `min_keep` (its next-lowest unit goes instead).
    Ties go in layer order, then unit order, so the choice is deterministic."""
    budget = int(np.floor(ratio * sum(len(s) for s in scores) + 1e-9))
    room = [max(0, len(s) - max(min_keep, 1)) for s in scores]
    layer = np.concatenate([np.full(len(s), i) for i, s in enumerate(scores)]) if scores else np.zeros(0, int)
    flat = np.concatenate(scores) if scores else np.zeros(0)
    removed = [0] * len(scores)
    for i in np.lexsort((np.arange(len(flat)), layer, flat)):  # ascending score
        if budget == 0:
            break
        if removed[layer[i]] < room[layer[i]]:
            removed[layer[i]] += 1
            budget -= 1
    return removed


def activation_sq_norms(graph: Graph, values: list[Value], ctx: PassContext, pass_name: str) -> dict[str, np.ndarray]:
    """Sum over the calibration tokens of each value's squared activations, per channel (its
    last axis): ||x_j||^2 for Wanda. The graph runs in the reference interpreter on
    `ctx.hints["calibration"]` (graphopt.calibration's feed dicts)."""
    feeds_list = ctx.hints.get("calibration")
    if not feeds_list:
        raise UserError(f"{pass_name}{{importance=wanda}} needs calibration data: " + CALIBRATION_HINT)
    progress = ctx.hints.get("progress") or (lambda msg: None)
    sums = {v.name: np.zeros(v.type.shape[-1], np.float64) for v in values}
    for i, feeds in enumerate(feeds_list):
        progress(f"{pass_name}: calibration {i + 1}/{len(feeds_list)}")
        env = interpret(graph, feeds, keep_all=True)
        for name, acc in sums.items():
            a = env[name].reshape(-1, acc.shape[0]).astype(np.float64)
            acc += (a * a).sum(axis=0)
    return sums


def keep_top(scores: np.ndarray, n_remove: int) -> np.ndarray:
    """Indices of the kept units (the highest scores), in their original order; ties keep
    the earlier unit, so the choice is deterministic."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[: len(scores) - n_remove])


def replace_weight(graph: Graph, node: Node, i: int, array: np.ndarray) -> Value:
    """Make input `i` of `node` a new initializer holding `array`; the old one goes when
    nothing else reads it (an initializer shared with another node is never changed)."""
    old = node.inputs[i]
    new = graph.add_initializer(f"{old.name}_pruned", np.ascontiguousarray(array))
    node.set_input(i, new)
    drop_if_unused(graph, old)
    return new


def drop_if_unused(graph: Graph, v: Value | None) -> None:
    if v is not None and v.is_initializer and not v.uses() and not v.is_graph_output and not v.is_graph_input:
        graph.remove_initializer(v.name)


def set_last_dim(v: Value, n: int) -> None:
    """The value's type with its last dimension `n` (its producer now makes it narrower)."""
    if v.type is not None and v.type.shape is not None:
        v.type = v.type.with_shape(tuple(v.type.shape[:-1]) + (n,))


def parameter_count(graph: Graph) -> int:
    """Elements in the graph's floating-point initializers (its parameters)."""
    return sum(int(v.const_value.size) for v in graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype.kind == "f")


@dataclasses.dataclass
class StructuredPruning(Pass):
    """What every structured pruning pass does, per site: find it (`find_site`: a site, None,
    or the reason it cannot be pruned), score its units (`scores`, or `activation` and `wanda_scores`), keep the most
    important, shrink the tensors (`shrink`), and count what went (`record`)."""

    approximate = True  # it changes the numbers by design

    ratio: float = 0.0
    importance: str = "magnitude"
    scope: str = "layer"
    min_keep: int = 1

    def __post_init__(self) -> None:  # bad options fail when the pipeline is parsed, before any model load
        check_options(self.name, self.ratio, self.min_keep, self.importance, self.scope)

    @property
    def needs_calibration(self) -> bool:
        return self.importance == "wanda" and self.ratio > 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        check_options(self.name, self.ratio, self.min_keep, self.importance, self.scope)
        result = PassResult()
        sites = []
        for node in list(graph.nodes):
            site = self.find_site(node)
            if isinstance(site, str):
                result.details.append({"node": node.name, "op": node.op, "reason": site})
            elif site is not None:
                sites.append((node, site))
        if not sites and not result.details:  # nothing of the form it prunes (the summary says so, not "removes none")
            result.details.append({"sites_found": 0})
        if self.ratio == 0 or not sites:  # an exact no-op: nothing scored, no data read
            return result
        if self.importance == "wanda":
            norms = activation_sq_norms(graph, [self.activation(s) for _, s in sites], ctx, self.name)
            scores = [self.wanda_scores(s, norms[self.activation(s).name]) for _, s in sites]
        else:
            scores = [self.scores(s) for _, s in sites]
        if self.scope == "global":
            removals = global_removals(scores, self.ratio, self.min_keep)
        else:
            removals = [count_to_remove(len(sc), self.ratio, self.min_keep) for sc in scores]
        flops_before = block_flops(graph)
        for (node, site), score, n_remove in zip(sites, scores, removals):
            if n_remove == 0:
                continue
            keep = keep_top(score, n_remove)
            before = parameter_count(graph)
            self.shrink(graph, site, keep)
            result.count("layers")
            result.count("parameters", before - parameter_count(graph))  # a weight shared elsewhere stays
            self.record(result, node, site, n_remove, keep)
        if not any(removals):  # why none went: the summary compares min-keep and the ratio with these
            result.details.append({"units": sorted({len(sc) for sc in scores}),
                                   "global_removes": sum(global_removals(scores, self.ratio, self.min_keep))})
        if result.changed:
            result.details.append({"block_flops": {"seq_len": FLOPS_SEQ_LEN, "before": flops_before,
                                                   "after": block_flops(graph)}})
        return result

    def find_site(self, node: Node):  # pragma: no cover - abstract
        raise NotImplementedError

    def scores(self, site) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def activation(self, site) -> Value:  # pragma: no cover - abstract
        """The value whose channels are the inputs of the weights a removed unit takes from the
        output side (Wanda's x)."""
        raise NotImplementedError

    def wanda_scores(self, site, sq_norm: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def shrink(self, graph: Graph, site, keep: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def record(self, result: PassResult, node: Node, site, n_remove: int, keep: np.ndarray) -> None:
        pass
