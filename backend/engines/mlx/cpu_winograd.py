"""Winograd F(4x4, 3x3) convolution for inference on the CPU, in numpy on every core.

winograd.py's transforms are MLX elementwise kernels, which run on one thread: at SD 1.5's 320 channels and 64x64
they were half of the convolution's time. Here each transform is one small matrix product per row of tiles: the
36 values of every 6x6 input tile (rows of tiles gathered straight from the unpadded input, the zero border
written as zeros) times the 36x36 matrix kron(B^T, B^T), and the 36 products per tile times the 16x36 kron(A^T,
A^T), whose 4x4 outputs go into place with the bias and any residual added. Three passes on cpu_pool's workers:
input transform by rows of tiles, the 36 (tiles, C_in) x (C_in, C_out) products dealt among the workers (one
core each), output transform by rows of tiles. The kernel's transform, kron(G, G) times each output channel's
(9, C_in) taps, is made per call (`kernel_transform`; kept, it would hold 4x each kernel's size).

The products are blas.product()'s: oneMKL's sgemm where it is the loaded BLAS, else numpy's. fp32 only; for
inference (the inputs are read as numpy views of evaluated MLX arrays). layers.Conv2d (the UNet) and vae_bands (the
VAE) call it.
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from backend import blas
from backend.engines.mlx import cpu_pool, winograd

TILE = 4  # output rows and columns per tile
_SPAN = TILE + 2  # input rows and columns per tile
_B_T, _G, _A_T = (np.array(m, np.float64) for m in winograd.matrices(TILE))
INPUT_TRANSFORM = np.kron(_B_T, _B_T).astype(np.float32)  # (36, 36): tile value 6i+j -> transformed value
KERNEL_TRANSFORM = np.kron(_G, _G).astype(np.float32)  # (36, 9): tap 3i+j -> transformed value
OUTPUT_TRANSFORM = np.kron(_A_T, _A_T).astype(np.float32)  # (16, 36): product -> output 4p+q of the tile
#: Bytes of gathered tiles one unit of work transforms at once (cache-sized).
UNIT_BYTES = 2 << 20


def kernel_transform(weight: np.ndarray) -> np.ndarray:
    """(C_out, 3, 3, C_in) fp32 kernel -> (C_out, 36, C_in): for transformed position k, the (C_out, C_in) matrix
    u[:, k] (its products use it transposed)."""
    c_out, c_in = weight.shape[0], weight.shape[3]
    taps = weight.reshape(c_out, 9, c_in)
    out = cpu_pool.empty((c_out, 36, c_in))

    def work(share):
        for o0, o1 in share:
            np.matmul(KERNEL_TRANSFORM, taps[o0:o1], out=out[o0:o1])

    cpu_pool.run(work, cpu_pool.row_shares(c_out, max(1, -(-c_out // (4 * cpu_pool.workers())))))
    return out


def conv3x3(x: np.ndarray, u: np.ndarray, out: np.ndarray, bias: Optional[np.ndarray] = None,
            residual: Optional[np.ndarray] = None, halo: bool = False) -> None:
    """out (B, R, W, C_out) = the 3x3, stride-1, padding-1 convolution of x [+ bias (C_out,), or (B, C_out) per
    image] [+ residual (B, R, W, C_out)], all fp32 numpy (x and residual may be views with strided rows); u from
    kernel_transform.

    x is (B, R, W, C_in), zero-padded by one on every side; with `halo`, x is (B, R + 2, W, C_in): its first and
    last rows are the rows above and below the output's (a band of a larger image), only the columns padded.
    R and W need not be multiples of 4 (the last tiles read zeros and their extra outputs are dropped).
    """
    batch, in_rows, width, c_in = x.shape
    rows, c_out = out.shape[1], out.shape[3]
    tile_rows, tiles_per_row = -(-rows // TILE), -(-width // TILE)
    n_tiles = batch * tile_rows * tiles_per_row
    v = cpu_pool.empty((36, n_tiles, c_in))
    m = cpu_pool.empty((36, n_tiles, c_out))
    matmul = blas.product()
    # Units of whole rows of tiles of one image, the gathered tiles of one about UNIT_BYTES, at least two per worker.
    per_unit = max(1, min(UNIT_BYTES // (36 * tiles_per_row * max(c_in, c_out) * 4),
                          -(-batch * tile_rows // (2 * cpu_pool.workers()))))
    units = [(b, t, min(tile_rows, t + per_unit)) for b in range(batch) for t in range(0, tile_rows, per_unit)]
    row_offset = 0 if halo else -1  # input row of tile row t's first value: 4t + row_offset

    def transform_inputs(share):
        scratch = cpu_pool.empty((36, per_unit * tiles_per_row, c_in))
        for b, t0, t1 in share:
            d = scratch[:, :(t1 - t0) * tiles_per_row].reshape(36, t1 - t0, tiles_per_row, c_in)
            for i in range(_SPAN):
                # tile rows whose input row 4t + i + row_offset lies in x
                first_t = max(t0, -(-(-i - row_offset) // TILE))
                end_t = min(t1, (in_rows - 1 - i - row_offset) // TILE + 1)
                for j in range(_SPAN):
                    target = d[_SPAN * i + j]
                    first = 1 if j == 0 else 0  # tile 0's column j - 1 = -1 is the zero border
                    end = min(tiles_per_row, (width - j) // TILE + 1)  # tiles whose column 4s + j - 1 < W
                    if first_t >= end_t:
                        target[...] = 0
                        continue
                    target[:first_t - t0] = 0
                    target[end_t - t0:] = 0
                    inside = target[first_t - t0:end_t - t0]
                    inside[:, :first] = 0
                    inside[:, end:] = 0
                    row = TILE * first_t + i + row_offset
                    inside[:, first:end] = x[b, row:row + TILE * (end_t - first_t - 1) + 1:TILE,
                                             TILE * first + j - 1::TILE][:, :end - first]
            start = (b * tile_rows + t0) * tiles_per_row
            matmul(INPUT_TRANSFORM, d.reshape(36, -1), v[:, start:start + (t1 - t0) * tiles_per_row].reshape(36, -1))

    def multiply(share):
        for k in share:
            matmul(v[k], u[:, k], m[k], b_transposed=True)

    def transform_outputs(share):
        scratch = cpu_pool.empty((TILE * TILE, per_unit * tiles_per_row, c_out))
        for b, t0, t1 in share:
            y = scratch[:, :(t1 - t0) * tiles_per_row]
            start = (b * tile_rows + t0) * tiles_per_row
            matmul(OUTPUT_TRANSFORM, m[:, start:start + (t1 - t0) * tiles_per_row].reshape(36, -1),
                   y.reshape(TILE * TILE, -1))
            if bias is not None:
                y += bias if bias.ndim == 1 else bias[b]
            y = y.reshape(TILE * TILE, t1 - t0, tiles_per_row, c_out)
            for p in range(TILE):
                end_t = min(t1, (rows - 1 - p) // TILE + 1)  # tile rows whose output row 4t + p < R
                if end_t <= t0:
                    break
                row = TILE * t0 + p
                for q in range(TILE):
                    n = min(tiles_per_row, -(-(width - q) // TILE))
                    pick = (slice(row, row + TILE * (end_t - t0 - 1) + 1, TILE), slice(q, None, TILE))
                    dest, part = out[b][pick][:, :n], y[TILE * p + q, :end_t - t0, :n]
                    if residual is not None:
                        np.add(part, residual[b][pick][:, :n], out=dest)
                    else:
                        dest[...] = part

    cpu_pool.run(transform_inputs, cpu_pool.deal(units))
    cpu_pool.run(multiply, cpu_pool.deal(list(range(36))))
    cpu_pool.run(transform_outputs, cpu_pool.deal(units))


def convolve(x: mx.array, weight: mx.array, bias: Optional[mx.array] = None,
             residual: Optional[mx.array] = None) -> mx.array:
    """The 3x3, stride-1, padding-1 convolution of NHWC x by an (C_out, 3, 3, C_in) kernel [+ bias: (C_out,), or
    (B, C_out) per image (a resnet's time embedding folded in)] [+ residual, NHWC like the output], computed in
    fp32 and returned in x's dtype."""
    extras = [a for a in (bias, residual) if a is not None]
    keep, views = cpu_pool.as_numpy(x, weight, *extras)
    rest = iter(views[2:])
    bias_n = next(rest) if bias is not None else None
    residual_n = next(rest) if residual is not None else None
    out = cpu_pool.empty(x.shape[:3] + (weight.shape[0],))
    conv3x3(views[0], kernel_transform(views[1]), out, bias_n, residual_n)
    del keep
    return cpu_pool.to_mlx(out, x.dtype)
