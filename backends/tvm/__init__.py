"""graphopt.backends.tvm: the TVM backend -- the IR lowered directly to Relax, built with
LLVM (cpu) or CUDA (cuda) into a shared library whose weights stay outside it.

    OUTDIR/model.so            the compiled Relax VM executable (its function `main`)
    OUTDIR/weights.safetensors the weights, in the order `main` takes them (manifest "params")

Modules: `lowering` (graph -> Relax, the rule walk and symbolic shape values), `rules_core`,
`rules_shapes` and `rules_graphopt` (one rule per op; `rules_cache`, the static KV cache's in-place write, registered in the op registry when
this package is imported; they need tvm only when they run), `build` (targets and pipelines), `schedules`
(CPU schedules without tuning), `schedules_quant` (the dequantize-fused quantized kernels
and their CPU and CUDA schedules), `runtime` (the backend protocol and the artifact's
Executable). See docs/tvm.md.
"""
from __future__ import annotations

from graphopt.backends.tvm.runtime import (NAME, Compiled, Executable, check_options, check_target, compile_graph,
                                          matmulnbits_level, save, versions)

__all__ = ["NAME", "Compiled", "Executable", "check_options", "check_target", "compile_graph", "matmulnbits_level",
           "save", "versions"]
