"""What the pruning passes share: importance of channels, choosing the kept ones, and
putting a sliced weight in place of the one a node reads."""
from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Graph, Node, Value
from graphopt.pass_manager import Pass, PassContext, PassResult


def check_options(pass_name: str, ratio: float, min_keep: int, importance: str) -> None:
    """The options every pruning pass takes, checked when the pipeline is parsed."""
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"{pass_name}: ratio must be in [0, 1), not {ratio}")
    if min_keep < 1:
        raise UserError(f"{pass_name}: min-keep must be at least 1, not {min_keep}")
    if importance != "magnitude":
        raise UserError(f"{pass_name}: importance must be magnitude (calibration-based scores are not "
                        f"built yet), not {importance!r}")


def count_to_remove(total: int, ratio: float, min_keep: int) -> int:
    """floor(ratio * total), but never below `min_keep` kept (and never all)."""
    return max(0, min(int(np.floor(ratio * total + 1e-9)), total - max(min_keep, 1)))


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
    or the reason it cannot be pruned), score its units (`units`, `scores`), keep the most
    important, shrink the tensors (`shrink`), and count what went (`record`)."""

    approximate = True  # it changes the numbers by design

    ratio: float = 0.0
    importance: str = "magnitude"
    min_keep: int = 1

    def __post_init__(self) -> None:  # bad options fail when the pipeline is parsed, before any model load
        check_options(self.name, self.ratio, self.min_keep, self.importance)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        check_options(self.name, self.ratio, self.min_keep, self.importance)
        result = PassResult()
        for node in list(graph.nodes):
            site = self.find_site(node)
            if site is None:
                continue
            if isinstance(site, str):
                result.details.append({"node": node.name, "op": node.op, "reason": site})
                continue
            n_remove = count_to_remove(self.units(site), self.ratio, self.min_keep)
            if n_remove == 0:
                continue
            keep = keep_top(self.scores(site), n_remove)
            before = parameter_count(graph)
            self.shrink(graph, site, keep)
            result.count("layers")
            result.count("parameters", before - parameter_count(graph))  # a weight shared elsewhere stays
            self.record(result, node, site, n_remove, keep)
        return result

    def find_site(self, node: Node):  # pragma: no cover - abstract
        raise NotImplementedError

    def units(self, site) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def scores(self, site) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def shrink(self, graph: Graph, site, keep: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def record(self, result: PassResult, node: Node, site, n_remove: int, keep: np.ndarray) -> None:
        pass
