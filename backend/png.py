"""Image files that carry their generation parameters, so any image can be reproduced.

PNG (the app's format): two text chunks, `parameters` in the convention other tools already read (prompt,
then "Negative prompt: ...", then "Steps: N, Sampler: ..., CFG scale: ..., Seed: ..., Size: WxH, Model: ...")
and `silicon_diffusion`, the exact JSON of the request, which restoring prefers. JPEG (quality 95) and
WebP (lossless), for the CLI's `--out x.jpg` / `x.webp`: the same JSON in the EXIF ImageDescription.
Any other extension, a folder or an unwritable place is refused with one sentence.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

from PIL import Image, PngImagePlugin

from backend.types import UserError

PARAMETERS_BYTES = 64 << 10  # a parameters chunk longer than this is ignored
log = logging.getLogger("silicon_diffusion.png")
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_DESCRIPTION = 0x010E  # EXIF ImageDescription

_KEYS = {"Steps": "steps", "Sampler": "scheduler", "CFG scale": "guidance", "Seed": "seed", "Model": "model",
         "Engine": "engine", "Precision": "precision", "Quantization": "quantization"}


def parameters_text(p: dict) -> str:
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [f"Steps: {p.get('steps')}", f"Sampler: {p.get('scheduler')}", f"CFG scale: {p.get('guidance')}",
              f"Seed: {p.get('seed')}", f"Size: {p.get('width')}x{p.get('height')}", f"Model: {p.get('model')}"]
    for label in ("Engine", "Precision", "Quantization"):
        if p.get(_KEYS[label]):
            fields.append(f"{label}: {p[_KEYS[label]]}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_info(p: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(p))
    info.add_text("silicon_diffusion", json.dumps(p, default=str))
    return info


def save_png(image: Image.Image, path, parameters: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=png_info(parameters))
    return path


def check_output(path) -> Path:
    """Refuse, before any work, an output path that cannot be written: an unknown extension, a folder, or a
    place this user cannot write to."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a file name such as {path / 'image.png'}")
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"cannot write {path.name}: the output must end in .png, .jpg, .jpeg or .webp")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: {parent} is not a folder this user can write to")
    return path


def save_image(image: Image.Image, path, parameters: dict) -> Path:
    """Write `image` in the format its extension names (PNG, JPEG, WebP), with its parameters."""
    path = check_output(path)
    fmt = FORMATS[path.suffix.lower()]
    try:
        if fmt == "PNG":
            return save_png(image, path, parameters)
        path.parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        exif[_DESCRIPTION] = json.dumps(parameters, default=str)
        options = {"quality": 95} if fmt == "JPEG" else {"lossless": True}
        image.convert("RGB").save(path, format=fmt, exif=exif.tobytes(), **options)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def parse_parameters_text(text: str) -> dict:
    """Read the common `parameters` convention back into a dict of settings."""
    lines = text.strip().split("\n")
    out: dict = {}
    last = lines[-1] if lines else ""
    if re.search(r"(^|, )Steps: ", last):
        body = lines[:-1]
        for m in re.finditer(r"([A-Za-z ]+): ([^,]*)(?:,|$)", last):
            key, value = m.group(1).strip(), m.group(2).strip()
            if key == "Size" and "x" in value:
                w, h = value.split("x", 1)
                out["width"], out["height"] = int(w), int(h)
            elif key in _KEYS:
                out[_KEYS[key]] = value
    else:
        body = lines
    negative = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    if negative:
        out["prompt"] = "\n".join(body[:negative[0]])
        out["negative_prompt"] = "\n".join(body[negative[0]:])[len("Negative prompt: "):]
    else:
        out["prompt"] = "\n".join(body)
    for key, cast in (("steps", int), ("seed", int), ("guidance", float)):
        if key in out:
            try:
                out[key] = cast(out[key])
            except ValueError:
                out.pop(key)
    return out


def read_parameters(source) -> Optional[dict]:
    """Generation parameters from a PNG path or PIL image, or None when it carries none. A parameters chunk
    over PARAMETERS_BYTES is ignored (logged), as is a file that is not an image."""
    from backend.images import MAX_FILE_BYTES, MAX_PIXELS
    try:
        if not isinstance(source, Image.Image) and os.path.getsize(source) > MAX_FILE_BYTES:
            log.warning("%s is over %d MB: its parameters are not read", source, MAX_FILE_BYTES >> 20)
            return None
        image = source if isinstance(source, Image.Image) else Image.open(source)
        if image.width * image.height > MAX_PIXELS:  # from the header: `text` below may decode the whole image
            log.warning("%s has over %d million pixels: its parameters are not read", source, MAX_PIXELS // 10**6)
            return None
        text = dict(getattr(image, "text", None) or image.info)
    except (OSError, ValueError, Image.DecompressionBombError):
        log.warning("%s is not an image whose parameters can be read", source)
        return None
    for key in [k for k, v in text.items() if isinstance(v, str) and len(v) > PARAMETERS_BYTES]:
        log.warning("ignored the %s chunk of %s: %d characters, over %d", key, source, len(text[key]),
                    PARAMETERS_BYTES)
        del text[key]
    if "silicon_diffusion" in text:
        try:
            return json.loads(text["silicon_diffusion"])
        except json.JSONDecodeError:
            pass
    if "parameters" in text:
        return parse_parameters_text(text["parameters"])
    try:
        return json.loads(image.getexif().get(_DESCRIPTION) or "null") or None
    except (json.JSONDecodeError, TypeError):
        return None
