"""A 3x3 stride-1 convolution for the CPU as nine shifted matrix products over the flat zero-padded input.

With the input padded by one column on each side and flattened to (rows x (W + 2), C_in), the tap (di, dj) of
every output pixel reads the input row di * (W + 2) + dj further on: one contiguous slice of the same buffer. So
the convolution is nine products of those slices with the tap's (C_in, C_out) matrix, accumulated in place by
oneMKL (beta = 1): the direct convolution's multiplications, with no unfolded copy of the input (MLX's CPU
convolution writes one 9x its input first) and no transforms (Winograd's, single-threaded elementwise passes in
MLX). Each output row also gets two columns computed from the wrap-around, dropped at the end (2 / W extra).

Measured here (one row band of one image, 2 cores, oneMKL): it wins where one side has few channels, the VAE's
first and last layers (4 -> 512 at 64x64 3.2 ms against 6.8 ms for cpu_winograd's F(4x4); 128 -> 3 at 1024 wide
3.8 against 6.7 ms; 128 -> 32 8.6 against 17.8 ms), and Winograd's 4x fewer multiplications win from 128 channels
on both sides (128 -> 128, 64 rows of 512: 26 against 36 ms; 256 -> 128: 42 against 71 ms). So vae_bands uses this
for layers with at most MAX_CHANNELS channels on one side. Needs oneMKL (blas.sgemm); fp32.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from backend import blas

#: Layers with at most this many channels on one side (input or output) are convolved this way; wider ones go to
#: Winograd.
MAX_CHANNELS = 32


def applies(c_in: int, c_out: int) -> bool:
    return min(c_in, c_out) <= MAX_CHANNELS and blas.sgemm() is not None


def taps(weight: mx.array) -> np.ndarray:
    """(C_out, 3, 3, C_in) kernel -> (9, C_in, C_out) fp32, the product matrix of each tap (di, dj)."""
    w = weight.astype(mx.float32).transpose(1, 2, 3, 0)
    return np.ascontiguousarray(np.asarray(w)).reshape(9, weight.shape[3], weight.shape[0])


def accumulate_into(padded: np.ndarray, tap_matrices: np.ndarray, out: np.ndarray) -> None:
    """out (B, R, W + 2, C_out) += the 3x3 'valid' convolution of padded (B, R + 2, W + 2, C_in), all fp32
    numpy; out's last two columns of each row receive wrap-around values, to be ignored."""
    sgemm = blas.sgemm()
    batch, width, c_in = padded.shape[0], padded.shape[2] - 2, padded.shape[3]
    rows, c_out = out.shape[1], out.shape[3]
    m = rows * (width + 2) - 2
    for b in range(batch):
        flat_in, flat_out = padded[b].reshape(-1, c_in), out[b].reshape(-1, c_out)[:m]
        for k in range(9):
            start = (k // 3) * (width + 2) + k % 3
            sgemm(flat_in[start:start + m], tap_matrices[k], flat_out, accumulate=True)
