"""Structured pruning passes: whole channels and heads removed, so the tensors (and the work) shrink.

`prune-mlp` (mlp.py) removes intermediate channels of MLPs and gated MLPs (GatedLinear or
Linear with an activation, followed by the down projection), slicing both matmuls
consistently; importance from the weights (the L2 norm of a channel's in- and out-weights),
per layer, with a minimum kept per layer. `prune-heads` (heads.py) removes whole attention
heads -- for grouped-query attention whole KV groups with their query heads -- from the 3-D
attention the default recipe makes (merged Q/K/V Linear, Split, RotaryEmbedding, Attention,
output projection). `common.py` holds what both share: choosing the kept units, slicing a
weight into place, counting parameters.
"""
from graphopt.passes.pruning import heads, mlp  # noqa: F401
