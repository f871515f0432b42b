"""Vectorized CPU versions of MLX's scalar exp-based ops: exp2, SiLU, GELU (exact and tanh), softmax attention.

Also `affine_silu`, SiLU(x * scale + shift) in one pass (a GroupNorm applied and activated), and
`squared_deviation`, for the VAE's row-band decoder (vae_bands.py).

MLX's CPU transcendental ops (exp, sigmoid, erf) are scalar and single-threaded: 10-50 ns per
element here, against ~0.2 ns for an add. In attention, exp over the scores costs about 5x
both matmuls; in a UNet step, SiLU and GELU cost about as much as all the convolutions. These
kernels build everything from 2^x evaluated by compiled (vectorized) polynomial kernels,
accurate to ~1e-7 relative, with analytic gradients. layers.py uses them when `available()`
(CPU device, and MLX's CPU compiler works); on a GPU MLX's own ops are used.
"""
from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

_LOG2E = 1.4426950408889634
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding then subtracting it rounds an fp32 to an integer
# 2^f on [-0.5, 0.5], relative error < 1e-7 (fit minimizing the relative error).
_EXP2_COEFFS = (0.6931470036506653, 0.24022242426872253, 0.0555073544383049,
                0.009671472944319248, 0.0013264167355373502)
# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t P(t) exp(-z^2), t = 1 / (1 + p z), |error| < 1.5e-7.
_ERF_P = 0.3275911
_ERF_COEFFS = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
# tanh-GELU as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): exp(-2u) = 2^(x (K + K A x^2)).
_GELU_TANH_K = -2 * math.sqrt(2 / math.pi) * _LOG2E
_GELU_TANH_A = 0.044715
_CHUNK_SCORES = 1 << 19  # attention scores computed at once on the CPU (2 MiB in fp32, cache-sized)
_CHUNK_ELEMENTS = 1 << 20  # activation elements per chunk under eager_chunks (SD's sizes are multiples of it)


# MLX fuses a compiled graph into vectorized loops only while no intermediate is used twice,
# hence the fraction (used five times by the polynomial) is computed by its own kernel.
@mx.compile
def _exp2_fraction(y):
    return y - ((y + _ROUND_MAGIC) - _ROUND_MAGIC)


@mx.compile
def _exp2_from_fraction(f, y):
    c1, c2, c3, c4, c5 = _EXP2_COEFFS
    p = ((((c5 * f + c4) * f + c3) * f + c2) * f + c1) * f + 1.0
    n = ((y + _ROUND_MAGIC) - _ROUND_MAGIC).astype(mx.int32)
    bits = (mx.clip(n, -126, 127) + 127) << 23  # 2^n built in the exponent field
    return p * mx.view(bits, mx.float32)


@mx.compile
def _silu_from_exp(x, e):
    return x / (1 + e)


@mx.compile
def _erf_t(x):
    return 1 / (1 + (_ERF_P / math.sqrt(2.0)) * mx.abs(x))


@mx.compile
def _erf_poly(t):
    a1, a2, a3, a4, a5 = _ERF_COEFFS
    return t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))


@mx.compile
def _gelu_from_parts(x, poly, e):
    # x/2 (1 + erf(x/sqrt2)) = relu(x) - |x|/2 (1 - erf(|x|/sqrt2))
    return mx.maximum(x, 0) - 0.5 * mx.abs(x) * poly * e


# tanh-GELU as x / (1 + 2^y): three flat kernels, the first two recomputing y (an FMA and two products)
# rather than reading it back, 2^round(y) built in the exponent field (about 20% faster here than calling
# the exp2 kernels from a compiled function, whose fused graph MLX splits into more passes). y is clipped to [-126, 126] (the result is x or 0 beyond |y| ~ 25),
# which keeps the exponent field valid and |x| near fp32's limit (x^2 = inf) finite.
def _gelu_tanh_exponent(x):
    return mx.clip(x * (_GELU_TANH_K + (_GELU_TANH_K * _GELU_TANH_A) * (x * x)), -126.0, 126.0)


@mx.compile
def _gelu_tanh_fraction(x):
    y = _gelu_tanh_exponent(x)
    return y - ((y + _ROUND_MAGIC) - _ROUND_MAGIC)


@mx.compile
def _gelu_tanh_scale_bits(x):
    y = _gelu_tanh_exponent(x)
    return (((y + _ROUND_MAGIC) - _ROUND_MAGIC).astype(mx.int32) + 127) << 23


