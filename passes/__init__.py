"""graphopt.passes: the pass catalogue -- cleanup (`passes/cleanup`), fusion (`passes/fusion`),
KV-cache rewriting (`passes/kvcache`), quantization (`passes/quantization`) and structured
pruning (`passes/pruning`). A pass imports only the graphopt core and is target-independent; importing this
package registers every built-in pass."""
from graphopt.passes import cleanup, fusion, kvcache, pruning, quantization  # noqa: F401
