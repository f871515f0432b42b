"""The MLX engine: loads a diffusers folder into MLX modules and runs the three stages.

The family (backend/families.py) says which modules: CLIP encoders (+ SD3's T5), a UNet or an SD3
transformer, the VAE.

Numpy NCHW at the boundary (backend/engines/base.py), NHWC inside. Weights are read memory-mapped
from safetensors and cast once to the chosen precision. Layer norms, group norms and softmax run in
fp32 inside the modules, and a VAE decode that overflows in fp16 is redone in fp32 (diffusers'
`force_upcast` behaviour), so fp16 never returns NaN.
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from backend.checkpoint import ModelSpec
from backend.engines.base import EncoderOutput, Stages
from backend.engines.mlx import cpu_kernels, weights as W
from backend.engines.mlx.quantize import load_saved_component, quantize_stages, saved_method
from backend.engines.mlx.clip import CLIPTextConfig, CLIPTextModel, checkpoint_names
from backend.engines.mlx.mmdit import SD3Config, SD3Transformer2DModel
from backend.engines.mlx.t5 import T5Config, T5EncoderModel, checkpoint_names as t5_names
from backend.engines.mlx.unet import UNet2DConditionModel, UNetConfig
from backend.engines.mlx.vae import ENCODER_PARTS, AutoencoderKL, VAEConfig
from backend.types import UserError

PRECISIONS = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}


def resolve_precision(precision: str) -> str:
    """'auto': fp16 on a GPU; fp32 on the CPU, where MLX has no fast half-precision matrix products
    (measured here: an fp16 UNet forward ~8x slower than fp32)."""
    if precision == "auto":
        return "fp16" if mx.default_device() == mx.gpu else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}': choose auto, fp32, fp16 or bf16")
    return precision


def _load_component(spec: ModelSpec, component: str, module, dtype, names=lambda state: state, keep=None):
    """`keep(name)`: which of the component's weights `module` takes (all by default; the VAE's halves)."""
    saved = load_saved_component(spec.folder, component, module, dtype, keep)  # a `quantize` output folder
    if saved is not None:
        return saved
    files = spec.weight_files.get(component) or \
        W.safetensors_files(spec.folder / component, variant="fp16" if dtype != mx.float32 else None)
    try:
        state = W.read_safetensors(files)
        if keep is not None:
            state = {k: v for k, v in state.items() if keep(k)}
        return W.load_into(module, names(state), dtype)
    except W.WeightError as exc:
        raise UserError(f"{component}: {exc}") from exc


def _text_encoder(spec: ModelSpec, name: str, config: dict, dtype, t5_storage):
    if spec.has_t5 and name == spec.traits.t5[0]:
        model = _load_component(spec, name, T5EncoderModel(T5Config.from_dict(config)), t5_storage, t5_names)
        return model.compute_in(dtype) if t5_storage != dtype else model
    return _load_component(spec, name, CLIPTextModel(CLIPTextConfig.from_dict(config)), dtype, checkpoint_names)


def _denoiser(spec: ModelSpec, dtype):
    if spec.is_transformer:
        model = SD3Transformer2DModel(SD3Config.from_dict(spec.denoiser_config))
    else:
        model = UNet2DConditionModel(UNetConfig.from_dict(spec.denoiser_config))
    return _load_component(spec, spec.traits.denoiser, model, dtype)


def _encoder_weight(name: str) -> bool:
    """A VAE weight of the encoder half (image-to-image only), loaded on first use."""
    return name.split(".", 1)[0] in ENCODER_PARTS


class MLXStages(Stages):
    def __init__(self, spec: ModelSpec, precision: str = "auto", quantization: Optional[str] = None,
                 t5: bool = True, reduce_memory: bool = False):
        self.spec = spec
        self.reduce_memory = reduce_memory  # here: the VAE encoder is released after each use
        asked, precision = precision, resolve_precision(precision)
        self.dtype = PRECISIONS[precision]
        # 'auto' on the CPU keeps T5's weights at fp16 and computes in fp32: T5-XXL in 9.5 GB, not 19
        t5_storage = mx.float16 if asked == "auto" and self.dtype == mx.float32 else self.dtype
        t5_name = spec.traits.t5[0] if spec.traits.t5 else None
        use_t5 = spec.has_t5 and t5
        notes = []
        if spec.has_t5 and not t5:
            notes.append("T5 text encoder skipped on request: its tokens are zeros, as in a checkpoint without T5")
        elif t5_name and not spec.has_t5:
            notes.append("this checkpoint has no T5 text encoder: its tokens are zeros")
        names = [n for n in spec.text_encoders if use_t5 or n != t5_name]
        configs = dict(zip(spec.text_encoders, spec.text_encoder_configs))
        self.encoder_names = names
        self.text_encoders = [_text_encoder(spec, name, configs[name], self.dtype, t5_storage) for name in names]
        self.denoiser = _denoiser(spec, self.dtype)
        # the decoder half; the encoder is built and loaded when an init image first needs it (encode_image)
        decoder_half = AutoencoderKL(VAEConfig.from_dict(spec.vae_config), with_encoder=False)
        self.vae = _load_component(spec, "vae", decoder_half, self.dtype, keep=lambda name: not _encoder_weight(name))
        self.vae.encoder_loader = self._load_image_encoder
        self._vae_fp32 = None
        self.quantized_layers = ""
        quantization = quantization or saved_method(spec.folder)
        if quantization:
            self.quantized_layers = quantize_stages(self, quantization)
        device = "GPU" if mx.default_device() == mx.gpu else "CPU"
        self.info = {"engine": "mlx", "device": device, "precision": precision, "family": spec.family,
                     "quantization": quantization or "none", "quantized_layers": self.quantized_layers,
                     "compute_units": device, "attention": "fused" if device == "GPU" else "chunked",
                     "notes": notes}
        if spec.traits.t5 is not None:
            self.info["t5"] = "loaded" if use_t5 else ("skipped" if spec.has_t5 else "absent")
            if use_t5 and t5_storage != self.dtype:
                self.info["t5_weights"] = "fp16, computed in fp32"

    def components(self):
        """(component folder name, loaded module) pairs: text encoders, denoiser, VAE."""
        return [*zip(self.encoder_names, self.text_encoders), (self.spec.traits.denoiser, self.denoiser),
                ("vae", self.vae)]

    def set_loras(self, loras: list) -> list:
        """LoRAs wrapped around the text encoders' and denoiser's layers; the base weights stay as loaded
        (plain or quantized) and a scale change only changes numbers (engines/mlx/lora.py)."""
        from backend.engines.mlx.lora import set_loras
        return set_loras(self, loras)

    # -- stages ---------------------------------------------------------------------------------------
    def encode_text(self, index: int, input_ids: np.ndarray) -> EncoderOutput:
        traits = self.spec.traits
        out = self.text_encoders[index](mx.array(input_ids.astype(np.int32)))
        if index >= len(traits.encoders):  # T5
            hidden, pooled = out.last_hidden_state, None
        else:
            hidden = out.last_hidden_state if traits.clip_layer == -1 else out.hidden_states[traits.clip_layer]
            pooled = out.text_embeds if traits.pooled != "none" else None
        mx.eval(hidden, *([pooled] if pooled is not None else []))
        return EncoderOutput(hidden=np.array(hidden.astype(mx.float32)),
                             pooled=None if pooled is None else np.array(pooled.astype(mx.float32)))

    def predict_noise(self, latents, timestep, hidden, text_embeds=None, time_ids=None, timestep_cond=None):
        x = mx.array(latents.transpose(0, 2, 3, 1)).astype(self.dtype)
        t = mx.full((latents.shape[0],), timestep, dtype=mx.float32)
        cast = lambda a: None if a is None else mx.array(a).astype(self.dtype)  # noqa: E731
        with cpu_kernels.eager_chunks():
            if self.spec.is_transformer:
                out = self.denoiser(x, t, cast(hidden), cast(text_embeds))
            else:
                out = self.denoiser(x, t, cast(hidden), text_embeds=cast(text_embeds), time_ids=cast(time_ids),
                                    timestep_cond=cast(timestep_cond))
            return np.array(out.astype(mx.float32)).transpose(0, 3, 1, 2)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = mx.array(latents.transpose(0, 2, 3, 1))
        image = self.vae.decode(z.astype(self.dtype)).astype(mx.float32)
        mx.eval(image)
        if self.dtype != mx.float32 and not bool(mx.all(mx.isfinite(image)).item()):
            image = self._upcast_vae().decode(z)
            mx.eval(image)
        return np.array(image)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """VAE encoder: pixels (B, 3, H, W) in [-1, 1] -> the posterior's mean (B, C, h, w), unscaled. The encoder
        is loaded on the first call; an fp16 result that overflows is redone in fp32, as the decoder does."""
        x = mx.array(np.asarray(pixels, dtype=np.float32).transpose(0, 2, 3, 1))
        mean = self.vae.encode(x.astype(self.dtype))[0].astype(mx.float32)
        mx.eval(mean)
        if self.dtype != mx.float32 and not bool(mx.all(mx.isfinite(mean)).item()):
            mean = self._upcast_vae().encode(x)[0]
            mx.eval(mean)
        return np.array(mean).transpose(0, 3, 1, 2)

    def load_image_encoder(self) -> None:
        """Load the VAE encoder now if it is not (a quantized variant is saved with it)."""
        if "encoder" not in self.vae:
            self._load_image_encoder(self.vae)

    def _load_image_encoder(self, vae: AutoencoderKL) -> None:
        part = AutoencoderKL.encoder_part(vae.config)
        vae.attach_encoder(_load_component(self.spec, "vae", part, self.dtype, keep=_encoder_weight))

    def end_stage(self, name: str) -> None:
        if name == "vae_encoder" and self.reduce_memory:  # reduce-memory: the encoder only while it runs
            self.vae.detach_encoder()
            self._vae_fp32 = None

    def _upcast_vae(self):
        with_encoder = "encoder" in self.vae
        if self._vae_fp32 is None or ("encoder" in self._vae_fp32) != with_encoder:
            vae = AutoencoderKL(VAEConfig.from_dict(self.spec.vae_config), with_encoder=with_encoder)
            vae.load_weights([(k, v.astype(mx.float32)) for k, v in W.tree_flatten(self.vae.parameters())])
            self._vae_fp32 = vae
        return self._vae_fp32

    # -- measurements ---------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        return sum(W.module_bytes(m) for _, m in self.components())

    def peak_memory(self) -> int:
        return int(mx.get_peak_memory())

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()


def load_mlx_stages(spec: ModelSpec, precision: str = "auto", quantization: Optional[str] = None,
                    compute_units: str = "auto", attention=None, reduce_memory: bool = False,
                    t5: bool = True) -> MLXStages:
    """Compute units and attention variants are Core ML options; MLX runs on its default device.
    `t5=False` leaves an SD3 checkpoint's T5 encoder unloaded (its tokens become zeros)."""
    return MLXStages(spec, precision=precision, quantization=quantization, t5=t5, reduce_memory=reduce_memory)
