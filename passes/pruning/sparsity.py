"""prune-magnitude and prune-nm: zero weights in place (unstructured, or N:M along the input
dimension). The tensors keep their shapes: this is a mask, and whether it is faster depends on
a backend having a sparse kernel for it.

    Before:  %y = graphopt.Linear(%x, @w)            (@w dense)
    After:   %y = graphopt.Linear(%x, @w_pruned)     (@w_pruned: the same shape, some entries 0)

Sites: every matmul by a constant weight matrix -- graphopt.Linear, graphopt.GatedLinear (both
weights), MatMul -- except one whose output is a graph output (the LM head, kept dense as
Wanda and SparseGPT keep it). A weight shared with another node (a tied embedding) gets its
own pruned copy.

prune-magnitude{sparsity=S}: in every weight, exactly floor(S * size) entries with the
smallest |w| are zeroed (ties: the earlier entry in row-major order goes first).
prune-nm{n=N, m=M}: for every output channel, in every run of M consecutive input positions,
the M - N smallest |w| are zeroed (2:4 keeps 2 of each 4). A weight whose input dimension M
does not divide is reported in `details` and left dense.

Speed: neither graphopt's ONNX Runtime lowering nor its TVM lowering has a sparse kernel for
these masks; ONNX Runtime's CPU MatMul runs a zeroed weight at the dense cost (measured in
docs/pruning.md). Each pass says so in its report: "mask only, no speed-up".

Statistics: `weights` pruned, `zeroed` entries, `entries` (all entries of the pruned weights).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.passes.pruning.common import replace_weight

G = GRAPHOPT_DOMAIN
SPEED_NOTE = ("mask only, no speed-up: the weights keep their dense shape and no graphopt backend "
              "(ONNX Runtime CPU, TVM) has a sparse kernel that skips the zeros")


def weight_sites(node: Node) -> list[tuple[int, int]]:
    """(input index, input-dimension axis) of each constant weight matrix `node` multiplies by;
    none for a node whose output is a graph output."""
    if any(o is not None and o.is_graph_output for o in node.outputs):
        return []
    if node.domain == G and node.op_type == "Linear":
        slots = [(1, 1 if node.attr("trans_w", 0) else 0)]
    elif node.domain == G and node.op_type == "GatedLinear":
        slots = [(1, 0), (2, 0)]
    elif node.domain == "" and node.op_type == "MatMul":
        slots = [(1, 0)]
    else:
        return []
    ok = []
    for i, axis in slots:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and v.is_initializer and v.const_value is not None and v.const_value.ndim == 2 \
                and v.const_value.dtype.kind == "f":
            ok.append((i, axis))
    return ok


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """True where `w` is kept: all but the floor(sparsity * size) smallest |w|."""
    n_zero = int(np.floor(sparsity * w.size + 1e-9))
    order = np.argsort(np.abs(w), axis=None, kind="stable")
    keep = np.ones(w.size, bool)
    keep[order[:n_zero]] = False
    return keep.reshape(w.shape)


def nm_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """True where `w` is kept: the n largest |w| of every m consecutive entries along `axis`."""
    wt = np.moveaxis(np.abs(w), axis, -1)                       # [out, in]
    groups = wt.reshape(wt.shape[0], -1, m)                      # [out, in/m, m]
    order = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.moveaxis(keep.reshape(wt.shape), -1, axis)


@dataclasses.dataclass
class MaskPruning(Pass):
    """Zero entries of every weight matrix by `mask` (per weight); the shapes stay."""

    approximate = True
    requires = ("fuse-linear|fuse-gated-mlp",)

    def mask(self, w: np.ndarray, axis: int) -> np.ndarray | str:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_no_op(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if self.is_no_op():
            return result
        for node in list(graph.nodes):
            for i, axis in weight_sites(node):
                w = node.inputs[i].const_value
                keep = self.mask(w, axis)
                if isinstance(keep, str):
                    result.details.append({"node": node.name, "op": node.op, "reason": keep})
                    continue
                replace_weight(graph, node, i, np.where(keep, w, np.zeros((), w.dtype)))
                result.count("weights")
                result.count("zeroed", int((~keep).sum()))
                result.count("entries", int(w.size))
        if result.changed:
            result.details.append({"speed": SPEED_NOTE})
        return result


@register_pass("prune-magnitude")
@dataclasses.dataclass
class PruneMagnitude(MaskPruning):
    """Zero the smallest-magnitude fraction `sparsity` of every weight matrix (unstructured).

    Before:  %y = graphopt.Linear(%x, @w)       After:  %y = graphopt.Linear(%x, @w_pruned)  (same shape)
    """

    sparsity: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"prune-magnitude: sparsity must be in [0, 1), not {self.sparsity}")

    def is_no_op(self) -> bool:
        return self.sparsity == 0

    def mask(self, w: np.ndarray, axis: int) -> np.ndarray:
        return magnitude_mask(w, self.sparsity)


@register_pass("prune-nm")
@dataclasses.dataclass
class PruneNM(MaskPruning):
    """Keep the `n` largest of every `m` consecutive weights along the input dimension (2:4).

    Before:  %y = graphopt.Linear(%x, @w)       After:  %y = graphopt.Linear(%x, @w_pruned)  (same shape)
    """

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.n <= self.m:
            raise UserError(f"prune-nm: need 1 <= n <= m, not n={self.n}, m={self.m}")

    def is_no_op(self) -> bool:
        return self.n == self.m

    def mask(self, w: np.ndarray, axis: int) -> np.ndarray | str:
        if w.shape[axis] % self.m:
            return f"the input dimension {w.shape[axis]} is not a multiple of m={self.m}"
        return nm_mask(w, self.n, self.m, axis)
