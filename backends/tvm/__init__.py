"""graphopt.backends.tvm: the TVM backend -- the IR lowered directly to Relax, built with
LLVM (cpu) or CUDA (cuda) into a shared library whose weights stay outside it.

    OUTDIR/model.so            the compiled Relax VM executable (main, main_transform_params)
    OUTDIR/weights.safetensors the weights, in the order `main` takes them (manifest "params")

Modules: `lowering` (graph -> Relax, the rule walk and symbolic shape values), `rules_core`
and `rules_graphopt` (one rule per op, registered in the op registry on import), `build`
(targets and pipelines), `schedules` (CPU schedules without tuning), `runtime` (the
artifact's Executable). tvm is imported only when the backend is used.
"""
from __future__ import annotations

import importlib.util

from graphopt.backends.tvm.runtime import NAME, Compiled, Executable, check_target, compile_graph, save, versions

__all__ = ["NAME", "Compiled", "Executable", "check_target", "compile_graph", "save", "versions", "load_rules"]


def load_rules() -> None:
    """Register the TVM lowering rules in the op registry (imports tvm)."""
    from graphopt.backends.tvm import rules_core, rules_graphopt  # noqa: F401


if importlib.util.find_spec("tvm") is not None:  # without tvm, check_target says how to install it
    load_rules()
