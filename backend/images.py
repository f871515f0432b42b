"""Init images and masks for image-to-image and inpainting, as diffusers' pipelines prepare them.

Rules (each diffusers' own, so the results match its pipelines):
- **Size.** The image is generated at the request's width and height. A side the request leaves out is the
  init image's, rounded down to the model's size step (diffusers' `get_default_height_width`). The init
  image is then resized to exactly width x height, aspect ratio not kept and nothing cropped, with Lanczos
  (`VaeImageProcessor.preprocess`, `resize_mode="default"`).
- **Pixels.** RGB, `x / 255 * 2 - 1`, NCHW float32 (an alpha channel is dropped).
- **Mask.** White repaints, black keeps. It must have the init image's size; it is made grayscale, blurred
  by `mask_blur` pixels when asked (PIL's GaussianBlur, as `VaeImageProcessor.blur`), resized like the
  image, and binarized at half intensity (>= 0.5 repaints). The masked image is the image with the
  repainted pixels set to 0 (`image * (mask < 0.5)`). At latent size the mask is nearest-neighbour
  downsampled (torch's `interpolate`, mode 'nearest').
- **Strength.** In (0, 1]; default 0.8 (StableDiffusionImg2ImgPipeline), with a mask 1.0
  (StableDiffusionInpaintPipeline). Which steps it skips: `Scheduler.strength_start`.

`InitLatents` is the image at latent level during one generation: the starting latents, the extra input
of a 9-channel inpainting UNet, and the known region blended back after each step for a 4-channel one.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from backend.types import GenerationRequest, UserError

IMG2IMG_STRENGTH = 0.8   # StableDiffusionImg2ImgPipeline's default
MAX_PIXELS = 64 * 10**6    # an init image or mask larger than this is refused before it is decoded
MAX_FILE_BYTES = 64 << 20
INPAINT_STRENGTH = 1.0   # StableDiffusionInpaintPipeline's default


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise UserError(f"the {what} is {width}x{height}: more than {MAX_PIXELS // 10**6} million pixels is not read")


def load_image(source: Any, what: str) -> tuple[Image.Image, str]:
    """(the image, sha256 of its file's bytes, or of its PNG encoding when given as a PIL image). A file is read
    only under MAX_FILE_BYTES and decoded only when its header says at most MAX_PIXELS (no decompression bomb)."""
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, what)
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return source, hashlib.sha256(buffer.getvalue()).hexdigest()
    if not isinstance(source, (str, Path)):
        raise UserError(f"the {what} must be an image file or a PIL image (got {type(source).__name__})")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"the {what} {path.name} does not exist")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"the {what} {path.name} is {path.stat().st_size / 2**20:.0f} MB: more than "
                        f"{MAX_FILE_BYTES // 2**20} MB is not read")
    data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(*image.size, what)  # from the header, before decoding
        image.load()
    except Image.DecompressionBombError:
        raise UserError(f"the {what} {path.name} declares more than {MAX_PIXELS // 10**6} million pixels: "
                        "not read") from None
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError):
        raise UserError(f"the {what} {path.name} is not an image this program can read (PNG, JPEG, WebP ...)") \
            from None
    return image, hashlib.sha256(data).hexdigest()


@dataclass
class ImageInputs:
    """An init image (and mask) of one request, loaded and checked; sized and converted on demand."""
    image: Image.Image
    image_sha256: str
    strength: float
    mask: Optional[Image.Image] = None
    mask_sha256: Optional[str] = None
    mask_blur: int = 0

    @classmethod
    def from_request(cls, r: GenerationRequest) -> Optional["ImageInputs"]:
        """None for text to image; a request's mask, strength or blur without an init image is refused."""
        if r.init_image is None:
            for value, name in ((r.mask, "a mask"), (r.strength, "strength")):
                if value is not None:
                    raise UserError(f"{name} needs an init image (image-to-image)")
            if r.mask_blur:
                raise UserError("mask blur needs a mask")
            return None
        image, image_sha = load_image(r.init_image, "init image")
        mask, mask_sha = load_image(r.mask, "mask") if r.mask is not None else (None, None)
        if mask is not None and mask.size != image.size:
            raise UserError(f"the mask is {mask.size[0]}x{mask.size[1]} and the init image {image.size[0]}x"
                            f"{image.size[1]}: they must be the same size")
        strength = r.strength
        if strength is None:
            strength = INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise UserError(f"strength must be a number above 0 and at most 1 (got {strength!r})") from None
        if not 0.0 < strength <= 1.0:
            raise UserError(f"strength must be above 0 and at most 1 (got {strength})")
        blur = r.mask_blur or 0
        if int(blur) != blur or blur < 0:
            raise UserError(f"mask blur must be a whole number of pixels, 0 or more (got {blur})")
        if blur and mask is None:
            raise UserError("mask blur needs a mask")
        return cls(image=image, image_sha256=image_sha, strength=strength, mask=mask, mask_sha256=mask_sha,
                   mask_blur=int(blur))

    def size(self, width: Optional[int], height: Optional[int], step: int) -> tuple[int, int]:
        """The request's width and height; a side it leaves out is the init image's, rounded down to `step`."""
        w, h = self.image.size
        return (max(w // step * step, step) if width is None else width,
                max(h // step * step, step) if height is None else height)

    def parameters(self) -> dict:
        """What the result records (and the PNG carries): the images as the sha256 of their bytes."""
        p = {"strength": self.strength, "init_image": self.image_sha256}
        if self.mask is not None:
            p.update(mask=self.mask_sha256, mask_blur=self.mask_blur)
        return p

    def pixels(self, width: int, height: int) -> np.ndarray:
        """The init image as (1, 3, height, width) float32 in [-1, 1]."""
        rgb = np.asarray(_resized(self.image.convert("RGB"), width, height), dtype=np.float32) / np.float32(255)
        return (np.float32(2) * rgb - np.float32(1)).transpose(2, 0, 1)[None].copy()

    def mask_pixels(self, width: int, height: int) -> np.ndarray:
        """The mask as (1, 1, height, width) float32: 1 repaints, 0 keeps."""
        gray = self.mask.convert("L")
        if self.mask_blur:
            gray = gray.filter(ImageFilter.GaussianBlur(self.mask_blur))
        values = np.asarray(_resized(gray, width, height), dtype=np.float32) / np.float32(255)
        return (values >= 0.5).astype(np.float32)[None, None]


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def masked_image(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the pixels to repaint set to 0 (mid-gray), what an inpainting UNet is shown."""
    return (pixels * (mask < 0.5)).astype(np.float32)


def latent_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (B, 1, H, W) mask at latent size, as torch's interpolate(mode='nearest'): source index floor(i * in/out)."""
    rows = _nearest(mask.shape[-2], height)
    cols = _nearest(mask.shape[-1], width)
    return np.ascontiguousarray(mask[..., rows[:, None], cols[None, :]])


def _nearest(size_in: int, size_out: int) -> np.ndarray:
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


@dataclass
class InitLatents:
    """The init image at latent level for one generation (scaled as the denoiser sees latents).

    latents: the image's latents (None where not needed: a 9-channel inpainting run at strength 1);
    noise: standard-normal, NCHW; mask: (B, 1, h, w), 1 repaints (inpainting); masked: the masked image's
    latents (9-channel inpainting only); pure_noise: inpainting at strength 1 starts from noise alone, as
    StableDiffusionInpaintPipeline does."""
    latents: Optional[np.ndarray]
    noise: np.ndarray
    mask: Optional[np.ndarray] = None
    masked: Optional[np.ndarray] = None
    pure_noise: bool = False

    def start(self, scheduler, first_timestep) -> np.ndarray:
        """The starting latents: the image noised at the first kept timestep (scheduler.add_noise)."""
        if self.pure_noise:
            return (self.noise * np.float32(scheduler.init_noise_sigma)).astype(np.float32)
        return scheduler.add_noise(self.latents, self.noise, first_timestep)

    def denoiser_input(self, model_in: np.ndarray) -> np.ndarray:
        """A 9-channel UNet's input: the scaled latents, then the mask, then the masked image's latents (each
        repeated for the guidance halves)."""
        if self.masked is None:
            return model_in
        repeat = model_in.shape[0] // self.mask.shape[0]
        return np.concatenate([model_in, np.concatenate([self.mask] * repeat),
                               np.concatenate([self.masked] * repeat)], axis=1).astype(np.float32)

    def after_step(self, latents: np.ndarray, scheduler, next_timestep) -> np.ndarray:
        """4-channel inpainting: the known region put back, noised to the next timestep (none after the last)."""
        if self.mask is None or self.masked is not None:
            return latents
        known = self.latents if next_timestep is None else scheduler.add_noise(self.latents, self.noise, next_timestep)
        return ((1 - self.mask) * known + self.mask * latents).astype(np.float32)
