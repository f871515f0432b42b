"""The one loop of the CPU attention that neither numpy nor oneMKL runs fast everywhere, in C: the softmax's exp over a
block of scores with each row's sum taken in the same pass (`exp_rows`). Compiled at first use with the system's C
compiler, for this CPU (`-march=native`), into `<home>/native/`, keyed by the source, the compiler and the CPU;
MLX's CPU kernels (cpu_kernels) need a compiler at run time as well.

Why: on the AMD EPYC (Zen 3) of the README's "A real AVX2 CPU", oneMKL's vector exp takes its non-Intel path at
1.1-1.6 ns per element on one thread and numpy's at 1.6-2.5 ns, against 0.2 ns for a multiply: a third of an
attention block's time. This loop, vectorized by the compiler (2^y = 2^n p(f) with cpu_kernels' polynomial), takes
0.4-0.6 ns, and with the row sums here the value product needs no column of ones.

Where no compiler works (or SILICON_DIFFUSION_NATIVE=0), `exp_rows()` is None and cpu_attention keeps oneMKL's or
numpy's exp with the column of ones.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from backend import blas

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Each of `rows` rows of `cols` fp32 scores (`stride` floats apart) becomes exp(score) in place, and sums[r] its sum.
   exp(x) = 2^y, y = x log2(e) clamped to [-126, 127]: 2^y = 2^n p(f), n = round(y), f = y - n in [-0.5, 0.5]. */
void exp_rows(float *scores, long rows, long cols, long stride, float *sums) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding, then subtracting it rounds to an integer */
    for (long r = 0; r < rows; r++) {
        float *s = scores + r * stride;
        float sum = 0.0f;
        #pragma omp simd reduction(+:sum)
        for (long i = 0; i < cols; i++) {
            float y = s[i] * 1.44269504088896341f;
            y = y > 127.0f ? 127.0f : y;
            y = y < -126.0f ? -126.0f : y;
            float n = (y + magic) - magic;
            float f = y - n;
            float p = 0.0013264167355373502f;
            p = p * f + 0.009671472944319248f;
            p = p * f + 0.0555073544383049f;
            p = p * f + 0.24022242426872253f;
            p = p * f + 0.6931470036506653f;
            p = p * f + 1.0f;
            int32_t bits = ((int32_t) n + 127) << 23;
            float scale;
            memcpy(&scale, &bits, sizeof scale);
            s[i] = p * scale;
            sum += s[i];
        }
        sums[r] = sum;
    }
}
"""

_lock = threading.Lock()
_function = None  # the loaded exp_rows, False once building failed


def _flags() -> list:
    arch = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    # No -ffast-math: it would fold the rounding trick away. The omp pragma vectorizes the sum without the runtime.
    return ["-O3", arch, "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-shared", "-fPIC"]


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and flags where Linux says them (blas reads /proc/cpuinfo)."""
    known = [blas._cpuinfo(field) for field in ("model name", "flags", "Features")]
    return "\n".join(known) if any(known) else platform.processor() or platform.machine()


def _build() -> Optional[Path]:
    """The compiled library for this source, compiler and CPU: from the cache, or compiled there now."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None
    from backend.session import home
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *_flags(), _cpu_identity()]).encode()).hexdigest()[:20]
    folder = home() / "native"
    library = folder / f"attention-{key}.so"
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        source, built = Path(work) / "attention.c", Path(work) / library.name
        source.write_text(_SOURCE)
        done = subprocess.run([compiler, *_flags(), str(source), "-o", str(built)], capture_output=True, timeout=120)
        if done.returncode != 0 or not built.is_file():
            return None
        os.replace(built, library)  # complete or absent: a concurrent or interrupted build never leaves half a file
    return library


def _load(library: Path):
    raw = ctypes.CDLL(str(library)).exp_rows
    raw.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    raw.restype = None

    def exp_rows(scores: np.ndarray, sums: np.ndarray) -> None:
        """scores (rows, cols) fp32, each row's elements adjacent: exp in place; sums (rows,) fp32 <- each row's sum."""
        rows, cols = scores.shape
        if scores.dtype != np.float32 or scores.strides[1] != 4 or scores.strides[0] % 4:
            raise ValueError("exp_rows takes fp32 scores whose elements within a row are adjacent")
        if sums.dtype != np.float32 or sums.shape != (rows,) or not sums.flags.c_contiguous:
            raise ValueError(f"exp_rows needs a contiguous fp32 sums array of {rows} rows")
        raw(scores.ctypes.data, rows, cols, max(cols, scores.strides[0] // 4), sums.ctypes.data)

    # A wrong build (a compiler that mis-vectorizes, a stale file) must not reach the attention: check it first.
    probe = np.linspace(-80, 80, 2 * 37, dtype=np.float32).reshape(2, 37)
    sums = np.empty(2, np.float32)
    expected = np.exp(probe.astype(np.float64))
    exp_rows(probe, sums)
    if not (np.allclose(probe, expected, rtol=1e-5, atol=0) and np.allclose(sums, expected.sum(1), rtol=1e-5)):
        return None
    return exp_rows


def exp_rows() -> Optional[Callable]:
    """f(scores, sums): exp of an fp32 (rows, cols) block in place and each row's sum into sums, by the compiled
    loop (it releases the GIL, so cpu_pool's workers run it side by side); None where it cannot be built here."""
    global _function
    if _function is None:
        with _lock:
            if _function is None:
                _function = False
                if os.environ.get("SILICON_DIFFUSION_NATIVE", "1") != "0":
                    try:
                        library = _build()
                        _function = (_load(library) if library else None) or False
                    except (OSError, subprocess.SubprocessError, ValueError):
                        _function = False
    return _function or None
