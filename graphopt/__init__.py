"""graphopt: a compiler-style optimization toolchain for trained neural networks.

The core lives here: the IR (`Graph`, `Node`, `Value`, `TensorType`), the op registry, the
textual form, the verifier, the reference interpreter and ONNX import/export. Heavy optional
parts (torch, transformers, tvm) are imported only where they are used.
"""
from __future__ import annotations

__version__ = "0.1.0"

# The IR's classes, as `graphopt.Graph`: lazy, since graphopt.ir's imports (ml_dtypes) take a second.
_IR_NAMES = ("Graph", "Node", "Value", "TensorType")


def load(path, **kwargs):
    """Load an artifact folder written by `graphopt optimize`; `.run(feeds)` executes it."""
    from graphopt.artifact import load as _load

    return _load(path, **kwargs)


def optimize(model, output_dir=None, **kwargs):
    """Optimize a model (path or Graph) and write an artifact folder. See graphopt.driver.optimize."""
    from graphopt.driver import optimize as _optimize

    return _optimize(model, output_dir, **kwargs)


def __getattr__(name):
    # Lazy: `from_torch` needs torch, and `import graphopt` must stay fast without it.
    if name == "from_torch":
        from graphopt.frontends import from_torch

        return from_torch
    if name in _IR_NAMES:
        import graphopt.ir

        return getattr(graphopt.ir, name)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
