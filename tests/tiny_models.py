"""Tiny random-weight Stable Diffusion pipelines, built with diffusers and saved in the diffusers layout.

Each builder returns the folder it wrote; the same folder is what the engines load and what the parity
tests run through diffusers. Families: sd1 (epsilon, conv proj), sd2 (v-prediction, linear proj, "!" pad,
upcast attention, gelu), sdxl (two encoders, text_time micro-conditioning), lcm (time_cond_proj_dim), the
second stage sdxl-refiner (text_encoder_2 only, aesthetic score), and SD3: sd3 (MMDiT, no T5, shift 3), sd3-t5
(with a tiny T5), sd35 (qk_norm, dual attention, dynamic shifting). Inpainting: sd1-inpaint (sd1 with a 9-channel
UNet: latents, mask, masked-image latents; StableDiffusionInpaintPipeline). And, without a folder, a small MLX VAE
with perturbed random weights for the band and memory tests (`perturbed_vae`, `cast_vae`).
"""
from __future__ import annotations

from pathlib import Path

from backend.vocab import write_tokenizer_folder

WORDS = ("a photo of an astronaut riding horse on mars red green blue yellow circle square triangle "
         "large small at the top bottom left right center background painting cat dog").split()
FAMILIES = ("sd1", "sd2", "sdxl", "lcm")
# SD3 (MMDiT): sd3 (no T5), sd3-t5 (with a tiny T5), sd35 (qk_norm, dual attention, dynamic shifting, no T5)
SD3_FAMILIES = ("sd3", "sd3-t5", "sd35")
# inpainting checkpoints (9-channel UNet), as stable-diffusion-v1-5/stable-diffusion-inpainting is saved
INPAINT_FAMILIES = ("sd1-inpaint",)
SD3_JOINT_DIM = 96  # wider than the two CLIP encoders together (64), so the zero padding is exercised


def _text_encoder(vocab_size: int, with_projection: bool = False, act: str = "quick_gelu", hidden: int = 32,
                  seed=None):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed if seed is not None else (1 if with_projection else 0))
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=32,
                         bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def _tokenizer(folder: Path, pad: str):
    from transformers import CLIPTokenizer
    write_tokenizer_folder(folder, WORDS, pad_token=pad)
    return CLIPTokenizer.from_pretrained(str(folder))


def _vae(seed: int = 2):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=32).eval()


def _unet(family: str):
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(3)
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                  block_out_channels=(32, 64))
    if family in ("sd1", "sd1-inpaint"):
        cfg = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
        if family == "sd1-inpaint":
            torch.manual_seed(10)
            common["in_channels"] = 9
    elif family == "sd2":
        cfg = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    elif family == "sdxl":
        cfg = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                   attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                   addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 32)
    elif family == "sdxl-refiner":  # conditioned on text_encoder_2 alone; 5 time ids (size, crop, aesthetic score)
        torch.manual_seed(8)
        cfg = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                   addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=5 * 8 + 32)
    elif family == "lcm":
        cfg = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                   time_cond_proj_dim=32)
    else:
        raise ValueError(family)
    return UNet2DConditionModel(**common, **cfg).eval()


