"""Structured pruning passes: whole channels and heads removed, so the tensors (and the work) shrink.

`prune-mlp` (mlp.py) removes intermediate channels of MLPs and gated MLPs (GatedLinear or
Linear with an activation, followed by the down projection), slicing both matmuls
consistently; importance from the weights (the L2 norm of a channel's in- and out-weights),
per layer, with a minimum kept per layer. `prune-heads` (heads.py) removes whole attention
heads -- for grouped-query attention whole KV groups with their query heads -- from the 3-D
attention the default recipe makes (merged Q/K/V Linear, Split, RotaryEmbedding, Attention,
output projection). `common.py` holds what both share: choosing the kept units (magnitude or
Wanda, per layer or global), slicing a weight into place, counting parameters; `flops.py`
counts block FLOPs for their reports. `prune-magnitude` and `prune-nm` (sparsity.py) only zero
weights (unstructured, N:M) and say so: mask only, no speed-up.
"""
from graphopt.passes.pruning import heads, mlp, sparsity  # noqa: F401
