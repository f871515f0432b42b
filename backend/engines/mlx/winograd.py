"""Winograd F(m x m, 3x3) convolution for the CPU: a 3x3 stride-1 convolution with fewer multiplications.

Each (m + 2)^2 input tile (tiles overlap, stride m) is transformed to (m + 2)^2 values (B^T d B);
position k of every tile, a (tiles, C_in) matrix, is multiplied by matrix k of the transformed
kernel (G g G^T, (C_in, C_out)), and the output transform (A^T M A) turns the products into the
tile's m x m outputs. Matrix products per output: 9 direct, 4 for F(2x2), 2.25 for F(4x4). The
transforms are short weighted sums, applied by rows then by columns, each a compiled kernel.
Accuracy (fp32, relative to a float64 convolution): direct ~3e-7, F(2x2) ~4e-7, F(4x4) ~3e-6.
vae_bands.py uses it for fp32 activations on the CPU, where matrix products are most of the time.
"""
from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

# (B^T, G, A^T) for interpolation points 0, +-1 (and +-2 for F(4x4)), and infinity.
_TRANSFORMS = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
TILES = tuple(_TRANSFORMS)


def matrices(m: int) -> tuple:
    """(B^T, G, A^T) of F(m x m, 3x3), as nested lists (cpu_winograd builds its numpy transforms from them)."""
    return _TRANSFORMS[m]


@functools.lru_cache(maxsize=None)
def _weighted_sum(coefficients: tuple):
    """One compiled kernel: sum of c * x over its inputs (+-1 as adds and subtracts)."""
    def kernel(*xs):
        acc = None
        for c, x in zip(coefficients, xs):
            if acc is None:
                acc = x if c == 1 else (-x if c == -1 else c * x)
            else:
                acc = acc + x if c == 1 else (acc - x if c == -1 else acc + c * x)
        return acc
    return mx.compile(kernel, shapeless=True)


def _apply(matrix, terms: list) -> list:
    """[sum over k of matrix[i][k] * terms[k] for each row i], skipping zero coefficients."""
    out = []
    for row in matrix:
        picked = [(float(c), t) for c, t in zip(row, terms) if c != 0]
        out.append(_weighted_sum(tuple(c for c, _ in picked))(*[t for _, t in picked]))
    return out


def transform_weight(weight: mx.array, m: int) -> mx.array:
    """(C_out, 3, 3, C_in) kernel -> ((m + 2)^2, C_in, C_out) fp32 matrices G g G^T."""
    g_matrix = np.array(_TRANSFORMS[m][1], np.float64)
    c_out, _, _, c_in = weight.shape
    g = weight.astype(mx.float32).transpose(1, 2, 3, 0).reshape(9, c_in * c_out)
    return (mx.array(np.kron(g_matrix, g_matrix).astype(np.float32)) @ g).reshape(-1, c_in, c_out)


def conv3x3(padded: mx.array, u: mx.array, m: int, addends=()) -> mx.array:
    """The 3x3 'valid' convolution of a padded (B, R + 2, W + 2, C_in) input, R and W multiples of m.

    `u` comes from transform_weight(kernel, m); `addends` (a bias, a residual (B, R, W, C_out), ...)
    are added while the m x m tile outputs are put in place. Returns (B, R, W, C_out).
    """
    b_t, _, a_t = _TRANSFORMS[m]
    n = m + 2
    b, rows, cols, c_in = padded.shape
    tile_rows, tile_cols = (rows - 2) // m, (cols - 2) // m
    c_out = u.shape[-1]
    by_rows = _apply(b_t, [padded[:, i:i + m * (tile_rows - 1) + 1:m] for i in range(n)])
    v = [t for part in by_rows for t in _apply(b_t, [part[:, :, j:j + m * (tile_cols - 1) + 1:m] for j in range(n)])]
    products = [v[k].reshape(-1, c_in) @ u[k] for k in range(n * n)]
    by_cols = [_apply(a_t, products[j::n]) for j in range(n)]  # [j][p]: sum over i of A^T[p, i] M[i, j]
    y = [t for p in range(m) for t in _apply(a_t, [by_cols[j][p] for j in range(n)])]
    # (row in tile, column in tile, B, tile rows, tile columns, C) -> (B, tile rows, row, tile columns, column, C)
    out = mx.stack(y).reshape(m, m, b, tile_rows, tile_cols, c_out).transpose(2, 3, 0, 4, 1, 5)
    for addend in addends:
        out = out + (addend.reshape(b, tile_rows, m, tile_cols, m, c_out) if addend.ndim == 4 else addend)
    return (out if addends else mx.contiguous(out)).reshape(b, tile_rows * m, tile_cols * m, c_out)
