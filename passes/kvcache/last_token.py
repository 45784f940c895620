"""slice-last-token-logits: the LM head only at the last position.

Generation reads one row of logits per sequence, the last; with left padding that is the
last position of every row. Computing the vocabulary projection at every position is a
large share of a prefill's work (about a third of GPT-2 small's FLOPs at sequence 128), so
the hidden state is sliced to its last position before the LM head (and before the final
norm, which works per position too).

Before:  %h = graphopt.RMSNorm(%x, @w)            After:  %l = Slice(%x, [-1], [INT64_MAX], [1])
         %logits = MatMul(%h, @lm_head)                   %h = graphopt.RMSNorm(%l, @w)
                                                          %logits = MatMul(%h, @lm_head)  : [batch, 1, vocab]

Scoring (perplexity, reranking) needs every position: leave the pass out
(`graphopt optimize --logits all`).
"""
from __future__ import annotations

import numpy as np

from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, TensorType
from graphopt.pass_manager import Pass, PassContext, PassError, PassResult, register_pass
from graphopt.builder import Builder

META_LOGITS = "graphopt.logits"
_INT64_MAX = np.iinfo(np.int64).max

# Ops that work on each position alone (input 0 is [batch, seq, ...], the rest weights):
# the slice can move above them.
_PER_POSITION = {("", "MatMul"), ("", "Gemm"), ("", "LayerNormalization"), (GRAPHOPT_DOMAIN, "Linear"),
                 (GRAPHOPT_DOMAIN, "RMSNorm"), (GRAPHOPT_DOMAIN, "LayerNorm"), ("", "Mul"), ("", "Div"),
                 ("", "Add"), ("", "Tanh"), ("", "Transpose"),
                 (GRAPHOPT_DOMAIN, "QuantLinear"), (GRAPHOPT_DOMAIN, "DynamicQuantLinear"),
                 ("", "QuantizeLinear"), ("", "DequantizeLinear")}  # quantize-static's QDQ pairs
# Projections whose weights are stored packed (QuantLinear: [N, n_blocks, block bytes]): a
# weight of rank 3 there is the format, not a broadcast along the sequence.
_PACKED_WEIGHTS = {"QuantLinear", "DynamicQuantLinear"}


class SliceLogitsError(PassError):
    """The logits are not computed by a per-position head this pass can slice."""


def _per_position(node: Node) -> bool:
    """True if node's output at position s depends only on input 0 at position s (and weights)."""
    if (node.domain, node.op_type) not in _PER_POSITION or len([o for o in node.outputs if o is not None]) != 1:
        return False
    if node.op_type == "Transpose":
        return False
    if node.op_type == "LayerNormalization" and node.attr("axis", -1) not in (-1, 2):
        return False
    if node.op_type in ("RMSNorm", "LayerNorm") and node.attr("axis", -1) not in (-1, 2):
        return False
    x = node.inputs[0]
    if x is None or x.type is None or x.type.rank != 3:
        return False
    if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.attr("axis", 1) in (1, -2) \
            and any(v is not None and v.type is not None and v.type.rank for v in node.inputs[1:]):
        return False  # scales along the sequence axis
    for w in node.inputs[1:]:
        if w is None:
            continue
        if w.const_value is None and not _constant_weight(w):
            return False
        if w.type is None or w.type.rank is None or (w.type.rank > 2 and node.op_type not in _PACKED_WEIGHTS):
            return False  # a weight of rank 3 would broadcast along the sequence
    return True


def _constant_weight(w) -> bool:
    """A weight computed from weights alone: a transposed one, or quantize-static's
    DequantizeLinear(@w_int8, @scale, @zero_point)."""
    p = w.producer()
    if p is None or p.op_type not in ("Transpose", "DequantizeLinear"):
        return False
    return all(v is None or v.const_value is not None for v in p.inputs)


@register_pass("slice-last-token-logits")
class SliceLastTokenLogits(Pass):
    """Compute the logits at the last position only ([batch, 1, vocab]), as generation needs.

    Before:  %logits = MatMul(%h, @lm_head)             : f32[batch, seq, vocab]
    After:   %logits = MatMul(Slice(%h, -1:, axis 1), @lm_head)   : f32[batch, 1, vocab]
    """

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        logits = graph.outputs[0] if graph.outputs else None
        if logits is None or logits.type is None or logits.type.rank != 3:
            raise SliceLogitsError("slice-last-token-logits: the first output is not [batch, seq, vocab] logits")
        if logits.type.shape[1] == 1:
            graph.metadata.metadata_props[META_LOGITS] = "last"
            return result  # already sliced
        head = logits.producer()
        if head is None or not _per_position(head):
            raise SliceLogitsError(f"slice-last-token-logits: the logits are not computed by a per-position LM head "
                            f"(found {head.op if head is not None else 'an input'})")
        top = head
        while True:  # climb over per-position ops whose output only the next one reads
            x = top.inputs[0]
            p = x.producer()
            if p is None or not _per_position(p) or len(x.uses()) != 1 or x.is_graph_output:
                break
            top = p

        b = Builder(graph, before=top, created_by="slice-last-token-logits")
        x = top.inputs[0]
        last = b.Slice(x, b.const(np.array([-1], np.int64), "last_start"),
                       b.const(np.array([_INT64_MAX], np.int64), "last_end"), b.const(np.array([1], np.int64), "last_axis"))
        last.type = TensorType(x.type.dtype, (x.type.shape[0], 1, *x.type.shape[2:]))
        top.set_input(0, last)
        node = top
        while True:  # the sequence axis is 1 from here to the logits
            for out in node.outputs:
                if out is not None and out.type is not None and out.type.rank == 3:
                    out.type = TensorType(out.type.dtype, (out.type.shape[0], 1, out.type.shape[2]))
            if node is head:
                break
            node = node.outputs[0].uses()[0][0]
        graph.metadata.metadata_props[META_LOGITS] = "last"
        result.count("sliced")
        return result


__all__ = ["SliceLastTokenLogits", "SliceLogitsError", "META_LOGITS"]
