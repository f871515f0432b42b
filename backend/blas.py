"""Loads an optimized BLAS into the process before MLX, so MLX's CPU matrix products use it.

The Linux `mlx[cpu]` wheel links a bundled reference BLAS (about 5 GFLOP/s here). Loading
OpenBLAS with RTLD_GLOBAL first makes the dynamic linker resolve MLX's `cblas_*` symbols to
OpenBLAS instead (about 150-270 GFLOP/s on the same machine). On macOS MLX uses Accelerate
and the GPU, so nothing is done there. Set SILICON_DIFFUSION_BLAS=reference to opt out, or to
a library path to load that one instead.
"""
from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so", "libmkl_rt.so.2", "libblis.so.4")
loaded: str | None = None


def load_optimized_blas() -> str | None:
    """Load the first optimized BLAS found; return its name, or None. Must run before `import mlx`."""
    global loaded
    if loaded is not None or not sys.platform.startswith("linux"):
        return loaded
    choice = os.environ.get("SILICON_DIFFUSION_BLAS", "")
    if choice == "reference":
        return None
    if "mlx.core" in sys.modules:
        # Too late: MLX already bound its BLAS symbols.
        return None
    for name in ([choice] if choice else []) + list(_CANDIDATES):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        return loaded
    return None


def describe() -> str:
    if not sys.platform.startswith("linux"):
        return "platform BLAS (Accelerate)"
    return loaded or "reference BLAS bundled with mlx (slow: install libopenblas0)"
