"""Shared MLX building blocks of the UNet and the VAE, named like diffusers' modules.

Owns: the attention kernel (`attention`), `Attention` (self/cross, optional group norm as in the
VAE), `FeedForward` with GEGLU, `BasicTransformerBlock`, `Transformer2DModel`, `ResnetBlock2D`,
`Downsample2D`, `Upsample2D`, the sinusoidal `timestep_embedding` and `TimestepEmbedding`.
Every module takes and returns channels-last (NHWC / (B, L, C)) arrays; attribute names mirror
diffusers' state-dict names so `weights.load_into` fills them without a name map.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

# ----------------------------------------------------------------------------------------------
# CPU kernels: exp2, SiLU, GELU and attention
# ----------------------------------------------------------------------------------------------
# MLX's CPU transcendental ops (exp, sigmoid, erf) are scalar and single-threaded: 10-50 ns per
# element here, against ~0.2 ns for an add. In attention, exp over the scores costs about 5x
# both matmuls; in a UNet step, SiLU and GELU cost about as much as all the convolutions. So
# on the CPU these are built from 2^x evaluated by compiled (vectorized) polynomial kernels,
# accurate to ~1e-7 relative. On a GPU, MLX's own ops and fused attention kernel are used.

_LOG2E = 1.4426950408889634
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding then subtracting it rounds an fp32 to an integer
# 2^f on [-0.5, 0.5], relative error < 1e-7 (fit minimizing the relative error).
_EXP2_COEFFS = (0.6931470036506653, 0.24022242426872253, 0.0555073544383049,
                0.009671472944319248, 0.0013264167355373502)
# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t P(t) exp(-z^2), t = 1 / (1 + p z), |error| < 1.5e-7.
_ERF_P = 0.3275911
_ERF_COEFFS = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_CHUNK_SCORES = 1 << 19  # attention scores computed at once on the CPU (2 MiB in fp32, cache-sized)


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


_compiled_kernels_work: Optional[bool] = None


def _use_cpu_kernels() -> bool:
    global _compiled_kernels_work
    if mx.default_device() == mx.gpu:
        return False
    if _compiled_kernels_work is None:  # MLX's CPU compile needs a C++ compiler at run time
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


def silu(x: mx.array) -> mx.array:
    if not _use_cpu_kernels():
        return nn.silu(x)
    return _silu32(x.astype(mx.float32)).astype(x.dtype)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as torch's F.gelu."""
    if not _use_cpu_kernels():
        return nn.gelu(x)
    return _gelu32(x.astype(mx.float32)).astype(x.dtype)


def _softmax_attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
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
        p = exp2(s - s.max(axis=-1, keepdims=True))
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


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v for (B, H, N, d) queries and (B, H, M, d) keys/values.

    GPU: MLX's fused kernel. CPU: the chunked fp32 kernel above (also for fp16 inputs, whose
    result is cast back).
    """
    if not _use_cpu_kernels():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return _softmax_attention_cpu(q, k, v, scale).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

_ACTIVATIONS = {"silu": silu, "swish": silu, "gelu": gelu, "mish": nn.mish, "relu": nn.relu}


def activation(name: str):
    """The activation function diffusers' `get_activation(name)` returns."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation function {name!r}") from None


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm on channels-last input (nn.GroupNorm with pytorch_compatible=True).

    On the CPU the statistics are reduced in place instead of through nn.GroupNorm's two
    transposed copies (about 2.5x faster); they are computed in fp32 for any input dtype.
    """

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__(groups, channels, eps=eps, affine=True, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.gpu:
            return super().__call__(x)
        shape, groups = x.shape, self.num_groups
        grouped = x.reshape(shape[0], -1, groups, shape[-1] // groups)
        x32 = grouped.astype(mx.float32)
        mean = x32.mean(axis=(1, 3), keepdims=True)
        var = mx.square(x32 - mean).mean(axis=(1, 3), keepdims=True)
        scale = mx.rsqrt(var + self.eps) * self.weight.astype(mx.float32).reshape(1, 1, groups, -1)
        shift = self.bias.astype(mx.float32).reshape(1, 1, groups, -1) - mean * scale
        return (grouped * scale.astype(x.dtype) + shift.astype(x.dtype)).reshape(shape)


def group_norm(groups: int, channels: int, eps: float) -> GroupNorm:
    return GroupNorm(groups, channels, eps)


def pointwise(in_channels: int, out_channels: int, bias: bool = True) -> nn.Linear:
    """A 1x1 convolution as a Linear over the channel axis (weights.load_into squeezes the kernel)."""
    return nn.Linear(in_channels, out_channels, bias=bias)


class Attention(nn.Module):
    """diffusers' `Attention`: multi-head self- or cross-attention on (B, L, C) sequences.

    `norm_num_groups` adds the pre-normalization `group_norm` of the VAE's spatial attention;
    residual connections are left to the caller.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: Optional[int] = None,
                 bias: bool = False, norm_num_groups: Optional[int] = None, eps: float = 1e-5):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        if norm_num_groups is not None:
            self.group_norm = group_norm(norm_num_groups, query_dim, eps)
        context_dim = cross_attention_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = [nn.Linear(inner, query_dim, bias=True)]

    def _split_heads(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, context: Optional[mx.array] = None) -> mx.array:
        if "group_norm" in self:
            x = self.group_norm(x)
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = attention(q, k, v, self.scale)
        b, _, n, _ = out.shape
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def __call__(self, x: mx.array) -> mx.array:
        hidden, gate = mx.split(self.proj(x), 2, axis=-1)
        return hidden * gelu(gate)


