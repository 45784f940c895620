"""graphopt.passes: the pass catalogue -- cleanup (`passes/cleanup`), fusion (`passes/fusion`)
and KV-cache rewriting (`passes/kvcache`); quantization and pruning are open issues. A pass
imports only the graphopt core and is target-independent; importing this package registers
every built-in pass."""
from graphopt.passes import cleanup, fusion, kvcache  # noqa: F401
