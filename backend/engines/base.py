"""The stage interface both engines implement; everything around the stages is engine-independent.

Arrays crossing this interface are numpy float32, in diffusers' layouts (latents NCHW), so the
pipeline, the schedulers and the guidance exist once. An engine converts to its own layout inside.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from backend.types import UserError

if TYPE_CHECKING:
    from backend.checkpoint import ModelSpec


@dataclass
class EncoderOutput:
    """One text encoder's output for a batch of token-id rows."""
    hidden: np.ndarray              # (B, 77, C): the layer this family conditions on
    pooled: Optional[np.ndarray]    # (B, P): projected pooled output (SDXL's text_embeds), or None


class Stages(ABC):
    """Text encoder(s), UNet and VAE decoder of one loaded model on one engine."""

    #: name, device, precision, quantization, compute units, attention ... (shown with results)
    info: dict

    @abstractmethod
    def encode_text(self, index: int, input_ids: np.ndarray) -> EncoderOutput:
        """Run text encoder `index` (0, or 1 for SDXL's second) on int32 ids of shape (B, 77)."""

    @abstractmethod
    def predict_noise(self, latents: np.ndarray, timestep: float, hidden: np.ndarray,
                      text_embeds: Optional[np.ndarray] = None, time_ids: Optional[np.ndarray] = None,
                      timestep_cond: Optional[np.ndarray] = None) -> np.ndarray:
        """UNet: latents (B, 4, h, w) NCHW, hidden (B, 77, C) -> model output (B, 4, h, w)."""

    @abstractmethod
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE decoder on already-unscaled latents (B, 4, h, w) -> images (B, H, W, 3) in [-1, 1]."""

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """VAE encoder (image-to-image, inpainting): pixels (B, 3, H, W) in [-1, 1] -> the posterior's mean
        (B, C, h, w), unscaled. Called between begin_stage('vae_encoder') and end_stage('vae_encoder')."""
        engine = getattr(self, "info", {}).get("engine", "unknown")
        raise UserError(f"this engine ({engine}) has no VAE encoder, which image-to-image and inpainting need")

    def weight_bytes(self) -> int:
        return 0

    def peak_memory(self) -> int:
        """The engine's own peak-memory counter since the last reset (0 if it has none)."""
        return 0

    def reset_peak_memory(self) -> None:
        pass

    def begin_stage(self, name: str) -> None:
        """Called before a stage runs ('text_encoder', 'unet', 'vae_decoder', 'vae_encoder')."""

    def end_stage(self, name: str) -> None:
        """Called after a stage ran; engines that load per stage release it here."""

    def set_loras(self, loras: list) -> list:
        """Apply [(safetensors file, scale)] LoRAs from now on ([] removes them); returns warnings to show
        (backend/lora.py). An engine that cannot change its weights at generation time refuses a non-empty list."""
        if loras:
            raise UserError(f"this engine ({self.info.get('engine', 'unknown')}) cannot apply LoRA at generation "
                            "time; run the model on MLX (--backend mlx)")
        return []


@dataclass
class EngineChoice:
    """The engine chosen for a model (select.choose_engine), with what it needs to load the model's stages."""
    name: str                  # the model's name as the user gave it
    kind: str                  # "coreml" or "mlx"
    reason: str                # one line: why this engine
    spec: ModelSpec
    tokenizers: list
    disk_bytes: int
    load: Callable             # (**options) -> Stages