class FeedForward(nn.Module):
    """diffusers' `FeedForward` with its default GEGLU activation: net.0 (GEGLU), net.2 (Linear)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = [GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)]  # net.1 is dropout

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention (or cross-only), cross-attention and feed-forward, each pre-LayerNorm + residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int,
                 only_cross_attention: bool = False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head, cross_attention_dim if only_cross_attention else None)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, residual (NHWC).

    proj_in/proj_out are 1x1 convolutions in SD 1.x checkpoints and Linears with
    use_linear_projection; both are the same per-token matmul, so both are Linears here.
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, only_cross_attention: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.norm = group_norm(norm_num_groups, in_channels, 1e-6)
        self.proj_in = pointwise(in_channels, inner)
        self.transformer_blocks = [
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, only_cross_attention)
            for _ in range(num_layers)]
        self.proj_out = pointwise(inner, in_channels)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.proj_out(tokens).reshape(b, h, w, c) + x


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, with the time embedding added (or scale/shift) in between."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int,
                 eps: float, act_fn: str = "silu", time_embedding_norm: str = "default",
                 output_scale_factor: float = 1.0):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"unsupported resnet_time_scale_shift {time_embedding_norm!r}")
        self.act = activation(act_fn)
        self.scale_shift = time_embedding_norm == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if self.scale_shift else 1))
        self.norm2 = group_norm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = pointwise(in_channels, out_channels)

    def __call__(self, x: mx.array, temb: Optional[mx.array] = None) -> mx.array:
        h = self.conv1(self.act(self.norm1(x)))
        t = self.time_emb_proj(self.act(temb))[:, None, None, :] if temb is not None else None
        if t is not None and not self.scale_shift:
            h = h + t
        h = self.norm2(h)
        if t is not None and self.scale_shift:
            scale, shift = mx.split(t, 2, axis=-1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.act(h))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        out = x + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution; padding 0 means diffusers' asymmetric (0, 1) padding (the VAE)."""

    def __init__(self, channels: int, out_channels: int, padding: int = 1):
        super().__init__()
        self.pad_right_bottom = padding == 0
        self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.pad_right_bottom:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


def upsample_nearest(x: mx.array, size: Optional[Sequence[int]] = None) -> mx.array:
    """Nearest-neighbour resize of NHWC `x`: 2x, or to `size` (h, w) with torch's index rule."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    out_h, out_w = size
    rows = mx.floor(mx.arange(out_h, dtype=mx.float32) * (h / out_h)).astype(mx.int32)
    cols = mx.floor(mx.arange(out_w, dtype=mx.float32) * (w / out_w)).astype(mx.int32)
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def __call__(self, x: mx.array, size: Optional[Sequence[int]] = None) -> mx.array:
        return self.conv(upsample_nearest(x, size))


def timestep_embedding(timesteps: mx.array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000) -> mx.array:
    """diffusers' `get_timestep_embedding`: (B,) values -> (B, dim) fp32 sinusoids."""
    half = dim // 2
    exponent = -math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - freq_shift)
    args = timesteps.astype(mx.float32)[:, None] * mx.exp(exponent)[None, :]
    sin, cos = mx.sin(args), mx.cos(args)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2, with LCM's optional `cond_proj` of a guidance embedding added first."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu",
                 out_dim: Optional[int] = None, cond_proj_dim: Optional[int] = None,
                 post_act_fn: Optional[str] = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        if cond_proj_dim is not None:
            self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False)
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = activation(post_act_fn) if post_act_fn else None

    def __call__(self, sample: mx.array, condition: Optional[mx.array] = None) -> mx.array:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act else sample
