"""Shared MLX building blocks of the UNet and the VAE, named like diffusers' modules.

Owns: the attention function UNet and VAE share (`attention`), SiLU/GELU (exact and tanh) and GroupNorm with
their fast CPU paths, `Attention` (self/cross, optional group norm as in the VAE), `FeedForward`
with GEGLU or tanh-GELU, `BasicTransformerBlock`, `Transformer2DModel`, `ResnetBlock2D`,
`Downsample2D`, `Upsample2D`, the sinusoidal `timestep_embedding` and `TimestepEmbedding`.
Every module takes and returns channels-last (NHWC / (B, L, C)) arrays; attribute names mirror
diffusers' state-dict names so `weights.load_into` fills them without a name map.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from backend.engines.mlx import cpu_attention, cpu_kernels, cpu_rowwise, cpu_winograd


# The most bytes of attention scores (batch x heads x queries x keys) one unfused call may materialise. MLX's own
# unfused attention (its fallback wherever no fused kernel applies) holds the whole score matrix: 640 MiB for
# SDXL's 4096-token self-attention at 1024x1024 in fp16, 1 GiB for its VAE's 16384-token, 512-wide single head
# in fp32. Above this budget the queries are split into calls that each stay within it.
SCORES_BUDGET = 256 << 20
# The head widths MLX's fused kernels take (Metal's full-attention kernel; CUDA's cuDNN takes multiples of 8 up
# to 128): a head that is not one of them (SD 1.x's 40 and 160) is zero-padded to the next one that is fused.
FUSED_HEAD_DIMS = (64, 72, 80, 96, 128, 192, 256)


class AttentionStats:
    """What `attention` did since `reset()`: calls per path, and the largest score matrix one call held
    (bytes; 0 for fused calls, which hold none). For tests and measurements; the count costs nothing."""
    calls: dict = {}
    largest_scores = 0

    @classmethod
    def reset(cls) -> None:
        cls.calls, cls.largest_scores = {}, 0

    @classmethod
    def record(cls, path: str, scores_bytes: int) -> None:
        cls.calls[path] = cls.calls.get(path, 0) + 1
        cls.largest_scores = max(cls.largest_scores, int(scores_bytes))


def scores_bytes(batch: int, heads: int, queries: int, keys: int, itemsize: int) -> int:
    return batch * heads * queries * keys * itemsize


def chunk_rows(batch: int, heads: int, queries: int, keys: int, itemsize: int, budget: Optional[int] = None) -> int:
    """Query rows per unfused call so that its scores (batch x heads x rows x keys) stay within `budget`
    (SCORES_BUDGET by default); all of them when the whole matrix fits, at least one."""
    budget = SCORES_BUDGET if budget is None else budget
    per_row = scores_bytes(batch, heads, 1, keys, itemsize)
    return max(1, min(queries, budget // max(1, per_row)))


def _joined(x):
    """An attention input given as parts along the token axis, as one array."""
    parts = cpu_attention.token_parts(x)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def attention(q, k, v, scale: float, rows: bool = False):
    """softmax(q k^T * scale) v for (B, H, N, d) queries and (B, H, M, d) keys/values; each may be a list of parts
    along the token axis (SD3's image and context tokens), joined unless the kernel reads them where they lie.

    CPU, inference (under cpu_kernels.eager_chunks): cpu_attention, numpy kernels on every core, reading the
    parts in place. CPU otherwise (training): cpu_kernels.attention, in fp32 (also for fp16 inputs, whose result
    is cast back), over cache-sized chunks of query rows; MLX's fused kernel on the CPU is a plain
    matmul-softmax-matmul whose scalar exp costs ~3x the cpu_kernels version (tools/bench_attention.py).
    Elsewhere (a GPU): `device_attention`.

    `rows` (CPU inference only: the caller checks `cpu_inference()`): q, k, v may be fp32 numpy parts, and the
    result is cpu_attention's fp32 numpy (B, N, H, d_v) buffer, for an output projection in numpy.
    """
    if not rows and not cpu_kernels.available():
        return device_attention(_joined(q), _joined(k), _joined(v), scale)
    q_parts, k_parts = cpu_attention.token_parts(q), cpu_attention.token_parts(k)
    batch, heads = q_parts[0].shape[:2]
    n_q, n_kv = sum(p.shape[2] for p in q_parts), sum(p.shape[2] for p in k_parts)
    if rows or cpu_inference(batch * heads * n_q * n_kv):
        AttentionStats.record("cpu_blocks", 4 * cpu_attention.held_scores(batch * heads, n_q, n_kv))
        return cpu_attention.attention(q, k, v, scale, rows=rows)
    q, k, v = _joined(q), _joined(k), _joined(v)
    AttentionStats.record("cpu", 4 * cpu_kernels.attention_chunk_scores(batch * heads, n_q, n_kv))
    return cpu_kernels.attention(q, k, v, scale).astype(q.dtype)


def device_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, budget: Optional[int] = None) -> mx.array:
    """MLX's attention on the default device without ever holding more than `budget` bytes of scores
    (SCORES_BUDGET by default) in one call:

    - scores within the budget: mx.fast.scaled_dot_product_attention as MLX routes it (fused, or its unfused
      fallback, which then holds at most the budget);
    - else the fused kernel, forced (MLX prefers its unfused path for some head widths), with the head
      zero-padded to a width the kernel takes if it does not take this one (the same scores and output);
    - else (no fused kernel here: the CPU, a 512-wide VAE head) the unfused path over chunks of query rows
      (`chunk_rows`), each chunk evaluated before the next under cpu_kernels.eager_chunks (inference).
    """
    batch, heads, n_q, _ = q.shape
    n_kv = k.shape[2]
    itemsize = max(q.itemsize, k.itemsize, v.itemsize)
    budget = SCORES_BUDGET if budget is None else budget
    full = scores_bytes(batch, heads, n_q, n_kv, itemsize)
    if full <= budget:
        AttentionStats.record("mlx", full)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    out = _fused(q, k, v, scale)
    if out is not None:
        return out
    rows = chunk_rows(batch, heads, n_q, n_kv, itemsize, budget)
    AttentionStats.record("chunked", scores_bytes(batch, heads, rows, n_kv, itemsize))
    parts = []
    for r in range(0, n_q, rows):
        parts.append(mx.fast.scaled_dot_product_attention(q[:, :, r:r + rows], k, v, scale=scale))
        if cpu_kernels.eager_chunks.active:
            mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


_FUSED_WIDTH: dict = {}  # (device, dtype, shapes) -> the head width the fused kernel ran at, or None (none did)


def _pad_head(x: mx.array, width: int) -> mx.array:
    return x if x.shape[-1] == width else mx.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])


def _fused(q: mx.array, k: mx.array, v: mx.array, scale: float) -> Optional[mx.array]:
    """The fused kernel's attention, at the head's own width or zero-padded to the narrowest fused width above it
    (zero columns add nothing to q k^T, and v's come out as zero columns, cut off); None where MLX has no fused
    kernel for it. MLX says so when the call is made (force_fused raises), before anything runs; the answer is
    kept per device, dtype and shapes."""
    d_v = v.shape[-1]
    width = max(q.shape[-1], d_v)
    key = (str(mx.default_device()), str(q.dtype), tuple(q.shape[1:]), tuple(k.shape[1:]), d_v)
    widths = [_FUSED_WIDTH[key]] if key in _FUSED_WIDTH else [width] + [w for w in FUSED_HEAD_DIMS if w > width]
    for w in widths:
        if w is None:
            break
        try:
            out = mx.fast.scaled_dot_product_attention(_pad_head(q, w), _pad_head(k, w), _pad_head(v, w),
                                                       scale=scale, force_fused=True)
        except ValueError:
            continue
        _FUSED_WIDTH[key] = w
        AttentionStats.record("fused" if w == width and d_v == width else "fused_padded", 0)
        return out if w == d_v else out[..., :d_v]
    _FUSED_WIDTH[key] = None
    return None


#: The fewest elements (or attention scores) a call needs for the numpy kernels: below it their fixed cost (handing
#: blocks to the workers, the copy back into MLX) outweighs the cores; the embedded 64 px model's step took 46 ms
#: with them everywhere and 35 ms with MLX's ops.
NUMPY_KERNEL_MIN = 1 << 17


def cpu_inference(elements: Optional[int] = None) -> bool:
    """True where the CPU inference paths apply (cpu_attention, cpu_rowwise, cpu_conv, Winograd): inference (under
    cpu_kernels.eager_chunks) on the CPU, for a call over at least NUMPY_KERNEL_MIN `elements` (None: a caller
    with a size condition of its own)."""
    return ((elements is None or elements >= NUMPY_KERNEL_MIN) and cpu_kernels.eager_chunks.active
            and cpu_kernels.available())


def silu(x: mx.array) -> mx.array:
    return cpu_kernels.silu(x) if cpu_kernels.available() else nn.silu(x)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as torch's F.gelu."""
    return cpu_kernels.gelu(x) if cpu_kernels.available() else nn.gelu(x)


def gelu_tanh(x: mx.array) -> mx.array:
    """tanh-approximated GELU, as torch's F.gelu(approximate="tanh") (diffusers' "gelu-approximate")."""
    return cpu_kernels.gelu_tanh(x) if cpu_kernels.available() else nn.gelu_approx(x)


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


class Linear(nn.Linear):
    """nn.Linear; on the CPU the product, then the bias: MLX's addmm there copies the bias into the output first
    and reads it back in the product (SDXL's 2x1024x1280 -> 1280: 23.8 ms, the product then the bias 20.0 ms,
    torch 22.2 ms, on the 2-core Xeon of the README's "Speed on Linux")."""

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self and mx.default_device() == mx.cpu:
            return x @ self.weight.T + self.bias
        return super().__call__(x)


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm on channels-last input (nn.GroupNorm with pytorch_compatible=True).

    On the CPU the statistics are reduced in place instead of through nn.GroupNorm's two
    transposed copies (about 2.5x faster); they are computed in fp32 for any input dtype. At CPU inference,
    cpu_rowwise.group_norm on every core, with the SiLU that follows it in the same pass (`then_silu`).
    """

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__(groups, channels, eps=eps, affine=True, pytorch_compatible=True)

    def __call__(self, x: mx.array, then_silu: bool = False) -> mx.array:
        if cpu_inference(x.size):
            return cpu_rowwise.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=then_silu)
        if then_silu:
            return silu(self(x))
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


class Conv2d(nn.Conv2d):
    """nn.Conv2d; on the CPU at inference (under cpu_kernels.eager_chunks), a 3x3, stride-1, padding-1 fp32
    convolution over images of at least WINOGRAD_MIN_PIXELS runs as Winograd F(4x4, 3x3) on every core
    (cpu_winograd.py), the bias added as the tiles are put in place. Measured on a 2-core Xeon (oneMKL), batch 2
    (README "Speed on Linux"): 320->320 channels at 64x64 68 -> 28 ms (torch 46), 640->640 at
    32x32 58 -> 29 ms (torch 46), 1280->1280 at 16x16 60 -> 45 ms (torch 53); at 8x8 MLX's direct convolution
    (16 ms) is kept, the kernel's transform would cost more than it saves, and so it is for outputs under
    NUMPY_KERNEL_MIN elements (the embedded 64 px model's: 35 ms a step with MLX's convolutions, 63 ms with these).
    The kernel's transform is computed per call: kept, it would add 4x every such kernel's size (1.18 GiB for SD
    1.5's UNet at fp32)."""

    folds_addends = True  # __call__ takes image_bias and residual (see `convolve`)

    def _winograd_applies(self, x: mx.array) -> bool:
        return winograd_applies(self, x, self.weight.shape, self.weight.dtype)

    def __call__(self, x: mx.array, image_bias: Optional[mx.array] = None, residual: Optional[mx.array] = None):
        """conv(x) [+ image_bias (B, C_out), added per image] [+ residual]: on the Winograd path both are added as
        the tiles are put in place (a resnet's time embedding and skip connection), else by MLX after."""
        if self._winograd_applies(x):
            return winograd_convolve(x, self.weight, self.get("bias"), image_bias, residual)
        return with_addends(super().__call__(x), image_bias, residual)


WINOGRAD_MIN_PIXELS = 16 * 16


def winograd_applies(conv, x: mx.array, kernel_shape: tuple, weight_dtype) -> bool:
    """Whether `conv` (a Conv2d, or a quantized one with its (C_out, kh, kw, C_in) kernel's shape and compute dtype)
    runs on x as cpu_winograd's fp32 3x3 convolution here."""
    b, h, w, _ = x.shape
    return (cpu_inference(b * h * w * kernel_shape[0]) and x.dtype == mx.float32 and weight_dtype == mx.float32
            and tuple(kernel_shape[1:3]) == (3, 3) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and conv.dilation in (1, (1, 1)) and conv.groups == 1 and h * w >= WINOGRAD_MIN_PIXELS)


def winograd_convolve(x: mx.array, kernel, bias: Optional[mx.array], image_bias: Optional[mx.array],
                      residual: Optional[mx.array]) -> mx.array:
    """cpu_winograd.convolve of x by a (C_out, 3, 3, C_in) kernel (MLX or fp32 numpy), the layer's bias and a
    per-image bias (B, C_out) folded into one, the residual added as the tiles are put in place."""
    if image_bias is not None:
        bias = image_bias if bias is None else image_bias + bias
    return cpu_winograd.convolve(x, kernel, bias, residual)


def with_addends(out: mx.array, image_bias: Optional[mx.array], residual: Optional[mx.array]) -> mx.array:
    """A convolution's output + image_bias (B, C_out) per image + residual, by MLX (each where given)."""
    if image_bias is not None:
        out = out + image_bias[:, None, None, :]
    return out if residual is None else out + residual


def convolve(conv, x: mx.array, image_bias: Optional[mx.array] = None, residual: Optional[mx.array] = None):
    """conv(x) [+ image_bias (B, C_out) per image] [+ residual], folded into the convolution where `conv` takes them
    (`folds_addends`: this module's Conv2d, quantize's QuantizedConv2d; a LoRA-wrapped one adds them after)."""
    if getattr(conv, "folds_addends", False):
        return conv(x, image_bias, residual)
    return with_addends(conv(x), image_bias, residual)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm; at CPU inference, cpu_rowwise.layer_norm on every core."""

    def __call__(self, x: mx.array, rows: bool = False):
        """LN(x); with `rows` (for a module that `takes_rows`), as fp32 numpy rows at CPU inference."""
        if cpu_inference(x.size):
            return cpu_rowwise.layer_norm(x, self.get("weight"), self.get("bias"), self.eps, rows=rows)
        return super().__call__(x)


def bias_free(linear, x: mx.array):
    """(x W^T, bias) for a plain nn.Linear, so a CPU kernel can add the bias in its own pass; else (linear(x), None)."""
    if plain_linear(linear) and "bias" in linear:
        return x @ linear.weight.T, linear.bias
    return linear(x), None


def plain_linear(linear) -> bool:
    """An unquantized Linear without LoRA."""
    return type(linear) in (Linear, nn.Linear)


def kernel_linear(linear) -> bool:
    """A Linear whose product the CPU kernels may run themselves, reading `weight_rows(linear)` and its bias: a plain
    one, or a quantized one where its codes can be dequantized here (quantize.QuantizedLinear.dequantizes_here); not one
    wrapped by a LoRA."""
    return plain_linear(linear) or (hasattr(linear, "dequantizes_here") and linear.dequantizes_here())


def weight_rows(linear):
    """A `kernel_linear`'s (N, K) weight as the CPU kernels read it: a plain Linear's MLX array, a quantized one's
    fp32 numpy rows dequantized now (a buffer of this call; the layer stays quantized)."""
    return linear.weight if plain_linear(linear) else linear.cpu_rows()


def weight_dtype(linear):
    """A Linear's compute dtype: its weight's, or a quantized one's scales'."""
    return linear["scales"].dtype if "scales" in linear else linear.weight.dtype


def linear_rows(linear, x, residual: Optional[tuple] = None) -> mx.array:
    """linear(x) [+ residual (r, gate), as FeedForward's], x an MLX array or (where `kernel_linear` at CPU inference)
    fp32 numpy rows: there the product, bias and residual in numpy (cpu_rowwise.project), with no bias or residual
    pass in MLX."""
    if cpu_inference(x.size) and kernel_linear(linear):
        shape = x.shape[:-1] + (linear.weight.shape[0],)
        dtype = residual[0].dtype if residual is not None else x.dtype if isinstance(x, mx.array) else mx.float32
        return cpu_rowwise.project(x, weight_rows(linear), linear.get("bias"), shape, dtype, residual)
    y = linear(x)
    return y if residual is None else gated_residual(residual, y)


def bias_free_rows(linear, x):
    """bias_free for a `kernel_linear` with the product in numpy (cpu_rowwise.products: fp32 rows, x an MLX array or
    fp32 numpy rows)."""
    return cpu_rowwise.products(x, [(weight_rows(linear), None)]), linear.get("bias")


def group_norm(groups: int, channels: int, eps: float) -> GroupNorm:
    return GroupNorm(groups, channels, eps)


def pointwise(in_channels: int, out_channels: int, bias: bool = True) -> nn.Linear:
    """A 1x1 convolution as a Linear over the channel axis (weights.load_into squeezes the kernel)."""
    return Linear(in_channels, out_channels, bias=bias)


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
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim, inner, bias=bias)
        self.to_v = Linear(context_dim, inner, bias=bias)
        self.to_out = [Linear(inner, query_dim, bias=True)]

    def _split_heads(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

    def takes_rows(self, x) -> bool:
        """Whether __call__ with a residual runs in numpy here (CPU inference, `kernel_linear`s, no group norm), so
        that x may come as fp32 numpy rows (B, L, C)."""
        linears = (self.to_q, self.to_k, self.to_v, self.to_out[0])
        return cpu_inference(x.size) and "group_norm" not in self and all(kernel_linear(m) for m in linears)

    def __call__(self, x, context: Optional[mx.array] = None, residual: Optional[tuple] = None) -> mx.array:
        """Attention over x (self) or context (cross); with `residual` (r, gate), as FeedForward's, r + gate * it.
        Where `takes_rows`, with a residual: in numpy from the q, k, v products to the residual (`_numpy_call`)."""
        if residual is not None and self.takes_rows(x):
            return self._numpy_call(x, context, residual)
        if "group_norm" in self:
            x = self.group_norm(x)
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = attention(q, k, v, self.scale)
        b, _, n, _ = out.shape
        out = self.to_out[0](out.transpose(0, 2, 1, 3).reshape(b, n, -1))
        return out if residual is None else gated_residual(residual, out)

    def _numpy_call(self, x, context: Optional[mx.array], residual: tuple) -> mx.array:
        """__call__ at CPU inference as SD3's JointAttention._numpy_call: q, k and v (a self-attention's in one
        product over x) by cpu_rowwise.products, cpu_attention reading them in place, and the output projection
        with the residual by cpu_rowwise.project; no MLX pass, no copy of q, k, v or the attention's output."""
        b, n = x.shape[0], x.shape[1]

        def heads_first(tokens, linears):
            rows = cpu_rowwise.products(tokens, [(weight_rows(m), m.get("bias")) for m in linears])
            per_head = rows.reshape(b, -1, len(linears), self.heads, rows.shape[1] // (len(linears) * self.heads))
            return [per_head[:, :, i].transpose(0, 2, 1, 3) for i in range(len(linears))]

        if context is None:
            q, k, v = heads_first(x, (self.to_q, self.to_k, self.to_v))
        else:
            (q,), (k, v) = heads_first(x, (self.to_q,)), heads_first(context, (self.to_k, self.to_v))
        out = attention(q, k, v, self.scale, rows=True)  # (B, N, heads, d)
        return linear_rows(self.to_out[0], out.reshape(b, n, -1), residual)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def numpy_rows(self, x):
        """At CPU inference, the activation as fp32 numpy rows (cpu_rowwise's `rows`) of MLX or numpy rows x."""
        return cpu_rowwise.geglu(*bias_free_rows(self.proj, x), rows=True)

    def __call__(self, x: mx.array) -> mx.array:
        if cpu_inference(x.size):
            return cpu_rowwise.geglu(*bias_free(self.proj, x))
        hidden, gate = mx.split(self.proj(x), 2, axis=-1)
        return hidden * gelu(gate)


class TanhGELU(nn.Module):
    """diffusers' activations.GELU(approximate="tanh"): `proj`, then tanh-GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def numpy_rows(self, x):
        """At CPU inference, the activation as fp32 numpy rows (cpu_rowwise's `rows`) of MLX or numpy rows x."""
        return cpu_rowwise.gelu_tanh(*bias_free_rows(self.proj, x), rows=True, in_place=True)  # over its own rows

    def __call__(self, x: mx.array) -> mx.array:
        if cpu_inference(x.size):
            return cpu_rowwise.gelu_tanh(*bias_free(self.proj, x))
        return gelu_tanh(self.proj(x))


_FEED_FORWARD_ACTIVATIONS = {"geglu": GEGLU, "gelu-approximate": TanhGELU}


class FeedForward(nn.Module):
    """diffusers' `FeedForward`: net.0 (the activation's projection: GEGLU by default, or SD3's
    "gelu-approximate"), net.2 (Linear). At CPU inference with `kernel_linear`s (plain or quantized, no LoRA)
    the products and the activation run in numpy (cpu_rowwise.products, the activation kernel, project), from
    MLX or numpy input rows."""

    def __init__(self, dim: int, mult: int = 4, activation_fn: str = "geglu"):
        super().__init__()
        inner = dim * mult
        self.net = [_FEED_FORWARD_ACTIVATIONS[activation_fn](dim, inner), nn.Identity(),  # net.1 is dropout
                    Linear(inner, dim)]

    def takes_rows(self, x) -> bool:
        """Whether __call__ runs in numpy here, so that x may come as fp32 numpy rows (B, ..., C)."""
        return cpu_inference(x.size) and kernel_linear(self.net[0].proj) and kernel_linear(self.net[2])

    def __call__(self, x, residual: Optional[tuple] = None) -> mx.array:
        """FF(x), or with `residual` (r, gate) r + gate * FF(x) (gate (B, 1, C), or None for r + FF(x)); x may be
        fp32 numpy rows where `takes_rows`."""
        if self.takes_rows(x):
            out = self.net[2]
            dtype = residual[0].dtype if residual is not None else x.dtype if isinstance(x, mx.array) else mx.float32
            return cpu_rowwise.project(self.net[0].numpy_rows(x), weight_rows(out), out.get("bias"),
                                       x.shape[:-1] + (out.weight.shape[0],), dtype, residual)
        for layer in self.net:
            x = layer(x)
        return x if residual is None else gated_residual(residual, x)


def gated_residual(residual: tuple, y: mx.array) -> mx.array:
    """r + gate * y for residual (r, gate), or r + y where gate is None."""
    r, gate = residual
    return r + (y if gate is None else gate * y)


class BasicTransformerBlock(nn.Module):
    """Self-attention (or cross-only), cross-attention and feed-forward, each pre-LayerNorm + residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int,
                 only_cross_attention: bool = False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head, cross_attention_dim if only_cross_attention else None)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        """Each sublayer takes its norm's fp32 numpy rows where it runs in numpy (`takes_rows`): no copy into MLX."""
        x = self.attn1(self.norm1(x, rows=self.attn1.takes_rows(x)),
                       context if self.only_cross_attention else None, residual=(x, None))
        x = self.attn2(self.norm2(x, rows=self.attn2.takes_rows(x)), context, residual=(x, None))
        return self.ff(self.norm3(x, rows=self.ff.takes_rows(x)), residual=(x, None))


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
        tokens = linear_rows(self.proj_in, self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return linear_rows(self.proj_out, tokens, residual=(x.reshape(b, h * w, c), None)).reshape(b, h, w, c)


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
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = Linear(temb_channels, out_channels * (2 if self.scale_shift else 1))
        self.norm2 = group_norm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = pointwise(in_channels, out_channels)

    def _norm_act(self, norm: GroupNorm, x: mx.array) -> mx.array:
        return norm(x, then_silu=True) if self.act is silu else self.act(norm(x))

    def __call__(self, x: mx.array, temb: Optional[mx.array] = None) -> mx.array:
        t = self.time_emb_proj(self.act(temb)) if temb is not None else None  # (B, C_out or 2 C_out)
        h = convolve(self.conv1, self._norm_act(self.norm1, x), None if self.scale_shift else t)
        if "conv_shortcut" in self:
            x = linear_rows(self.conv_shortcut, x)
        if t is not None and self.scale_shift:
            scale, shift = mx.split(t[:, None, None, :], 2, axis=-1)
            h = self.act(self.norm2(h) * (1 + scale) + shift)
        else:
            h = self._norm_act(self.norm2, h)
        if self.output_scale_factor != 1.0:
            return (x + self.conv2(h)) / self.output_scale_factor
        return convolve(self.conv2, h, residual=x)


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
        self.conv = Conv2d(channels, out_channels, 3, padding=1)

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
        self.linear_1 = Linear(in_channels, time_embed_dim)
        if cond_proj_dim is not None:
            self.cond_proj = Linear(cond_proj_dim, in_channels, bias=False)
        self.act = activation(act_fn)
        self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = activation(post_act_fn) if post_act_fn else None

    def __call__(self, sample: mx.array, condition: Optional[mx.array] = None) -> mx.array:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act else sample
