"""graphopt: a compiler-style optimization toolchain for trained neural networks.

The core lives here: the IR (`Graph`, `Node`, `Value`, `TensorType`), the op registry, the
textual form, the verifier, the reference interpreter and ONNX import/export. Heavy optional
parts (torch, transformers, tvm) are imported only where they are used.
"""
from __future__ import annotations

__version__ = "0.1.0"
