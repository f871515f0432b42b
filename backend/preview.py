"""Live previews: the picture a step's predicted final latents (x0, `Scheduler.predicted_original`) would decode
to, shown while the run goes on.

Modes (`GenerationRequest.preview`):
- "off": nothing is computed;
- "fast": a linear projection of the latents to RGB (microseconds): the family's matrix (backend/families.py,
  ComfyUI's published factors), or the model's own when its silicon_diffusion.json declares `preview_rgb`
  ({"factors": C x 3, "bias": 3}; the embedded model's, fitted by `fit_projection` to its own VAE);
- "sharp": a tiny VAE decoder (diffusers' AutoencoderTiny: TAESD, TAESDXL, TAESD3) in MLX
  (backend/engines/mlx/taesd.py), from the family's `tiny_vae` Hub repository, or the model's `preview_decoder`
  (a Hub id, a folder, or "vae": its own VAE, for a model whose VAE is tiny, such as the embedded one). When the
  tiny VAE cannot be had (not downloaded while offline), the preview falls back to the projection and the
  result says so once.

`GenerationRequest.preview_every` = N previews the first step, every N-th after it, and the last.
Like ComfyUI's and diffusers' callbacks, a preview shows the first image of the batch.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from backend.types import Cancelled, UserError, whole_number

log = logging.getLogger("silicon_diffusion.preview")

MODES = ("off", "fast", "sharp")
OWN_VAE = "vae"  # a model's `preview_decoder` naming its own VAE
_TINY_VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
_decoders: dict = {}  # tiny VAE source -> loaded TinyVAE (loaded once per process)
_lock = threading.Lock()


def project(latents: np.ndarray, factors, bias=None) -> np.ndarray:
    """(C, h, w) latents -> (h, w, 3) uint8 through a linear map to RGB in [-1, 1] (ComfyUI's
    Latent2RGBPreviewer: latents @ factors + bias, then (rgb + 1) / 2)."""
    matrix = np.asarray(factors, dtype=np.float32)
    rgb = np.einsum("chw,cr->hwr", np.asarray(latents[: matrix.shape[0]], np.float32), matrix)
    if bias is not None:
        rgb += np.asarray(bias, dtype=np.float32)
    return to_uint8(rgb)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """An image in [-1, 1] -> uint8."""
    return (np.clip((rgb + 1.0) * 127.5, 0, 255) + 0.5).astype(np.uint8)


def fit_projection(latents: np.ndarray, images: np.ndarray, factor: int) -> dict:
    """The least-squares linear projection {"factors": C x 3, "bias": 3} from latents (N, C, h, w) to images
    (N, h * factor, w * factor, 3) in [-1, 1] averaged over each latent cell: how a model with its own VAE gets
    its `preview_rgb` (tools/fit_preview_projection.py writes the embedded model's)."""
    n, c, h, w = latents.shape
    cells = np.asarray(images, np.float64).reshape(n, h, factor, w, factor, 3).mean(axis=(2, 4)).reshape(-1, 3)
    x = np.asarray(latents, np.float64).transpose(0, 2, 3, 1).reshape(-1, c)
    solution = np.linalg.lstsq(np.concatenate([x, np.ones((len(x), 1))], axis=1), cells, rcond=None)[0]
    return {"factors": np.round(solution[:c], 4).tolist(), "bias": np.round(solution[c], 4).tolist()}


def _projection(spec) -> tuple:
    own = spec.defaults.get("preview_rgb")
    if isinstance(own, dict) and own.get("factors"):
        return own["factors"], own.get("bias")
    factors, bias = spec.traits.preview
    return factors, bias


def tiny_vae(source: str, progress: Optional[Callable[[str], None]] = None):
    """The loaded tiny VAE decoder of a Hub repository or a local folder (once per process)."""
    with _lock:
        if source not in _decoders:
            from backend import registry
            from backend.engines.mlx.taesd import TinyVAE
            folder = Path(source).expanduser()
            if not folder.is_dir():
                folder = registry.download_files(source, _TINY_VAE_FILES, progress)
            _decoders[source] = TinyVAE.from_folder(folder)
        return _decoders[source]


class Previewer:
    """Renders the previews of one generation: `render(step, total, x0)` -> (uint8 image or None, seconds). A
    sharp decoder that fails mid-run gives way to `fallback` (the projection), with a warning in `warnings`."""

    def __init__(self, decode: Callable[[np.ndarray], np.ndarray], every: int, kind: str,
                 fallback: Optional["Previewer"] = None, warnings: Optional[list] = None):
        self.decode, self.every, self.kind = decode, every, kind
        self.fallback, self.warnings = fallback, warnings

    def due(self, step: int, total: int) -> bool:
        return (step - 1) % self.every == 0 or step == total

    def render(self, step: int, total: int, x0: Callable[[], Optional[np.ndarray]]) -> tuple:
        if not self.due(step, total):
            return None, 0.0
        t0 = time.perf_counter()
        latents = x0()
        if latents is None:
            return None, 0.0
        latents = np.asarray(latents[:1], np.float32)
        try:
            image = self.decode(latents)
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - a preview never fails the generation
            if self.fallback is None:
                raise
            log.warning("sharp preview failed", exc_info=True)
            self.warnings.append(f"sharp preview failed ({type(exc).__name__}): the preview shows latent colours "
                                 "instead")
            self.decode, self.kind, self.fallback = self.fallback.decode, "fast", None
            image = self.decode(latents)
        return image, time.perf_counter() - t0


def make_previewer(spec, stages, mode: str, every: int, warnings: list,
                   progress: Optional[Callable[[str], None]] = None) -> Optional[Previewer]:
    """The previewer a request asks for (None when off). `stages` decodes when the model's own VAE is its
    preview decoder; a tiny VAE that cannot be loaded falls back to the projection with a warning."""
    if mode not in MODES:
        raise UserError(f"unknown preview mode {mode!r}: choose one of {', '.join(MODES)}")
    every = whole_number(every, "preview interval", 1, 1000)
    if mode == "off":
        return None
    factors, bias = _projection(spec)
    fast = Previewer(lambda z: project(z[0], factors, bias), every, "fast")
    if mode == "fast":
        return fast
    source = spec.defaults.get("preview_decoder") or spec.traits.tiny_vae
    if source == OWN_VAE:  # called inside the denoising stage, without begin/end_stage: nothing is unloaded
        return Previewer(lambda z: to_uint8(stages.decode(_unscaled(z, spec.vae_config))[0]), every, "sharp",
                         fast, warnings)
    try:
        if not source:
            raise UserError("this model family has no tiny VAE")
        decoder = tiny_vae(source, progress)
    except Exception as exc:  # noqa: BLE001 - a preview never fails the generation
        if not isinstance(exc, UserError):
            log.warning("tiny VAE %s failed to load", source, exc_info=True)
        warnings.append(f"sharp preview unavailable ({exc}): the preview shows latent colours instead")
        return fast
    return Previewer(lambda z: to_uint8(decoder.decode(z)[0]), every, "sharp", fast, warnings)


def _unscaled(latents: np.ndarray, vae: dict) -> np.ndarray:
    """What a model's own VAE decodes: the latents un-scaled (and shifted) as Pipeline._decode does."""
    z = latents / np.float32(vae.get("scaling_factor", 0.18215))
    return z + np.float32(vae["shift_factor"]) if vae.get("shift_factor") is not None else z
