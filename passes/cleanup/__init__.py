"""Cleanup passes: dead code, common subexpressions, constant folding, redundant ops and
shape computations. The default pipeline for `graphopt optimize` is `CLEANUP_PIPELINE`."""
from graphopt.passes.cleanup import cse, dce, fold_constants, shapes, simplify  # noqa: F401

CLEANUP_PIPELINE = ("fold-constants,simplify-shapes,remove-identities,simplify-chains,"
                    "eliminate-common-subexpressions,fold-constants,eliminate-dead-code")

# After fusion: what the fused ops left behind.
POST_FUSION_CLEANUP = "simplify-shapes,remove-identities,simplify-chains,eliminate-common-subexpressions,eliminate-dead-code"
