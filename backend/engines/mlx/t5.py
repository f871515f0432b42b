"""MLX T5 encoder: transformers' T5EncoderModel (SD3's text_encoder_3, T5 v1.1 XXL), same names, same math.

Parameter names mirror the checkpoints (`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`, `encoder.block.0.layer.1.
DenseReluDense.wi_0.weight`, `encoder.final_layer_norm.weight`), so backend.engines.mlx.weights.load_into
fills a model from a text_encoder_3 folder. The token embedding is one table: transformers ties
`encoder.embed_tokens.weight` to `shared.weight` and saves either or both; `checkpoint_names` keeps one
(load_t5_encoder does that for you) and drops a full T5's decoder and lm_head.

The math, as transformers computes it: no embedding scale, pre-norm blocks with RMS norms (no mean, no
bias, statistics in fp32), attention without the 1/sqrt(d) scale and with a learned relative-position bias
(bidirectional log-spaced buckets) that block 0 owns and every block reuses, a ReLU or gated-GELU
(tanh GELU, "gelu_new") feed-forward, and a final RMS norm. No padding mask: diffusers' SD3 pipeline calls
text_encoder_3(input_ids) without one, so the padding tokens are attended to, as there.

fp16 follows what transformers does with an fp16 T5: the feed-forward's output projection `wo` runs in
fp32 (transformers' `_keep_in_fp32_modules = ["wo"]`; here the product before it is also fp32, so it
cannot overflow), which makes the residual stream fp32 from block 0's feed-forward on, and an fp16 hidden
state is clamped to fp16's finite range after each sublayer (T5Block's clamp). The output is cast back to
the weights' dtype by the final norm; an fp16 T5 gives no inf. bf16 runs in bf16 throughout, as there.

On the CPU the attention softmax and the tanh GELU are built on cpu_kernels.exp2 (MLX's scalar exp and
tanh cost about as much again); on a GPU MLX's fused attention takes the position bias as an additive mask.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backend import files
from backend.engines.mlx import cpu_kernels
from backend.engines.mlx.layers import gelu_tanh
from backend.engines.mlx import weights as weight_io

FP16_MAX = 65504.0
_LOG2E = 1.4426950408889634
# feed_forward_proj -> (gated, activation name as transformers' T5Config derives it)
_FEED_FORWARD = {"relu": (False, "relu"), "gated-gelu": (True, "gelu_new")}
_MODEL_TYPES = ("t5",)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @property
    def is_gated_act(self) -> bool:
        return _FEED_FORWARD[self.feed_forward_proj][0]

    @property
    def dense_act_fn(self) -> str:
        return _FEED_FORWARD[self.feed_forward_proj][1]

    @classmethod
    def from_dict(cls, config: Mapping) -> "T5Config":
        """From a T5 config.json (transformers' T5Config fields; defaults are its defaults)."""
        model_type = config.get("model_type", "t5")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"unsupported text encoder model_type {model_type!r}: only T5 is ported "
                             f"(UMT5 has a position bias per block, MT5 is not checked)")
        if config.get("is_decoder"):
            raise ValueError("this T5 config describes a decoder; only the encoder is ported")
        result = cls(**{f: config[f] for f in cls.__dataclass_fields__ if f in config})
        if result.feed_forward_proj not in _FEED_FORWARD:
            raise ValueError(f"unsupported T5 feed_forward_proj {result.feed_forward_proj!r} "
                             f"(expected one of {sorted(_FEED_FORWARD)})")
        if result.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets {result.relative_attention_num_buckets} is too few "
                             "(bidirectional buckets need at least 4)")
        for name in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size"):
            if getattr(result, name) < 1:
                raise ValueError(f"T5 config {name} must be positive, not {getattr(result, name)}")
        return result

    @classmethod
    def from_file(cls, path) -> "T5Config":
        return cls.from_dict(files.read_json(path))


@dataclass
class T5Output:
    last_hidden_state: mx.array  # (B, L, d_model), after the final layer norm, in the weights' dtype


# ----------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(query_length, key_length) bucket ids of key - query positions, bidirectional, as transformers'
    T5Attention._relative_position_bucket computes them (in float32, truncated to integers): half the
    buckets per direction, exact distances below a quarter of them, log-spaced bins up to max_distance."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    buckets = buckets + np.where(distance < max_exact, distance, large)
    buckets.flags.writeable = False
    return buckets


_ACTIVATIONS = {"relu": nn.relu, "gelu_new": gelu_tanh}  # transformers' gelu_new is the tanh GELU


def attention(q: mx.array, k: mx.array, v: mx.array, bias: mx.array) -> mx.array:
    """softmax(q k^T + bias) v (no scale, as T5) for (B, H, L, d) and a (1 or B, H, L, L) additive bias.

    GPU: MLX's fused kernel with the bias as its mask. CPU: in fp32 with the exp from cpu_kernels.exp2
    (about 1.5x MLX's CPU attention here); a ones column makes the value product also give the denominator.
    """
    if not cpu_kernels.available():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
    q32, k32, v32 = (t.astype(mx.float32) for t in (q, k, v))
    scores = (q32 @ k32.swapaxes(-1, -2) + bias.astype(mx.float32)) * _LOG2E
    p = cpu_kernels.exp2(scores - scores.max(axis=-1, keepdims=True))
    ones = mx.ones((*v32.shape[:-1], 1), dtype=mx.float32)
    out = p @ mx.concatenate([v32, ones], axis=-1)
    d = v.shape[-1]
    return (out[..., :d] / out[..., d:]).astype(q.dtype)


