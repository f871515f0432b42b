"""Loads an optimized BLAS into the process before MLX, so MLX's CPU matrix products use it.

The Linux `mlx[cpu]` wheel links a bundled reference BLAS (about 5 GFLOP/s here). Loading
OpenBLAS with RTLD_GLOBAL first makes the dynamic linker resolve MLX's `cblas_*` symbols to
OpenBLAS instead (about 150-270 GFLOP/s on the same machine). On macOS MLX uses Accelerate
and the GPU, so nothing is done there. Set SILICON_DIFFUSION_BLAS=reference to opt out, or to
a library path to load that one instead.

OpenBLAS picks its kernels from a table of CPUs it knows; a CPU newer than the build (Debian's 0.3.21 on
this machine's Xeon) falls back to "Prescott" kernels without AVX: 32 GFLOP/s instead of ~150, and an SD3
transformer step 2.6x slower than torch's. So when OPENBLAS_CORETYPE is unset, it is set from the CPU's
own flags before the library loads (SkylakeX for AVX-512 F/BW/DQ/VL, Haswell for AVX2 + FMA), and only if
the library would otherwise choose Prescott. A value already in the environment is kept.
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
    kernels = _kernels_for_this_cpu() if "OPENBLAS_CORETYPE" not in os.environ else None
    for name in ([choice] if choice else []) + list(_CANDIDATES):
        if kernels and "openblas" in name and _would_fall_back(name):
            os.environ["OPENBLAS_CORETYPE"] = kernels  # read by OpenBLAS when it loads, below
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        return loaded
    return None


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _kernels_for_this_cpu():
    """The OpenBLAS kernel family this CPU can run (None: leave OpenBLAS's own choice)."""
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _would_fall_back(name: str) -> bool:
    """Whether OpenBLAS, left to itself, picks its no-AVX Prescott kernels here (asked in a child process,
    since the choice is made once, when the library loads)."""
    import subprocess
    probe = ("import ctypes,sys; lib=ctypes.CDLL(sys.argv[1]); lib.openblas_get_corename.restype=ctypes.c_char_p;"
             "print(lib.openblas_get_corename().decode())")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    try:
        out = subprocess.run([sys.executable, "-c", probe, name], capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip().lower() == "prescott"


def kernel_name() -> str | None:
    """The kernel family the loaded OpenBLAS uses (None for other libraries)."""
    if not loaded or "openblas" not in loaded:
        return None
    try:
        lib = ctypes.CDLL(loaded)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return None


def describe() -> str:
    if not sys.platform.startswith("linux"):
        return "platform BLAS (Accelerate)"
    if not loaded:
        return "reference BLAS bundled with mlx (slow: install libopenblas0)"
    kernels = kernel_name()
    return f"{loaded}" + (f" ({kernels} kernels)" if kernels else "")
