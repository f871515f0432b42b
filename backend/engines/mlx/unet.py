"""The MLX UNet2DConditionModel of SD 1.x, SD 2.x, SDXL, LCM and the Turbo models.

Owns `UNetConfig` (diffusers' unet/config.json, with diffusers' defaults) and the model, built
from the config alone; its attribute names mirror diffusers' state dict. Tensors are NHWC.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from backend import interrupt
from backend.engines.mlx.layers import (
    Conv2d, Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2DModel, Upsample2D, activation, group_norm,
    timestep_embedding,
)

PerLevel = Union[int, Sequence]


@dataclass
class UNetConfig:
    """The config.json fields this implementation reads; the defaults are diffusers' defaults."""
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: Union[bool, Sequence[bool]] = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: PerLevel = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: PerLevel = 1280
    transformer_layers_per_block: PerLevel = 1
    reverse_transformer_layers_per_block: Optional[Sequence] = None
    attention_head_dim: PerLevel = 8
    num_attention_heads: Optional[PerLevel] = None
    use_linear_projection: bool = False  # same math either way here (see Transformer2DModel)
    upcast_attention: bool = False  # the attention kernel always computes its softmax in fp32
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    resnet_time_scale_shift: str = "default"
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: Optional[int] = None
    time_embedding_act_fn: Optional[str] = None
    timestep_post_act: Optional[str] = None
    time_cond_proj_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: Optional[Union[int, Sequence[int]]] = None
    # Present in some configs; any value other than these defaults is refused in from_dict.
    class_embed_type: Optional[str] = None
    num_class_embeds: Optional[int] = None
    encoder_hid_dim: Optional[int] = None
    encoder_hid_dim_type: Optional[str] = None
    dual_cross_attention: bool = False
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    resnet_skip_time_act: bool = False
    cross_attention_norm: Optional[str] = None
    extra: dict = field(default_factory=dict)  # keys this implementation does not read

    _UNSUPPORTED_UNLESS_DEFAULT = ("class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
                                   "dual_cross_attention", "attention_type", "class_embeddings_concat",
                                   "resnet_skip_time_act", "cross_attention_norm")

    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names and not k.startswith("_")}
        cfg = cls(**known, extra=extra)
        defaults = cls()
        for name in cls._UNSUPPORTED_UNLESS_DEFAULT:
            if getattr(cfg, name) != getattr(defaults, name):
                raise ValueError(f"UNet config option {name}={getattr(cfg, name)!r} is not supported")
        if cfg.time_embedding_type != "positional":
            raise ValueError(f"UNet time_embedding_type {cfg.time_embedding_type!r} is not supported")
        if cfg.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet addition_embed_type {cfg.addition_embed_type!r} is not supported")
        if cfg.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
            raise ValueError(f"UNet mid_block_type {cfg.mid_block_type!r} is not supported")
        levels = len(cfg.down_block_types)
        if len(cfg.up_block_types) != levels or len(cfg.block_out_channels) != levels:
            raise ValueError("UNet config: down_block_types, up_block_types and block_out_channels differ in length")
        return cfg

    def per_level(self, value: PerLevel) -> list:
        """An int (or bool) option repeated for each level, or the per-level list as given."""
        n = len(self.down_block_types)
        values = list(value) if isinstance(value, (list, tuple)) else [value] * n
        if len(values) != n:
            raise ValueError(f"UNet config: per-level option {value!r} does not have {n} entries")
        return values

    @property
    def heads_per_level(self) -> list:
        # diffusers' naming quirk: configs call the number of heads `attention_head_dim`.
        return self.per_level(self.num_attention_heads or self.attention_head_dim)


