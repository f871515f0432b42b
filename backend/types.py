"""The request and result objects every caller (app, CLI, tests, benchmarks) exchanges with the backend."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any, Callable, Optional

import numpy as np


class UserError(ValueError):
    """An error the user caused; its message is shown as it is in the UI and the CLI."""


def whole_number(value, name: str, low: int, high: int) -> int:
    """`value` as an int when it is a whole number from `low` to `high` (an int, or a float or numeric string
    with no fraction); anything else, NaN and booleans included, is a UserError naming the range."""
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        number = int(value) if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()) \
            else float(value)
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not low <= number <= high:
        raise UserError(f"{name} must be a whole number from {low} to {high} (got {value!r})")
    return number


def finite_number(value, name: str, low: float, high: float) -> float:
    """`value` as a float from `low` to `high`; NaN, infinities, text and booleans are a UserError."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if not low <= number <= high:  # False for NaN too
        raise UserError(f"{name} must be a number from {low:g} to {high:g} (got {value!r})")
    return number


class Cancelled(Exception):
    """Raised inside a generation when the step callback asks to stop."""


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: Optional[int] = None          # None: the model's default
    guidance: Optional[float] = None     # None: the model's default; <= 1 turns guidance off
    scheduler: Optional[str] = None      # None: the model's default
    width: Optional[int] = None          # None: the model's native size
    height: Optional[int] = None
    seed: Optional[int] = None           # None: a random seed, reported on the result
    latents: Optional[np.ndarray] = None  # standard-normal noise, NCHW (diffusers' `latents=`)
    batch_size: int = 1
    init_image: Any = None               # image-to-image: a PIL image or a path (sizing: backend/images.py)
    strength: Optional[float] = None     # with an init image, in (0, 1] (None: 0.8; with a mask 1.0)
    mask: Any = None                     # inpainting, with an init image: PIL image or path, white = repaint
    mask_blur: int = 0                   # Gaussian blur radius in pixels applied to the mask before binarizing
    max_sequence_length: Optional[int] = None  # SD3: T5 tokens after the 77 CLIP ones (None: 256, or as packaged)
    refiner_start: Optional[float] = None  # with a refiner: the fraction of the schedule the base runs (None: 0.8)
    loras: list = field(default_factory=list)  # [(safetensors file, scale)], applied in order (backend/lora.py)
    preview: str = "off"                 # live previews in StepInfo: "off", "fast" (latent colours) or "sharp"
                                         # (tiny VAE), of the predicted final image (backend/preview.py)
    preview_every: int = 1               # preview the first step, every N-th after it, and the last


@dataclass
class StepInfo:
    """What the per-step callback receives. Return False (or raise Cancelled) to stop."""
    step: int                 # 1-based
    total: int
    seconds: float            # this step's time
    latents: np.ndarray       # current latents, NCHW
    preview: Optional[np.ndarray] = None  # (h, w, 3) uint8: the predicted final image (request.preview), or None
    preview_seconds: float = 0.0          # what rendering the preview took (not counted in `seconds`)


StepCallback = Callable[[StepInfo], Optional[bool]]


@dataclass
class Timings:
    load: float = 0.0
    text_encoder: float = 0.0            # every text encoder, a refiner's included
    refiner_text_encoder: float = 0.0    # the refiner's share of text_encoder
    text_reused: bool = False            # every text encoder output came from earlier runs (backend/text_rows.py)
    steps: list = field(default_factory=list)  # every denoising step, the refiner's (the last ones) included
    image_encoder: float = 0.0           # the VAE encoder on an init image (and a masked image)
    vae_decode: float = 0.0
    total: float = 0.0

    @property
    def denoise(self) -> float:
        return float(sum(self.steps))

    @property
    def steps_per_second(self) -> float:
        return len(self.steps) / self.denoise if self.steps and self.denoise > 0 else 0.0


@dataclass
class Memory:
    peak_engine_bytes: int = 0     # MLX's own peak counter (0 for engines without one)
    peak_process_bytes: int = 0    # the process's peak resident set during the generation
    weight_bytes: int = 0          # bytes of the weights as loaded
    disk_bytes: int = 0            # bytes of the weight files on disk
    # per stage that ran ("image_encoder", "text_encoder", "denoise", "vae_decode"; a refiner's stages count with
    # the base's): {"peak_engine_bytes": ..., "peak_process_bytes": ...}, each counter reset when the stage begins
    per_stage: dict = field(default_factory=dict)


@dataclass
class GenerationResult:
    images: list                   # PIL.Image.Image, one per batch item
    seed: int
    timings: Timings
    memory: Memory
    engine: dict                   # name, device, compute units, precision, quantization, reason
    parameters: dict               # everything needed to reproduce the image
    warnings: list = field(default_factory=list)
    pixels: Optional[np.ndarray] = None   # (B, H, W, 3) float32 in [0, 1], before rounding to 8 bits
    seeds: list = field(default_factory=list)  # each image's own seed (seed + i: backend/seeds.py); [] = [seed]

    @property
    def image(self):
        return self.images[0]

    def image_parameters(self, index: int) -> dict:
        """Image `index`'s own parameters: its seed and a batch of one reproduce it alone (backend/seeds.py)."""
        seeds = self.seeds or [self.seed]
        if len(self.images) == 1 and index == 0:
            return dict(self.parameters)
        return {**self.parameters, "seed": seeds[index], "batch_size": 1,
                "batch": {"index": index, "size": len(self.images), "first_seed": self.seed}}

    def measurements(self) -> dict[str, Any]:
        """A JSON-ready summary (what `--json` prints and the app's API returns)."""
        t = self.timings
        return {
            "seed": self.seed,
            "seconds": {
                "load": t.load, "text_encoder": t.text_encoder, "refiner_text_encoder": t.refiner_text_encoder,
                "text_reused": t.text_reused, "denoise": t.denoise,
                "steps": list(t.steps), "image_encoder": t.image_encoder, "vae_decode": t.vae_decode,
                "total": t.total,
            },
            "steps_per_second": t.steps_per_second,
            "memory": asdict(self.memory),
            "engine": dict(self.engine),
            "parameters": dict(self.parameters),
            "warnings": list(self.warnings),
        }
