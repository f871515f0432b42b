"""The MLX engine: loads a diffusers folder into MLX modules and runs the three stages.

The family (backend/families.py) says which modules: CLIP encoders (+ SD3's T5), a UNet or an SD3
transformer, the VAE.

Numpy NCHW at the boundary (backend/engines/base.py), NHWC inside. Weights are read lazily from safetensors
(each tensor read when evaluated, the file's copy dropped once cast) and cast once to the chosen precision.
Layer norms, group norms and softmax run in fp32 inside the modules. The VAE runs in fp32 from the start where
the family's diffusers pipelines upcast it (the VAE config's `force_upcast`, SDXL): decided when loading, so a
decode runs once.

Memory: by default every stage stays loaded (the fastest repeat). With `reduce_memory` each stage is loaded
when it runs and released after (each text encoder right after its call, so none is left for the denoising; the
denoiser after the last step; the VAE decoder after decoding; the image encoder after encoding), and MLX's
buffer cache is emptied: the peak is about the largest stage, not their sum, at the price of a load per stage
per generation. LoRAs and on-the-fly quantization are applied to each stage as it loads; the quantization while
the weights are still unevaluated, so each layer is read, cast and quantized in turn and no component ever stands
whole at full precision (in either mode).
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backend import allocator
from backend.checkpoint import ModelSpec
from backend.engines.base import EncoderOutput, Stages
from backend.engines.mlx import cpu_kernels, weights as W
from backend.engines.mlx.quantize import (apply_plan, load_saved_component, plan_component, quantize_stages,
                                          read_saved_plan, saved_method, scheme_recipe, sentence)
from backend.engines.mlx.clip import CLIPTextConfig, CLIPTextModel, checkpoint_names
from backend.engines.mlx.mmdit import SD3Config, SD3Transformer2DModel
from backend.engines.mlx.t5 import T5Config, T5EncoderModel, checkpoint_names as t5_names
from backend.engines.mlx.unet import UNet2DConditionModel, UNetConfig
from backend.engines.mlx.vae import ENCODER_PARTS, AutoencoderKL, VAEConfig
from backend.types import UserError

PRECISIONS = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
IMAGE_ENCODER = "vae_encoder"  # the VAE's encoder half, a component of its own under reduce-memory
# which components each pipeline stage (Stages.begin_stage) runs; under reduce-memory the others are released
_STAGE_PARTS = {"vae_decoder": ("vae",), "vae_encoder": (IMAGE_ENCODER,)}


def resolve_precision(precision: str) -> str:
    """'auto': fp16 on a GPU; fp32 on the CPU, where MLX has no fast half-precision matrix products
    (measured here: an fp16 UNet forward ~8x slower than fp32)."""
    if precision == "auto":
        return "fp16" if mx.default_device() == mx.gpu else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}': choose auto, fp32, fp16 or bf16")
    return precision


def _load_component(spec: ModelSpec, component: str, module, dtype, names=lambda state: state, keep=None,
                    file_dtype=None, before_eval=None):
    """`keep(name)`: which of the component's weights `module` takes (all by default; the VAE's halves).
    `file_dtype` (default `dtype`): fp16 prefers a folder's fp16 weight files (an upcast VAE reads them too).
    `before_eval`: W.load_into's (on-the-fly quantization, applied while the weights are unevaluated)."""
    saved = load_saved_component(spec.folder, component, module, dtype, keep)  # a `quantize` output folder
    if saved is not None:
        return saved
    file_dtype = dtype if file_dtype is None else file_dtype
    files = spec.weight_files.get(component) or \
        W.safetensors_files(spec.folder / component, variant="fp16" if file_dtype != mx.float32 else None)
    try:
        state = W.read_safetensors(files)
        weights = names({k: v for k, v in state.items() if keep is None or keep(k)})
        del state  # the file's tensors are read lazily and each freed once cast (W.drained)
        return W.load_into(module, W.drained(weights), dtype, before_eval)
    except W.WeightError as exc:
        raise UserError(f"{component}: {exc}") from exc


def _encoder_weight(name: str) -> bool:
    """A VAE weight of the encoder half (image-to-image only), loaded on first use."""
    return name.split(".", 1)[0] in ENCODER_PARTS


