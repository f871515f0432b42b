"""The CPU loops that neither numpy, oneMKL nor MLX runs fast everywhere, in C, compiled at first use with the
system's C compiler for this CPU (`-march=native`) into `<home>/native/`, keyed by the source, the compiler and the
CPU (MLX's CPU kernels, cpu_kernels, need a compiler at run time as well):
- `exp_rows`: the softmax's exp over a block of scores with each row's sum taken in the same pass. On the AMD EPYC
  (Zen 3) of the README's "A real AVX2 CPU", oneMKL's vector exp takes its non-Intel path at 1.1-1.6 ns per element
  on one thread and numpy's at 1.6-2.5 ns, against 0.2 ns for a multiply: a third of an attention block's time.
  This loop, vectorized by the compiler (2^y = 2^n p(f) with cpu_kernels' polynomial), takes 0.4-0.6 ns, and with
  the row sums the value product needs no column of ones.
- `attention_rows`: one head's attention over a range of query rows, flash-style: blocks of query rows against
  chunks of keys, the two products by oneMKL's cblas_sgemm (called through its address), the exp between them, so
  a block's scores stay in the core's cache and no Python runs between blocks. With a running row maximum where
  the caller cannot bound the scores.
- `dequantize_rows`: rows of an mx.quantize'd weight (affine, 2-8 bits, each row a little-endian stream of codes, one
  scale and bias per group) back to fp32, so the CPU kernels run quantized layers as fp32 products. MLX's own
  `dequantize` takes 17 ns a weight on this CPU (8 and 4 bits; 38 ns at 6), as long as the product it feeds at
  SD3's 1178 rows; this loop takes under 1 ns.
- `channel_sums`, `affine_rows`: GroupNorm's two passes over channels-last rows (the per-channel sums of x and x^2 in
  fp64; the affine map with the SiLU after it, its exp by the same polynomial), where numpy took two and six passes
  (GroupNorm + SiLU of 512x512x128 123 -> 60 ms, an SD 1.5 VAE decode 13.98 -> 13.18 s: tools/bench_group_norm.py).

Where no compiler works (or SILICON_DIFFUSION_NATIVE=0) all are None: cpu_attention keeps oneMKL's or numpy's exp
with the column of ones, cpu_rowwise its numpy passes; without oneMKL `attention_rows` is None and the blocks run from
Python.
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
#include <math.h>
#include <stdint.h>
#include <string.h>

/* 2^y, y clamped to [-126, 127]: 2^y = 2^n p(f), n = round(y), f = y - n in [-0.5, 0.5]. */
static inline float exp2_poly(float y) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding, then subtracting it rounds to an integer */
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
    return p * scale;
}

#define LOG2E 1.44269504088896341f

/* exp(score - shift) of a row in place, its sum returned. */
static float exp_row(float *s, long cols, float shift) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (long i = 0; i < cols; i++) {
        s[i] = exp2_poly((s[i] - shift) * LOG2E);
        sum += s[i];
    }
    return sum;
}

/* GroupNorm's statistics: per channel, the sums of x and x^2 over `rows` runs of `width` floats (`stride` apart),
   the channels cycling along a run (width a multiple of `channels`), added in fp64 to sums[0, channels) and
   sums[channels, 2 channels). */
void channel_sums(const float *x, long rows, long width, long stride, long channels, double *sums) {
    double *squares = sums + channels;
    for (long r = 0; r < rows; r++)
        for (long at = 0; at < width; at += channels) {
            const float *v = x + r * stride + at;
            #pragma omp simd
            for (long c = 0; c < channels; c++) {
                double d = v[c];
                sums[c] += d;
                squares[c] += d * d;
            }
        }
}

/* GroupNorm's affine map per channel, then SiLU (y / (1 + e^-y)) where `silu`: out = x * scale[c] + shift[c] over
   `rows` runs of `width` floats (x_stride and out_stride apart), the channels cycling along a run. */
void affine_rows(const float *x, long x_stride, float *out, long out_stride, long rows, long width, long channels,
                 const float *scale, const float *shift, int silu) {
    for (long r = 0; r < rows; r++)
        for (long at = 0; at < width; at += channels) {
            const float *v = x + r * x_stride + at;
            float *o = out + r * out_stride + at;
            if (silu) {
                #pragma omp simd
                for (long c = 0; c < channels; c++) {
                    float y = v[c] * scale[c] + shift[c];
                    o[c] = y / (1.0f + exp2_poly(-y * LOG2E));
                }
            } else {
                #pragma omp simd
                for (long c = 0; c < channels; c++)
                    o[c] = v[c] * scale[c] + shift[c];
            }
        }
}

/* Each of `rows` rows of `cols` fp32 scores (`stride` floats apart) becomes exp(score) in place, and sums[r] its sum. */
void exp_rows(float *scores, long rows, long cols, long stride, float *sums) {
    for (long r = 0; r < rows; r++)
        sums[r] = exp_row(scores + r * stride, cols, 0.0f);
}

/* Rows [r0, r1) of a weight quantized as mx.quantize does: each row row_bytes bytes, a little-endian stream of
   `bits`-bit codes; one fp32 scale and bias per `group` codes -> out, `cols` fp32 a row. */
void dequantize_rows(const uint8_t *packed, long row_bytes, const float *scales, const float *biases, long r0, long r1,
                     long cols, int bits, long group, float *out) {
    long groups = cols / group;
    unsigned mask = (1u << bits) - 1u;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = packed + r * row_bytes;
        const float *scale = scales + r * groups, *bias = biases + r * groups;
        float *o = out + r * cols;
        for (long g = 0; g < groups; g++) {
            float s = scale[g], b = bias[g];
            float *og = o + g * group;
            if (bits == 8) {
                const uint8_t *p = row + g * group;
                #pragma omp simd
                for (long i = 0; i < group; i++)
                    og[i] = (float) p[i] * s + b;
            } else if (bits == 4) {
                const uint8_t *p = row + g * group / 2;
                #pragma omp simd
                for (long i = 0; i < group / 2; i++) {
                    og[2 * i] = (float) (p[i] & 15u) * s + b;
                    og[2 * i + 1] = (float) (p[i] >> 4) * s + b;
                }
            } else {
                for (long i = 0; i < group; i++) {
                    long bit = (g * group + i) * bits, byte = bit >> 3;
                    unsigned v = row[byte] | (byte + 1 < row_bytes ? (unsigned) row[byte + 1] << 8 : 0u);
                    og[i] = (float) ((v >> (bit & 7)) & mask) * s + b;
                }
            }
        }
    }
}

typedef void (*sgemm_t)(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *,
                        int);
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* out (n_q rows, ldo floats apart, d_v wide) = softmax(scale q k^T) v for one head's n_q queries and n_kv keys (rows
   ldq, ldk, ldv floats apart), a block of block_q query rows against a chunk of `chunk` keys at a time, so that the
   block's scores stay in the core's cache between the two products (cblas_sgemm, by pointer) and the exp. With
   `shift`, each row's running maximum is subtracted (rescaling what the row holds when it grows); without it the
   caller has bounded the scores within exp's range. work: block_q * (chunk rounded up to 16) + block_q * (d_v + 2)
   floats. */
void attention_rows(sgemm_t sgemm, const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                    float *out, long ldo, long n_q, long n_kv, long d, long d_v, float scale, int shift,
                    long block_q, long chunk, float *work) {
    long stride = (chunk + 15) / 16 * 16;
    float *s = work, *acc = work + block_q * stride, *sums = acc + block_q * d_v, *maxima = sums + block_q;
    for (long r = 0; r < n_q; r += block_q) {
        long m = n_q - r < block_q ? n_q - r : block_q;
        for (long i = 0; i < m; i++) {
            sums[i] = 0.0f;
            maxima[i] = -INFINITY;
        }
        for (long c = 0; c < n_kv; c += chunk) {
            long w = n_kv - c < chunk ? n_kv - c : chunk;
            sgemm(ROW_MAJOR, NO_TRANS, TRANS, m, w, d, scale, q + r * ldq, ldq, k + c * ldk, ldk, 0.0f, s, stride);
            for (long i = 0; i < m; i++) {
                float *row = s + i * stride, by = 0.0f;
                if (shift) {
                    float top = maxima[i];
                    for (long j = 0; j < w; j++)
                        top = row[j] > top ? row[j] : top;
                    if (top > maxima[i] && c > 0) {
                        float factor = expf(maxima[i] - top);
                        sums[i] *= factor;
                        for (long j = 0; j < d_v; j++)
                            acc[i * d_v + j] *= factor;
                    }
                    maxima[i] = top;
                    by = top;
                }
                sums[i] += exp_row(row, w, by);
            }
            sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, d_v, w, 1.0f, s, stride, v + c * ldv, ldv, c > 0 ? 1.0f : 0.0f,
                  acc, d_v);
        }
        for (long i = 0; i < m; i++) {
            float inverse = 1.0f / sums[i];
            for (long j = 0; j < d_v; j++)
                out[(r + i) * ldo + j] = acc[i * d_v + j] * inverse;
        }
    }
}
"""

