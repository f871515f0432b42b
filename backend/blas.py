"""Loads an optimized BLAS into the process before MLX, so MLX's CPU matrix products use it.

The Linux `mlx[cpu]` wheel links a bundled reference BLAS (3-5 GFLOP per CPU-second here). Loading an
optimized BLAS with RTLD_GLOBAL first makes the dynamic linker resolve MLX's `cblas_*` symbols to it instead
(90-150 GFLOP per CPU-second on the same machine, on every core). On macOS MLX uses Accelerate and the
GPU, so nothing is done there.

Where it comes from, first found first:
1. SILICON_DIFFUSION_BLAS: a library path or name (`reference` keeps MLX's own BLAS).
2. oneMKL from the `mkl` wheel that requirements.txt installs on Linux x86-64 (`libmkl_rt.so.N`, found
   through the installed distribution's file list, wherever pip put it). It needs no system package.
3. A system library: Debian's `libopenblas0`, then MKL or BLIS installed by the system.

OpenBLAS picks its kernels from a table of CPUs it knows; a CPU newer than the build (Debian's 0.3.21 on
this machine's Xeon) falls back to "Prescott" kernels without AVX: 32 GFLOP/s instead of ~150, and an SD3
transformer step 2.6x slower than torch's. So when OPENBLAS_CORETYPE is unset, it is set from the CPU's
own flags before the library loads (SkylakeX for AVX-512 F/BW/DQ/VL, Haswell for AVX2 + FMA), and only if
the library would otherwise choose Prescott. A value already in the environment is kept. oneMKL picks its
own code path from the CPU (AVX-512 here; see `kernel_name()`).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys

#: The pip distribution that brings the BLAS (requirements.txt, Linux x86-64) and its library's file name.
WHEEL, WHEEL_LIBRARY = "mkl", "libmkl_rt.so"
#: The OpenMP runtime oneMKL's default (Intel) threading layer calls; a dependency of the mkl wheel.
_OPENMP_WHEEL, _OPENMP_LIBRARY = "intel-openmp", "libiomp5.so"
_SYSTEM = ("libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so", "libmkl_rt.so.2", "libblis.so.4")
#: How much slower MLX's matrix products run on the reference BLAS than on oneMKL from the wheel, per CPU core:
#: 23-43x over a 2048³ product, SD 1.5's feed-forward products and a 3x3 convolution (README, "Speed on Linux").
#: oneMKL also uses every core; the reference BLAS one.
REFERENCE_SLOWDOWN = 30
loaded: str | None = None
#: Where `loaded` came from: "the mkl wheel", "the system" or "SILICON_DIFFUSION_BLAS".
source: str | None = None
_reported = False


def load_optimized_blas() -> str | None:
    """Load the first optimized BLAS found; return its path or name, or None. Must run before `import mlx`."""
    global loaded, source
    if loaded is not None or not sys.platform.startswith("linux"):
        return loaded
    choice = os.environ.get("SILICON_DIFFUSION_BLAS", "")
    if choice == "reference":
        return None
    if "mlx.core" in sys.modules:
        # Too late: MLX already bound its BLAS symbols.
        return None
    kernels = _kernels_for_this_cpu() if "OPENBLAS_CORETYPE" not in os.environ else None
    wheel = wheel_library()
    candidates = [(choice, "SILICON_DIFFUSION_BLAS")] if choice else []
    candidates += [(wheel, "the mkl wheel")] if wheel else []
    candidates += [(name, "the system") for name in _SYSTEM]
    for name, origin in candidates:
        if kernels and "openblas" in name and _would_fall_back(name):
            os.environ["OPENBLAS_CORETYPE"] = kernels  # read by OpenBLAS when it loads, below
        if "mkl_rt" in name:
            _prepare_mkl(name)
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded, source = name, origin
        return loaded
    return None


def _distribution_file(dist: str, prefix: str) -> str | None:
    """The installed file of pip distribution `dist` whose name starts with `prefix`, from its RECORD."""
    from importlib import metadata
    try:
        files = metadata.distribution(dist).files or ()
    except metadata.PackageNotFoundError:
        return None
    for f in sorted(files, key=lambda f: f.name):
        if f.name.startswith(prefix) and not f.name.endswith((".a", ".dbg")):
            path = f.locate()
            if os.path.isfile(path):
                return os.path.abspath(path)
    return None


def wheel_library() -> str | None:
    """The path of oneMKL's `libmkl_rt.so.N` from the installed `mkl` wheel, or None."""
    if not sys.platform.startswith("linux"):
        return None
    return _distribution_file(WHEEL, WHEEL_LIBRARY)


