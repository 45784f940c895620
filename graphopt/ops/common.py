"""Helpers every op module shares: the one-line error for a node an op cannot take, int64 shape
constants, the BNSH <-> BSNH permutation.
"""
from __future__ import annotations

import numpy as np

from graphopt.errors import UserError
from graphopt.ir import Node

BNSH_FROM_BSNH = [0, 2, 1, 3]  # the same permutation goes both ways


def i64(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def unsupported(node: Node, why: str) -> UserError:
    return UserError(f"node {node.name!r} ({node.op}): {why}")
