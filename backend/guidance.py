"""Conditioning helpers shared by every engine: classifier-free guidance, SDXL micro-conditioning,
the LCM guidance embedding, and the cheap latent-to-RGB preview."""
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


# Linear maps from SD latents to RGB, fitted by the community on real images (ComfyUI's previews use the
# same idea); good enough for a live preview, at no cost.
_SD_LATENT_RGB = np.array([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                           [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]], dtype=np.float32)
_SDXL_LATENT_RGB = np.array([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                             [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]], dtype=np.float32)
_SDXL_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)


def latent_preview(latents: np.ndarray, family: str, projection=None) -> np.ndarray:
    """(4, h, w) latents -> (h, w, 3) uint8 through a fixed linear projection (no VAE)."""
    if projection is not None:
        matrix, bias = projection
    elif family == "sdxl":
        matrix, bias = _SDXL_LATENT_RGB, _SDXL_BIAS
    else:
        matrix, bias = _SD_LATENT_RGB, np.zeros(3, np.float32)
    rgb = np.einsum("chw,cr->hwr", latents[: matrix.shape[0]].astype(np.float32), matrix) + bias
    return (np.clip((rgb + 1.0) / 2.0, 0, 1) * 255).round().astype(np.uint8)
