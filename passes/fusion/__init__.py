"""Fusion passes: decomposed subgraphs that exporters emit -> graphopt's fused ops.

`FUSION_PIPELINE` is the fusion half of the default recipe for decoders and encoders (cleanup,
fusions, cleanup): the fusions in dependency order -- activations and norms first, so Linear
can absorb them; Linear before attention, so the attention's 3-D form can see through the
projections. A pass that needs another one first says so (`Pass.requires`), and the pass
manager refuses a pipeline that runs it without.
"""
from graphopt.passes.fusion import activations, attention, attention_3d, interleaved_heads, linear, norms, rotary  # noqa: F401

FUSION_PIPELINE = ("fuse-activations,fuse-layer-norm,fuse-rms-norm,fuse-linear,fuse-rotary,fuse-attention,"
                   "eliminate-dead-code,split-interleaved-heads,attention-to-3d,"
                   "fuse-gated-mlp,merge-projections,fuse-skip-norm")
