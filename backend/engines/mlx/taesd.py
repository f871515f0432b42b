"""The tiny VAE decoder (TAESD, TAESDXL, TAESD3 by madebyollin) in MLX, for sharp live previews.

diffusers' `AutoencoderTiny` (models/autoencoders/autoencoder_tiny.py, `DecoderTiny` in vae.py): latents ->
tanh(x / 3) * 3 -> conv + activation -> per stage `num_decoder_blocks` residual blocks (three 3x3 convs, ReLU
fused after the skip), then nearest 2x upsampling and a bias-free 3x3 conv (the last stage: the RGB conv, with
bias) -> [0, 1], mapped to [-1, 1]. Only the decoder is built; the checkpoint's `encoder.*` weights are skipped.
Attribute names mirror diffusers' state dict (`layers.<i>.conv.<j>`), so weights.py places the weights.

The latents it takes are the diffusion model's: the pipelines give it `latents / scaling_factor + shift_factor`
with the tiny VAE's own config (1 and 0 for TAESD/TAESDXL; TAESD3 carries SD3's 1.5305 and 0.0609).
`latent_magnitude` / `latent_shift` only quantize latents to bytes in AutoencoderTiny.forward and play no part
in decoding. Tensors are NHWC. On the CPU in fp32, the 3x3 convolutions of sides divisible by 4 run as
Winograd F(4x4, 3x3) (winograd.py, as the VAE's bands do): about 2.6x faster than MLX's convolution there.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backend import files
from backend.engines.mlx import weights, winograd

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}


def _plain(layer, x: mx.array) -> mx.array:
    return layer(x)


@dataclass(frozen=True)
class TinyVAEConfig:
    """The decoder's part of an AutoencoderTiny config.json, with diffusers' defaults."""
    latent_channels: int = 4
    out_channels: int = 3
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    upsampling_scaling_factor: int = 2
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @classmethod
    def from_dict(cls, config: dict) -> "TinyVAEConfig":
        names = {f.name for f in fields(cls)}
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names and v is not None}
        cfg = cls(**known)
        if cfg.act_fn not in _ACTIVATIONS or cfg.upsample_fn != "nearest":
            raise ValueError(f"tiny VAE with act_fn {cfg.act_fn!r} / upsample_fn {cfg.upsample_fn!r} is not supported")
        if len(cfg.decoder_block_out_channels) != len(cfg.num_decoder_blocks):
            raise ValueError("decoder_block_out_channels and num_decoder_blocks differ in length")
        return cfg


class AutoencoderTinyBlock(nn.Module):
    """diffusers' AutoencoderTinyBlock: relu(conv(act(conv(act(conv(x))))) + skip(x))."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        act = _ACTIVATIONS[act_fn]
        self.conv = [nn.Conv2d(in_channels, out_channels, 3, padding=1), act(),
                     nn.Conv2d(out_channels, out_channels, 3, padding=1), act(),
                     nn.Conv2d(out_channels, out_channels, 3, padding=1)]
        if in_channels != out_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def __call__(self, x: mx.array, conv=_plain) -> mx.array:
        y = x
        for layer in self.conv:
            y = conv(layer, y) if isinstance(layer, nn.Conv2d) else layer(y)
        return nn.relu(y + (self.skip(x) if "skip" in self else x))


class DecoderTiny(nn.Module):
    """diffusers' DecoderTiny; `layers` keeps its nn.Sequential's indices (activations and upsamplers hold none)."""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        channels, act = cfg.decoder_block_out_channels, _ACTIVATIONS[cfg.act_fn]
        layers = [nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1), act()]
        for i, count in enumerate(cfg.num_decoder_blocks):
            last = i == len(cfg.num_decoder_blocks) - 1
            layers += [AutoencoderTinyBlock(channels[i], channels[i], cfg.act_fn) for _ in range(count)]
            if not last:
                layers.append(nn.Upsample(scale_factor=float(cfg.upsampling_scaling_factor), mode="nearest"))
            layers.append(nn.Conv2d(channels[i], cfg.out_channels if last else channels[i], 3, padding=1, bias=last))
        self.layers = layers

    def __call__(self, x: mx.array, conv=_plain, each=lambda x: None) -> mx.array:
        """`conv(layer, x)` runs each 3x3 convolution; `each(x)` sees every layer's output (to evaluate it)."""
        x = mx.tanh(x / 3) * 3
        for layer in self.layers:
            if isinstance(layer, AutoencoderTinyBlock):
                x = layer(x, conv)
            else:
                x = conv(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
            each(x)
        return x * 2 - 1


class TinyVAE:
    """A loaded tiny VAE decoder: `decode(latents)` takes the diffusion model's latents (B, C, h, w) NCHW numpy and
    returns images (B, H, W, 3) float32 in [-1, 1]."""

    def __init__(self, cfg: TinyVAEConfig, decoder: DecoderTiny, dtype=mx.float32):
        self.config, self.decoder, self.dtype = cfg, decoder, dtype
        self._run = mx.compile(decoder)
        self._kernels: dict = {}  # id(conv) -> its Winograd-transformed kernel (CPU)

    def _winograd(self, layer, x: mx.array) -> mx.array:
        """A 3x3 convolution as Winograd F(4x4, 3x3) where the sides allow it (plain otherwise)."""
        if layer.weight.shape[1:3] != (3, 3) or x.shape[1] % 4 or x.shape[2] % 4:
            return layer(x)
        u = self._kernels.get(id(layer))
        if u is None:
            u = self._kernels[id(layer)] = winograd.transform_weight(layer.weight, 4)
        padded = mx.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return winograd.conv3x3(padded, u, 4, (layer.bias,) if "bias" in layer else ())

    @classmethod
    def from_folder(cls, folder, dtype=None) -> "TinyVAE":
        """From a diffusers AutoencoderTiny folder (config.json and diffusion_pytorch_model.safetensors). `dtype`:
        fp16 on a GPU, fp32 on the CPU by default."""
        folder = Path(folder)
        cfg = TinyVAEConfig.from_dict(files.read_json(folder / "config.json"))
        if dtype is None:
            dtype = mx.float16 if mx.default_device() == mx.gpu else mx.float32
        decoder = DecoderTiny(cfg)
        state = weights.read_safetensors(weights.safetensors_files(folder))
        weights.load_into(decoder, [(k[len("decoder."):], v) for k, v in state.items() if k.startswith("decoder.")],
                          dtype=dtype)
        return cls(cfg, decoder, dtype)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        cfg = self.config
        z = np.asarray(latents, np.float32) / np.float32(cfg.scaling_factor) + np.float32(cfg.shift_factor)
        x = mx.array(z.transpose(0, 2, 3, 1)).astype(self.dtype)
        if mx.default_device() == mx.cpu and self.dtype == mx.float32:
            image = self.decoder(x, self._winograd, each=mx.eval)  # one layer at a time: bounded memory
        else:
            image = self._run(x)
        return np.array(image.astype(mx.float32))