_lock = threading.Lock()
_library = None  # the loaded functions by name, False once building failed
_driver = None  # attention_rows bound to oneMKL's sgemm, False where it cannot run


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
        done = subprocess.run([compiler, *_flags(), str(source), "-o", str(built), "-lm"], capture_output=True,
                              timeout=120)
        if done.returncode != 0 or not built.is_file():
            return None
        os.replace(built, library)  # complete or absent: a concurrent or interrupted build never leaves half a file
    return library


def _load(library: Path) -> Optional[dict]:
    loaded = ctypes.CDLL(str(library))
    raw_exp, raw_attention, raw_dequantize = loaded.exp_rows, loaded.attention_rows, loaded.dequantize_rows
    pointer, integer = ctypes.c_void_p, ctypes.c_long
    raw_dequantize.argtypes = [pointer, integer, pointer, pointer] + [integer] * 3 + [ctypes.c_int, integer, pointer]
    raw_dequantize.restype = None
    raw_exp.argtypes = [pointer, integer, integer, integer, pointer]
    raw_attention.argtypes = [pointer] * 2 + [integer, pointer, integer, pointer, integer, pointer] + [integer] * 5 + [
        ctypes.c_float, ctypes.c_int, integer, integer, pointer]
    raw_exp.restype = raw_attention.restype = None

    def exp_rows(scores: np.ndarray, sums: np.ndarray) -> None:
        """scores (rows, cols) fp32, each row's elements adjacent: exp in place; sums (rows,) fp32 <- each row's sum."""
        stride = blas.rows_apart(scores, "scores")
        rows, cols = scores.shape
        if sums.dtype != np.float32 or sums.shape != (rows,) or not sums.flags.c_contiguous:
            raise ValueError(f"exp_rows needs a contiguous fp32 sums array of {rows} rows")
        raw_exp(scores.ctypes.data, rows, cols, stride, sums.ctypes.data)

    # A wrong build (a compiler that mis-vectorizes, a stale file) must not reach the attention: check it first.
    probe = np.linspace(-80, 80, 2 * 37, dtype=np.float32).reshape(2, 37)
    sums = np.empty(2, np.float32)
    expected = np.exp(probe.astype(np.float64))
    exp_rows(probe, sums)
    if not (np.allclose(probe, expected, rtol=1e-5, atol=0) and np.allclose(sums, expected.sum(1), rtol=1e-5)):
        return None
    library = {"exp_rows": exp_rows, "attention_rows": raw_attention}
    dequantize = _checked_dequantize(raw_dequantize)
    if dequantize is not None:
        library["dequantize_rows"] = dequantize
    library.update(_checked_group_norm(loaded.channel_sums, loaded.affine_rows))
    return library


