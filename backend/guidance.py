"""Conditioning helpers shared by every engine: classifier-free guidance, SDXL micro-conditioning and
the LCM guidance embedding."""
from __future__ import annotations

import numpy as np


def uses_cfg(guidance: float, is_lcm: bool) -> bool:
    """diffusers' rule: guidance on when scale > 1; LCM models embed the scale instead."""
    return guidance > 1.0 and not is_lcm


def combine(noise_uncond: np.ndarray, noise_text: np.ndarray, guidance: float) -> np.ndarray:
    return noise_uncond + guidance * (noise_text - noise_uncond)


def sdxl_time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """(original size, crop top-left, target size) as SDXL's add_time_ids, for an uncropped image."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], dtype=np.float32), (batch, 1))


def lcm_guidance_embedding(guidance: float, dim: int, batch: int) -> np.ndarray:
    """Sinusoidal embedding of w = guidance - 1 (scaled by 1000), as LCM pipelines compute it."""
    w = np.full((batch,), (guidance - 1.0) * 1000.0, dtype=np.float32)
    half = dim // 2
    rate = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)  # float32 throughout, as diffusers
    freqs = np.exp(np.arange(half, dtype=np.float32) * -rate)
    emb = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)
