"""Structured pruning passes: whole channels and heads removed, so the tensors (and the work) shrink.

`prune-mlp` (mlp.py) removes intermediate channels of MLPs and gated MLPs (GatedLinear or
Linear with an activation, followed by the down projection), slicing both matmuls
consistently; importance from the weights (the L2 norm of a channel's in- and out-weights),
per layer, with a minimum kept per layer. `common.py` holds the weight slicing shared by
the pruning passes.
"""
from graphopt.passes.pruning import mlp  # noqa: F401
