"""graphopt.passes: the pass catalogue -- cleanup (`passes/cleanup`) and fusion
(`passes/fusion`) today; quantization, pruning and KV-cache rewriting are open issues. A pass
imports only the graphopt core and is target-independent; importing this package registers
every built-in pass."""
from graphopt.passes import cleanup, fusion  # noqa: F401
