"""The MLX SD3Transformer2DModel (MMDiT) of Stable Diffusion 3 and 3.5.

Owns `SD3Config` (diffusers' transformer/config.json, with diffusers' defaults), the model built from
the config alone, and `load_sd3_transformer`. Attribute names mirror diffusers' state dict, the
`pos_embed.pos_embed` table included (diffusers saves it when pos_embed_max_size is set), so
`weights.load_into` fills the model with no renames. Latents are NHWC, token sequences (B, L, C).

The joint attention runs once over image and context tokens together (layers.attention: the
chunked fp32 kernel on the CPU, MLX's fused kernel on a GPU). Layer norms, the q/k RMS norms and
softmax are computed in fp32 for any weight dtype; the feed-forward uses the tanh-GELU kernel.
At CPU inference with plain Linears, each block runs in numpy between its residual sums (the
modulated rows, the q, k, v products, attention, the output projections with their gated residuals,
the feed-forward: JointAttention._numpy_call, FeedForward), the residual streams staying MLX arrays.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backend import files, interrupt
from backend.engines.mlx import cpu_kernels, cpu_rowwise, layers, weights as W
from backend.engines.mlx.layers import FeedForward, Linear, TimestepEmbedding, attention, silu, timestep_embedding

_NORM_EPS = 1e-6  # every norm of the model: adaLN LayerNorms, norm2, norm_out, the q/k RMS norms
_TIME_CHANNELS = 256  # CombinedTimestepTextProjEmbeddings' sinusoidal timestep width


@dataclass
class SD3Config:
    """The config.json fields of diffusers' SD3Transformer2DModel; the defaults are diffusers' defaults."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: Optional[int] = 16
    pos_embed_max_size: Optional[int] = 96
    dual_attention_layers: tuple = ()  # () for SD3; (0, ..., 12) for SD3.5 Medium
    qk_norm: Optional[str] = None  # "rms_norm" for SD3.5
    extra: dict = field(default_factory=dict)  # keys this implementation does not read

    @classmethod
    def from_dict(cls, config: dict) -> "SD3Config":
        class_name = config.get("_class_name", "SD3Transformer2DModel")
        if class_name != "SD3Transformer2DModel":
            raise ValueError(f"transformer class {class_name!r} is not supported (only SD3Transformer2DModel)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names and not k.startswith("_")}
        cfg = cls(**known, extra=extra)
        if cfg.out_channels is None:
            cfg.out_channels = cfg.in_channels  # as diffusers does
        if cfg.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3 transformer qk_norm {cfg.qk_norm!r} is not supported (None or 'rms_norm')")
        if cfg.caption_projection_dim != cfg.inner_dim:
            # The attention's add_*_proj take inner_dim inputs: diffusers' model fails on these configs too.
            raise ValueError(f"SD3 transformer caption_projection_dim={cfg.caption_projection_dim} must equal "
                             f"num_attention_heads * attention_head_dim = {cfg.inner_dim}")
        if not isinstance(cfg.sample_size, int) or cfg.patch_size < 1 or cfg.num_layers < 1:
            raise ValueError(f"SD3 transformer config: unsupported sample_size={cfg.sample_size!r}, "
                             f"patch_size={cfg.patch_size!r} or num_layers={cfg.num_layers!r}")
        if cfg.pos_embed_max_size is not None and cfg.pos_embed_max_size < 1:
            raise ValueError(f"SD3 transformer pos_embed_max_size={cfg.pos_embed_max_size!r} is not supported")
        if cfg.inner_dim % 4:
            raise ValueError("SD3 transformer: the 2-D sin-cos position embedding needs a width divisible by 4")
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def sincos_pos_embed(dim: int, height: int, width: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers' `get_2d_sincos_pos_embed` for a (height, width) grid of patches: (height*width, dim) fp32.

    As in diffusers, the first half of the channels encodes the column and the second half the row,
    positions are computed in fp32 and the sines in fp64.
    """
    def axis(n):
        return np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)

    def one_d(positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.outer(positions.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(axis(width), axis(height))  # (height, width) each
    return np.concatenate([one_d(cols.reshape(-1)), one_d(rows.reshape(-1))], axis=1).astype(np.float32)


def _layer_norm(x: mx.array) -> mx.array:
    """LayerNorm without affine parameters (nn.LayerNorm(elementwise_affine=False, eps=1e-6)), in fp32."""
    return mx.fast.layer_norm(x.astype(mx.float32), None, None, _NORM_EPS)


def _modulate(normed: mx.array, scale: mx.array, shift: mx.array, dtype) -> mx.array:
    """normed * (1 + scale) + shift, in fp32 (normed is fp32; scale, shift (B, 1, C)), cast to dtype."""
    return (normed * (1 + scale.astype(mx.float32)) + shift.astype(mx.float32)).astype(dtype)


def _norm_modulate(x: mx.array, scale: mx.array, shift: mx.array, dtype, rows: bool = False):
    """_modulate(_layer_norm(x), ...): at CPU inference one numpy kernel on every core (cpu_rowwise.layer_norm
    with per-image weights), with `rows` its fp32 numpy result (B, L, C) for products that follow in numpy."""
    if layers.cpu_inference(x.size):
        out = cpu_rowwise.layer_norm(x, 1 + scale.astype(mx.float32), shift.astype(mx.float32), _NORM_EPS, rows)
        return out if rows else out.astype(dtype)
    return _modulate(_layer_norm(x), scale, shift, dtype)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """diffusers' `PatchEmbed` with SD3's cropped position embedding: NHWC latents -> (B, h*w/p^2, C) tokens.

    `proj` is the stride-p p x p convolution, applied as one matrix product over the flattened
    patches. With pos_embed_max_size, `pos_embed` is the checkpoint's (1, M*M, C) table, center-cropped
    to the latent's patch grid; without it, the embedding is computed for the grid, as diffusers does.
    """

    def __init__(self, cfg: SD3Config):
        super().__init__()
        p, inner = cfg.patch_size, cfg.inner_dim
        self.patch_size = p
        self.max_size = cfg.pos_embed_max_size
        self.base_size = cfg.sample_size // p
        self.proj = nn.Conv2d(cfg.in_channels, inner, p, stride=p)
        if self.max_size:
            # A persistent buffer in diffusers: loaded from the checkpoint, never trained.
            self.pos_embed = mx.zeros((1, self.max_size * self.max_size, inner))
            self.freeze(keys=["pos_embed"], recurse=False)

    def _kernel(self) -> mx.array:
        """`proj`'s kernel, dequantized when the projection is a quantized convolution."""
        proj = self.proj
        if "scales" not in proj:
            return proj.weight
        kernel = mx.dequantize(proj["weight"], proj["scales"], proj["biases"], proj.group_size, proj.bits)
        return kernel.reshape(proj.kernel_shape)

    def position_embedding(self, h: int, w: int, dtype) -> mx.array:
        """(1, h*w, C) for an h x w grid of patches."""
        if not self.max_size:
            dim = self.proj.weight.shape[0]
            return mx.array(sincos_pos_embed(dim, h, w, self.base_size))[None].astype(dtype)
        m = self.max_size
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(m, m, -1)[top:top + h, left:left + w]
        return table.reshape(1, h * w, -1).astype(dtype)

    def __call__(self, latents: mx.array) -> mx.array:
        b, height, width, c = latents.shape
        p = self.patch_size
        h, w = height // p, width // p
        patches = latents.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)
        weight = self._kernel()  # (C_out, p, p, C_in), the order of a patch's flattened values
        tokens = mx.addmm(self.proj.bias.astype(latents.dtype), patches,
                          weight.reshape(weight.shape[0], -1).T.astype(latents.dtype))
        return tokens + self.position_embedding(h, w, tokens.dtype)


class PixArtAlphaTextProjection(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' PixArtAlphaTextProjection with act_fn="silu")."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = Linear(in_features, hidden_size)
        self.linear_2 = Linear(hidden_size, hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """The conditioning vector: embedded timestep + projected pooled text embedding, (B, C)."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(_TIME_CHANNELS, embedding_dim)
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim)

    def __call__(self, timestep: mx.array, pooled: mx.array) -> mx.array:
        t_emb = timestep_embedding(timestep, _TIME_CHANNELS, flip_sin_to_cos=True, freq_shift=0)
        return self.timestep_embedder(t_emb.astype(pooled.dtype)) + self.text_embedder(pooled)


class AdaLayerNorm(nn.Module):
    """The adaLN modulation vectors: `linear` of SiLU(conditioning), split in `chunks` (B, 1, C) arrays.

    diffusers' AdaLayerNormZero (6 chunks: shift, scale, gate for attention, then for the MLP),
    SD35AdaLayerNormZeroX (9: a second shift, scale, gate for attn2) and AdaLayerNormContinuous
    (2: scale, shift). The parameterless LayerNorm they wrap is applied by the block; SiLU(conditioning)
    is computed once per forward, by the model.
    """

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim)

    def __call__(self, conditioning_act: mx.array) -> list:
        return mx.split(self.linear(conditioning_act)[:, None, :], self.chunks, axis=-1)


class RMSNorm(nn.Module):
    """diffusers' RMSNorm with a weight, over the last axis, computed in fp32, returned in x's dtype
    (as diffusers does; on a GPU the fused attention needs q, k and v of one dtype)."""

    def __init__(self, dim: int, eps: float = _NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps).astype(x.dtype)


class JointAttention(nn.Module):
    """diffusers' `Attention` under JointAttnProcessor2_0: image tokens, and with `joint` context tokens
    through their own projections (add_q/k/v_proj, to_add_out), in one softmax over both.

    `context_pre_only` (the last block) has no to_add_out: the context's attention output is unused,
    so its queries are skipped (add_q_proj is loaded but not applied). The attention output of the
    image rows is the same either way, since each query row's softmax is independent.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: Optional[str], joint: bool,
                 context_pre_only: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.scale = head_dim ** -0.5
        self.context_pre_only = context_pre_only
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        self.to_out = [Linear(inner, dim)]  # to_out.1 is dropout
        if qk_norm:
            self.norm_q = RMSNorm(head_dim)
            self.norm_k = RMSNorm(head_dim)
        if joint:
            self.add_q_proj = Linear(dim, inner)
            self.add_k_proj = Linear(dim, inner)
            self.add_v_proj = Linear(dim, inner)
            if not context_pre_only:
                self.to_add_out = Linear(inner, dim)
            if qk_norm:
                self.norm_added_q = RMSNorm(head_dim)
                self.norm_added_k = RMSNorm(head_dim)

    def _project(self, proj: nn.Linear, x: mx.array, norm: Optional[str]) -> mx.array:
        """(B, L, C) -> (B, L, heads, head_dim), RMS-normalized per head when the config asks."""
        b, n, _ = x.shape
        y = proj(x).reshape(b, n, self.heads, self.head_dim)
        return self[norm](y) if norm and norm in self else y

    def __call__(self, x: mx.array, context: Optional[mx.array] = None, residuals: Optional[tuple] = None):
        """Image output (B, N, C), or with `context` (image output, context output or None). With `residuals`
        ((r, gate) for the image and, with context, (r, gate) or None for the context; gate (B, 1, C)): r + gate *
        output in place of each output (the block's gated residuals)."""
        if residuals is not None and self.numpy_path(x):
            return self._numpy_call(x, context, residuals)
        b, n, _ = x.shape
        q = [self._project(self.to_q, x, "norm_q")]
        k = [self._project(self.to_k, x, "norm_k")]
        v = [self._project(self.to_v, x, None)]
        with_context = context is not None
        context_queries = with_context and not self.context_pre_only
        if with_context:
            # Image tokens first, then context tokens, as diffusers concatenates them (layers.attention joins the
            # parts, or its CPU kernel reads them in place).
            k.append(self._project(self.add_k_proj, context, "norm_added_k"))
            v.append(self._project(self.add_v_proj, context, None))
            if context_queries:
                q.append(self._project(self.add_q_proj, context, "norm_added_q"))
        heads_first = [[p.transpose(0, 2, 1, 3) for p in parts] for parts in (q, k, v)]
        out = attention(*heads_first, self.scale)
        out = out.transpose(0, 2, 1, 3).reshape(b, out.shape[2], -1).astype(x.dtype)
        image = self.to_out[0](out[:, :n])
        context_out = self.to_add_out(out[:, n:]) if context_queries else None
        if residuals is not None:
            image = layers.gated_residual(residuals[0], image)
            if context_out is not None and residuals[1] is not None:
                context_out = layers.gated_residual(residuals[1], context_out)
        return (image, context_out) if with_context else image

    def numpy_path(self, x: mx.array) -> bool:
        """CPU inference with `layers.kernel_linear` projections (plain or quantized, no LoRA): with residuals,
        __call__ runs in numpy (`_numpy_call`) and takes x and context as MLX arrays or fp32 numpy rows (B, L, C)."""
        linears = [self[name] for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                           "to_add_out") if name in self] + [self.to_out[0]]
        return layers.cpu_inference(x.size) and all(layers.kernel_linear(m) for m in linears)

    def _numpy_call(self, x: mx.array, context: Optional[mx.array], residuals: tuple):
        """__call__ with residuals at CPU inference, from the q, k, v products to the gated residuals in numpy
        (cpu_rowwise.products, cpu_attention, cpu_rowwise.project): no bias or residual pass in MLX, no copy of
        q, k, v or the attention output back into MLX."""
        b, n, _ = x.shape
        parts = {"q": [], "k": [], "v": []}
        streams = [(x, ("to_q", "to_k", "to_v"), {"q": "norm_q", "k": "norm_k"})]
        context_queries = context is not None and not self.context_pre_only
        if context is not None:
            names = ("add_q_proj", "add_k_proj", "add_v_proj") if context_queries else ("add_k_proj", "add_v_proj")
            streams.append((context, names, {"q": "norm_added_q", "k": "norm_added_k"}))
        for tokens, names, norms in streams:
            rows = cpu_rowwise.products(tokens, [(layers.weight_rows(self[m]), self[m].get("bias")) for m in names])
            per_head = rows.reshape(-1, len(names), self.heads, self.head_dim)
            roles = "qkv"[3 - len(names):]  # the last block's context: keys and values only
            for i, role in enumerate(roles):
                norm = norms.get(role)
                if norm in self:
                    cpu_rowwise.rms_norm_heads(per_head[:, i], self[norm].weight, self[norm].eps)
                parts[role].append(per_head[:, i].reshape(b, -1, self.heads, self.head_dim).transpose(0, 2, 1, 3))
        out = attention(parts["q"], parts["k"], parts["v"], self.scale, rows=True)  # (B, N, heads, head_dim)
        out = out.reshape(b, out.shape[1], -1)
        image_residual = residuals[0]
        image = cpu_rowwise.project(out[:, :n], layers.weight_rows(self.to_out[0]), self.to_out[0].get("bias"),
                                    image_residual[0].shape, image_residual[0].dtype, image_residual)
        if context is None:
            return image
        if not context_queries:
            return image, None
        context_residual = residuals[1]
        return image, cpu_rowwise.project(out[:, n:], layers.weight_rows(self.to_add_out), self.to_add_out.get("bias"),
                                          context_residual[0].shape, context_residual[0].dtype, context_residual)


class JointTransformerBlock(nn.Module):
    """The MMDiT block: adaLN-Zero on both streams, joint attention, (attn2,) gated MLPs.

    `context_pre_only` (the last block) modulates the context with AdaLayerNormContinuous, only to
    serve as keys and values, and returns no context. `use_dual_attention` (SD3.5 Medium) adds a
    self-attention over the image tokens (attn2) with its own modulation (SD35AdaLayerNormZeroX).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool, qk_norm: Optional[str],
                 use_dual_attention: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = AdaLayerNorm(dim, 9 if use_dual_attention else 6)
        self.norm1_context = AdaLayerNorm(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, heads, head_dim, qk_norm, joint=True, context_pre_only=context_pre_only)
        if use_dual_attention:
            self.attn2 = JointAttention(dim, heads, head_dim, qk_norm, joint=False)
        self.ff = FeedForward(dim, activation_fn="gelu-approximate")
        if not context_pre_only:
            self.ff_context = FeedForward(dim, activation_fn="gelu-approximate")

    def __call__(self, x: mx.array, context: mx.array, conditioning_act: mx.array):
        """(image tokens, context tokens) -> (context tokens or None for the last block, image tokens)."""
        dtype = x.dtype
        mods = self.norm1(conditioning_act)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        numpy_attention = self.attn.numpy_path(x)  # then both streams' modulated rows stay numpy
        if self.use_dual_attention:  # the normalized image tokens serve both attentions
            normed = _layer_norm(x)
            x_attn = _modulate(normed, scale_msa, shift_msa, dtype)
        else:
            normed, x_attn = None, _norm_modulate(x, scale_msa, shift_msa, dtype, numpy_attention)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(conditioning_act)  # AdaLayerNormContinuous: scale first
        else:
            c_shift, c_scale, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(conditioning_act)
        c_attn = _norm_modulate(context, c_scale, c_shift, dtype, numpy_attention)

        x, context_attn = self.attn(x_attn, c_attn, residuals=(
            (x, gate_msa), None if self.context_pre_only else (context, c_gate_msa)))
        if self.use_dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = self.attn2(_modulate(normed, scale_msa2, shift_msa2, dtype), residuals=((x, gate_msa2),))
        del normed
        x = self.ff(_norm_modulate(x, scale_mlp, shift_mlp, dtype, self.ff.takes_rows(x)), residual=(x, gate_mlp))
        if self.context_pre_only:
            return None, x

        context = context_attn
        normed_context = _norm_modulate(context, c_scale_mlp, c_shift_mlp, dtype, self.ff_context.takes_rows(context))
        return self.ff_context(normed_context, residual=(context, c_gate_mlp)), x


class SD3Transformer2DModel(nn.Module):
    """Patch embedding, conditioning, the joint blocks, AdaLayerNormContinuous, proj_out, unpatchify."""

    def __init__(self, config: Union[SD3Config, dict]):
        super().__init__()
        cfg = config if isinstance(config, SD3Config) else SD3Config.from_dict(config)
        self.config = cfg
        inner = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(inner, cfg.pooled_projection_dim)
        self.context_embedder = Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        dual = set(cfg.dual_attention_layers)
        self.transformer_blocks = [
            JointTransformerBlock(inner, cfg.num_attention_heads, cfg.attention_head_dim,
                                  context_pre_only=i == cfg.num_layers - 1, qk_norm=cfg.qk_norm,
                                  use_dual_attention=i in dual)
            for i in range(cfg.num_layers)]
        self.norm_out = AdaLayerNorm(inner, 2)
        self.proj_out = Linear(inner, cfg.patch_size * cfg.patch_size * cfg.out_channels)

    @property
    def max_latent_size(self) -> Optional[int]:
        """The largest latent height/width the position table covers (None: unlimited)."""
        cfg = self.config
        return cfg.pos_embed_max_size * cfg.patch_size if cfg.pos_embed_max_size else None

    def check_latent_size(self, height: int, width: int) -> None:
        p, limit = self.config.patch_size, self.max_latent_size
        if height % p or width % p:
            raise ValueError(f"SD3 latents must be multiples of the patch size {p}, got {height}x{width}")
        if limit is not None and (height > limit or width > limit):
            raise ValueError(f"SD3 latents of {height}x{width} exceed this transformer's limit of {limit}x{limit} "
                             f"(pos_embed_max_size={self.config.pos_embed_max_size} patches of {p})")

    def __call__(self, latents: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 pooled_projections: mx.array) -> mx.array:
        """latents (B, h, w, C) NHWC, timestep (B,) or scalar (diffusers passes sigma * 1000),
        encoder_hidden_states (B, L, joint_attention_dim), pooled_projections (B, pooled_projection_dim)
        -> (B, h, w, out_channels) NHWC."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"SD3 latents must be (B, h, w, {cfg.in_channels}) NHWC, got {tuple(latents.shape)}")
        b, height, width, _ = latents.shape
        self.check_latent_size(height, width)
        dtype = latents.dtype
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (b,))

        x = self.pos_embed(latents)
        conditioning = self.time_text_embed(timestep, pooled_projections.astype(dtype))
        conditioning_act = silu(conditioning)  # every adaLN linear takes SiLU(conditioning)
        context = self.context_embedder(encoder_hidden_states.astype(dtype))
        for block in self.transformer_blocks:
            context, x = block(x, context, conditioning_act)
            if cpu_kernels.eager_chunks.active:
                # Inference: evaluate block by block, so the lazy graph holds one block's intermediates.
                mx.eval(x, *([] if context is None else [context]))
            interrupt.checkpoint(x, *([] if context is None else [context]))

        scale, shift = self.norm_out(conditioning_act)
        x = self.proj_out(_norm_modulate(x, scale, shift, dtype))
        p, c = cfg.patch_size, cfg.out_channels
        h, w = height // p, width // p
        return x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def load_sd3_transformer(folder: Union[str, Path], dtype=mx.float32) -> SD3Transformer2DModel:
    """Build the transformer from `folder`/config.json and load its safetensors, cast to `dtype`.

    `folder` is the transformer/ folder of a diffusers checkpoint, or the checkpoint itself. With a
    dtype other than fp32, an fp16 variant of the weights is preferred when present.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    config = files.read_json(folder / "config.json")
    model = SD3Transformer2DModel(SD3Config.from_dict(config))
    weight_files = W.safetensors_files(folder, variant="fp16" if dtype != mx.float32 else None)
    return W.load_into(model, W.read_safetensors(weight_files), dtype)


__all__ = ["SD3Config", "SD3Transformer2DModel", "load_sd3_transformer", "sincos_pos_embed"]
