"""What a Core ML resources folder (resources.py) says about its model: its `ModelSpec`, tokenizers and compression.

- `coreml_spec`: family from its models (SD3's MMDiT, else TextEncoder2's presence), sizes from the
  denoiser's and VAE decoder's own descriptions, configs from the folder's `configs/` (our exports), else
  from the paired diffusers model when the registry names one and it is cached, else the family's defaults
  (SD3: flow matching with shift 3, VAE scale 1.5305 / shift 0.0609, as Apple's CLI);
- `coreml_tokenizers`: one CLIP tokenizer per text encoder, from the checkpoint's folder or vocab.json +
  merges.txt in or beside the resources;
- `mmdit_tensors`, `quantization_label`, and the models' tensor names the engine (engine.py) feeds.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from backend import files
from backend.checkpoint import SETTINGS_FILE, ModelSpec
from backend.engines.coreml import resources as res
from backend.tokenizer import CLIPTokenizer
from backend.types import UserError

TEXT_ENCODERS = (("TextEncoder", "text_encoder", "tokenizer"), ("TextEncoder2", "text_encoder_2", "tokenizer_2"))
HIDDEN_OUTPUTS = ("hidden_embeds", "last_hidden_state")  # SDXL's penultimate layer / SD's last layer
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)
# SD3's defaults where a folder has no configs: apple/ml-stable-diffusion's CLI for --sd3 (scaleFactor 1.5305,
# shiftFactor 0.0609, timestepShift 3.0) and stable-diffusion-3-medium-diffusers' scheduler_config.json
_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
_SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
# the MMDiT's tensor names (Apple's package; MobileDiffuser's split stages add modulation_inputs and *_out)
MMDIT_LATENT, MMDIT_TEXT = "latent_image_embeddings", "token_level_text_embeddings"
MMDIT_POOLED = "pooled_text_embeddings"
CLIP_TOKENS = 77


def _read(folder: Optional[Path], relative: str) -> dict:
    path = folder / relative if folder is not None else None
    return files.read_json(path) if path is not None and path.is_file() else {}


def _default_scheduler(sdxl: bool, v_prediction: bool) -> dict:
    if sdxl:
        return dict(_class_name="EulerDiscreteScheduler", **_SD_BETAS, prediction_type="epsilon",
                    timestep_spacing="leading")
    return dict(_class_name="PNDMScheduler", **_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False,
                prediction_type="v_prediction" if v_prediction else "epsilon")


def named_or_first(tensors: dict, preferred=()) -> res.TensorSpec:
    """The first of the `preferred` names that `tensors` holds, else its first entry."""
    for name in preferred:
        if name in tensors:
            return tensors[name]
    return next(iter(tensors.values()))


def _text_width(resources: res.CoreMLResources, stage: str) -> int:
    hidden = named_or_first(resources.io(stage).outputs, HIDDEN_OUTPUTS)
    return int(hidden.shape[-1]) if hidden.shape else 0


def _vae_config(resources: res.CoreMLResources, configs: Optional[Path], channels: int, defaults: dict) -> dict:
    vae = resources.io("VAEDecoder")
    image = named_or_first(vae.outputs, ("image",)).shape
    scale = int(image[-1]) // int(named_or_first(vae.inputs).shape[-1]) if len(image) == 4 else 8
    vae_config = {**defaults, **_read(configs, "vae/config.json")}
    vae_config["latent_channels"] = channels
    if len(vae_config.get("block_out_channels", [0] * 4)) != int(math.log2(scale)) + 1:
        # ModelSpec counts the VAE's levels for its scale factor; the description is what counts here
        vae_config["block_out_channels"] = [0] * (int(math.log2(scale)) + 1)
    return vae_config


def _finish(spec: ModelSpec, h: int, w: int, paired: Optional[Path], folder: Path) -> ModelSpec:
    spec.defaults = spec._family_defaults()
    if h == w:
        spec.defaults["size"] = int(h) * spec.vae_scale_factor
    for settings in (paired, folder):
        spec.defaults.update({k: v for k, v in _read(settings, SETTINGS_FILE).items() if v is not None})
    return spec


def mmdit_tensors(resources: res.CoreMLResources) -> dict:
    """The MMDiT's described inputs by name, over its stages: latents and text as Stage0 (or the single
    package) takes them, pooled text and timestep as the Conditioning (or the single package) takes them."""
    found = {}
    for stage in resources.denoiser_stages:
        for name, tensor in resources.io(stage).inputs.items():
            found.setdefault(name, tensor)
    for name in (MMDIT_LATENT, MMDIT_TEXT, MMDIT_POOLED, "timestep"):
        if name not in found:
            raise UserError(f"the SD3 MMDiT models in {resources.folder} have no input '{name}'; "
                            "they are not in Apple's or MobileDiffuser's layout")
    return found


def _patch_size(resources: res.CoreMLResources, config: dict, h: int, w: int) -> int:
    """The transformer's patch: from its config, else from Stage0's token count (h/p * w/p), else 2 (every SD3)."""
    if config.get("patch_size"):
        return int(config["patch_size"])
    if resources.split_mmdit:
        tokens = resources.io(resources.denoiser_stages[1]).outputs.get(MMDIT_LATENT + "_out")
        if tokens is not None and len(tokens.shape) == 3 and tokens.shape[1]:
            return int(round(math.sqrt(h * w / tokens.shape[1])))
    return 2


def _sd3_spec(resources: res.CoreMLResources, paired: Optional[Path]) -> ModelSpec:
    configs = resources.configs or paired
    tensors = mmdit_tensors(resources)
    _, channels, h, w = tensors[MMDIT_LATENT].shape
    _, joint_dim, _, sequence = tensors[MMDIT_TEXT].shape
    present = [e for e in TEXT_ENCODERS if e[0] in resources.models]
    widths = [_text_width(resources, stage) for stage, _, _ in present]
    transformer = dict(_read(configs, "transformer/config.json"), in_channels=channels, out_channels=channels,
                       sample_size=h, joint_attention_dim=joint_dim,
                       pooled_projection_dim=tensors[MMDIT_POOLED].shape[1])
    transformer["patch_size"] = _patch_size(resources, transformer, h, w)
    index = _read(configs, "model_index.json")
    spec = ModelSpec(
        folder=resources.folder, family="sd3",
        pipeline_class=index.get("_class_name", "CoreMLStableDiffusion3Pipeline"),
        text_encoders=[name for _, name, _ in present], tokenizers=[tok for _, _, tok in present],
        denoiser_config=transformer, vae_config=_vae_config(resources, configs, channels, _SD3_VAE),
        text_encoder_configs=[_read(configs, f"{name}/config.json") or {"hidden_size": width}
                              for (_, name, _), width in zip(present, widths)],
        scheduler_config=_read(configs, "scheduler/scheduler_config.json") or dict(_SD3_SCHEDULER))
    spec.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt",
                                                       spec.traits.zeros_for_empty_negative))
    if sequence <= CLIP_TOKENS:
        raise UserError(f"the MMDiT in {resources.folder} takes {sequence} text tokens; SD3 needs 77 CLIP "
                        "tokens followed by T5's (154 in Apple's and MobileDiffuser's exports)")
    return _finish(spec, h, w, paired, resources.folder)


def coreml_spec(resources: res.CoreMLResources, paired: Optional[Path] = None) -> ModelSpec:
    """What the pipeline needs to know about a resources folder; the models' descriptions win over configs."""
    if resources.is_sd3:
        return _sd3_spec(resources, paired)
    # a refiner bundled beside its base: the folder's configs are the base's
    configs = paired if resources.refiner else resources.configs or paired
    unet = resources.io(resources.unet_stages[0]).inputs
    vae = resources.io("VAEDecoder")
    _, channels, h, w = unet["sample"].shape
    image = named_or_first(vae.outputs, ("image",)).shape
    scale = int(image[-1]) // int(named_or_first(vae.inputs).shape[-1]) if len(image) == 4 else 8
    sdxl = resources.is_sdxl
    present = [e for e in TEXT_ENCODERS if e[0] in resources.models]
    widths = [_text_width(resources, stage) for stage, _, _ in present]

    # an inpainting UNet takes 9 channels (latents, mask, masked-image latents) and gives the VAE's 4
    latent = int(named_or_first(vae.inputs).shape[1]) if len(named_or_first(vae.inputs).shape) == 4 else channels
    unet_config = dict(_read(configs, "unet/config.json"), in_channels=channels, out_channels=latent, sample_size=h,
                       cross_attention_dim=unet["encoder_hidden_states"].shape[1])
    unet_config.pop("time_cond_proj_dim", None)
    if "timestep_cond" in unet:
        unet_config["time_cond_proj_dim"] = unet["timestep_cond"].shape[1]
    family = "sdxl" if sdxl else "sd"
    if "time_ids" in unet:
        unet_config["addition_embed_type"] = "text_time"
        ids = unet["time_ids"].shape
        per_row = ids[-1] if len(ids) > 1 else ids[0] // max(int(unet["sample"].shape[0]), 1)
        if per_row == 5:  # size, crop, aesthetic score: the refiner (Apple's Swift reads it the same way)
            family = "sdxl-refiner"
    vae_config = _vae_config(resources, configs, latent, {"scaling_factor": 0.13025 if sdxl else 0.18215})
    # SD 2.x at 768 (OpenCLIP ViT-H text, 96x96 latents) predicts v; the 512 "base" models predict noise
    v_prediction = not sdxl and widths[0] == 1024 and h * scale == 768
    scheduler = _read(configs, "scheduler/scheduler_config.json") or _default_scheduler(sdxl, v_prediction)
    index = _read(configs, "model_index.json")
    spec = ModelSpec(
        folder=resources.folder, family=family,
        pipeline_class=index.get("_class_name", "CoreMLStableDiffusionPipeline"),
        text_encoders=[name for _, name, _ in present], tokenizers=[tok for _, _, tok in present],
        denoiser_config=unet_config, vae_config=vae_config,
        text_encoder_configs=[_read(configs, f"{name}/config.json") or {"hidden_size": width}
                              for (_, name, _), width in zip(present, widths)],
        scheduler_config=scheduler,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)))
    return _finish(spec, h, w, paired, resources.folder)


