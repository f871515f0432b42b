"""MLX CLIP text encoders: transformers' CLIPTextModel and CLIPTextModelWithProjection, same names, same math.

Parameter names mirror the checkpoints (`text_model.embeddings.token_embedding.weight`,
`text_model.encoder.layers.0.self_attn.q_proj.weight`, `text_model.final_layer_norm.weight`,
`text_projection.weight`), so backend.engines.mlx.weights.load_into fills a model from a text encoder's
safetensors. transformers 5 saves a plain CLIPTextModel without the `text_model.` prefix;
`checkpoint_names` puts it back (load_text_encoder does that for you).

The model returns every hidden state, so the caller picks what its family conditions on:
SD 1.x/2.x use `last_hidden_state`; SDXL uses `hidden_states[-2]` of both encoders and the second
encoder's `text_embeds`.

Computation runs in the weights' dtype; layer norms run in float32 and the attention softmax is
float32 (mx.fast.scaled_dot_product_attention), so fp16 weights are safe.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import mlx.core as mx
import mlx.nn as nn

from backend import files
from backend.engines.mlx import cpu_attention, cpu_rowwise, layers, weights as weight_io
from backend.engines.mlx.layers import Linear

LEGACY_EOS_TOKEN_ID = 2  # configs written before transformers PR #24773: pool at the highest id instead


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407
    with_projection: bool = False

    @classmethod
    def from_dict(cls, config: Mapping) -> "CLIPTextConfig":
        """From a text encoder's config.json (transformers' CLIPTextConfig fields; defaults are its defaults)."""
        known = {f: config[f] for f in cls.__dataclass_fields__ if f in config and f != "with_projection"}
        if isinstance(known.get("eos_token_id"), (list, tuple)):
            known["eos_token_id"] = known["eos_token_id"][0]
        architectures = config.get("architectures") or []
        result = cls(**known, with_projection="CLIPTextModelWithProjection" in architectures)
        if result.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported CLIP activation {result.hidden_act!r} "
                             f"(expected one of {sorted(_ACTIVATIONS)})")
        if result.hidden_size % result.num_attention_heads:
            raise ValueError(f"hidden_size {result.hidden_size} is not divisible by "
                             f"num_attention_heads {result.num_attention_heads}")
        return result

    @classmethod
    def from_file(cls, path) -> "CLIPTextConfig":
        return cls.from_dict(files.read_json(path))


@dataclass
class CLIPOutput:
    last_hidden_state: mx.array          # (B, L, hidden), after the final layer norm
    hidden_states: tuple                 # embeddings, then each layer's output (no final norm): layers + 1
    pooled_output: mx.array              # (B, hidden): last_hidden_state at each row's eos token
    text_embeds: Optional[mx.array]      # (B, projection_dim): projected pooled output, None without projection


def _quick_gelu(x: mx.array) -> mx.array:
    # x sigmoid(1.702 x) = SiLU(1.702 x) / 1.702: layers.silu is vectorized on the CPU, mx.sigmoid scalar there
    # (0.13 s of a 0.4 s SD 1.5 text encoding at batch 2).
    return layers.silu(1.702 * x) * (1 / 1.702)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": nn.gelu}
#: Their numpy kernels at CPU inference, fc1's bias folded in (MLX's erf and sigmoid are scalar on the CPU).
_ROW_ACTIVATIONS = {_quick_gelu: cpu_rowwise.quick_gelu, nn.gelu: cpu_rowwise.gelu}


class _LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are computed in float32 whatever the input dtype."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float32:
            return super().__call__(x)
        return mx.fast.layer_norm(x.astype(mx.float32), self.weight.astype(mx.float32),
                                  self.bias.astype(mx.float32), self.eps).astype(x.dtype)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        length = input_ids.shape[-1]
        if length > self.position_embedding.weight.shape[0]:
            raise ValueError(f"{length} tokens exceed the text encoder's "
                             f"{self.position_embedding.weight.shape[0]} positions")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (dim // self.num_heads) ** -0.5
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, dim = x.shape

        def heads(t):
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if layers.cpu_inference(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]):
            out = cpu_attention.attention(q, k, v, self.scale, causal=True)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dim))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        kernel = _ROW_ACTIVATIONS.get(self.activation)
        if kernel is not None and layers.cpu_inference():
            h, bias = layers.bias_free(self.fc1, x)
            if layers.cpu_inference(h.size):  # the numpy kernel, fc1's bias added in its pass
                return self.fc2(kernel(h, bias))
            return self.fc2(self.activation(h if bias is None else h + bias))
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = _LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = _LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = _LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """A CLIP text encoder, with the projection head when `config.with_projection`."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    def eos_positions(self, input_ids: mx.array) -> mx.array:
        """Where each row's eos token is, the way transformers finds it for the pooled output."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return mx.argmax(input_ids, axis=-1)  # eos has the highest id; ties -> first position
        return mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)

    def __call__(self, input_ids: mx.array) -> CLIPOutput:
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        input_ids = input_ids.astype(mx.int32)
        transformer = self.text_model
        x = transformer.embeddings(input_ids)
        hidden_states = [x]
        for layer in transformer.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        last = transformer.final_layer_norm(x)
        pooled = last[mx.arange(last.shape[0]), self.eos_positions(input_ids)]
        text_embeds = self.text_projection(pooled) if self.config.with_projection else None
        return CLIPOutput(last_hidden_state=last, hidden_states=tuple(hidden_states),
                          pooled_output=pooled, text_embeds=text_embeds)


def checkpoint_names(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint weights with the `text_model.` prefix that transformers 5 leaves out of CLIPTextModel."""
    return {name if name.startswith(("text_model.", "text_projection.")) else f"text_model.{name}": value
            for name, value in weights.items()}


def load_text_encoder(folder, dtype=None, variant: str | None = None) -> CLIPTextModel:
    """A text encoder folder (config.json + safetensors, diffusers layout) -> loaded CLIPTextModel."""
    folder = Path(folder)
    model = CLIPTextModel(CLIPTextConfig.from_file(folder / "config.json"))
    state = weight_io.read_safetensors(weight_io.safetensors_files(folder, variant))
    return weight_io.load_into(model, checkpoint_names(state), dtype=dtype)