@mx.compile
def _gelu_tanh_from_parts(x, f, scale):
    c1, c2, c3, c4, c5 = _EXP2_COEFFS
    p = ((((c5 * f + c4) * f + c3) * f + c2) * f + c1) * f + 1.0
    return x / (1 + p * scale)


# SiLU(x * scale + shift) without writing the affine result: each kernel recomputes it (an FMA)
# rather than reading it back, and the exp2 fraction again gets a kernel of its own.
@mx.compile
def _affine_exp2_fraction(x, scale, shift):
    y = (x.astype(mx.float32) * scale + shift) * -_LOG2E
    return y - ((y + _ROUND_MAGIC) - _ROUND_MAGIC)


@mx.compile
def _affine_silu_from_fraction(f, x, scale, shift):
    a = x.astype(mx.float32) * scale + shift
    return (a / (1 + _exp2_from_fraction(f, a * -_LOG2E))).astype(x.dtype)


@mx.compile
def _squared_deviation(x, mean):
    return mx.square(x.astype(mx.float32) - mean)


_compiled_kernels_work: Optional[bool] = None


def available() -> bool:
    """True on the CPU device when MLX can compile the kernels (it needs a C++ compiler at run time)."""
    global _compiled_kernels_work
    if mx.default_device() == mx.gpu:
        return False
    if _compiled_kernels_work is None:
        try:
            probe = mx.array([-1.0, 0.0])
            mx.eval(_exp2_from_fraction(_exp2_fraction(probe), probe))
            _compiled_kernels_work = True
        except RuntimeError:
            _compiled_kernels_work = False
    return _compiled_kernels_work


# The kernels round and bit-cast, which autodiff would differentiate to zero, so each public
# function carries its analytic gradient (the UNet and VAE are also trained, see backend/embedded).
def _single(primals):
    # A one-argument custom function's vjp receives its primal as is, not in a tuple.
    return primals[0] if isinstance(primals, (list, tuple)) else primals


@mx.custom_function
def exp2(y: mx.array) -> mx.array:
    """2**y for fp32 y, by the compiled kernels; results are clamped to [2**-126, 2**127]."""
    return _exp2_from_fraction(_exp2_fraction(y), y)


@exp2.vjp
def _exp2_vjp(primals, cotangent, output):
    return (cotangent * output * math.log(2.0),)


@mx.custom_function
def _silu32(x):
    return _silu_from_exp(x, exp2(x * -_LOG2E))


@_silu32.vjp
def _silu32_vjp(primals, cotangent, output):
    x = _single(primals)
    sig = 1 / (1 + exp2(x * -_LOG2E))
    return (cotangent * sig * (1 + x * (1 - sig)),)


@mx.custom_function
def _gelu32(x):
    return _gelu_from_parts(x, _erf_poly(_erf_t(x)), exp2((x * x) * (-0.5 * _LOG2E)))


@_gelu32.vjp
def _gelu32_vjp(primals, cotangent, output):
    x = _single(primals)
    gauss = exp2((x * x) * (-0.5 * _LOG2E))  # exp(-x^2 / 2)
    tail = _erf_poly(_erf_t(x)) * gauss  # 1 - erf(|x| / sqrt 2)
    cdf = mx.where(x >= 0, 1 - 0.5 * tail, 0.5 * tail)
    return (cotangent * (cdf + x * gauss * (1 / math.sqrt(2 * math.pi))),)


@mx.custom_function
def _gelu_tanh32(x):
    return _gelu_tanh_from_parts(x, _gelu_tanh_fraction(x), mx.view(_gelu_tanh_scale_bits(x), mx.float32))


@_gelu_tanh32.vjp
def _gelu_tanh32_vjp(primals, cotangent, output):
    x = _single(primals)
    sig = 1 / (1 + exp2(_gelu_tanh_exponent(x)))  # sigmoid(2u)
    du2 = (-_GELU_TANH_K / _LOG2E) * (1 + (3 * _GELU_TANH_A) * (x * x))  # d(2u)/dx
    return (cotangent * (sig + x * sig * (1 - sig) * du2),)


def _sum_to(x: mx.array, shape) -> mx.array:
    """Reduce a broadcast result back to `shape` (the gradient of a broadcast operand)."""
    lead = x.ndim - len(shape)
    axes = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1]
    return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x


