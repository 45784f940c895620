"""Fusion passes: decomposed subgraphs that exporters emit -> graphopt's fused ops.

`TRANSFORMER_PIPELINE` is the default recipe for decoder and encoder models: cleanup, then
the fusions in dependency order (activations and norms first, so Linear can absorb them;
Linear before attention, so the attention's 3-D form can see through the projections),
then cleanup again.
"""
from graphopt.passes.fusion import activations, attention, linear, norms, rotary  # noqa: F401

FUSION_PIPELINE = ("fuse-activations,fuse-layer-norm,fuse-rms-norm,fuse-linear,fuse-rotary,fuse-attention,"
                   "fuse-gated-mlp,merge-projections,fuse-skip-norm")
