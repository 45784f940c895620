"""prune-mlp: remove intermediate channels of MLPs and gated MLPs, shrinking both matmuls.

    Before:  %h = graphopt.GatedLinear(%x, @w_gate, @w_up) {activation="silu"} : f32[batch, seq, 64]
             %y = MatMul(%h, @w_down)                                           : f32[batch, seq, 32]
    After:   %h = graphopt.GatedLinear(%x, @w_gate_pruned, @w_up_pruned) {activation="silu"} : f32[batch, seq, 48]
             %y = MatMul(%h, @w_down_pruned)                                                  : f32[batch, seq, 32]

Sites: an up projection -- graphopt.GatedLinear, or graphopt.Linear with an activation --
whose output is read only by a down projection (graphopt.Linear or MatMul by a constant
matrix) as its X. Every intermediate channel j is independent of the others (the activation
and the gate are elementwise), so removing column j of the up weights (and of their biases)
together with row j of the down weight removes exactly that channel's contribution.

Preconditions (checked per site; a site that fails one is reported in `details`, not changed):
the weights are constant initializers of rank 2, the biases constant vectors, the
intermediate is read by the down projection alone and is not a graph output.

Options:
  ratio       the fraction of each layer's channels to remove (floor), 0 <= ratio < 1;
              0 leaves the graph exactly as it was
  importance  magnitude: a channel's score is the L2 norm of all its weights (its columns of
              the up/gate weights and its row of the down weight); wanda: ||h_j|| (the
              channel's activations over the calibration data, ctx.hints["calibration"])
              times the L1 norm of its down-weight row; the lowest go
  scope       layer: every layer loses floor(ratio * its channels); global: the lowest
              floor(ratio * all channels) of the whole model go, each layer keeping min-keep
  min-keep    the fewest channels a layer keeps (at least 1)

Statistics: `layers` pruned, `channels` and `parameters` removed; `details` lists per layer
the nodes, channels kept of how many, and the kept channel indices, then the block FLOPs
before and after (passes/pruning/flops.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from graphopt.passes.pruning.common import (
    StructuredPruning,
    drop_if_unused,
    replace_weight,
    set_last_dim,
)

from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.pass_manager import PassResult, register_pass

G = GRAPHOPT_DOMAIN


@dataclasses.dataclass
class MlpSite:
    """An MLP's two projections and how their weights are laid out around the channels."""

    up: Node
    down: Node
    hidden: Value                        # the intermediate, [..., channels]
    up_weights: list[tuple[int, int]]    # (input index, channel axis) of each up weight
    up_biases: list[int]                 # input indices of the up biases (channel axis -1)
    down_weight: tuple[int, int]         # (input index, channel axis)
    channels: int


def _weight(v: Value | None) -> np.ndarray | None:
    if v is None or not v.is_initializer or v.const_value is None or v.const_value.ndim != 2:
        return None
    return v.const_value


def find_site(up: Node) -> MlpSite | str | None:
    """The MLP whose up projection is `up`, why it is not one, or None when `up` is no up
    projection at all (pure: it never mutates)."""
    if up.domain != G:
        return None
    ins = list(up.inputs)
    if up.op_type == "GatedLinear":
        up_weights = [(1, 1), (2, 1)]
        up_biases = [i for i in (3, 4) if i < len(ins) and ins[i] is not None]
    elif up.op_type == "Linear" and up.attr("activation", ""):
        up_weights = [(1, 0 if up.attr("trans_w", 0) else 1)]
        up_biases = [2] if len(ins) > 2 and ins[2] is not None else []
    else:
        return None
    hidden = up.outputs[0]
    arrays = [_weight(ins[i]) for i, _ in up_weights]
    if any(a is None for a in arrays):
        return "the up weights are not constant matrices"
    n = arrays[0].shape[up_weights[0][1]]
    if any(a.shape[axis] != n for a, (_, axis) in zip(arrays, up_weights)):
        return "the up weights disagree on the channel count"
    for i in up_biases:
        b = ins[i].const_value if ins[i].is_initializer else None
        if b is None or b.ndim != 1 or b.shape[0] != n:
            return "an up bias is not a constant vector"
    if hidden.is_graph_output or len(hidden.uses()) != 1:
        return "the intermediate has other readers than the down projection"
    down, slot = hidden.uses()[0]
    if slot != 0:
        return "the intermediate is not the down projection's X"
    if down.domain == G and down.op_type == "Linear":
        axis = 1 if down.attr("trans_w", 0) else 0
    elif down.domain == "" and down.op_type == "MatMul":
        axis = 0
    else:
        return f"the intermediate is read by {down.op}, not a down projection"
    w_down = _weight(down.inputs[1])
    if w_down is None or w_down.shape[axis] != n:
        return "the down weight is not a constant matrix over the channels"
    return MlpSite(up, down, hidden, up_weights, up_biases, (1, axis), n)