_openmp = None  # Intel OpenMP, where _prepare_mkl loaded it


def _prepare_mkl(path: str) -> None:
    """oneMKL's default threading layer calls OpenMP's `omp_*` without linking it, and the process dies at
    the first product if no OpenMP runtime can be found. Load intel-openmp's libiomp5 first, found as the mkl
    wheel is; without one, fall back to oneMKL's sequential layer (one thread, still fast). Threads: oneMKL
    uses one per physical core unless MKL_NUM_THREADS says otherwise."""
    global _openmp
    if os.environ.get("MKL_THREADING_LAYER", "").upper() not in ("", "INTEL"):
        return
    # Intel OpenMP's threads spin for 200 ms after each parallel region by default, holding a core that the
    # CPU attention's workers (engines/mlx/cpu_attention.py) then lack: 0 puts them to sleep at once. SD 1.5
    # UNet step on 2 cores (`python -m backend bench --parts unet`): 8.61 -> 8.10 s.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    beside = os.path.join(os.path.dirname(path), _OPENMP_LIBRARY) if os.path.isabs(path) else None
    for openmp in (beside, _distribution_file(_OPENMP_WHEEL, _OPENMP_LIBRARY), _OPENMP_LIBRARY):
        if openmp and (openmp == _OPENMP_LIBRARY or os.path.isfile(openmp)):
            try:
                _openmp = ctypes.CDLL(openmp, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                pass
    os.environ["MKL_THREADING_LAYER"] = "SEQUENTIAL"  # e.g. the mkl wheel installed with --no-deps


@contextlib.contextmanager
def products_back_to_back(wait_ms: int = 200):
    """Inside the block, oneMKL's threads wait `wait_ms` for the next product before they sleep (Intel OpenMP's own
    default, `kmp_set_blocktime`), instead of the KMP_BLOCKTIME=0 set above for the numpy workers' sake. For runs of
    products with only small calls between them in the calling thread: a text encoder's 154-row layers, where
    waking the sleeping threads for each product cost CLIP-L 7% and bigG 5% (one process, alternating: medians
    162.6 -> 150.4 ms and 1024 -> 969 ms). Nothing changes without Intel OpenMP or where KMP_BLOCKTIME was set
    to something else."""
    setter = getattr(_openmp, "kmp_set_blocktime", None) if os.environ.get("KMP_BLOCKTIME") == "0" else None
    if setter is None:
        yield
        return
    setter(wait_ms)
    try:
        yield
    finally:
        setter(0)


def provider() -> str | None:
    """The file that the process's `cblas_sgemm` comes from (what MLX, loaded after it, binds to), or None
    when no library loaded globally exports it (MLX then uses its bundled reference BLAS)."""
    class _Info(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                    ("saddr", ctypes.c_void_p)]
    try:
        process = ctypes.CDLL(None)
        symbol = process.cblas_sgemm
    except (OSError, AttributeError):
        return None
    try:  # in libc since glibc 2.34, in libdl before
        dladdr = getattr(process, "dladdr", None) or ctypes.CDLL("libdl.so.2").dladdr
    except (OSError, AttributeError):
        return None
    info = _Info()
    if not dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) or not info.fname:
        return None
    return os.fsdecode(info.fname)


