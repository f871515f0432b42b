"""backend/blas.py: the optimized BLAS MLX runs on (the mkl wheel first), with kernels this CPU can use."""
import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend import blas

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux loads a BLAS; macOS has Accelerate")
needs_wheel = pytest.mark.skipif(platform.machine() != "x86_64", reason="the mkl wheel is for Linux x86-64")


def _python(code: str, **env):
    """Run `code` in a fresh interpreter (the BLAS is chosen once per process, before MLX loads)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("SILICON_DIFFUSION_BLAS", "OPENBLAS_CORETYPE")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=environment)


def _right_products():
    import mlx.core as mx
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((257, 300)).astype(np.float32), rng.standard_normal((300, 129)).astype(np.float32)
    mine = np.array(mx.array(a) @ mx.array(b))
    assert np.abs(mine - a.astype(np.float64) @ b).max() < 1e-3
    x = rng.standard_normal((1, 9, 9, 16)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 16)).astype(np.float32)
    conv = np.array(mx.conv2d(mx.array(x), mx.array(w), padding=1))
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = sum(np.einsum("nhwc,oc->nhwo", padded[:, i:i + 9, j:j + 9], w[:, i, j].astype(np.float64))
               for i in range(3) for j in range(3))
    assert np.abs(conv - want).max() < 1e-3


def test_kernels_follow_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(blas, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"})
    assert blas._kernels_for_this_cpu() == "SkylakeX"
    monkeypatch.setattr(blas, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert blas._kernels_for_this_cpu() == "Haswell"
    monkeypatch.setattr(blas, "cpu_flags", lambda: {"sse4_2"})
    assert blas._kernels_for_this_cpu() is None


@needs_wheel
def test_the_wheels_library_is_found_from_the_installed_distribution():
    from importlib import metadata
    path = blas.wheel_library()
    assert path, "requirements.txt installs the mkl wheel on Linux x86-64"
    assert os.path.basename(path).startswith("libmkl_rt.so.") and os.path.isfile(path)
    listed = {os.path.abspath(f.locate()) for f in metadata.distribution("mkl").files}
    assert path in listed  # found through pip's record of the wheel, not a hard-coded folder
    exported = ctypes.CDLL(path)
    assert exported.cblas_sgemm and exported.cblas_sgemv  # the standard, unprefixed CBLAS names MLX calls


def test_the_loaded_blas_serves_mlx_and_gives_right_products():
    if os.environ.get("SILICON_DIFFUSION_BLAS") == "reference":
        pytest.skip("SILICON_DIFFUSION_BLAS=reference")
    assert blas.loaded, "no optimized BLAS: " + blas.describe()
    if platform.machine() == "x86_64" and "SILICON_DIFFUSION_BLAS" not in os.environ:
        assert blas.loaded == blas.wheel_library() and blas.source == "the mkl wheel"  # preferred to the system's
    # MLX's cblas_sgemm resolves to the library loaded first, not to its bundled reference BLAS
    assert blas.provider() and os.path.basename(blas.provider()) == os.path.basename(blas.loaded)
    if "mkl" in blas.loaded and blas._kernels_for_this_cpu() is not None:  # AVX2 or AVX-512: vector kernels
        # oneMKL names its kernels on Intel's CPUs only (see test_onemkl_kernels_are_named_by_isa_or_as_non_intel)
        assert blas.kernel_name() in (("AVX2", "AVX-512", "AVX10") if blas.cpu_vendor() == "GenuineIntel"
                                      else (blas.NON_INTEL,))
    assert os.path.basename(blas.loaded) in blas.describe()
    _right_products()


def test_onemkl_kernels_are_named_by_isa_or_as_non_intel(monkeypatch):
    """oneMKL's version record names the instruction set of its path on Intel CPUs; on others it says "Intel(R)
    Architecture processors", which the bench must not print as if it were a kernel family."""
    labels = {"Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) enabled processors": "AVX-512",
              "Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors": "AVX2"}
    monkeypatch.setattr(blas, "loaded", "/x/libmkl_rt.so.3")
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        monkeypatch.setattr(blas, "cpu_vendor", lambda: vendor)
        for label, isa in labels.items():
            monkeypatch.setattr(blas, "_mkl_version", lambda: (blas._MKLVersion(processor=label.encode()), 2))
            assert blas.kernel_name() == isa
        monkeypatch.setattr(blas, "_mkl_version",
                            lambda: (blas._MKLVersion(processor=b"Intel(R) Architecture processors"), 2))
        assert blas.kernel_name() == ("Intel(R) Architecture processors" if vendor == "GenuineIntel"
                                      else blas.NON_INTEL)


def test_a_system_openblas_still_serves_with_vector_kernels():
    if _python("import ctypes; ctypes.CDLL('libopenblas.so.0')").returncode != 0:  # (loading picks its kernels)
        pytest.skip("no system OpenBLAS (Debian's libopenblas0 is an alternative to the mkl wheel)")
    proc = _python("import backend; from backend import blas; import tests.test_blas as t; t._right_products();"
                   "print(blas.loaded, blas.source, blas.kernel_name(), blas.provider(), sep='|')",
                   SILICON_DIFFUSION_BLAS="libopenblas.so.0")
    assert proc.returncode == 0, proc.stderr
    name, origin, kernels, provider = proc.stdout.strip().splitlines()[-1].split("|")
    assert name == "libopenblas.so.0" and origin == "SILICON_DIFFUSION_BLAS" and "openblas" in provider
    if blas._kernels_for_this_cpu() is not None:
        assert kernels.lower() != "prescott"


def test_the_reference_blas_is_named_with_its_cost_in_the_app_and_once_in_the_cli():
    proc = _python("import backend, mlx.core; from backend import blas; from ui import present;"
                   "print(blas.warning()); print(blas.provider());"
                   "print(present.header_html()); present.header_html()", SILICON_DIFFUSION_BLAS="reference")
    assert proc.returncode == 0, proc.stderr
    sentence, provider, header = proc.stdout.strip().splitlines()
    assert f"about {blas.REFERENCE_SLOWDOWN}x slower" in sentence and "reference BLAS" in sentence
    assert provider == "None"  # nothing exports cblas_sgemm globally: MLX binds its own reference BLAS
    assert "sd-blas-warning" in header and "reference BLAS" in header  # the app's header says it
    assert proc.stderr.count("reference BLAS") == 1  # and its log, once however often the header is built
    # the CLI says it once, on stderr, before doing the command (here: refusing the output name)
    cli = subprocess.run([sys.executable, "-m", "backend", "generate", "--prompt", "x", "--out", "x.txt"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "SILICON_DIFFUSION_BLAS": "reference"})
    assert cli.returncode == 1
    assert cli.stderr.count("reference BLAS") == 1 and sentence in cli.stderr
    assert "cannot write x.txt" in cli.stderr


def test_products_back_to_back_lets_openmp_threads_wait_inside_only():
    """Inside the block Intel OpenMP's threads wait 200 ms for the next product; after it they sleep at once again
    (KMP_BLOCKTIME=0, for the numpy workers), also when the block raises."""
    if blas._openmp is None or os.environ.get("KMP_BLOCKTIME") != "0":
        pytest.skip("Intel OpenMP is not loaded here, or KMP_BLOCKTIME was set by hand")
    get = blas._openmp.kmp_get_blocktime
    assert get() == 0
    with blas.products_back_to_back():
        assert get() == 200
    assert get() == 0
    with pytest.raises(RuntimeError), blas.products_back_to_back(50):
        assert get() == 50
        raise RuntimeError
    assert get() == 0
