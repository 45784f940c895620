"""GPTQ (Frantar et al., 2022): quantize a weight column by column, and spread each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
layer's squared output error, H = X^T X over calibration inputs X [tokens, K].

Block-wise scales and zero points are chosen from the error-compensated weights when the
quantizer reaches each block's first column (GPTQ's "static groups" off, act-order off), so
the result is in exactly the format round-to-nearest gives (graphopt.quant_ops).
"""
from __future__ import annotations

import numpy as np

from graphopt.ops.quant_format import block_params, num_blocks, quantize_values


class Hessian:
    """Accumulates X^T X of a layer's input over calibration batches."""

    def __init__(self, k: int):
        self.h = np.zeros((k, k), np.float64)
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        x2 = np.asarray(x, np.float64).reshape(-1, self.h.shape[0])
        self.h += x2.T @ x2
        self.rows += x2.shape[0]


def gptq_rows(w_nk: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool,
              damp: float = 0.01):
    """W [N, K], H [K, K] -> (q u8 [N, K], scales f32 [N, n_blocks], zero points u8 [N, n_blocks] or None)."""
    w = np.array(w_nk, np.float64)
    n, k = w.shape
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # The upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j holds the error propagation
    # from column j onto the later columns, given the earlier ones are fixed.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    nb = num_blocks(k, block_size)
    q = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    zps = None if symmetric else np.zeros((n, nb), np.uint8)
    center = 2 ** (bits - 1)
    for j in range(k):
        b = j // block_size
        if j % block_size == 0:
            s, z = block_params(w[:, j:j + block_size], bits, symmetric)
            scales[:, b] = s
            if zps is not None:
                zps[:, b] = z
        s = scales[:, b].astype(np.float64)
        z = center if zps is None else zps[:, b].astype(np.float64)
        q[:, j] = quantize_values(w[:, j], s, None if zps is None else zps[:, b], bits)
        err = (w[:, j] - (q[:, j].astype(np.float64) - z) * s) / u[j, j]  # (uint8 - 8 would wrap)
        w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return q, scales, zps
