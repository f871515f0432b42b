"""The MLX AutoencoderKL (the SD/SDXL VAE): encoder to (mean, logvar), decoder back to pixels.

Owns `VAEConfig` (diffusers' vae/config.json with diffusers' defaults, including the latent
scaling_factor / shift_factor / force_upcast the pipeline needs) and the model; attribute names
mirror diffusers' state dict (old checkpoints' query/key/value/proj_attn are renamed by
weights.py). Tensors are NHWC. On the CPU the decoder runs band by band (vae_bands.py): the same
function, to rounding; `Decoder.graph` is the one-graph version (used inside mx.compile / mx.vmap, and on a
GPU for images up to vae_bands.DEVICE_BAND_PIXELS; larger ones are banded there too).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from backend import interrupt
from backend.engines.mlx import vae_bands
from backend.engines.mlx.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, activation, group_norm

_EPS = 1e-6  # the VAE's GroupNorm epsilon, fixed in diffusers' Encoder/Decoder


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, tuple] = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict = field(default_factory=dict)  # keys this implementation does not read

    @classmethod
    def from_dict(cls, config: dict) -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names and not k.startswith("_")}
        cfg = cls(**known, extra=extra)
        for kind in cfg.down_block_types:
            if kind != "DownEncoderBlock2D":
                raise ValueError(f"VAE down block type {kind!r} is not supported")
        for kind in cfg.up_block_types:
            if kind != "UpDecoderBlock2D":
                raise ValueError(f"VAE up block type {kind!r} is not supported")
        return cfg


class UNetMidBlock2D(nn.Module):
    """resnet, single-head spatial self-attention (residual), resnet; no time embedding."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, None, groups, _EPS, act_fn) for _ in range(2)]
        if add_attention:
            self.attentions = [Attention(channels, heads=1, dim_head=channels, bias=True,
                                         norm_num_groups=groups, eps=_EPS)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            b, h, w, c = x.shape
            x = self.attentions[0](x.reshape(b, h * w, c)).reshape(b, h, w, c) + x
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str,
                 add_downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS, act_fn)
                        for i in range(layers)]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, out_channels, padding=0)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str,
                 add_upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS, act_fn)
                        for i in range(layers)]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels, out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = list(cfg.block_out_channels)
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = []
        out_ch = channels[0]
        for i in range(len(cfg.down_block_types)):
            in_ch, out_ch = out_ch, channels[i]
            self.down_blocks.append(DownEncoderBlock2D(in_ch, out_ch, cfg.layers_per_block, groups, cfg.act_fn,
                                                       add_downsample=i < len(channels) - 1))
        self.mid_block = UNetMidBlock2D(channels[-1], groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(groups, channels[-1], _EPS)
        self.conv_act = activation(cfg.act_fn)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        if vae_bands.applies(self, x):
            return vae_bands.encode(self, x)
        return self.graph(x)

    def graph(self, x: mx.array) -> mx.array:
        """The forward pass as one lazy graph."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = list(reversed(cfg.block_out_channels))
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.up_blocks = []
        out_ch = channels[0]
        for i in range(len(cfg.up_block_types)):
            in_ch, out_ch = out_ch, channels[i]
            self.up_blocks.append(UpDecoderBlock2D(in_ch, out_ch, cfg.layers_per_block + 1, groups, cfg.act_fn,
                                                   add_upsample=i < len(channels) - 1))
        self.conv_norm_out = group_norm(groups, channels[-1], _EPS)
        self.conv_act = activation(cfg.act_fn)
        self.conv_out = nn.Conv2d(channels[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        if vae_bands.applies(self, z, scale=2 ** (len(self.up_blocks) - 1)):
            return vae_bands.decode(self, z)
        return self.graph(z)

    def graph(self, z: mx.array) -> mx.array:
        """The forward pass as one lazy graph."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
            interrupt.checkpoint(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


ENCODER_PARTS = ("encoder", "quant_conv")  # the image-to-image half: weight names under these come with it


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL. `with_encoder=False` builds the decoder half only; `encode` then calls
    `encoder_loader(self)` first, which attaches the encoder (`attach_encoder`): an engine loads it on first use.
    `with_decoder=False` builds the encoder half only (an engine's image encoder under reduce-memory)."""

    def __init__(self, config: Union[VAEConfig, dict], with_encoder: bool = True, with_decoder: bool = True):
        super().__init__()
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        self.config = cfg
        self.encoder_loader = None
        if with_encoder:
            self.attach_encoder(self.encoder_part(cfg))
        if not with_decoder:
            return
        self.decoder = Decoder(cfg)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @staticmethod
    def encoder_part(cfg: VAEConfig) -> nn.Module:
        """The encoder and its quant_conv alone, under their AutoencoderKL names (so they load from its weights)."""
        part = nn.Module()
        part.encoder = Encoder(cfg)
        if cfg.use_quant_conv:
            part.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        return part

    def attach_encoder(self, part: nn.Module) -> None:
        for name in ENCODER_PARTS:
            if name in part:
                setattr(self, name, part[name])

    def detach_encoder(self) -> None:
        for name in ENCODER_PARTS:
            self.pop(name, None)

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Images (B, H, W, C) in [-1, 1] -> the latent Gaussian's (mean, logvar), each (B, h, w, latent)."""
        if "encoder" not in self:
            if self.encoder_loader is None:
                raise ValueError("this VAE was built without its encoder")
            self.encoder_loader(self)
        moments = self.encoder(x)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def decode(self, z: mx.array) -> mx.array:
        """Unscaled latents (B, h, w, latent) -> images (B, H, W, C), nominally in [-1, 1]."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: mx.array) -> mx.array:
        return self.decode(self.encode(x)[0])
