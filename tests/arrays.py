"""Array helpers the parity tests share: relative error, and NCHW (torch) <-> NHWC (MLX) layouts."""
import mlx.core as mx
import numpy as np


def relative_error(mine: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(mine - reference) / np.linalg.norm(reference))


def nhwc(t) -> mx.array:
    """A torch NCHW tensor -> an MLX NHWC array."""
    return mx.array(t.permute(0, 2, 3, 1).numpy())


def nchw(a: mx.array) -> np.ndarray:
    """An MLX NHWC array -> a numpy NCHW float32 array."""
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)