def _clamp_fp16(x: mx.array) -> mx.array:
    """transformers' T5Block clamp: an fp16 hidden state is kept inside fp16's finite range (1000 inside
    it when it already holds an inf). Other dtypes pass unchanged."""
    if x.dtype != mx.float16:
        return x
    limit = mx.where(mx.isinf(x).any(), FP16_MAX - 1000, FP16_MAX).astype(mx.float16)
    return mx.clip(x, -limit, limit)


def _linear_fp32(layer: nn.Module, x: mx.array) -> mx.array:
    """`layer(x)` computed in fp32 whatever the layer's weight dtype (a quantized layer takes fp32 input)."""
    if isinstance(layer, nn.Linear) and "bias" not in layer:
        return x.astype(mx.float32) @ layer.weight.astype(mx.float32).T
    return layer(x.astype(mx.float32)).astype(mx.float32)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; statistics in fp32, the result in the weight's dtype."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.output_dtype = None  # None: the weight's dtype (transformers' rule); see T5EncoderModel.compute_in

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float32 and self.weight.dtype == mx.float32:
            return mx.fast.rms_norm(x, self.weight, self.eps)
        out = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
        return out.astype(self.output_dtype or self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.n_heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def compute_bias(self, query_length: int, key_length: int) -> mx.array:
        """(1, heads, query_length, key_length) position bias from the learned per-bucket values."""
        buckets = relative_position_buckets(query_length, key_length, self.num_buckets, self.max_distance)
        values = self.relative_attention_bias(mx.array(buckets, dtype=mx.int32))  # (Lq, Lk, heads)
        return values.transpose(2, 0, 1)[None]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(t):
            return t.reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)

        out = attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), position_bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class T5DenseActDense(nn.Module):
    """wo(act(wi(x))) ("relu")."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = _ACTIVATIONS[config.dense_act_fn]

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float16:  # wo in fp32, as transformers keeps it for fp16 models
            return _linear_fp32(self.wo, self.act(self.wi(x).astype(mx.float32)))
        return self.wo(self.act(self.wi(x)))


class T5DenseGatedActDense(nn.Module):
    """wo(act(wi_0(x)) * wi_1(x)) ("gated-gelu": T5 v1.1, SD3's T5-XXL)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = _ACTIVATIONS[config.dense_act_fn]

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float16:  # the gated product and wo in fp32, as transformers keeps wo for fp16 models
            gated = self.act(self.wi_0(x).astype(mx.float32)) * self.wi_1(x).astype(mx.float32)
            return _linear_fp32(self.wo, gated)
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = (T5DenseGatedActDense if config.is_gated_act else T5DenseActDense)(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        x = _clamp_fp16(self.layer[0](x, position_bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = [T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """A T5 encoder: token ids (B, L) or (L,) -> T5Output.last_hidden_state (B, L, d_model)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)
        self.compute_dtype = None

    def compute_in(self, dtype) -> "T5EncoderModel":
        """Compute in `dtype` whatever the weights are stored in: fp16-stored weights run in fp32, each
        matrix product promoting its weight, so T5-XXL takes 9.5 GB instead of 19 at fp32 arithmetic."""
        self.compute_dtype = dtype
        for _, module in self.named_modules():
            if isinstance(module, T5LayerNorm):
                module.output_dtype = dtype
        return self

    def __call__(self, input_ids: mx.array) -> T5Output:
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        input_ids = input_ids.astype(mx.int32)
        length = input_ids.shape[-1]
        x = self.shared(input_ids)
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        blocks = self.encoder.block
        position_bias = blocks[0].layer[0].SelfAttention.compute_bias(length, length)
        for block in blocks:
            x = block(x, position_bias)
        return T5Output(last_hidden_state=self.encoder.final_layer_norm(x))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

_TIED_EMBEDDING = "encoder.embed_tokens.weight"


def checkpoint_names(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint weights as T5EncoderModel names them: one token embedding (`shared.weight`, or the tied
    `encoder.embed_tokens.weight` when only that was saved), without a full T5's decoder and lm_head."""
    names = {name: value for name, value in weights.items()
             if not name.startswith(("decoder.", "lm_head.")) and name != _TIED_EMBEDDING}
    if "shared.weight" not in names and _TIED_EMBEDDING in weights:
        names["shared.weight"] = weights[_TIED_EMBEDDING]
    return names


def load_t5_encoder(folder, dtype=None, variant: str | None = None) -> T5EncoderModel:
    """A T5 text encoder folder (config.json + safetensors, SD3's text_encoder_3) -> loaded T5EncoderModel.

    All weights are stored in `dtype` (the checkpoint's when None); at fp16 the feed-forward's `wo` is
    still computed in fp32 (see the module docstring), its weights upcast per call.
    """
    folder = Path(folder)
    model = T5EncoderModel(T5Config.from_file(folder / "config.json"))
    state = weight_io.read_safetensors(weight_io.safetensors_files(folder, variant))
    return weight_io.load_into(model, checkpoint_names(state), dtype=dtype)
