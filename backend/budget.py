"""Memory budgets checked before a request allocates anything: the activations a generation will need for its
batch and size, estimated from the model's own widths, against the memory this machine has free.

The per-model size cap (checkpoint.size_limit, lifted by --allow-large) keeps a request near what a model
was trained for; this check keeps a request the machine cannot hold (a batch of 8 at 2048², say) from
swapping the whole machine to a halt. It is never lifted.

Calibration (bench-results/, random weights, fp32, CFG batch 2, MLX on the CPU): the SD 1.5 UNet step peaks
at 0.72 GB above its weights at 512² (68 bytes per latent pixel x batch x base channel x byte of the dtype)
and the SD3 Medium transformer at 0.56 GB above its weights at 1024² (11 per token x hidden width x byte).
The factors below take 1.5x those measurements, and the decoder's a whole-graph decode (a GPU's; the CPU
decodes in row bands and needs less).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from backend.types import UserError

UNET_FACTOR = 100          # bytes of activations per latent pixel, batch item, base channel and dtype byte
TRANSFORMER_FACTOR = 16    # the same per token and hidden channel (blocks evaluated one after another)
DECODER_FACTOR = 8         # the VAE decoder's live activations per pixel and last-level channel
HEADROOM = 0.9             # of the free memory a request may plan to use


def activation_bytes(spec, width: int, height: int, batch: int, cfg: bool, dtype_bytes: int) -> int:
    """The activations a generation at this size and batch will hold at its peak (denoiser or decoder)."""
    rows = batch * (2 if cfg else 1)
    latent_pixels = (width // spec.vae_scale_factor) * (height // spec.vae_scale_factor)
    config = spec.denoiser_config
    if spec.is_transformer:
        hidden = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 64))
        tokens = latent_pixels // int(config.get("patch_size", 2)) ** 2
        denoiser = TRANSFORMER_FACTOR * rows * tokens * hidden * dtype_bytes
    else:
        base = int((config.get("block_out_channels") or [320])[0])
        denoiser = UNET_FACTOR * rows * latent_pixels * base * dtype_bytes
    last = int((spec.vae_config.get("block_out_channels") or [128])[0])
    decoder = DECODER_FACTOR * batch * width * height * last * 4  # decoded in fp32 when upcast
    return max(denoiser, decoder)


def free_bytes() -> Optional[int]:
    """Memory available to this process now (Linux: MemAvailable; macOS: 3/4 of the unified memory, which the
    GPU shares); None when unknown (the check is skipped then)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4)
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(spec, width: int, height: int, batch: int, cfg: bool, dtype_bytes: int,
                 free: Optional[int] = None) -> None:
    """Refuse, naming the figures, a request whose activations would not fit in the memory that is free."""
    free = free_bytes() if free is None else free
    if free is None:
        return
    need = activation_bytes(spec, width, height, batch, cfg, dtype_bytes)
    if need > HEADROOM * free:
        images = f"{batch} images of {width}x{height} need" if batch > 1 else f"an image of {width}x{height} needs"
        raise UserError(f"{images} about {need / 2**30:.1f} GiB of working memory and this "
                        f"machine has {free / 2**30:.1f} GiB free: use a smaller size or batch")