def _cpuinfo(field: str) -> str:
    """The value of `field` in /proc/cpuinfo's first processor entry, or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return ""


def cpu_flags() -> set:
    return set(_cpuinfo("flags").split())


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


class _MKLVersion(ctypes.Structure):  # MKLVersion in mkl_types.h
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int), ("patch", ctypes.c_int),
                ("status", ctypes.c_char_p), ("build", ctypes.c_char_p), ("processor", ctypes.c_char_p),
                ("platform", ctypes.c_char_p)]


def _mkl_version():
    try:
        lib = ctypes.CDLL(loaded)
        v = _MKLVersion()
        lib.MKL_Get_Version(ctypes.byref(v))
        return v, lib.MKL_Get_Max_Threads()
    except (OSError, AttributeError, TypeError):
        return None, None


def kernel_name() -> str | None:
    """The kernel family the loaded library runs here: OpenBLAS's core name, or oneMKL's instruction set
    (None for other libraries)."""
    if not loaded:
        return None
    if "openblas" in loaded:
        try:
            lib = ctypes.CDLL(loaded)
            lib.openblas_get_corename.restype = ctypes.c_char_p
            return lib.openblas_get_corename().decode()
        except (OSError, AttributeError):
            return None
    if "mkl" in loaded:
        v, _ = _mkl_version()
        processor = (v.processor or b"").decode() if v else ""
        isa = next((isa for isa in ("AVX10", "AVX-512", "AVX2", "AVX", "SSE4.2") if isa in processor), None)
        if isa is None and cpu_vendor() not in ("", "GenuineIntel"):
            # oneMKL labels its path on other CPUs "Intel(R) Architecture processors", which names no instruction
            # set; on an AMD EPYC (Zen 3, AVX2) its one-thread products ran at OpenBLAS's Haswell kernels' speed.
            return NON_INTEL
        return isa or processor or None
    return None


#: `kernel_name()` of oneMKL on a CPU that is not Intel's, where oneMKL does not say which kernels it runs.
NON_INTEL = "its non-Intel CPU"


def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), or "" where there is none."""
    return _cpuinfo("vendor_id")


def warning() -> str | None:
    """One sentence when MLX's matrix products run on its reference BLAS (Linux without an optimized one),
    else None."""
    if not sys.platform.startswith("linux") or loaded:
        return None
    fix = ("oneMKL, which also uses every core: pip install mkl (requirements.txt does)" if _x86_64()
           else "OpenBLAS, which also uses every core: apt-get install libopenblas0")  # no mkl wheel for ARM
    return (f"MLX is using its reference BLAS: matrix products run about {REFERENCE_SLOWDOWN}x slower per core "
            f"than with {fix}; see README, Speed on Linux")


def report_once(stream=None) -> str | None:
    """Print the warning to stderr the first time it is asked for in this process; return it."""
    global _reported
    text = warning()
    if text and not _reported:
        _reported = True
        print(f"warning: {text}", file=stream or sys.stderr, flush=True)
    return text


def _x86_64() -> bool:
    import platform
    return platform.machine().lower() in ("x86_64", "amd64")


def describe() -> str:
    if not sys.platform.startswith("linux"):
        return "platform BLAS (Accelerate)"
    if not loaded:
        return "reference BLAS bundled with mlx (slow: see README, Speed on Linux)"
    kernels = kernel_name()
    name = os.path.basename(loaded)
    if "mkl" in loaded:
        v, threads = _mkl_version()
        version = f"oneMKL {v.major}.{v.update}" if v else "oneMKL"
        threads = f", {threads} thread" + ("s" if threads != 1 else "") if threads else ""
        return f"{name} from {source} ({version}, {kernels or '?'} kernels{threads})"
    return f"{name}" + (f" ({kernels} kernels)" if kernels else "")


_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112
_sgemm = None
_sgemm_address = None


def sgemm():
    """oneMKL's `cblas_sgemm` as f(a, b, out, alpha=1.0, b_transposed=False, accumulate=False): out = alpha a b
    (or alpha a b^T; `accumulate` adds it to out instead) for fp32 numpy matrices whose rows may be strided but
    whose elements within a row are adjacent (views of MLX arrays included); None unless oneMKL is the loaded
    BLAS (callers use numpy's matmul then). In worker threads that each run on one core (`one_thread_here`) it
    is ~1.5x numpy's bundled OpenBLAS on attention's products (2 threads, 512x4096x40 and 512x4096x41: 270 vs
    183 GFLOP/s on this Xeon); called from another thread it uses oneMKL's threads."""
    global _sgemm, _sgemm_address
    if _sgemm is not None or not loaded or "mkl" not in loaded:
        return _sgemm or None
    try:
        function = ctypes.CDLL(loaded).cblas_sgemm
    except (OSError, AttributeError):
        return None
    _sgemm_address = ctypes.cast(function, ctypes.c_void_p).value
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    function.argtypes = [integer] * 6 + [ctypes.c_float, pointer, integer, pointer, integer, ctypes.c_float,
                                         pointer, integer]
    function.restype = None

    def product(a, b, out, alpha: float = 1.0, b_transposed: bool = False, accumulate: bool = False) -> None:
        m, k = a.shape
        n = b.shape[0] if b_transposed else b.shape[1]
        if out.shape != (m, n) or (b.shape[1] if b_transposed else b.shape[0]) != k:
            raise ValueError(f"sgemm shapes {a.shape} x {b.shape}{'^T' if b_transposed else ''} -> {out.shape}")
        function(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS if b_transposed else _CBLAS_NO_TRANS, m, n, k,
                 alpha, a.ctypes.data, rows_apart(a, "a"), b.ctypes.data, rows_apart(b, "b"),
                 1.0 if accumulate else 0.0, out.ctypes.data, rows_apart(out, "out"))

    _sgemm = product
    return _sgemm


