"""graphopt.backends.tvm: the TVM backend -- the IR lowered directly to Relax, built with
LLVM (cpu) or CUDA (cuda) into a shared library whose weights stay outside it.

    OUTDIR/model.so            the compiled Relax VM executable (its function `main`)
    OUTDIR/weights.safetensors the weights, in the order `main` takes them (manifest "params")

Modules: `lowering` (graph -> Relax, the rule walk and symbolic shape values), `rules_core`,
`rules_shapes` and `rules_graphopt` (one rule per op, registered in the op registry when
this package is imported with tvm installed), `build` (targets and pipelines), `schedules`
(CPU schedules without tuning), `runtime` (the backend protocol and the artifact's
Executable). See docs/tvm.md.
"""
from __future__ import annotations

import importlib.util

from graphopt.backends.tvm.runtime import NAME, Compiled, Executable, check_target, compile_graph, save, versions

__all__ = ["NAME", "Compiled", "Executable", "check_target", "compile_graph", "save", "versions", "load_rules"]


def load_rules() -> None:
    """Register the TVM lowering rules in the op registry (imports tvm)."""
    from graphopt.backends.tvm import rules_core, rules_graphopt, rules_quant, rules_shapes  # noqa: F401


if importlib.util.find_spec("tvm") is not None:  # without tvm, check_target says how to install it
    load_rules()
