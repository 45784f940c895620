"""Block FLOPs: the work of a transformer's blocks, counted on graphopt's IR, so a pruning
report can say what share of it went.

Counted per sequence of `seq_len` tokens (a prefill): every matmul by a constant weight
matrix (graphopt.Linear, GatedLinear, MatMul, Gemm) at 2 * K * N per token, except one whose
output is a graph output (the LM head, which pruning leaves alone), and every
graphopt.Attention at 4 * seq_len * heads * head_dim per token (Q.K^T and P.V over the whole
sequence, the mask not subtracted). Elementwise work, norms and softmax are not counted.
"""
from __future__ import annotations

from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node

FLOPS_SEQ_LEN = 128  # the prefill length the issue measures at

_MATMULS = {(GRAPHOPT_DOMAIN, "Linear"): 1, (GRAPHOPT_DOMAIN, "GatedLinear"): 2, ("", "MatMul"): 1, ("", "Gemm"): 1}


def node_flops(node: Node, seq_len: int = FLOPS_SEQ_LEN) -> int:
    """FLOPs of `node` for one sequence of `seq_len` tokens (0 for what is not counted)."""
    weights = _MATMULS.get((node.domain, node.op_type))
    if weights is not None:
        if len(node.inputs) < 2 or any(o.is_graph_output for o in node.outputs if o is not None):
            return 0
        w = node.inputs[1]
        if w is None or not w.is_initializer or w.const_value is None or w.const_value.ndim != 2:
            return 0
        return 2 * weights * int(w.const_value.size) * seq_len
    if node.domain == GRAPHOPT_DOMAIN and node.op_type == "Attention":
        q = node.inputs[0].type
        if q is None or q.shape is None or not isinstance(q.shape[-1], int):
            return 0
        if q.rank == 4:  # [batch, heads, seq, head_dim]
            width = q.shape[1] * q.shape[-1] if isinstance(q.shape[1], int) else 0
        else:
            width = q.shape[-1]
        return 4 * seq_len * width * seq_len
    return 0


def block_flops(graph: Graph, seq_len: int = FLOPS_SEQ_LEN) -> int:
    return sum(node_flops(n, seq_len) for n in graph.nodes)