def _runs(a: np.ndarray, name: str) -> tuple:
    """(rows, width, stride) of an fp32 array (rows, ..., C) whose rows' elements are adjacent (rows may lie any
    number of floats apart: the interior of a padded buffer); ValueError naming it otherwise."""
    adjacent = a.dtype == np.float32 and a.ndim >= 2 and a.strides[0] % 4 == 0
    step = 4
    for size, stride in zip(reversed(a.shape[1:]), reversed(a.strides[1:])):
        adjacent = adjacent and (size == 1 or stride == step)
        step *= size
    if not adjacent:
        raise ValueError(f"{name} must be fp32 (rows, ..., channels) with each row's elements adjacent")
    width = step // 4
    return a.shape[0], width, max(a.strides[0] // 4, width)


def _checked_group_norm(raw_sums, raw_affine) -> dict:
    pointer, integer = ctypes.c_void_p, ctypes.c_long
    raw_sums.argtypes = [pointer] + [integer] * 4 + [pointer]
    raw_affine.argtypes = [pointer, integer, pointer] + [integer] * 4 + [pointer, pointer, ctypes.c_int]
    raw_sums.restype = raw_affine.restype = None

    def _channel_vector(v: np.ndarray, channels: int, dtype, name: str) -> None:
        if v.dtype != dtype or v.shape != (channels,) or not v.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous {np.dtype(dtype).name} vector of {channels} channels")

    def channel_sums(x: np.ndarray, sums: np.ndarray) -> None:
        """sums (2, C) fp64 += per channel, the sums of x and x^2 over x (rows, ..., C) fp32 (rows' elements
        adjacent, rows any stride apart)."""
        rows, width, stride = _runs(x, "x")
        channels = x.shape[-1]
        if sums.dtype != np.float64 or sums.shape != (2, channels) or not sums.flags.c_contiguous:
            raise ValueError(f"sums must be a contiguous fp64 (2, {channels}) array")
        raw_sums(x.ctypes.data, rows, width, stride, channels, sums.ctypes.data)

    def affine_rows(x: np.ndarray, out: np.ndarray, scale: np.ndarray, shift: np.ndarray, silu: bool) -> None:
        """out <- x * scale + shift per channel, then SiLU if asked: x and out fp32 (rows, ..., C) of one shape
        (rows' elements adjacent, rows any stride apart; out may be x), scale and shift contiguous fp32 (C,)."""
        (rows, width, x_stride), (_, _, out_stride) = _runs(x, "x"), _runs(out, "out")
        channels = x.shape[-1]
        if out.shape != x.shape:
            raise ValueError(f"affine_rows: out {out.shape} is not x's shape {x.shape}")
        for v, name in ((scale, "scale"), (shift, "shift")):
            _channel_vector(v, channels, np.float32, name)
        raw_affine(x.ctypes.data, x_stride, out.ctypes.data, out_stride, rows, width, channels, scale.ctypes.data,
                   shift.ctypes.data, int(bool(silu)))

    # Checked once against numpy (rows apart, SiLU's tails at +-90) before any GroupNorm runs through them.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 4, 3, 8)) * 30).astype(np.float32)[:, 1:]  # rows 96 floats apart, 72 wide
    sums = np.zeros((2, 8))
    channel_sums(x, sums)
    wide = x.astype(np.float64).reshape(-1, 8)
    scale, shift = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    y = wide * scale + shift
    with np.errstate(over="ignore"):
        silu = y / (1 + np.exp(-y))
    ok = np.allclose(sums, [wide.sum(0), (wide * wide).sum(0)], rtol=1e-9)
    for activated, expected in ((False, y), (True, silu)):
        out = np.full(x.shape, np.nan, np.float32)
        affine_rows(x, out, scale, shift, activated)
        ok = ok and np.allclose(out.reshape(-1, 8), expected, rtol=1e-5, atol=1e-6)
    return {"channel_sums": channel_sums, "affine_rows": affine_rows} if ok else {}


def _checked_dequantize(raw) -> Optional[Callable]:
    def dequantize_rows(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int,
                        out: np.ndarray, r0: int = 0, r1: Optional[int] = None) -> None:
        """out[r0:r1] <- rows r0..r1 of a quantized weight: packed (N, row bytes) uint8 (mx.quantize's uint32 words
        viewed as bytes), scales and biases (N, K / group) fp32, out (N, K) fp32, all contiguous."""
        rows, cols = out.shape
        r1 = rows if r1 is None else r1
        if (packed.dtype != np.uint8 or packed.shape[0] != rows or packed.shape[1] * 8 != cols * bits
                or scales.shape != (rows, cols // group) or biases.shape != scales.shape or cols % group
                or not 0 <= r0 <= r1 <= rows or bits not in (2, 3, 4, 5, 6, 8) or group % 8
                or any(a.dtype != np.float32 or not a.flags.c_contiguous for a in (scales, biases, out))
                or not packed.flags.c_contiguous):
            raise ValueError(f"dequantize_rows: {bits}-bit codes {packed.shape} {packed.dtype}, groups of {group}, "
                             f"scales {scales.shape}, out {out.shape} {out.dtype}")
        raw(packed.ctypes.data, packed.shape[1], scales.ctypes.data, biases.ctypes.data, r0, r1, cols, bits, group,
            out.ctypes.data)

    # Checked once against numpy's reading of the same codes for every width before any model runs through it.
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 6, 8):
        codes = rng.integers(0, 1 << bits, (3, 64))
        stream = ((codes[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(3, -1)
        packed = np.packbits(stream, axis=1, bitorder="little")
        scales, biases = (rng.standard_normal((3, 2)).astype(np.float32) for _ in range(2))
        expected = (codes.reshape(3, 2, 32) * scales[..., None] + biases[..., None]).reshape(3, 64)
        out = np.full((3, 64), np.nan, np.float32)
        dequantize_rows(packed, scales, biases, bits, 32, out)
        if not np.allclose(out, expected, rtol=1e-6, atol=1e-6):
            return None
    return dequantize_rows


def _loaded() -> dict:
    """The compiled functions by name (built or loaded at the first call), empty where they cannot be had."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                _library = False
                if os.environ.get("SILICON_DIFFUSION_NATIVE", "1") != "0":
                    try:
                        library = _build()
                        _library = (_load(library) if library else None) or False
                    except (OSError, subprocess.SubprocessError, ValueError):
                        _library = False
    return _library or {}


def exp_rows() -> Optional[Callable]:
    """f(scores, sums): exp of an fp32 (rows, cols) block in place and each row's sum into sums, by the compiled
    loop (it releases the GIL, so cpu_pool's workers run it side by side); None where it cannot be built here."""
    return _loaded().get("exp_rows")


def dequantize_rows() -> Optional[Callable]:
    """f(packed, scales, biases, bits, group, out, r0=0, r1=None): rows of an mx.quantize'd weight as fp32, by the
    compiled loop (it releases the GIL: workers run it side by side); None where it cannot be built here."""
    return _loaded().get("dequantize_rows")


def channel_sums() -> Optional[Callable]:
    """f(x, sums): GroupNorm's per-channel sums of x and x^2 (fp64) over fp32 rows (rows, ..., C), by the compiled
    loop (it releases the GIL: workers run it side by side); None where it cannot be built here."""
    return _loaded().get("channel_sums")


def affine_rows() -> Optional[Callable]:
    """f(x, out, scale, shift, silu): GroupNorm's per-channel affine map, then SiLU if asked, over fp32 rows
    (rows, ..., C) into out, in one pass by the compiled loop (exp by exp_rows' polynomial); None where it cannot
    be built here."""
    return _loaded().get("affine_rows")


def attention_work(block_q: int, chunk: int, d_v: int) -> int:
    """The floats of work space `attention_rows` needs for these blocks and value width."""
    return block_q * (-(-chunk // 16) * 16) + block_q * (d_v + 2)


def _bind(raw, sgemm: int) -> Callable:
    def attention_rows(q, k, v, out, scale: float, shift: bool, block_q: int, chunk: int, work: np.ndarray) -> None:
        """out (n_q, d_v) <- softmax(scale q k^T) v for one head's q (n_q, d), k (n_kv, d), v (n_kv, d_v): fp32
        matrices, rows any number of floats apart, elements within a row adjacent. Blocks of block_q query rows
        against chunks of `chunk` keys; with `shift`, each row's running maximum is subtracted, else the caller
        has bounded every score within exp's range. work: a contiguous fp32 array of attention_work(...) floats."""
        ld = [blas.rows_apart(m, name) for m, name in ((q, "q"), (k, "k"), (v, "v"), (out, "out"))]
        (n_q, d), (n_kv, d_v) = q.shape, v.shape
        if k.shape != (n_kv, d) or out.shape != (n_q, d_v):
            raise ValueError(f"attention_rows shapes q {q.shape}, k {k.shape}, v {v.shape} -> out {out.shape}")
        if (work.dtype != np.float32 or not work.flags.c_contiguous
                or work.size < attention_work(block_q, chunk, d_v) or min(block_q, chunk) < 1):
            raise ValueError(f"attention_rows needs {attention_work(block_q, chunk, d_v)} contiguous fp32 floats "
                             "of work space and blocks of at least one row and key")
        raw(sgemm, q.ctypes.data, ld[0], k.ctypes.data, ld[1], v.ctypes.data, ld[2], out.ctypes.data, ld[3], n_q,
            n_kv, d, d_v, scale, int(bool(shift)), block_q, chunk, work.ctypes.data)

    # Checked once against numpy on a ragged call in both modes before any model's attention runs through it.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, 24)).astype(np.float32) for n in (21, 37, 37))
    s = (q.astype(np.float64) @ k.T.astype(np.float64)) * 0.5
    p = np.exp(s - s.max(1, keepdims=True))
    expected = (p / p.sum(1, keepdims=True)) @ v
    work = np.empty(attention_work(8, 12, 24), np.float32)
    for shift in (False, True):
        out = np.full((21, 24), np.nan, np.float32)
        attention_rows(q, k, v, out, 0.5, shift, 8, 12, work)
        if not np.allclose(out, expected, rtol=0, atol=1e-4):
            return None
    return attention_rows


def attention_rows() -> Optional[Callable]:
    """f(q, k, v, out, scale, shift, block_q, chunk, work): one head's attention over a range of query rows in C,
    the products by oneMKL's cblas_sgemm, the exp between them; None without a compiled library or without oneMKL
    (cpu_attention then runs its blocks from Python)."""
    global _driver
    if _driver is None:
        raw, sgemm = _loaded().get("attention_rows"), blas.sgemm_address()
        with _lock:
            _driver = (_bind(raw, sgemm) if raw and sgemm else None) or False
    return _driver or None
