"""What a diffusers-layout checkpoint folder is: its family, components, configs and defaults.

Everything architectural comes from the folder's own JSON files; the defaults (steps, guidance,
scheduler, size) come from an optional `silicon_diffusion.json`, else from the family.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from backend.types import UserError

SETTINGS_FILE = "silicon_diffusion.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{Path(path).parent.name}/{Path(path).name} is missing: not a complete diffusers model folder")
    except json.JSONDecodeError as exc:
        raise UserError(f"{Path(path).parent.name}/{Path(path).name} is not valid JSON ({exc})")


@dataclass
class ModelSpec:
    folder: Path
    family: str                      # "sd" (1.x / 2.x) or "sdxl"
    pipeline_class: str
    text_encoders: list              # component names, in order
    tokenizers: list
    unet_config: dict
    vae_config: dict
    text_encoder_configs: list
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool = False
    defaults: dict = field(default_factory=dict)

    @property
    def is_lcm(self) -> bool:
        return self.unet_config.get("time_cond_proj_dim") is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet_config.get("in_channels", 4))

    @property
    def unet_multiple(self) -> int:
        """Latent sizes must be multiples of this (one factor 2 per UNet downsampling)."""
        return 2 ** (len(self.unet_config.get("down_block_types", [])) - 1)

    @property
    def native_size(self) -> int:
        return int(self.defaults.get("size") or self.unet_config.get("sample_size", 64) * self.vae_scale_factor)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def default(self, key: str):
        return self.defaults[key]

    @classmethod
    def from_folder(cls, folder) -> "ModelSpec":
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"model folder {folder} does not exist")
        index = read_json(folder / "model_index.json")
        family = "sdxl" if "text_encoder_2" in index else "sd"
        if "text_encoder" not in index or "unet" not in index or "vae" not in index:
            raise UserError(f"{folder.name} is not a text-to-image Stable Diffusion model "
                            "(model_index.json needs text_encoder, unet and vae)")
        encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
        tokenizers = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
        spec = cls(
            folder=folder, family=family, pipeline_class=index.get("_class_name", ""),
            text_encoders=encoders, tokenizers=tokenizers,
            unet_config=read_json(folder / "unet" / "config.json"),
            vae_config=read_json(folder / "vae" / "config.json"),
            text_encoder_configs=[read_json(folder / e / "config.json") for e in encoders],
            scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", family == "sdxl")),
        )
        spec.defaults = spec._family_defaults()
        settings = folder / SETTINGS_FILE
        if settings.exists():
            spec.defaults.update({k: v for k, v in read_json(settings).items() if v is not None})
        return spec

    def _family_defaults(self) -> dict:
        sched_class = self.scheduler_config.get("_class_name", "")
        if self.is_lcm:
            return {"steps": 4, "guidance": 8.0, "scheduler": "lcm"}
        if self.scheduler_config.get("timestep_spacing") == "trailing" and "Euler" in sched_class:
            # SD-Turbo / SDXL-Turbo: one to four steps, no guidance
            return {"steps": 1, "guidance": 0.0, "scheduler": "euler_a"}
        if self.family == "sdxl":
            return {"steps": 25, "guidance": 5.0, "scheduler": "dpmpp_2m"}
        return {"steps": 25, "guidance": 7.5, "scheduler": "dpmpp_2m"}


def resolve_dims(spec: ModelSpec, width: Optional[int], height: Optional[int]) -> tuple[int, int]:
    """Validate an image size for this model; return (width, height) in pixels."""
    w = spec.native_size if width is None else int(width)
    h = spec.native_size if height is None else int(height)
    step = spec.vae_scale_factor
    low = step * spec.unet_multiple
    for name, v in (("width", w), ("height", h)):
        if v < low or v > 4096:
            raise UserError(f"{name} {v} is out of range: use {low} to 4096 pixels")
        if v % step:
            raise UserError(f"{name} {v} is not a multiple of {step} (the VAE works in {step}-pixel blocks)")
    return w, h
