"""graphopt.passes: the pass catalogue (cleanup, fusion, quantization, pruning, KV-cache
rewriting). A pass imports only the graphopt core and is target-independent; importing
this package registers every built-in pass."""
from graphopt.passes import cleanup, fusion, quantization  # noqa: F401