def rows_apart(matrix, name: str) -> int:
    """The row stride (floats) that cblas_sgemm takes for an fp32 numpy matrix whose elements within a row are
    adjacent (rows may be strided: views of MLX arrays); ValueError naming the matrix otherwise."""
    if matrix.dtype != "float32" or matrix.ndim != 2 or matrix.strides[1] != 4 or matrix.strides[0] % 4:
        raise ValueError(f"{name} must be an fp32 matrix whose elements within a row are adjacent")
    return max(1, matrix.strides[0] // 4, matrix.shape[1])


def sgemm_address() -> int | None:
    """Where oneMKL's `cblas_sgemm` lies in memory, for compiled code that calls it (cpu_native's attention);
    None where `sgemm()` is None."""
    return _sgemm_address if sgemm() else None


def _numpy_product(a, b, out, alpha: float = 1.0, b_transposed: bool = False, accumulate: bool = False) -> None:
    import numpy as np  # here, not at the top: this module runs before anything else loads a BLAS
    b = b.T if b_transposed else b
    a = a * np.float32(alpha) if alpha != 1.0 else a
    if accumulate:
        out += a @ b
    else:
        np.matmul(a, b, out=out)


def product():
    """`sgemm()` where oneMKL is loaded, else numpy's matmul behind the same signature (f(a, b, out, alpha,
    b_transposed, accumulate)): for the CPU kernels that run either way."""
    return sgemm() or _numpy_product


def one_thread_here() -> None:
    """oneMKL runs the calling thread's products on one thread (a worker of a pool with one thread per core)."""
    if loaded and "mkl" in loaded:
        try:
            ctypes.CDLL(loaded).MKL_Set_Num_Threads_Local(1)
        except (OSError, AttributeError):
            pass


# oneMKL's vector math mode: "low accuracy" (at most 4 ulp; its default, HA, is 1 ulp and slower), and overflow or
# underflow (exp of a large or very negative value) neither sets errno nor calls an error handler.
_VML_MODE = 0x1 | 0x100  # VML_LA | VML_ERRMODE_IGNORE
_vector_math: dict = {}


def vector_math(name: str, inputs: int = 1, scalars: int = 0):
    """oneMKL's vector math function `vms<name>` (e.g. "Exp", "Erf"; "Mul" with inputs=2; "LinearFrac", (scale_a a +
    shift_a) / (scale_b b + shift_b), with inputs=2, scalars=4) as f(*x, *scalars, out) over contiguous fp32 numpy
    arrays of one shape (out may be one of them), in its low-accuracy mode (relative error ~1e-7 here); None unless
    oneMKL is the loaded BLAS. One thread per call in cpu_pool's workers (`one_thread_here`), oneMKL's threads in any
    other thread."""
    key = (name, inputs, scalars)
    if key in _vector_math:
        return _vector_math[key]
    function = None
    if loaded and "mkl" in loaded:
        try:
            function = getattr(ctypes.CDLL(loaded), f"vms{name}")
            function.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * inputs + [ctypes.c_float] * scalars + \
                [ctypes.c_void_p, ctypes.c_int64]
            function.restype = None
        except (OSError, AttributeError):
            function = None
    if function is not None:
        raw = function

        def function(*args) -> None:
            if len(args) != inputs + scalars + 1:
                raise ValueError(f"vms{name} takes {inputs + 1} arrays and {scalars} numbers")
            arrays, numbers = args[:inputs] + args[-1:], args[inputs:-1]
            if any(a.dtype != "float32" or a.shape != arrays[0].shape or not a.flags.c_contiguous for a in arrays):
                raise ValueError(f"vms{name} takes {inputs + 1} contiguous fp32 arrays of one shape")
            raw(arrays[0].size, *[a.ctypes.data for a in arrays[:-1]], *numbers, arrays[-1].ctypes.data, _VML_MODE)
    _vector_math[key] = function
    return function
