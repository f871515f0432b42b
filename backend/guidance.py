"""Conditioning helpers shared by every engine: classifier-free guidance, SDXL micro-conditioning (the base's
and the refiner's time ids) and the LCM guidance embedding."""
from __future__ import annotations

from typing import Optional

import numpy as np


def uses_cfg(guidance: float, is_lcm: bool) -> bool:
    """diffusers' rule: guidance on when scale > 1; LCM models embed the scale instead."""
    return guidance > 1.0 and not is_lcm


def combine(noise_uncond: np.ndarray, noise_text: np.ndarray, guidance: float) -> np.ndarray:
    return noise_uncond + guidance * (noise_text - noise_uncond)


AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' SDXL img2img defaults (the refiner)

# a family's `time_ids` kind -> one row for an uncropped (height, width) image; `negative`: the unconditional row
_TIME_IDS = {
    "size": lambda h, w, negative: [h, w, 0, 0, h, w],  # original size, crop top-left, target size
    "size+aesthetic": lambda h, w, negative: [h, w, 0, 0, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE],
}


def time_ids(kind: Optional[str], height: int, width: int, batch: int, do_cfg: bool) -> Optional[np.ndarray]:
    """SDXL's add_time_ids for the denoiser's batch (under guidance the unconditional half first), or None for a
    family without them."""
    if kind is None:
        return None
    rows = [_TIME_IDS[kind](height, width, True)] * batch if do_cfg else []
    rows += [_TIME_IDS[kind](height, width, False)] * batch
    return np.array(rows, dtype=np.float32)


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