def _scheduler(family: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, PNDMScheduler
    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if family in ("sd1", "sd1-inpaint"):
        return PNDMScheduler(**base, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    if family == "sd2":
        return DDIMScheduler(**base, prediction_type="v_prediction", steps_offset=1, clip_sample=False,
                             set_alpha_to_one=False, timestep_spacing="leading")
    if family == "sdxl":
        return EulerDiscreteScheduler(**base, steps_offset=1, timestep_spacing="leading")
    return LCMScheduler(**base, original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True)


def _sd3_transformer(sd35: bool):
    import torch
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(4)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16,
                                 num_layers=3 if sd35 else 2, attention_head_dim=8, num_attention_heads=4,
                                 joint_attention_dim=SD3_JOINT_DIM, caption_projection_dim=32,
                                 pooled_projection_dim=64, pos_embed_max_size=32,
                                 qk_norm="rms_norm" if sd35 else None,
                                 dual_attention_layers=(0, 1) if sd35 else ()).eval()


def _sd3_vae():
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(5)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


def _t5(folder: Path):
    """A tiny T5 encoder whose width is the transformer's joint dimension, with its tokenizer."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast
    from backend.vocab import write_t5_tokenizer_folder
    write_t5_tokenizer_folder(folder, WORDS)
    tokenizer = T5TokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(6)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=SD3_JOINT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).eval(), tokenizer


def build_sd3_pipeline(family: str):
    """A tiny StableDiffusion3Pipeline: two CLIP encoders with projection, MMDiT, 16-channel VAE with shift."""
    import tempfile
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    tmp = Path(tempfile.mkdtemp(prefix="tok-"))
    tokenizer = _tokenizer(tmp / "tokenizer", "<|endoftext|>")
    vocab_size = len(tokenizer)
    sd35 = family == "sd35"
    scheduler = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=64, max_image_seq_len=256)
                 if sd35 else FlowMatchEulerDiscreteScheduler(shift=3.0))
    t5, t5_tokenizer = _t5(tmp / "tokenizer_3") if family == "sd3-t5" else (None, None)
    return StableDiffusion3Pipeline(
        transformer=_sd3_transformer(sd35), scheduler=scheduler, vae=_sd3_vae(),
        text_encoder=_text_encoder(vocab_size, with_projection=True), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(vocab_size, with_projection=True, act="gelu", seed=7),
        tokenizer_2=_tokenizer(tmp / "tokenizer_2", "!"), text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def build_pipeline(family: str):
    """The diffusers pipeline object for `family` (random weights, deterministic)."""
    if family in SD3_FAMILIES:
        return build_sd3_pipeline(family)
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="tok-"))
    pad = "!" if family == "sd2" else "<|endoftext|>"
    tokenizer = _tokenizer(tmp / "tokenizer", pad)
    vocab_size = len(tokenizer)
    act = "gelu" if family == "sd2" else "quick_gelu"
    parts = dict(vae=_vae(), unet=_unet(family), scheduler=_scheduler(family), tokenizer=tokenizer,
                 text_encoder=_text_encoder(vocab_size, act=act))
    if family == "sdxl":
        return StableDiffusionXLPipeline(**parts, tokenizer_2=_tokenizer(tmp / "tokenizer_2", "!"),
                                         text_encoder_2=_text_encoder(vocab_size, with_projection=True,
                                                                      act="gelu"))
    if family == "sd1-inpaint":
        from diffusers import StableDiffusionInpaintPipeline
        return StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    if family == "lcm":
        return LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_refiner():
    """A tiny SDXL refiner (StableDiffusionXLImg2ImgPipeline as stabilityai's refiner 1.0 is saved): no first text
    encoder, the base's second one, aesthetic-score time ids, an empty negative prompt encoded (not zeros), its
    own UNet and VAE weights."""
    import tempfile
    from diffusers import StableDiffusionXLImg2ImgPipeline
    tmp = Path(tempfile.mkdtemp(prefix="tok-"))
    tokenizer_2 = _tokenizer(tmp / "tokenizer_2", "!")
    return StableDiffusionXLImg2ImgPipeline(
        vae=_vae(seed=9), unet=_unet("sdxl-refiner"), scheduler=_scheduler("sdxl"), text_encoder=None, tokenizer=None,
        text_encoder_2=_text_encoder(len(tokenizer_2), with_projection=True, act="gelu"), tokenizer_2=tokenizer_2,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


def save_pipeline(family: str, folder: Path):
    """Build `family` and save it in the diffusers layout (safetensors) under `folder`; return (pipe, folder)."""
    pipe = build_refiner() if family == "sdxl-refiner" else build_pipeline(family)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe, Path(folder)


def fake_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """`source` laid out as huggingface_hub's cache does: models--owner--name/snapshots/<rev>/, refs/main; returns
    the snapshot folder."""
    import shutil
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = "0" * 40
    shutil.copytree(source, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


# -- MLX modules with random weights, no folder ------------------------------------------------------------------
#: A two-level VAE, small enough for the band and memory tests.
SMALL_VAE = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def perturbed_vae(config: dict = SMALL_VAE, seed: int = 0):
    """An MLX AutoencoderKL of `config` with every parameter moved off its initial value by 0.1 N(0, 1) noise:
    non-trivial norm affines and biases, so that every term of the layers shows."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from backend.engines.mlx.vae import AutoencoderKL
    mx.random.seed(seed)
    model = AutoencoderKL(config)
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    return model


def cast_vae(model, dtype, config: dict = SMALL_VAE):
    """A copy of `model` (an AutoencoderKL of `config`) with its parameters in `dtype`."""
    from mlx.utils import tree_map
    from backend.engines.mlx.vae import AutoencoderKL
    copy = AutoencoderKL(config)
    copy.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    return copy