def _layers_list(value, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D; returns the skip states too."""

    def __init__(self, cfg: UNetConfig, level: int, in_channels: int, out_channels: int, temb_channels: int,
                 with_attention: bool, add_downsample: bool):
        super().__init__()
        n = cfg.per_level(cfg.layers_per_block)[level]
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, cfg.norm_num_groups,
                          cfg.norm_eps, cfg.act_fn, cfg.resnet_time_scale_shift, cfg.resnet_out_scale_factor)
            for i in range(n)]
        if with_attention:
            heads = cfg.heads_per_level[level]
            depth = _layers_list(cfg.per_level(cfg.transformer_layers_per_block)[level], n)
            self.attentions = [
                Transformer2DModel(heads, out_channels // heads, out_channels, depth[i],
                                   cfg.per_level(cfg.cross_attention_dim)[level], cfg.norm_num_groups,
                                   cfg.per_level(cfg.only_cross_attention)[level])
                for i in range(n)]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, out_channels, cfg.downsample_padding)]

    def __call__(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if "attentions" in self:
                x = self.attentions[i](x, context)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with `attentions`) or UpBlock2D, consuming skip states from the end."""

    def __init__(self, cfg: UNetConfig, level: int, in_channels: int, prev_output_channels: int, out_channels: int,
                 temb_channels: int, with_attention: bool, add_upsample: bool):
        super().__init__()
        reversed_levels = list(reversed(range(len(cfg.down_block_types))))
        source = reversed_levels[level]  # the per-level option index this up level mirrors
        n = cfg.per_level(cfg.layers_per_block)[source] + 1
        self.resnets = []
        for i in range(n):
            skip_channels = in_channels if i == n - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(
                resnet_in + skip_channels, out_channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps,
                cfg.act_fn, cfg.resnet_time_scale_shift, cfg.resnet_out_scale_factor))
        if with_attention:
            heads = cfg.heads_per_level[source]
            if cfg.reverse_transformer_layers_per_block is not None:
                depth = _layers_list(cfg.reverse_transformer_layers_per_block[level], n)
            else:
                depth = _layers_list(cfg.per_level(cfg.transformer_layers_per_block)[source], n)
            self.attentions = [
                Transformer2DModel(heads, out_channels // heads, out_channels, depth[i],
                                   cfg.per_level(cfg.cross_attention_dim)[source], cfg.norm_num_groups,
                                   cfg.per_level(cfg.only_cross_attention)[source])
                for i in range(n)]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels, out_channels)]

    def __call__(self, x, skips: list, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb)
            if "attentions" in self:
                x = self.attentions[i](x, context)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig, channels: int, temb_channels: int):
        super().__init__()
        heads = cfg.heads_per_level[-1]
        depth = _layers_list(cfg.per_level(cfg.transformer_layers_per_block)[-1], 1)
        self.resnets = [
            ResnetBlock2D(channels, channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                          cfg.resnet_time_scale_shift, cfg.mid_block_scale_factor)
            for _ in range(2)]
        self.attentions = [Transformer2DModel(heads, channels // heads, channels, depth[0],
                                              cfg.per_level(cfg.cross_attention_dim)[-1], cfg.norm_num_groups)]

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: Union[UNetConfig, dict]):
        super().__init__()
        cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
        self.config = cfg
        channels = list(cfg.block_out_channels)
        levels = len(channels)
        time_embed_dim = cfg.time_embedding_dim or channels[0] * 4

        self.conv_in = Conv2d(cfg.in_channels, channels[0], cfg.conv_in_kernel,
                                 padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, cfg.act_fn,
                                                cond_proj_dim=cfg.time_cond_proj_dim,
                                                post_act_fn=cfg.timestep_post_act)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_embed_dim)
        self.time_embed_act = activation(cfg.time_embedding_act_fn) if cfg.time_embedding_act_fn else None

        self.down_blocks = []
        out_ch = channels[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            self.down_blocks.append(DownBlock(cfg, i, in_ch, out_ch, time_embed_dim,
                                              with_attention=_block_kind(kind, "CrossAttnDownBlock2D", "DownBlock2D"),
                                              add_downsample=i < levels - 1))
        if cfg.mid_block_type is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(cfg, channels[-1], time_embed_dim)

        self.up_blocks = []
        reversed_channels = list(reversed(channels))
        out_ch = reversed_channels[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, levels - 1)]
            self.up_blocks.append(UpBlock(cfg, i, in_ch, prev_ch, out_ch, time_embed_dim,
                                          with_attention=_block_kind(kind, "CrossAttnUpBlock2D", "UpBlock2D"),
                                          add_upsample=i < levels - 1))

        self.conv_norm_out = group_norm(cfg.norm_num_groups, channels[0], cfg.norm_eps)
        self.conv_act = activation(cfg.act_fn)
        self.conv_out = Conv2d(channels[0], cfg.out_channels, cfg.conv_out_kernel,
                                  padding=(cfg.conv_out_kernel - 1) // 2)

    def time_embed(self, timestep: mx.array, batch: int, dtype, text_embeds=None, time_ids=None,
                   timestep_cond=None) -> mx.array:
        """The embedding every resnet receives: timestep (+ LCM guidance) (+ SDXL micro-conditioning)."""
        cfg = self.config
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (batch,))
        t_emb = timestep_embedding(timestep, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        cond = timestep_cond.astype(dtype) if timestep_cond is not None else None
        if cond is not None and "cond_proj" not in self.time_embedding:
            raise ValueError("timestep_cond given, but this UNet has no time_cond_proj_dim")
        emb = self.time_embedding(t_emb.astype(dtype), cond)
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (SDXL-style) needs text_embeds and time_ids")
            time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                             cfg.flip_sin_to_cos, cfg.freq_shift).reshape(text_embeds.shape[0], -1)
            add = mx.concatenate([text_embeds.astype(mx.float32), time_embeds], axis=-1).astype(dtype)
            emb = emb + self.add_embedding(add)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def __call__(self, sample: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 text_embeds: Optional[mx.array] = None, time_ids: Optional[mx.array] = None,
                 timestep_cond: Optional[mx.array] = None) -> mx.array:
        """sample (B, h, w, C) NHWC, timestep (B,) or scalar, encoder_hidden_states (B, L, C) -> NHWC."""
        cfg = self.config
        dtype = sample.dtype
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embed(timestep, sample.shape[0], dtype, text_embeds, time_ids, timestep_cond)
        context = encoder_hidden_states.astype(dtype)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
            interrupt.checkpoint(x, *skips)
        if "mid_block" in self:
            x = self.mid_block(x, emb, context)

        # Sizes not divisible by 2^levels: upsample to the skip's size, as diffusers does.
        factor = 2 ** sum(1 for b in self.up_blocks if "upsamplers" in b)
        forward_size = any(d % factor for d in sample.shape[1:3])
        for i, block in enumerate(self.up_blocks):
            block_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            size = skips[-1].shape[1:3] if forward_size and i < len(self.up_blocks) - 1 else None
            x = block(x, block_skips, emb, context, size)
            interrupt.checkpoint(x)

        x = self.conv_act(self.conv_norm_out(x))
        return self.conv_out(x)


def _block_kind(kind: str, with_attention: str, without: str) -> bool:
    if kind == with_attention:
        return True
    if kind == without:
        return False
    raise ValueError(f"UNet block type {kind!r} is not supported")

