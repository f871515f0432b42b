"""backend/blas.py: the optimized BLAS MLX runs on, with kernels this CPU can use."""
import sys

import numpy as np
import pytest

from backend import blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux loads OpenBLAS; macOS has Accelerate")


def test_kernels_follow_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(blas, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"})
    assert blas._kernels_for_this_cpu() == "SkylakeX"
    monkeypatch.setattr(blas, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert blas._kernels_for_this_cpu() == "Haswell"
    monkeypatch.setattr(blas, "cpu_flags", lambda: {"sse4_2"})
    assert blas._kernels_for_this_cpu() is None


def test_openblas_is_loaded_with_vector_kernels_and_gives_right_products():
    if blas.loaded is None or "openblas" not in blas.loaded:
        pytest.skip("no OpenBLAS on this machine (install libopenblas0)")
    import mlx.core as mx
    if blas._kernels_for_this_cpu() is not None:  # a CPU with AVX2 or AVX-512 gets vector kernels
        assert blas.kernel_name() and blas.kernel_name().lower() != "prescott"
    assert blas.kernel_name() in blas.describe()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((257, 300)).astype(np.float32), rng.standard_normal((300, 129)).astype(np.float32)
    mine = np.array(mx.array(a) @ mx.array(b))
    assert np.abs(mine - a.astype(np.float64) @ b).max() < 1e-3
