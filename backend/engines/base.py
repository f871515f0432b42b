"""The stage interface both engines implement; everything around the stages is engine-independent.

Arrays crossing this interface are numpy float32, in diffusers' layouts (latents NCHW), so the
pipeline, the schedulers and the guidance exist once. An engine converts to its own layout inside.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np


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

    def weight_bytes(self) -> int:
        return 0

    def peak_memory(self) -> int:
        """The engine's own peak-memory counter since the last reset (0 if it has none)."""
        return 0

    def reset_peak_memory(self) -> None:
        pass

    def begin_stage(self, name: str) -> None:
        """Called before a stage runs ('text_encoder', 'unet', 'vae_decoder')."""

    def end_stage(self, name: str) -> None:
        """Called after a stage ran; engines that load per stage release it here."""
