"""graphopt's own op catalogue: importing it registers every graphopt-domain op.

The registry finds it through the entry point group `graphopt.ops` (see graphopt/plugins.py).
"""
from graphopt import fused_ops, graphopt_ops, quant_ops  # noqa: F401  (each registers its ops on import)