def channel_importance(site: MlpSite) -> np.ndarray:
    """Magnitude: the L2 norm of every weight that touches the channel, in and out."""
    sq = np.zeros(site.channels, np.float64)
    for i, axis in site.up_weights:
        w = site.up.inputs[i].const_value.astype(np.float64)
        sq += (w * w).sum(axis=1 - axis)
    i, axis = site.down_weight
    w = site.down.inputs[i].const_value.astype(np.float64)
    sq += (w * w).sum(axis=1 - axis)
    return np.sqrt(sq)


def channel_wanda(site: MlpSite, sq_norm: np.ndarray) -> np.ndarray:
    """Wanda (structured, as Wanda-sp): the summed |W| * ||x|| of the down-projection weights a
    channel takes with it -- ||h_j|| over the calibration tokens times the L1 norm of row j."""
    i, axis = site.down_weight
    w = np.abs(site.down.inputs[i].const_value.astype(np.float64))
    return np.sqrt(sq_norm) * w.sum(axis=1 - axis)


def prune_site(graph: Graph, site: MlpSite, keep: np.ndarray) -> None:
    """Keep only channels `keep` in both projections."""
    sliced: dict[tuple[int, int], Value] = {}  # one copy of a weight read twice (a bias for gate and up)
    for node, i, axis in ([(site.up, i, a) for i, a in site.up_weights] + [(site.up, i, 0) for i in site.up_biases]
                          + [(site.down, *site.down_weight)]):
        old = node.inputs[i]
        if (id(old), axis) in sliced:
            node.set_input(i, sliced[id(old), axis])
            drop_if_unused(graph, old)
            continue
        new = np.take(old.const_value, keep, axis=axis)
        sliced[id(old), axis] = replace_weight(graph, node, i, new)
    set_last_dim(site.hidden, len(keep))


@register_pass("prune-mlp")
class PruneMlp(StructuredPruning):
    """Remove the least important intermediate channels of every MLP (both matmuls shrink).

    Before:  %h = graphopt.GatedLinear(%x, @wg, @wu) : f32[b, s, 64]; %y = MatMul(%h, @wd)
    After:   %h = graphopt.GatedLinear(%x, @wg_pruned, @wu_pruned) : f32[b, s, 48]; %y = MatMul(%h, @wd_pruned)
    """

    requires = ("fuse-linear|fuse-gated-mlp",)  # it prunes graphopt.Linear / GatedLinear nodes

    def find_site(self, node: Node):
        return find_site(node)

    def scores(self, site: MlpSite) -> np.ndarray:
        return channel_importance(site)

    def activation(self, site: MlpSite) -> Value:
        return site.hidden

    def wanda_scores(self, site: MlpSite, sq_norm: np.ndarray) -> np.ndarray:
        return channel_wanda(site, sq_norm)

    def shrink(self, graph: Graph, site: MlpSite, keep: np.ndarray) -> None:
        prune_site(graph, site, keep)

    def record(self, result: PassResult, node: Node, site: MlpSite, n_remove: int, keep: np.ndarray) -> None:
        result.count("channels", n_remove)
        result.details.append({"node": site.up.name, "down": site.down.name, "op": site.up.op,
                               "channels": site.channels, "kept": len(keep), "keep": keep.tolist()})