def vae_upcast(spec: ModelSpec, dtype) -> bool:
    """Whether the VAE runs in fp32 under a half-precision pipeline: where diffusers' pipelines of the family
    upcast it (SDXL), as its config's `force_upcast` says (diffusers' default: true)."""
    return dtype != mx.float32 and spec.traits.vae_force_upcast and VAEConfig.from_dict(spec.vae_config).force_upcast


class MLXStages(Stages):
    def __init__(self, spec: ModelSpec, precision: str = "auto", quantization: Optional[str] = None,
                 t5: bool = True, reduce_memory: bool = False):
        self.spec = spec
        self.reduce_memory = reduce_memory  # each stage loaded when it runs and released after (module docstring)
        asked, precision = precision, resolve_precision(precision)
        self.dtype = PRECISIONS[precision]
        self.vae_dtype = mx.float32 if vae_upcast(spec, self.dtype) else self.dtype
        # 'auto' on the CPU keeps T5's weights at fp16 and computes in fp32: T5-XXL in 9.5 GB, not 19
        self._t5_storage = mx.float16 if asked == "auto" and self.dtype == mx.float32 else self.dtype
        t5_name = spec.traits.t5[0] if spec.traits.t5 else None
        use_t5 = spec.has_t5 and t5
        notes = []
        if spec.has_t5 and not t5:
            notes.append("T5 text encoder skipped on request: its tokens are zeros, as in a checkpoint without T5")
        elif t5_name and not spec.has_t5:
            notes.append("this checkpoint has no T5 text encoder: its tokens are zeros")
        self.encoder_names = [n for n in spec.text_encoders if use_t5 or n != t5_name]
        self._configs = dict(zip(spec.text_encoders, spec.text_encoder_configs))
        self._resident: dict = {}    # component -> its loaded module
        self._loaded_bytes: dict = {}  # component -> its weight bytes when it was last loaded
        self._open: set = set()      # stages begun and not ended (reduce-memory keeps their components until the end)
        self._loras: list = []       # the LoRAs asked for, applied to each stage as it loads (reduce-memory)
        self.quantization_plans: dict = {}
        quantization = quantization or saved_method(spec.folder)
        # planned from the modules' shapes, applied to each component as it loads (_acquire)
        self.quantized_layers = self._plan_quantization(quantization) if quantization else ""
        if not reduce_memory:
            for name in self._names():
                self._acquire(name)
        device = "GPU" if mx.default_device() == mx.gpu else "CPU"
        self.info = {"engine": "mlx", "device": device, "precision": precision, "family": spec.family,
                     "quantization": quantization or "none", "quantized_layers": self.quantized_layers,
                     "compute_units": device, "attention": "fused" if device == "GPU" else "chunked",
                     "reduce_memory": reduce_memory, "notes": notes}
        if self.vae_dtype != self.dtype:
            self.info["vae_precision"] = "fp32 (the VAE's force_upcast)"
        if spec.traits.t5 is not None:
            self.info["t5"] = "loaded" if use_t5 else ("skipped" if spec.has_t5 else "absent")
            if use_t5 and self._t5_storage != self.dtype:
                self.info["t5_weights"] = "fp16, computed in fp32"

    # -- components: loaded, released ------------------------------------------------------------------
    def _names(self) -> list:
        return [*self.encoder_names, self.spec.traits.denoiser, "vae"]

    def _is_t5(self, name: str) -> bool:
        return self.spec.has_t5 and name == self.spec.traits.t5[0]

    def _build(self, name: str) -> nn.Module:
        """Component `name`'s module, its weights not loaded (MLX's random initial values stay unevaluated)."""
        spec = self.spec
        if name in self._configs:
            config = self._configs[name]
            return T5EncoderModel(T5Config.from_dict(config)) if self._is_t5(name) \
                else CLIPTextModel(CLIPTextConfig.from_dict(config))
        if name == spec.traits.denoiser:
            if spec.is_transformer:
                return SD3Transformer2DModel(SD3Config.from_dict(spec.denoiser_config))
            return UNet2DConditionModel(UNetConfig.from_dict(spec.denoiser_config))
        vae_config = VAEConfig.from_dict(spec.vae_config)
        if name == IMAGE_ENCODER:
            return AutoencoderKL(vae_config, with_decoder=False)
        # the decoder half; the encoder is built and loaded when an init image first needs it (encode_image)
        return AutoencoderKL(vae_config, with_encoder=False)

    def _load(self, name: str) -> nn.Module:
        spec, module = self.spec, self._build(name)
        plan = self.quantization_plans.get(name)
        quantized = None if plan is None else (lambda m: apply_plan(m, plan["layers"]))
        if name in self._configs:
            if self._is_t5(name):
                module = _load_component(spec, name, module, self._t5_storage, t5_names, before_eval=quantized)
                return module.compute_in(self.dtype) if self._t5_storage != self.dtype else module
            return _load_component(spec, name, module, self.dtype, checkpoint_names, before_eval=quantized)
        if name == spec.traits.denoiser:
            return _load_component(spec, name, module, self.dtype, before_eval=quantized)
        if name == IMAGE_ENCODER:
            return _load_component(spec, "vae", module, self.vae_dtype, keep=_encoder_weight, file_dtype=self.dtype)
        module = _load_component(spec, "vae", module, self.vae_dtype, keep=lambda n: not _encoder_weight(n),
                                 file_dtype=self.dtype, before_eval=quantized)
        module.encoder_loader = self._load_image_encoder
        return module

    def _acquire(self, name: str) -> nn.Module:
        """Component `name`, loaded now if it is not (with on-the-fly quantization and LoRAs applied)."""
        module = self._resident.get(name)
        if module is None:
            module = self._load(name)  # on-the-fly quantization applied as it loads
            self._resident[name] = module
            self._loaded_bytes[name] = W.module_bytes(module)
            self._rewrap_loras()
            allocator.release()  # what loading freed (file copies, fp32 originals of quantized layers)
        return module

    def _release(self, names) -> None:
        """Reduce-memory: drop components `names` and give their memory back (MLX's buffer cache emptied)."""
        if not self.reduce_memory:
            return
        dropped = [n for n in names if self._resident.pop(n, None) is not None]
        if dropped:
            self._rewrap_loras()
            mx.clear_cache()
            allocator.release()

    def _done_with(self, name: str, stage: str) -> None:
        """After a call that used component `name`: reduce-memory releases it unless `stage` is still open."""
        if stage not in self._open:
            self._release([name])

    def _stage_parts(self, stage: str) -> tuple:
        if stage == "text_encoder":
            return tuple(self.encoder_names)
        if stage == "unet":
            return (self.spec.traits.denoiser,)
        return _STAGE_PARTS.get(stage, ())

    def _plan_quantization(self, quantization: str) -> str:
        """The on-the-fly quantization planned from the modules' shapes (applied at each load)."""
        if read_saved_plan(self.spec.folder) is not None:  # a saved variant: loaded quantized; checks the name
            return quantize_stages(self, quantization)
        recipe = scheme_recipe(quantization)
        self.quantization_plans = {name: plan_component(self._build(name), name, recipe) for name in self._names()}
        return sentence(quantization, self.quantization_plans)

    def _rewrap_loras(self) -> None:
        """After a load or a release: the LoRAs wrapped around the loaded modules, and only them."""
        state = self.__dict__.get("_lora_state")
        if state is None or not self.reduce_memory:
            return
        if state["applied"] is not None:
            state["applied"].remove()
            state["applied"] = None
        if self._loras:
            from backend.engines.mlx.lora import set_loras
            set_loras(self, self._loras)

    @property
    def text_encoders(self) -> list:
        return [self._acquire(n) for n in self.encoder_names]

    @property
    def denoiser(self) -> nn.Module:
        return self._acquire(self.spec.traits.denoiser)

    @property
    def vae(self) -> AutoencoderKL:
        """The VAE's decoder half (with the encoder once image-to-image loaded it, outside reduce-memory)."""
        return self._acquire("vae")

    def components(self):
        """(component folder name, module) pairs: text encoders, denoiser, VAE; under reduce-memory the released
        ones are loaded again (and stay until a stage releases them)."""
        return [(name, self._acquire(name)) for name in self._names()]

    def resident(self):
        """The (name, module) pairs loaded now."""
        return [(name, self._resident[name]) for name in self._names() if name in self._resident]

    def architecture(self):
        """(name, module) pairs of every component: loaded, or built without weights (for its layers' shapes)."""
        return [(name, self._resident.get(name) or self._build(name)) for name in self._names()]

    def set_loras(self, loras: list) -> list:
        """LoRAs wrapped around the text encoders' and denoiser's layers; the base weights stay as loaded
        (plain or quantized) and a scale change only changes numbers (engines/mlx/lora.py)."""
        from backend.engines.mlx.lora import set_loras
        self._loras = list(loras)
        return set_loras(self, loras)

    # -- stages ---------------------------------------------------------------------------------------
    def begin_stage(self, name: str) -> None:
        self._open.add(name)
        if self.reduce_memory:  # one stage's weights at a time
            parts = self._stage_parts(name)
            self._release([n for n in list(self._resident) if n not in parts])

    def end_stage(self, name: str) -> None:
        self._open.discard(name)
        self._release(self._stage_parts(name))

    def encode_text(self, index: int, input_ids: np.ndarray) -> EncoderOutput:
        traits = self.spec.traits
        name = self.encoder_names[index]
        try:
            with cpu_kernels.eager_chunks():
                model, ids = self._acquire(name), mx.array(input_ids.astype(np.int32))
                if index >= len(traits.encoders):  # T5
                    hidden, pooled = model(ids).last_hidden_state, None
                else:  # only what the denoiser takes: the pooled output where it is used, and with a projection
                    hidden, pooled = model.conditioning(
                        ids, traits.clip_layer, traits.uses_pooled(index) and model.config.with_projection)
                mx.eval(hidden, *([pooled] if pooled is not None else []))
            return EncoderOutput(hidden=np.array(hidden.astype(mx.float32)),
                                 pooled=None if pooled is None else np.array(pooled.astype(mx.float32)))
        finally:
            self._release([name])  # reduce-memory: each encoder only while it runs, none left for the denoiser

    def predict_noise(self, latents, timestep, hidden, text_embeds=None, time_ids=None, timestep_cond=None):
        name = self.spec.traits.denoiser
        denoiser = self._acquire(name)
        x = mx.array(latents.transpose(0, 2, 3, 1)).astype(self.dtype)
        t = mx.full((latents.shape[0],), timestep, dtype=mx.float32)
        cast = lambda a: None if a is None else mx.array(a).astype(self.dtype)  # noqa: E731
        try:
            with cpu_kernels.eager_chunks():
                if self.spec.is_transformer:
                    out = denoiser(x, t, cast(hidden), cast(text_embeds))
                else:
                    out = denoiser(x, t, cast(hidden), text_embeds=cast(text_embeds), time_ids=cast(time_ids),
                                   timestep_cond=cast(timestep_cond))
                return np.array(out.astype(mx.float32)).transpose(0, 3, 1, 2)
        finally:
            self._done_with(name, "unet")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """One decode, in the VAE's precision (fp32 where the family upcasts it: decided at load, `vae_upcast`)."""
        z = mx.array(latents.transpose(0, 2, 3, 1)).astype(self.vae_dtype)
        try:
            with cpu_kernels.eager_chunks():
                image = self._acquire("vae").decode(z).astype(mx.float32)
                mx.eval(image)
            return np.array(image)
        finally:
            self._done_with("vae", "vae_decoder")

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """VAE encoder: pixels (B, 3, H, W) in [-1, 1] -> the posterior's mean (B, C, h, w), unscaled, in the VAE's
        precision. The encoder is loaded on the first call (kept after, except under reduce-memory)."""
        x = mx.array(np.asarray(pixels, dtype=np.float32).transpose(0, 2, 3, 1)).astype(self.vae_dtype)
        name = IMAGE_ENCODER if self.reduce_memory else "vae"
        try:
            with cpu_kernels.eager_chunks():
                mean = self._acquire(name).encode(x)[0].astype(mx.float32)
                mx.eval(mean)
            return np.array(mean).transpose(0, 3, 1, 2)
        finally:
            self._done_with(name, "vae_encoder")

    def load_image_encoder(self) -> None:
        """Load the VAE encoder now if it is not (a quantized variant is saved with it)."""
        if "encoder" not in self.vae:
            self._load_image_encoder(self.vae)

    def _load_image_encoder(self, vae: AutoencoderKL) -> None:
        part = AutoencoderKL.encoder_part(vae.config)
        vae.attach_encoder(_load_component(self.spec, "vae", part, self.vae_dtype, keep=_encoder_weight,
                                           file_dtype=self.dtype))

    # -- measurements ---------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of the weights as loaded: every component resident (default), or each stage's when it last
        loaded (reduce-memory: they are not resident together)."""
        return sum(W.module_bytes(m) if (m := self._resident.get(name)) is not None else self._loaded_bytes.get(name, 0)
                   for name in [*self._names(), IMAGE_ENCODER])

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