@mx.custom_function
def affine_silu(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    """SiLU(x * scale + shift) computed in fp32, in x's dtype; scale and shift fp32, broadcast to x."""
    return _affine_silu_from_fraction(_affine_exp2_fraction(x, scale, shift), x, scale, shift)


@affine_silu.vjp
def _affine_silu_vjp(primals, cotangent, output):
    x, scale, shift = primals
    a = x.astype(mx.float32) * scale + shift
    sig = 1 / (1 + exp2(a * -_LOG2E))
    da = cotangent.astype(mx.float32) * sig * (1 + a * (1 - sig))
    return (da * scale).astype(x.dtype), _sum_to(da * x, scale.shape), _sum_to(da, shift.shape)


def squared_deviation(x: mx.array, mean: mx.array) -> mx.array:
    """(x - mean)^2 in fp32, in one pass."""
    return _squared_deviation(x, mean)


class eager_chunks:
    """Inference only (no autodiff or mx.compile around it): within it, SiLU and GELU of large arrays run
    _CHUNK_ELEMENTS at a time, each chunk evaluated before the next, so only one chunk's fp32
    intermediates exist at once. A lazy graph keeps them all: a 64x64 GEGLU at fp16 peaked at 11x its output."""
    active = False

    def __enter__(self):
        self._before, eager_chunks.active = eager_chunks.active, True
        return self

    def __exit__(self, *exc):
        eager_chunks.active = self._before


def _in_chunks(fn, x: mx.array) -> mx.array:
    if not eager_chunks.active or x.size <= _CHUNK_ELEMENTS:
        return fn(x)
    flat = x.reshape(-1)
    parts = []
    for i in range(0, x.size, _CHUNK_ELEMENTS):
        parts.append(fn(flat[i:i + _CHUNK_ELEMENTS]))
        mx.eval(parts[-1])
    return mx.concatenate(parts).reshape(x.shape)


def silu(x: mx.array) -> mx.array:
    return _in_chunks(lambda part: _silu32(part.astype(mx.float32)).astype(x.dtype), x)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as torch's F.gelu."""
    return _in_chunks(lambda part: _gelu32(part.astype(mx.float32)).astype(x.dtype), x)


def gelu_tanh(x: mx.array) -> mx.array:
    """tanh-approximated GELU, as torch's F.gelu(approximate="tanh"), computed in fp32."""
    return _in_chunks(lambda part: _gelu_tanh32(part.astype(mx.float32)).astype(x.dtype), x)


def attention_chunk_scores(bh: int, n_q: int, n_kv: int) -> int:
    """The most scores (elements, fp32) one chunk of `attention` holds, for bh = batch x heads."""
    rows = max(1, _CHUNK_SCORES // n_kv)
    if rows >= n_q:
        return min(bh, rows // n_q) * n_q * n_kv
    return rows * n_kv


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T scale) v in fp32, over chunks of query rows whose scores stay in cache."""
    batch, heads, n_q, _ = q.shape
    n_kv, d_v = k.shape[2], v.shape[3]
    bh = batch * heads
    q = (q.astype(mx.float32) * (scale * _LOG2E)).reshape(bh, n_q, -1)  # scores in log2 units
    k_t = k.astype(mx.float32).reshape(bh, n_kv, -1).swapaxes(1, 2)
    # A column of ones makes the value matmul also return each row's softmax denominator.
    v1 = mx.concatenate([v.astype(mx.float32).reshape(bh, n_kv, d_v),
                         mx.ones((bh, n_kv, 1), mx.float32)], axis=-1)
    rows = max(1, _CHUNK_SCORES // n_kv)

    def chunk(heads_slice, rows_slice):
        s = q[heads_slice, rows_slice] @ k_t[heads_slice]
        p = exp2(s - mx.stop_gradient(s.max(axis=-1, keepdims=True)))  # the result is invariant to it
        o = p @ v1[heads_slice]
        return o[..., :d_v] / o[..., d_v:]

    if rows >= n_q:  # whole heads fit in a chunk: take several at once
        group = rows // n_q
        out = mx.concatenate([chunk(slice(h, h + group), slice(None)) for h in range(0, bh, group)], axis=0)
    else:
        out = mx.concatenate([
            mx.concatenate([chunk(slice(h, h + 1), slice(r, r + rows)) for r in range(0, n_q, rows)], axis=1)
            for h in range(bh)], axis=0)
    return out.reshape(batch, heads, n_q, d_v)
