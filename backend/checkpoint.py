"""What a diffusers-layout checkpoint folder is: its family, components, configs and defaults.

Everything architectural comes from the folder's own JSON files; the family (backend/families.py) from
the components model_index.json names; the defaults (steps, guidance, scheduler, size) from an optional
`silicon_diffusion.json`, else from the family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from backend import families, files
from backend.families import Family
from backend.types import UserError

SETTINGS_FILE = "silicon_diffusion.json"


def read_json(path: Path) -> dict:
    """A config of the folder (a bounded read, backend/files.py); a missing one says the folder is incomplete."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path.parent.name}/{path.name} is missing: not a complete diffusers model folder")
    return files.read_json(path)


@dataclass
class ModelSpec:
    folder: Path
    family: str                      # a backend.families name: "sd" (1.x / 2.x), "sdxl", "sdxl-refiner" or "sd3"
    pipeline_class: str
    text_encoders: list              # component names, in order: the CLIP encoders, then T5 when present
    tokenizers: list
    denoiser_config: dict            # unet/config.json or transformer/config.json
    vae_config: dict
    text_encoder_configs: list
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool = False
    defaults: dict = field(default_factory=dict)
    weight_files: dict = field(default_factory=dict)  # component -> safetensors files in place of its folder's

    @property
    def traits(self) -> Family:
        """What this model's family does: conditioning, denoiser, latents (backend/families.py)."""
        return families.get(self.family)

    @property
    def has_t5(self) -> bool:
        return self.traits.t5 is not None and self.traits.t5[0] in self.text_encoders

    @property
    def is_lcm(self) -> bool:
        return self.denoiser_config.get("time_cond_proj_dim") is not None

    @property
    def is_transformer(self) -> bool:
        return self.traits.denoiser == "transformer"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def latent_channels(self) -> int:
        """The latents' channels: what the denoiser outputs (an inpainting UNet takes 9 in: latents, mask, image)."""
        config = self.denoiser_config
        return int(config.get("out_channels") or config.get("in_channels", 4))

    @property
    def inpainting(self) -> bool:
        """An inpainting denoiser: it takes the mask and the masked image's latents beside the latents."""
        return int(self.denoiser_config.get("in_channels", 4)) == 2 * self.latent_channels + 1

    @property
    def latent_multiple(self) -> int:
        """Latent sizes must be multiples of this: the transformer's patch, or one factor 2 per UNet level."""
        if self.is_transformer:
            return int(self.denoiser_config.get("patch_size", 2))
        return 2 ** (len(self.denoiser_config.get("down_block_types", [])) - 1)

    @property
    def max_size(self) -> int:
        """The largest width or height in pixels: what the transformer's position table covers, else 4096."""
        cells = self.denoiser_config.get("pos_embed_max_size") if self.is_transformer else None
        return min(4096, int(cells) * self.latent_multiple * self.vae_scale_factor) if cells else 4096

    @property
    def size_step(self) -> int:
        """Image sides are multiples of this many pixels: the VAE's block, or the transformer's patch in pixels."""
        return self.vae_scale_factor * (self.latent_multiple if self.is_transformer else 1)

    @property
    def min_size(self) -> int:
        return self.vae_scale_factor * self.latent_multiple

    @property
    def native_size(self) -> int:
        return int(self.defaults.get("size") or self.denoiser_config.get("sample_size", 64) * self.vae_scale_factor)

    @property
    def prediction_type(self) -> str:
        return "flow" if self.traits.flow else self.scheduler_config.get("prediction_type", "epsilon")

    def default(self, key: str):
        return self.defaults[key]

    @property
    def vocabulary(self) -> Optional[list]:
        """The only words the model was trained on, when its settings file declares them (the embedded model)."""
        words = self.defaults.get("vocabulary")
        return list(words) if isinstance(words, list) else None

    def words_it_ignores(self, prompt: str) -> list:
        """The words of `prompt` outside the model's declared vocabulary (none when it declares none)."""
        known = set(self.vocabulary or [])
        words = re.findall(r"[a-z0-9']+", (prompt or "").lower())
        return list(dict.fromkeys(w for w in words if w not in known)) if known else []

    def patch_count(self, width: int, height: int) -> int:
        """The transformer's image tokens at this size (the flow schedule's resolution shift reads it)."""
        cell = self.vae_scale_factor * self.latent_multiple
        return (height // cell) * (width // cell)

    @classmethod
    def from_folder(cls, folder) -> "ModelSpec":
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"model folder {folder} does not exist")
        index = read_json(folder / "model_index.json")
        family = families.family_of_index(index)
        needed = (family.encoders[0][0], family.denoiser, "vae")
        if any(component not in index for component in needed):
            raise UserError(f"{folder.name} is not a text-to-image Stable Diffusion model "
                            f"(model_index.json needs {', '.join(needed[:2])} and vae)")
        encoders = [e for e, _ in family.encoders]
        tokenizers = [t for _, t in family.encoders]
        if family.t5 is not None and _present(index, folder, family.t5[0]):
            encoders.append(family.t5[0])
            tokenizers.append(family.t5[1])
        spec = cls(
            folder=folder, family=family.name, pipeline_class=index.get("_class_name", ""),
            text_encoders=encoders, tokenizers=tokenizers,
            denoiser_config=read_json(folder / family.denoiser / "config.json"),
            vae_config=read_json(folder / "vae" / "config.json"),
            text_encoder_configs=[read_json(folder / e / "config.json") for e in encoders],
            scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt",
                                                        family.zeros_for_empty_negative)),
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
        return dict(self.traits.defaults)


def _present(index: dict, folder: Path, component: str) -> bool:
    """A component the index names with a class (not [null, null]) and whose folder is there."""
    entry = index.get(component)
    return isinstance(entry, list) and entry[0] is not None and (folder / component).is_dir()


LARGE_FACTOR = 2  # a model is asked for at most twice its native side unless large images are allowed


def size_limit(spec: ModelSpec, allow_large: bool = False) -> int:
    """The largest side a request may ask of this model: twice its native size (beyond it, models trained at
    one size repeat their subject and the time and memory grow with the pixels), or with `allow_large` what
    the denoiser can take."""
    return spec.max_size if allow_large else min(spec.max_size, LARGE_FACTOR * spec.native_size)


def resolve_dims(spec: ModelSpec, width: Optional[int], height: Optional[int],
                 allow_large: bool = False) -> tuple[int, int]:
    """Validate an image size for this model (before anything is allocated); return (width, height) in pixels."""
    w = spec.native_size if width is None else int(width)
    h = spec.native_size if height is None else int(height)
    step, low, high = spec.size_step, spec.min_size, size_limit(spec, allow_large)
    if (w > high or h > high) and low <= w <= spec.max_size and low <= h <= spec.max_size and not allow_large:
        raise UserError(f"{w}x{h} is too large for this model: at most {high}x{high} (twice its native "
                        f"{spec.native_size}); the app's --allow-large option (the CLI's too) lifts this to "
                        f"{spec.max_size}")
    for name, v in (("width", w), ("height", h)):
        if v < low or v > high:
            raise UserError(f"{name} {v} is out of range: use {low} to {high} pixels")
        if v % step:
            block = "the transformer works on" if spec.is_transformer else "the VAE works in"
            raise UserError(f"{name} {v} is not a multiple of {step} ({block} {step}-pixel blocks)")
    return w, h
