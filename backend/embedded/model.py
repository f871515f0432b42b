"""The embedded model's architecture and its diffusers folder: configs, fresh modules, save and load.

The model is a Stable Diffusion 1.x-style pipeline scaled down: a CLIP text encoder over a vocabulary
where every caption word is one token, a UNet2DConditionModel on 16x16x4 latents (cross-attention at
8x8, 4x4 and 2x2), and an AutoencoderKL that downsamples 64x64 images 4x (no attention, so it can be
trained on crops). Sizes were chosen for training time on two CPU cores. The configs are diffusers' and
transformers' own config.json fields, so the saved folder loads through the same code as a downloaded
checkpoint (and through diffusers).

Weights are saved under the checkpoint names (the MLX modules already use them); the only change is
the convolution layout, MLX (O, kH, kW, I) -> PyTorch (O, I, kH, kW).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from backend.embedded.dataset import vocabulary
from backend.engines.mlx import weights as weight_io
from backend.engines.mlx.clip import CLIPTextConfig, CLIPTextModel, checkpoint_names
from backend.engines.mlx.unet import UNet2DConditionModel, UNetConfig
from backend.engines.mlx.vae import AutoencoderKL, VAEConfig
from backend.vocab import build_vocab, write_tokenizer_folder

RESOLUTION = 64
DEFAULTS = {"steps": 20, "guidance": 4.0, "scheduler": "dpmpp_2m", "size": RESOLUTION}
SETTINGS_FILE = "silicon_diffusion.json"
EXAMPLE_PROMPT = "a large red circle in the center on a blue background"
WEIGHTS = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
           "vae": "diffusion_pytorch_model.safetensors"}

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
    "sample_size": RESOLUTION, "scaling_factor": 1.0, "force_upcast": False, "mid_block_add_attention": False,
}
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "sample_size": RESOLUTION // 4, "in_channels": 4, "out_channels": 4,
    # Down to 2x2: there each cell's 3x3 convolutions meet a different pattern of zero padding, so the
    # network knows left from right and top from bottom (at 4x4 and above it hardly learned to).
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "attention_head_dim": 4,
    "cross_attention_dim": 128, "norm_num_groups": 16, "use_linear_projection": True, "act_fn": "silu",
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
}
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 128, "initializer_range": 0.02,
    "initializer_factor": 1.0, "attention_dropout": 0.0, "dropout": 0.0,
}
TEXT_LENGTH = TEXT_ENCODER_CONFIG["max_position_embeddings"]
SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "algorithm_type": "dpmsolver++",
    "solver_order": 2, "steps_offset": 1, "timestep_spacing": "trailing", "set_alpha_to_one": False,
    "clip_sample": False, "trained_betas": None,
    # Without these the noisiest training step still shows the picture's layout faintly, so the model learns to
    # read the object's place from the starting noise instead of from the caption (arXiv 2305.08891).
    "rescale_betas_zero_snr": True,
}


def text_encoder_config() -> dict:
    """The text encoder's config.json: the vocabulary size and special ids follow the tokenizer."""
    vocab, _ = build_vocab(vocabulary())
    eos = vocab["<|endoftext|>"]
    return {**TEXT_ENCODER_CONFIG, "vocab_size": len(vocab), "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": eos, "pad_token_id": eos}


class Parts(nn.Module):
    """The three trained modules, under the names of their folders."""

    def __init__(self, vae_config: dict = VAE_CONFIG, text_config: dict | None = None, unet_config: dict = UNET_CONFIG):
        super().__init__()
        self.text_config = dict(text_config or text_encoder_config())
        self.unet_config = dict(unet_config)
        self.vae_config = dict(vae_config)
        self.text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(self.text_config))
        self.unet = UNet2DConditionModel(UNetConfig.from_dict(self.unet_config))
        self.vae = AutoencoderKL(VAEConfig.from_dict(self.vae_config))

    def component(self, name: str) -> nn.Module:
        return getattr(self, name)


# 1x1 convolutions in diffusers that the MLX modules hold as Linear layers.
_POINTWISE_CONVS = ("conv_shortcut.weight",)


def torch_layout(module: nn.Module, dtype=None) -> dict[str, mx.array]:
    """A module's parameters under checkpoint names, convolutions as PyTorch lays them out."""
    out = {}
    for name, value in tree_flatten(module.parameters()):
        if value.ndim == 4:
            value = value.transpose(0, 3, 1, 2)
        elif name.endswith(_POINTWISE_CONVS):
            value = value[:, :, None, None]
        out[name] = value.astype(dtype) if dtype is not None else value
    return out


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_folder(parts: Parts, folder: Path, dtype=mx.float32, defaults: dict = DEFAULTS) -> Path:
    """Write the whole pipeline in the diffusers layout (replacing `folder`)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_json(tmp / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    _write_json(tmp / "text_encoder" / "config.json", {**parts.text_config, "torch_dtype": "float32"})
    _write_json(tmp / "unet" / "config.json", parts.unet_config)
    _write_json(tmp / "vae" / "config.json", parts.vae_config)
    _write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    # the words it knows and an example, so that the app can show them and warn about the others; its own small
    # VAE decodes the sharp live previews (the fast ones' projection: tools/fit_preview_projection.py --write)
    _write_json(tmp / SETTINGS_FILE, {**defaults, "vocabulary": vocabulary(), "example_prompt": EXAMPLE_PROMPT,
                                      "preview_decoder": "vae"})
    write_tokenizer_folder(tmp / "tokenizer", vocabulary(), max_length=TEXT_LENGTH)
    for name, filename in WEIGHTS.items():
        mx.save_safetensors(str(tmp / name / filename), torch_layout(parts.component(name), dtype),
                            metadata={"format": "pt"})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_folder(folder: Path) -> Parts:
    """The modules of a folder `save_folder` wrote, in float32 (to resume training or fine-tune)."""
    folder = Path(folder)
    # The folder's own configs: its vocabulary or widths may differ from the current constants.
    config = {name: json.loads((folder / name / "config.json").read_text()) for name in WEIGHTS}
    parts = Parts(config["vae"], config["text_encoder"], config["unet"])
    for name, filename in WEIGHTS.items():
        state = weight_io.read_safetensors([folder / name / filename])
        if name == "text_encoder":
            state = checkpoint_names(state)
        weight_io.load_into(parts.component(name), state, mx.float32)
    return parts
