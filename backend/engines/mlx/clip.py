"""MLX CLIP text encoders: transformers' CLIPTextModel and CLIPTextModelWithProjection, same names, same math.

Parameter names mirror the checkpoints (`text_model.embeddings.token_embedding.weight`,
`text_model.encoder.layers.0.self_attn.q_proj.weight`, `text_model.final_layer_norm.weight`,
`text_projection.weight`), so backend.engines.mlx.weights.load_into fills a model from a text encoder's
safetensors. transformers 5 saves a plain CLIPTextModel without the `text_model.` prefix;
`checkpoint_names` puts it back (load_text_encoder does that for you).

Called, the model returns every hidden state; `conditioning` computes only what a family conditions on:
SD 1.x/2.x use `last_hidden_state`; SDXL uses `hidden_states[-2]` of both encoders and the second
encoder's `text_embeds`, so its first encoder's last layer is never run and its second's only at the eos token.

Computation runs in the weights' dtype; layer norms run in float32 and the attention softmax is
float32 (mx.fast.scaled_dot_product_attention), so fp16 weights are safe.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backend import blas, files
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
#: Layers over at least this many elements (batch x tokens x width) run as numpy rows at CPU inference
#: (CLIPEncoderLayer.as_rows): SD's CLIP-L at 2 x 77 x 768 and OpenCLIP bigG; the embedded model's 2 x 77 x 128
#: keeps MLX's ops.
ROWS_MIN_ELEMENTS = 1 << 16


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

    def _heads(self, t: mx.array) -> mx.array:
        """(B, L, dim) -> (B, heads, L, head_dim)."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, dim = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if layers.cpu_inference(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]):
            out = cpu_attention.attention(q, k, v, self.scale, causal=True)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dim))

    def at_rows(self, h: mx.array, positions: mx.array) -> mx.array:
        """The attention output (B, dim) for one query per row, at `positions` (B,): it sees keys 0..position."""
        batch, length, dim = h.shape
        q = self._heads(self.q_proj(h[mx.arange(batch), positions][:, None]))
        k, v = self._heads(self.k_proj(h)), self._heads(self.v_proj(h))
        visible = (mx.arange(length)[None] <= positions[:, None])[:, None, None]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=visible)
        return self.out_proj(out.reshape(batch, dim))


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
        if self.takes_rows(x):
            return self.as_rows(x)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

    def takes_rows(self, x: mx.array) -> bool:
        """Whether the layer runs as numpy rows here: fp32 CPU inference over ROWS_MIN_ELEMENTS, with
        `layers.kernel_linear`s (plain or quantized, no LoRA)."""
        attn, mlp = self.self_attn, self.mlp
        return (x.size >= ROWS_MIN_ELEMENTS and x.dtype == mx.float32 and layers.cpu_inference()
                and mlp.activation in _ROW_ACTIVATIONS and layers.weight_dtype(mlp.fc1) == mx.float32
                and all(layers.kernel_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj,
                                                          mlp.fc1, mlp.fc2)))

    def as_rows(self, x: mx.array) -> mx.array:
        """The layer with fp32 numpy rows between its kernels: LayerNorm, the products with their biases written
        first (cpu_rowwise.products), the causal attention, the activation over fc1's rows in place, and each output
        projection with its residual added (cpu_rowwise.project). Only the layer's output is copied into MLX, and
        no op runs in MLX (each costs ~0.05 ms there at these 154 rows, a numpy call ~0.005-0.03 ms)."""
        attn, mlp, (batch, length, dim) = self.self_attn, self.mlp, x.shape

        def norm(ln, y):
            return cpu_rowwise.layer_norm(y, ln.weight, ln.bias, ln.eps, rows=True)

        qkv = cpu_rowwise.products(norm(self.layer_norm1, x), [(layers.weight_rows(p), p.bias) for p in
                                                               (attn.q_proj, attn.k_proj, attn.v_proj)])
        q, k, v = (part.transpose(0, 2, 1, 3) for part in
                   np.moveaxis(qkv.reshape(batch, length, 3, attn.num_heads, -1), 2, 0))
        out = cpu_attention.attention(q, k, v, attn.scale, causal=True, rows=True)
        # all images' rows in one product: out is one contiguous (B, L, heads, head_dim) buffer
        x = cpu_rowwise.project(out.reshape(batch * length, dim), layers.weight_rows(attn.out_proj),
                                attn.out_proj.get("bias"), x.shape, x.dtype, (x, None))
        h = _ROW_ACTIVATIONS[mlp.activation](cpu_rowwise.products(norm(self.layer_norm2, x),
                                                                  [(layers.weight_rows(mlp.fc1), mlp.fc1.get("bias"))]),
                                             rows=True, in_place=True)
        return cpu_rowwise.project(h, layers.weight_rows(mlp.fc2), mlp.fc2.get("bias"), x.shape, x.dtype, (x, None))

    def at_rows(self, x: mx.array, positions: mx.array) -> mx.array:
        """This layer's output (B, hidden) at one position per row (B,): the causal attention needs the keys and
        values of the tokens up to it, nothing after it, and every other step works on that row alone."""
        x = x[:, :int(positions.max().item()) + 1]
        y = x[mx.arange(x.shape[0]), positions] + self.self_attn.at_rows(self.layer_norm1(x), positions)
        return y + self.mlp(self.layer_norm2(y))


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
        input_ids = _batched_ids(input_ids)
        transformer = self.text_model
        x = transformer.embeddings(input_ids)
        hidden_states = [x]
        with self._products_back_to_back():
            for layer in transformer.encoder.layers:
                x = layer(x)
                hidden_states.append(x)
        last = transformer.final_layer_norm(x)
        pooled = last[mx.arange(last.shape[0]), self.eos_positions(input_ids)]
        text_embeds = self.text_projection(pooled) if self.config.with_projection else None
        return CLIPOutput(last_hidden_state=last, hidden_states=tuple(hidden_states),
                          pooled_output=pooled, text_embeds=text_embeds)

    @staticmethod
    def _products_back_to_back():
        """At CPU inference the layers run eagerly, one product after another with small numpy calls between them:
        oneMKL's threads wait for the next product instead of sleeping (blas.products_back_to_back)."""
        return blas.products_back_to_back() if layers.cpu_inference() else contextlib.nullcontext()

    def conditioning(self, input_ids: mx.array, layer: int = -1, pooled: bool = False) -> tuple:
        """(hidden, pooled) as a pipeline conditions on them, computing nothing else: the hidden state `layer`
        (-1: the last, after the final norm, as last_hidden_state; -2: the penultimate, as hidden_states[-2]) and,
        with `pooled`, text_embeds (pooled_output where the model has no projection), else None.

        The layers after `layer` run only for the pooled output, and the last of them only at each row's eos
        token (CLIPEncoderLayer.at_rows): SDXL's first encoder skips its last layer, and its second runs one row
        of it."""
        input_ids = _batched_ids(input_ids)
        transformer = self.text_model
        stack = transformer.encoder.layers
        if not -len(stack) - 1 <= layer <= -1:
            raise ValueError(f"hidden state {layer} is outside the text encoder's {len(stack)} layers")
        full = len(stack) + 1 + layer  # layers run on every token
        x = transformer.embeddings(input_ids)
        with self._products_back_to_back():
            for each in stack[:full]:
                x = each(x)
            hidden = transformer.final_layer_norm(x) if layer == -1 else x
            if not pooled:
                return hidden, None
            eos = self.eos_positions(input_ids)
            if full < len(stack):
                for each in stack[full:-1]:
                    x = each(x)
                rows = stack[-1].at_rows(x, eos)
            else:
                rows = x[mx.arange(x.shape[0]), eos]
        rows = transformer.final_layer_norm(rows)
        return hidden, self.text_projection(rows) if self.config.with_projection else rows


def _batched_ids(input_ids: mx.array) -> mx.array:
    """Token ids as an int32 (B, L) batch (one row may come as (L,))."""
    return (input_ids[None] if input_ids.ndim == 1 else input_ids).astype(mx.int32)


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
