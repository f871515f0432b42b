"""One torch module -> one Core ML package as Apple's exports describe it (export.py, export_sd3.py convert with it).

Conversion is torch.jit.trace + ct.convert(mlprogram, minimum_deployment_target=macOS13). torch 2.13 is
newer than what coremltools 9.0 was tested with (2.7): it warns at import, and one converter rule
(aten::Int of a one-element tensor) needs the fix `_patch_coremltools` installs. Every package gets
apple/ml-stable-diffusion's file name (`package_name`), its tensors' descriptions (`DESCRIPTIONS`) and the
metadata resources.py reads (`describe`).
"""
from __future__ import annotations

import warnings

import numpy as np

from backend.engines.coreml import resources as res

_PATCHED = False


def _patch_coremltools() -> None:
    """aten::Int of a one-element constant tensor (diffusers' `height * width` under torch 2.13) -> int32."""
    global _PATCHED
    if _PATCHED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    def int_of_one_element(context, node):
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and np.size(x.val) == 1:
            context.add(mb.const(val=np.int32(np.asarray(x.val).item()), name=node.name))
        else:
            ops._int(context, node)

    _TORCH_OPS_REGISTRY.set_func_by_name(int_of_one_element, "int")
    _PATCHED = True


def package_name(model_version: str, stage: str) -> str:
    return f"Stable_Diffusion_version_{model_version}_{res.python_suffix(stage)}.mlpackage".replace("/", "_")


def convert(module, example: dict, input_dtypes: dict, outputs: dict, fp16: bool):
    """Trace `module` on the example inputs and convert it; `outputs` maps output name -> numpy dtype."""
    import coremltools as ct
    import torch

    _patch_coremltools()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: shapes are fixed on purpose
        traced = torch.jit.trace(module.eval(), tuple(example.values()), check_trace=False)
        return ct.convert(
            traced, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13,
            inputs=[ct.TensorType(name=n, shape=tuple(v.shape), dtype=input_dtypes[n]) for n, v in example.items()],
            outputs=[ct.TensorType(name=n, dtype=d) for n, d in outputs.items()],
            compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
            skip_model_load=True)


def describe(mlmodel, stage: str, info: dict, descriptions: dict) -> None:
    mlmodel.author = f"Converted by Silicon Diffusion from {info['source']}"
    mlmodel.version = info["model_version"]
    mlmodel.short_description = f"Stable Diffusion {stage} ({info['attention']} attention, {info['precision']})"
    for name, text in descriptions.items():
        if name in mlmodel.input_description:
            mlmodel.input_description[name] = text
        elif name in mlmodel.output_description:
            mlmodel.output_description[name] = text
    mlmodel.user_defined_metadata.update({
        res.META_STAGE: stage, res.META_ATTENTION: info["attention"],
        res.META_PRECISION: info["precision"], res.META_SOURCE: info["source"]})


DESCRIPTIONS = {
    "input_ids": "CLIP token ids, padded to 77 (float32 as in Apple's exports)",
    "last_hidden_state": "Token embeddings the UNet conditions on",
    "hidden_embeds": "Hidden states of the penultimate encoder layer (SDXL conditioning)",
    "pooled_outputs": "Pooled (projected, for SDXL's second encoder) text embedding",
    "sample": "Noisy latents being denoised",
    "timestep": "The scheduler's timestep, one per batch item",
    "encoder_hidden_states": "Text embeddings laid out (B, C, 1, 77)",
    "time_ids": "SDXL micro-conditioning: original size, crop top-left, target size",
    "text_embeds": "SDXL pooled text embedding of the second text encoder",
    "timestep_cond": "LCM guidance-scale embedding",
    "noise_pred": "The UNet's prediction (noise, or v for v-prediction models)",
    "z": "Latents already divided by the VAE scaling factor",
    "image": "Decoded image in [-1, 1]",
    "x": "Image in [-1, 1]",
    "latent": "Mean and log-variance of the latent distribution",
    "latent_image_embeddings": "Noisy latents (B, C, h, w), or the image tokens (B, N, dim) between MMDiT stages",
    "token_level_text_embeddings": "Text tokens (B, C, 1, 77 CLIP + T5 tokens), or (B, S, dim) between MMDiT stages",
    "pooled_text_embeddings": "Pooled CLIP-L and CLIP-G text embeddings, concatenated (B, P, 1, 1)",
    "modulation_inputs": "Timestep and pooled-text embedding (temb) that modulates every MMDiT block",
    "latent_image_embeddings_out": "Image tokens for the next MMDiT stage",
    "token_level_text_embeddings_out": "Text tokens for the next MMDiT stage",
    "denoiser_output": "The MMDiT's flow-matching velocity",
}
