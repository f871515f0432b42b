"""Model families as data: how each conditions on text, which denoiser it runs, what its latents look like.

A family plugs into the pipeline and the engines through one `Family` description; the code around it
reads these fields and never asks for a family by name:

- text: the CLIP encoders (component and tokenizer folders) and which hidden layer is used, how their
  pooled outputs combine, and whether a T5 encoder may follow (SD3);
- denoiser: the component folder (`unet` or `transformer`) and whether it is a flow-matching model;
- extra conditioning: SDXL's micro-conditioning (`time_ids`, built by backend/guidance.py);
- stages: a second-stage model (the SDXL refiner) names the family it finishes (`refines`);
- latents: how a live preview shows them (backend/preview.py): a linear projection to RGB, and the tiny VAE
  decoder (madebyollin's TAESD family on the Hub) that decodes them sharply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from backend.types import UserError

T5_SEQUENCE_LENGTH = 256  # diffusers' SD3 max_sequence_length default


@dataclass(frozen=True)
class Family:
    name: str
    denoiser: str                           # the denoiser's component folder: "unet" or "transformer"
    encoders: tuple                         # CLIP (text encoder folder, tokenizer folder) pairs, in order
    clip_layer: int                         # hidden state used: -1 the last (after the final norm), -2 penultimate
    pooled: str                             # "none", "last" (last encoder's projection) or "concat" (all of them)
    t5: Optional[tuple] = None              # (encoder, tokenizer) folders of an optional T5 encoder
    flow: bool = False                      # flow matching: velocity prediction, sigma schedules
    time_ids: Optional[str] = None          # SDXL's micro-conditioning: "size" (size, crop, target) or
                                            # "size+aesthetic" (the refiner's size, crop, aesthetic score)
    zeros_for_empty_negative: bool = False  # an empty negative prompt conditions on zeros (SDXL), unless
                                            # model_index.json's force_zeros_for_empty_prompt says otherwise
    refines: Optional[str] = None           # a second stage: the family whose schedule it finishes
    vae_force_upcast: bool = False          # diffusers' pipelines of this family run the VAE in fp32 when its
                                            # config's force_upcast says so (SDXL's VAE overflows in fp16)
    defaults: dict = field(default_factory=dict)
    preview: tuple = ()                     # (C x 3 matrix, RGB bias) from latents to a rough picture
    tiny_vae: Optional[str] = None          # the Hub repository of the tiny VAE (AutoencoderTiny) for its latents

    def uses_pooled(self, encoder: int) -> bool:
        """Whether the denoiser takes the pooled output of CLIP encoder number `encoder` (so it is computed)."""
        return self.pooled == "concat" or (self.pooled == "last" and encoder == len(self.encoders) - 1)

    def join_text(self, hiddens: list, pooleds: list, t5_hidden: Optional[np.ndarray],
                  joint_dim: Optional[int]) -> tuple:
        """(hidden, pooled) the denoiser takes, from each CLIP encoder's output and T5's (or its zeros)."""
        hidden = np.concatenate(hiddens, axis=-1) if len(hiddens) > 1 else hiddens[0]
        if self.t5 is not None:
            width = joint_dim or hidden.shape[-1]
            hidden = np.pad(hidden, ((0, 0), (0, 0), (0, width - hidden.shape[-1])))
            hidden = np.concatenate([hidden, t5_hidden.astype(np.float32)], axis=1)
        if self.pooled == "none":
            return hidden, None
        pooled = pooleds[-1] if self.pooled == "last" else np.concatenate(pooleds, axis=-1)
        return hidden, pooled


# Linear maps from (scaled) latents to RGB in [-1, 1], fitted by the community on real images: ComfyUI's
# comfy/latent_formats.py, classes SD15 (SD 1.x and 2.x share one VAE), SDXL and SD3, `latent_rgb_factors` and
# `latent_rgb_factors_bias`. Good enough for a live preview, at no cost (backend/preview.py applies them).
_SD_PREVIEW = ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0])
_SDXL_PREVIEW = ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
                  [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011])
# ComfyUI comfy/latent_formats.py, class SD3: latent_rgb_factors (16 x 3) and latent_rgb_factors_bias.
_SD3_PREVIEW = ([[-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458],
                 [0.0856, 0.0339, 0.0902], [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309],
                 [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358], [-0.0194, 0.0020, 0.0669],
                 [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
                 [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293],
                 [-0.1448, -0.1463, -0.1189]], [0.2394, 0.2135, 0.1925])

SD = Family("sd", denoiser="unet", encoders=(("text_encoder", "tokenizer"),), clip_layer=-1, pooled="none",
            defaults={"steps": 25, "guidance": 7.5, "scheduler": "dpmpp_2m"}, preview=_SD_PREVIEW,
            tiny_vae="madebyollin/taesd")
SDXL = Family("sdxl", denoiser="unet", encoders=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
              clip_layer=-2, pooled="last", time_ids="size", zeros_for_empty_negative=True, vae_force_upcast=True,
              defaults={"steps": 25, "guidance": 5.0, "scheduler": "dpmpp_2m"}, preview=_SDXL_PREVIEW,
              tiny_vae="madebyollin/taesdxl")
# the SDXL refiner: OpenCLIP bigG only, aesthetic-score conditioning; it runs the last part of an SDXL schedule
# (`refiner_start`: the fraction the base runs, diffusers' denoising_end / denoising_start). diffusers' img2img
# pipeline zeros an empty negative prompt unless model_index.json says not (the refiner 1.0 repository does).
SDXL_REFINER = Family("sdxl-refiner", denoiser="unet", encoders=(("text_encoder_2", "tokenizer_2"),),
                      clip_layer=-2, pooled="last", time_ids="size+aesthetic", zeros_for_empty_negative=True,
                      refines="sdxl", vae_force_upcast=True,
                      defaults={"steps": 25, "guidance": 5.0, "scheduler": "euler", "refiner_start": 0.8},
                      preview=_SDXL_PREVIEW, tiny_vae="madebyollin/taesdxl")
SD3 = Family("sd3", denoiser="transformer",
             encoders=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")), clip_layer=-2,
             pooled="concat", t5=("text_encoder_3", "tokenizer_3"), flow=True,
             defaults={"steps": 28, "guidance": 7.0, "scheduler": "flow_euler"}, preview=_SD3_PREVIEW,
             tiny_vae="madebyollin/taesd3")
FAMILIES = {f.name: f for f in (SD, SDXL, SDXL_REFINER, SD3)}


def family_of_index(index: dict) -> Family:
    """The family a diffusers model_index.json describes (its components say it; a component saved as None is
    written [null, null])."""
    if "transformer" in index and "text_encoder_2" in index:
        return SD3
    if "transformer" in index:
        raise UserError(f"{index.get('_class_name', 'this model')} is a transformer model Silicon Diffusion does "
                        "not run (it runs Stable Diffusion 1.x, 2.x, XL and 3)")
    if "text_encoder_2" not in index:
        return SD
    first = index.get("text_encoder")
    return SDXL if isinstance(first, list) and first[0] is not None else SDXL_REFINER


def get(name: str) -> Family:
    return FAMILIES[name]