def _tokenizer_files(resources: res.CoreMLResources) -> tuple:
    """vocab.json + merges.txt: in the folder, else beside it (Apple's repos keep them in compiled/ only)."""
    if resources.vocab and resources.merges:
        return resources.vocab, resources.merges
    for sibling in sorted(resources.folder.parent.glob("*")):
        if (sibling / "vocab.json").is_file() and (sibling / "merges.txt").is_file():
            return sibling / "vocab.json", sibling / "merges.txt"
    return None, None


def coreml_tokenizers(resources: res.CoreMLResources, spec: ModelSpec, paired: Optional[Path] = None) -> list:
    """One CLIP tokenizer per text encoder: the checkpoint's own folder when known, else vocab.json + merges.txt."""
    tokenizers = []
    for name, config in zip(spec.tokenizers, spec.text_encoder_configs):
        folder = next((base / name for base in (resources.configs, paired)
                       if base is not None and (base / name).is_dir()), None)
        if folder is not None:
            tokenizers.append(CLIPTokenizer.from_folder(folder))
            continue
        vocab, merges = _tokenizer_files(resources)
        if vocab is None:
            raise UserError(f"{resources.folder} has no vocab.json + merges.txt for the CLIP tokenizer; "
                            "copy them from the model's tokenizer folder")
        # OpenCLIP encoders (SD 2.x's ViT-H, SDXL's bigG: 1024+ wide) were trained with "!" as padding
        pad = "!" if config.get("hidden_size", 0) >= 1024 or name == "tokenizer_2" else None
        tokenizers.append(CLIPTokenizer.from_files(vocab, merges, pad_token=pad))
    return tokenizers


def quantization_label(resources: res.CoreMLResources) -> str:
    """How the weights are compressed: the manifest's method (and bits), else what the denoiser's ops show."""
    manifest = resources.manifest
    method = manifest.get("method")
    if method and method != "export":
        bits = manifest.get("average_bits") or manifest.get("bits")
        return f"{method} {bits}-bit" if bits else method
    ops = resources.io(resources.denoiser_stages[-1]).op_counts
    if ops.get("constexpr_lut_to_dense"):
        return "palettized"
    return "linear int8" if ops.get("constexpr_affine_dequantize") else "none"
