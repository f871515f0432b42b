"""Row-wise inference kernels for the CPU in numpy, on every core: GEGLU, GELU, tanh-GELU and CLIP's quick GELU (each
with its projection's bias folded in), LayerNorm, and GroupNorm with an optional SiLU.

MLX's CPU backend computes these one op at a time on one thread (its reductions scalar): an SD 1.5 UNet step at
512x512 spent 0.6 s in GEGLU's GELU and 0.55 s in its norms where torch spends 0.1 s on all of them. Here rows
are cut into cache-sized blocks shared among cpu_pool's workers, each block taken through every op of the
kernel while it is in cache, in fp32 (fp16 inputs are cast, results cast back). Only for inference (under
cpu_kernels.eager_chunks): the inputs are evaluated and the result is a new array, so no gradient flows.
layers.py picks them; training and the GPU keep MLX's ops.
"""
from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import numpy as np

from backend import blas
from backend.engines.mlx import cpu_native, cpu_pool

# erfc(z) = t P(t) exp(-z^2), t = 1 / (1 + p z) (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7), for z = |x|/sqrt2.
_ERF_P = np.float32(0.3275911 / math.sqrt(2.0))
_ERF_COEFFS = tuple(np.float32(0.5 * c) for c in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_GELU_TANH_K = np.float32(-2 * math.sqrt(2 / math.pi))  # tanh-GELU = x / (1 + exp(K (x + A x^3)))
_GELU_TANH_A = np.float32(0.044715)
_QUICK_GELU_K = np.float32(-1.702)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


def _gelu_into(g: np.ndarray, out: np.ndarray, a: np.ndarray, t: np.ndarray) -> None:
    """out = GELU(g) (exact, erf) without oneMKL: relu(g) - |g|/2 erfc(|g|/sqrt2) by a polynomial; a and t are
    scratch of g's shape."""
    np.abs(g, out=a)
    np.multiply(a, _ERF_P, out=t)
    t += 1
    np.reciprocal(t, out=t)
    c1, c2, c3, c4, c5 = _ERF_COEFFS
    np.multiply(t, c5, out=out)
    for c in (c4, c3, c2, c1):
        out += c
        out *= t
    np.multiply(g, g, out=t)
    t *= np.float32(-0.5)
    np.exp(t, out=t)
    out *= t
    out *= a  # |g|/2 erfc(|g|/sqrt2) (the 1/2 is in the coefficients)
    np.maximum(g, 0, out=t)
    np.subtract(t, out, out=out)


def _gelu_by_cdf_into(g: np.ndarray, out: np.ndarray, cdf) -> None:
    """out = GELU(g) = g Phi(g), Phi the normal CDF (torch's g (1 + erf(g / sqrt2)) / 2), with oneMKL's vector
    CdfNorm: two passes instead of torch's formula's five (2x faster here), and no cancellation in 1 + erf for
    negative g (relative error 2e-7 against 6e-4 in the tail)."""
    cdf(g, out)
    out *= g


def _exact_gelu_into(g: np.ndarray, out: np.ndarray, a: np.ndarray, t: np.ndarray, cdf) -> None:
    """out = GELU(g): by oneMKL's normal CDF where `cdf` is it, else by the polynomial (a and t scratch)."""
    if cdf is not None:
        _gelu_by_cdf_into(g, out, cdf)
    else:
        _gelu_into(g, out, a, t)


def geglu(h: mx.array, bias: Optional[mx.array] = None, rows: bool = False):
    """diffusers' GEGLU after its projection: hidden * GELU(gate), (hidden, gate) = split(h + bias) on the last axis.
    With `rows`, the fp32 numpy result as (rows, inner), for a product that follows in numpy (`project`)."""
    keep, views = cpu_pool.as_numpy(h, *([] if bias is None else [bias]))
    hn = _rows(views[0])
    inner = hn.shape[1] // 2
    b_hidden, b_gate = (views[1][:inner], views[1][inner:]) if bias is not None else (None, None)
    out = cpu_pool.empty((hn.shape[0], inner))
    block = cpu_pool.block_rows(inner, 1 << 16)

    cdf = blas.vector_math("CdfNorm")

    def work(share):
        g, a, t = (cpu_pool.empty((block, inner)) for _ in range(3))
        for r0, r1 in share:
            n = r1 - r0
            gate, act = g[:n], out[r0:r1]
            np.add(hn[r0:r1, inner:], b_gate, out=gate) if b_gate is not None else np.copyto(gate, hn[r0:r1, inner:])
            _exact_gelu_into(gate, act, a[:n], t[:n], cdf)
            if b_hidden is not None:
                np.add(hn[r0:r1, :inner], b_hidden, out=gate)
                act *= gate
            else:
                act *= hn[r0:r1, :inner]

    cpu_pool.run(work, cpu_pool.row_shares(hn.shape[0], block))
    del keep
    return out if rows else cpu_pool.to_mlx(out, h.dtype, h.shape[:-1] + (inner,))


def _output(h, hn: np.ndarray, in_place: bool) -> np.ndarray:
    """Where an activation kernel writes: over its input rows hn where the caller hands over its own fp32 numpy
    array h (a 4x-wide activation then needs no second buffer, nor that buffer's page faults), else a new array."""
    if not in_place:
        return cpu_pool.empty(hn.shape)
    if not (isinstance(h, np.ndarray) and h.dtype == np.float32 and h.flags.c_contiguous):
        raise ValueError("in_place needs the caller's own contiguous fp32 numpy rows")
    return hn


#: In-place activations over at most this many elements (a text encoder's MLP) run as a few whole-array oneMKL vector
#: calls in the calling thread, on oneMKL's own threads, instead of blocks on the workers. One process, alternating,
#: inside products_back_to_back: bigG's fc1 (154 x 1280 -> 5120) with its GELU 8.4-8.7 -> 7.9-8.2 ms (its bias
#: written before the product, no longer added by the GELU), CLIP-L's quick GELU over 154 x 3072 0.59 -> 0.30-0.35 ms.
WHOLE_ARRAY_ELEMENTS = 1 << 21


def _whole_array(h, bias, in_place: bool, *functions) -> bool:
    """Whether an activation runs as whole-array oneMKL calls here: in place over the caller's contiguous fp32 numpy
    rows, no bias, small enough, and each of `functions` (blas' oneMKL vector functions) present."""
    return (in_place and bias is None and isinstance(h, np.ndarray) and h.dtype == np.float32
            and h.flags.c_contiguous and h.size <= WHOLE_ARRAY_ELEMENTS and all(f is not None for f in functions))


def gelu(h: mx.array, bias: Optional[mx.array] = None, rows: bool = False, in_place: bool = False):
    """torch's exact (erf) GELU of h + bias (the text encoders of SD 2.x and SDXL's second one); `rows` as in
    geglu. `in_place`: h is fp32 numpy rows the caller gives up, and the result is written over them."""
    keep, views = cpu_pool.as_numpy(h, *([] if bias is None else [bias]))
    hn, b = _rows(views[0]), (views[1] if bias is not None else None)
    out = _output(h, hn, in_place)
    cdf, mul = blas.vector_math("CdfNorm"), blas.vector_math("Mul", inputs=2)
    if _whole_array(h, b, in_place, cdf, mul):
        cdf_values = cpu_pool.empty(hn.shape)
        cdf(hn, cdf_values)
        mul(hn, cdf_values, out)
        return out if rows else cpu_pool.to_mlx(out, mx.float32, h.shape)
    block = cpu_pool.block_rows(hn.shape[1], 1 << 16)

    def work(share):
        g, a, t = (cpu_pool.empty((block, hn.shape[1])) for _ in range(3))
        for r0, r1 in share:
            n, x, dest = r1 - r0, hn[r0:r1], out[r0:r1]
            if b is None and cdf is not None:  # x Phi(x) straight from x (dest may be x)
                cdf(x, g[:n])
                np.multiply(x, g[:n], out=dest)
                continue
            np.add(x, b, out=g[:n]) if b is not None else np.copyto(g[:n], x)
            _exact_gelu_into(g[:n], dest, a[:n], t[:n], cdf)

    cpu_pool.run(work, cpu_pool.row_shares(hn.shape[0], block), hn.size)
    del keep
    return out if rows else cpu_pool.to_mlx(out, h.dtype, h.shape)


def _sigmoid_gated(h: mx.array, bias: Optional[mx.array], exponent_into, rows: bool = False, in_place: bool = False):
    """x / (1 + exp(E(x))) for x = h + bias, where exponent_into(x, e) writes E(x) into e: x sigmoid(-E(x))."""
    keep, views = cpu_pool.as_numpy(h, *([] if bias is None else [bias]))
    hn, b = _rows(views[0]), (views[1] if bias is not None else None)
    out = _output(h, hn, in_place)
    block = cpu_pool.block_rows(hn.shape[1], 1 << 16)

    def work(share):
        t = cpu_pool.empty((block, hn.shape[1]))
        with np.errstate(over="ignore"):  # exp(large) = inf gives x / inf = 0, the limit
            for r0, r1 in share:
                x, e = out[r0:r1], t[:r1 - r0]
                if b is not None:
                    np.add(hn[r0:r1], b, out=x)
                elif not in_place:
                    np.copyto(x, hn[r0:r1])
                exponent_into(x, e)
                np.exp(e, out=e)  # numpy's, here faster than oneMKL's (whose overflow path is slow)
                e += 1
                x /= e

    cpu_pool.run(work, cpu_pool.row_shares(hn.shape[0], block), hn.size)
    del keep
    return out if rows else cpu_pool.to_mlx(out, h.dtype, h.shape)


def _gelu_tanh_exponent(x: np.ndarray, e: np.ndarray) -> None:
    np.multiply(x, x, out=e)
    e *= _GELU_TANH_K * _GELU_TANH_A
    e += _GELU_TANH_K
    e *= x


def gelu_tanh(h: mx.array, bias: Optional[mx.array] = None, rows: bool = False, in_place: bool = False):
    """torch's GELU(approximate="tanh") of h + bias: x / (1 + exp(K (x + A x^3))); `rows` and `in_place` as in
    gelu."""
    return _sigmoid_gated(h, bias, _gelu_tanh_exponent, rows, in_place)


def _quick_gelu_exponent(x: np.ndarray, e: np.ndarray) -> None:
    np.multiply(x, _QUICK_GELU_K, out=e)


def quick_gelu(h: mx.array, bias: Optional[mx.array] = None, rows: bool = False, in_place: bool = False):
    """CLIP's quick GELU of h + bias: x sigmoid(1.702 x) = x / (1 + exp(-1.702 x)); `rows` and `in_place` as in
    gelu."""
    fraction = blas.vector_math("LinearFrac", inputs=2, scalars=4)
    exp, divide = blas.vector_math("Exp"), blas.vector_math("Div", inputs=2)
    if _whole_array(h, bias, in_place, fraction, exp, divide):
        x = _rows(h)
        e = cpu_pool.empty(x.shape)
        fraction(x, x, _QUICK_GELU_K, 0.0, 0.0, 1.0, e)  # -1.702 x
        exp(e, e)
        e += 1
        divide(x, e, x)  # exp's overflow (x < -52) gives x / inf = 0, the limit (LinearFrac would give NaN)
        return x if rows else cpu_pool.to_mlx(x, mx.float32, h.shape)
    return _sigmoid_gated(h, bias, _quick_gelu_exponent, rows, in_place)


#: Fills of fewer elements than this run in the calling thread: a copy is too little work per element to pay for
#: the workers' hand-off (154 x 2304: 0.03 ms here, 0.10-0.17 ms on two workers; 2356 x 4608: 1.7 against 1.0 ms).
FILL_INLINE_ELEMENTS = 1 << 20


def _fill_rows(out: np.ndarray, value: np.ndarray) -> None:
    """out[:] = value (a row broadcast over out's rows), on the workers where out is large."""
    if out.size < FILL_INLINE_ELEMENTS:
        out[...] = value
        return

    def work(share):
        for r0, r1 in share:
            out[r0:r1] = value

    cpu_pool.run(work, cpu_pool.row_shares(out.shape[0], -(-out.shape[0] // cpu_pool.workers())))


def products(x: mx.array, linears: list) -> np.ndarray:
    """x W_i^T + b_i for each (weight, bias or None) in `linears`, side by side in one fp32 numpy (rows, sum N_i)
    array, for a kernel that reads its parts in numpy (SD3's q, k and v for cpu_attention, an activation kernel):
    the biases written on the workers and oneMKL's products (all its threads) accumulating onto them, with no bias
    pass in MLX. x: an MLX array or fp32 numpy rows (..., K)."""
    weights = [w for w, _ in linears]
    biases = [b for _, b in linears if b is not None]
    keep, views = cpu_pool.as_numpy(x, *weights, *biases)
    rows = _rows(views[0])
    w_views, b_views = iter(views[1:1 + len(weights)]), iter(views[1 + len(weights):])
    widths = [w.shape[0] for w in weights]
    out = cpu_pool.empty((rows.shape[0], sum(widths)))
    if biases:
        _fill_rows(out, np.concatenate([next(b_views) if b is not None else np.zeros(n, np.float32)
                                        for (_, b), n in zip(linears, widths)]))
    matmul, first = blas.product(), 0
    for w, n in zip(w_views, widths):
        matmul(rows, w, out[:, first:first + n], b_transposed=True, accumulate=bool(biases))
        first += n
    del keep
    return out


def _product_rows(x: np.ndarray) -> np.ndarray:
    """x (..., K) as a product's rows: (M, K) or (B, n, K) per image, each row's elements adjacent; contiguous x as
    one (M, K) (one product over every image's rows), a copy only where no such view exists."""
    if x.flags.c_contiguous:
        return _rows(x)
    if x.ndim in (2, 3) and x.strides[-1] == x.itemsize:
        return x
    return _rows(np.ascontiguousarray(x))


def project(x, weight: mx.array, bias: Optional[mx.array], shape: tuple, dtype,
            residual: Optional[tuple] = None) -> mx.array:
    """x W^T + bias for fp32 numpy rows x (M, K), or (B, n, K) with rows of any stride (an attention kernel's
    output), or an MLX array (..., K), and a Linear's (N, K) weight, as an MLX array of `shape` and `dtype`: the
    activation, often 4x the block's width, is not copied back into MLX (a 50 MB copy is ~6 ms on one thread
    here), only the product is.
    The output starts as the bias (if any), written on the workers, and oneMKL's product (all its threads)
    accumulates onto it. `residual` (r, gate): r + gate * (x W^T + bias) instead, r of `shape`, gate (B, 1, N) or
    None (a plain residual), applied on the workers (MLX would take two passes on one thread)."""
    extra = [] if residual is None else [a for a in residual if a is not None]
    keep, views = cpu_pool.as_numpy(x, weight, *([] if bias is None else [bias]), *extra)
    x, w, rest = views[0], views[1], iter(views[2:])
    b = next(rest) if bias is not None else None
    r = next(rest).reshape(-1, w.shape[0]) if residual is not None else None
    gate = next(rest).reshape(-1, w.shape[0]) if residual is not None and residual[1] is not None else None
    x = _product_rows(x)
    images = x.shape[0] if x.ndim == 3 else 1
    out = cpu_pool.empty((x.shape[0] * x.shape[1] if x.ndim == 3 else x.shape[0], w.shape[0]))
    if b is not None:
        _fill_rows(out, b)
    matmul = blas.product()
    for part, dest in zip(x if x.ndim == 3 else [x], np.split(out, images)):
        matmul(part, w, dest, b_transposed=True, accumulate=b is not None)
    if r is not None:
        gates = gate.shape[0] if gate is not None else 1
        per_gate, block = out.shape[0] // gates, cpu_pool.block_rows(out.shape[1])
        blocks = [(g, r0, min(r0 + block, (g + 1) * per_gate))  # within one image's rows: one gate each
                  for g in range(gates) for r0 in range(g * per_gate, (g + 1) * per_gate, block)]

        def add(share):
            for g, r0, r1 in share:
                if gate is not None:
                    out[r0:r1] *= gate[g]
                out[r0:r1] += r[r0:r1]

        cpu_pool.run(add, cpu_pool.deal(blocks), out.size)
    del keep
    return cpu_pool.to_mlx(out, dtype, shape)


def rms_norm_heads(per_head: np.ndarray, weight: mx.array, eps: float) -> None:
    """diffusers' RMSNorm over the last axis of an fp32 numpy view (M, heads, d), in place (SD3.5's q/k norms): x
    times rsqrt(mean(x^2) + eps), times the (d,) weight."""
    keep, (w,) = cpu_pool.as_numpy(weight)
    d = per_head.shape[2]

    def work(share):
        for r0, r1 in share:
            h = per_head[r0:r1]
            inv = np.einsum("rhd,rhd->rh", h, h)
            inv *= np.float32(1 / d)
            inv += np.float32(eps)
            np.sqrt(inv, out=inv)
            np.reciprocal(inv, out=inv)
            h *= inv[:, :, None]
            h *= w

    cpu_pool.run(work, cpu_pool.row_shares(per_head.shape[0], cpu_pool.block_rows(per_head[0].size)))
    del keep


#: LayerNorms over fewer elements than this run in the calling thread, in one block: a few light passes per element
#: pay for the workers' hand-off only above ~1M (154 x 1280: 0.36 ms inline, 0.63 ms on two workers; 1232 x 1280:
#: 3.2 against 2.4 ms).
NORM_INLINE_ELEMENTS = 1 << 20


def layer_norm(x: mx.array, weight: Optional[mx.array], bias: Optional[mx.array], eps: float, rows: bool = False):
    """LayerNorm over the last axis of (B, ..., C) x (torch's, biased variance), statistics in fp32; weight and
    bias (C,), or (B, 1, C) per image (SD3's modulation: LN(x) (1 + scale) + shift). With `rows`, the fp32 numpy
    result in x's shape, for products that follow in numpy (`products`)."""
    keep, views = cpu_pool.as_numpy(x, *[a for a in (weight, bias) if a is not None])
    batch, channels = x.shape[0], x.shape[-1]
    rest = iter(views[1:])
    w = next(rest).reshape(-1, channels) if weight is not None else None
    b = next(rest).reshape(-1, channels) if bias is not None else None
    shared = all(a is None or len(a) == 1 for a in (w, b))  # one affine for all images: their rows as one
    per_image = views[0].reshape(1 if shared else batch, -1, channels)
    out = cpu_pool.empty(per_image.shape)
    # Few, large blocks (its numpy calls are many and short), but at least two per worker; below
    # NORM_INLINE_ELEMENTS one block in the calling thread (each numpy call costs ~5 us whatever its size).
    count = per_image.shape[1]
    block = count if x.size < NORM_INLINE_ELEMENTS else \
        max(1, min(cpu_pool.block_rows(channels, 1 << 19), -(-count // (2 * cpu_pool.workers()))))
    averaging = np.full((channels, 1), 1.0 / channels, np.float32)  # row means as a product: 4x numpy's mean

    def work(share):
        for img in range(per_image.shape[0]):
            for r0, r1 in share:
                d, part = out[img, r0:r1], per_image[img, r0:r1]
                np.subtract(part, part @ averaging, out=d)
                var = np.einsum("ij,ij->i", d, d)[:, None]
                var *= np.float32(1.0 / channels)
                var += np.float32(eps)
                d *= 1 / np.sqrt(var)
                if w is not None:
                    d *= w[img % len(w)]
                if b is not None:
                    d += b[img % len(b)]

    cpu_pool.run(work, cpu_pool.row_shares(count, block))
    del keep
    return out.reshape(x.shape) if rows else cpu_pool.to_mlx(out, x.dtype, x.shape)


def _channel_sums(per_image: np.ndarray, block: int) -> np.ndarray:
    """(B, 2, C) fp64 sums of x and x^2 per image and channel of (B, rows, C), fp64 per block on the workers."""
    batch, rows, channels = per_image.shape
    shares = cpu_pool.row_shares(rows, block)
    sums = np.zeros((len(shares), batch, 2, channels), np.float64)
    compiled = cpu_native.channel_sums()

    def work(i):
        square = None if compiled else cpu_pool.empty((block, channels))
        for img in range(batch):
            for r0, r1 in shares[i]:
                part = per_image[img, r0:r1]
                if compiled:
                    compiled(part, sums[i, img])
                    continue
                sums[i, img, 0] += part.sum(axis=0, dtype=np.float64)
                np.multiply(part, part, out=square[:r1 - r0])
                sums[i, img, 1] += square[:r1 - r0].sum(axis=0, dtype=np.float64)

    cpu_pool.run(work, range(len(shares)))
    return sums.sum(axis=0)


def _affine(per_image: np.ndarray, scale: np.ndarray, shift: np.ndarray, silu: bool, block: int,
            out: Optional[np.ndarray] = None) -> np.ndarray:
    """x * scale + shift, then SiLU if asked, for (B, rows, ..., C) x and (B, C) scale and shift, into `out`
    (a new array, or a view of x's shape such as a padded buffer's interior)."""
    batch, rows = per_image.shape[:2]
    out = cpu_pool.empty(per_image.shape) if out is None else out
    compiled = cpu_native.affine_rows()
    scale, shift = (np.ascontiguousarray(v, np.float32) for v in (scale, shift))

    def work(share):
        e = None if compiled else cpu_pool.empty((block,) + per_image.shape[2:])
        with np.errstate(over="ignore"):  # exp(-y) = inf for very negative y: y / inf = -0, SiLU's limit
            for img in range(batch):
                for r0, r1 in share:
                    y = out[img, r0:r1]
                    if compiled:  # one pass instead of numpy's six
                        compiled(per_image[img, r0:r1], y, scale[img], shift[img], silu)
                        continue
                    np.multiply(per_image[img, r0:r1], scale[img], out=y)
                    y += shift[img]
                    if silu:
                        t = e[:r1 - r0]
                        np.negative(y, out=t)
                        np.exp(t, out=t)
                        t += 1
                        y /= t

    cpu_pool.run(work, cpu_pool.row_shares(rows, block))
    return out


def _group_sums(per_image: np.ndarray, groups: int, block: int) -> tuple:
    """(count per group, (B, G) fp64 sums of x, (B, G) fp64 sums of x^2) of (B, rows, C)."""
    batch, rows, channels = per_image.shape
    sums = _channel_sums(per_image, block).reshape(batch, 2, groups, channels // groups).sum(axis=3)
    return rows * (channels // groups), sums[:, 0], sums[:, 1]


def group_norm(x: mx.array, groups: int, weight: mx.array, bias: mx.array, eps: float, silu: bool = False) -> mx.array:
    """torch's GroupNorm of channels-last x (B, ..., C), then SiLU if asked. Statistics per (image, group) in fp64
    from per-block channel sums of x and x^2 (one pass); then the affine map and the SiLU per block."""
    keep, (xn, w, b) = cpu_pool.as_numpy(x, weight, bias)
    batch, channels = x.shape[0], x.shape[-1]
    per_image = xn.reshape(batch, -1, channels)
    block = cpu_pool.block_rows(channels, 1 << 17)
    count, total, squares = _group_sums(per_image, groups, block)
    mean = total / count
    var = np.maximum(squares / count - mean ** 2, 0)
    inv_std = np.repeat(1 / np.sqrt(var + eps), channels // groups, axis=1)  # (batch, channels)
    scale = (inv_std * w).astype(np.float32)
    shift = (b - np.repeat(mean, channels // groups, axis=1) * inv_std * w).astype(np.float32)
    out = _affine(per_image, scale, shift, silu, block)
    del keep
    return cpu_pool.to_mlx(out, x.dtype, x.shape)


def affine_silu_into(x: mx.array, scale: mx.array, shift: mx.array, dest: np.ndarray) -> None:
    """SiLU(x * scale + shift) for NHWC x, per-image per-channel scale and shift (B, 1, 1, C), written into the
    fp32 numpy view `dest` of x's shape (the interior of a zero-padded buffer: vae_bands' fused convolution)."""
    keep, (xn, sc, sh) = cpu_pool.as_numpy(x, scale, shift)
    batch, channels = x.shape[0], x.shape[-1]
    _affine(xn, sc.reshape(batch, channels), sh.reshape(batch, channels), True,
            cpu_pool.block_rows(x.shape[2] * channels, 1 << 17), out=dest)
    del keep


def affine_silu(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    """SiLU(x * scale + shift) for channels-last x (B, ..., C) and per-image, per-channel fp32 scale and shift
    (B, 1, ..., C): a GroupNorm whose statistics are known (vae_bands' bands), applied and activated."""
    keep, (xn, sc, sh) = cpu_pool.as_numpy(x, scale, shift)
    batch, channels = x.shape[0], x.shape[-1]
    out = _affine(xn.reshape(batch, -1, channels), sc.reshape(batch, channels), sh.reshape(batch, channels), True,
                  cpu_pool.block_rows(channels, 1 << 17))
    del keep
    return cpu_pool.to_mlx(out, x.dtype, x.shape)


def group_moments(x: mx.array, groups: int) -> tuple:
    """(count, group means, centred group sums of squares) of channels-last x (B, ..., C), the means and sums
    (B, G) fp32: vae_bands' GroupNorm moments of one band."""
    keep, (xn,) = cpu_pool.as_numpy(x)
    batch, channels = x.shape[0], x.shape[-1]
    per_image = xn.reshape(batch, -1, channels)
    count, total, squares = _group_sums(per_image, groups, cpu_pool.block_rows(channels, 1 << 17))
    del keep
    mean = total / count
    m2 = np.maximum(squares - count * mean ** 2, 0)
    return count, mx.array(mean.astype(np.float32)), mx.array(m2.astype(np.float32))
