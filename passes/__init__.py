"""graphopt.passes: the pass catalogue -- cleanup (`passes/cleanup`), fusion (`passes/fusion`),
KV-cache rewriting (`passes/kvcache`) and quantization (`passes/quantization`); pruning is an
open issue. A pass imports only the graphopt core and is target-independent; importing this
package registers every built-in pass."""
from graphopt.passes import cleanup, fusion, kvcache, quantization  # noqa: F401
