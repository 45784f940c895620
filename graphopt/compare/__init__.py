"""graphopt.compare: one report of latency and accuracy across backends and variants.

`compare(models, backends=..., variants=...)` builds every backend x variant cell (the
variant registry in `variants`), times them interleaved on the same feeds (`timing`),
measures accuracy against eager fp32 PyTorch (`accuracy`, `reference`), peak memory in a
fresh process per cell (`memory`), time to first token and decode tokens/s with `--generate`
(`decoding`), records the machine (`machine`) and returns the report as a JSON-ready dict; `table` renders it for the
terminal, `html` as one self-contained page, `command` is the `graphopt compare` CLI.
Importing the package is cheap: the names below load their modules on first use.
"""
from __future__ import annotations

__all__ = ["compare", "register_variant", "Runner", "VARIANTS"]


def __getattr__(name: str):
    if name == "compare":
        from graphopt.compare.run import compare

        return compare
    if name in ("register_variant", "Runner", "VARIANTS"):
        from graphopt.compare import variants

        return getattr(variants, name)
    raise AttributeError(f"module 'graphopt.compare' has no attribute {name!r}")
