"""The embedded model's training data: a caption grammar and a deterministic renderer of its scenes.

A scene is one shape on a plain background. Its full caption reads
`a {size} {color} {shape} {position} on a {color} background`; a caption may leave any part out, and
the scene then has a random value there (with "shape" standing in for a left-out shape word). The
object's color never equals the background's. Everything is a pure function of (seed, index), so
the same data comes back on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SIZES = ("small", "large")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (245, 215, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("at the top", "at the bottom", "on the left", "on the right", "in the center")

# Geometry as fractions of the image side.
DIAMETER = {"small": 0.22, "large": 0.36}
OFFSET = 0.28          # distance of an off-center object's center from the image center
JITTER = 0.03          # random shift of the object's center
SIZE_JITTER = 0.08     # relative random change of its diameter
SUPERSAMPLE = 4        # drawn this much larger, then downsampled: anti-aliased edges

_DIRECTIONS = {"at the top": (0, -1), "at the bottom": (0, 1), "on the left": (-1, 0), "on the right": (1, 0),
               "in the center": (0, 0)}


@dataclass(frozen=True)
class Scene:
    """What an image shows; fields left None in a partial scene are "not said"."""
    size: Optional[str] = None
    color: Optional[str] = None
    shape: Optional[str] = None
    position: Optional[str] = None
    background: Optional[str] = None

    def caption(self) -> str:
        """The caption saying exactly the fields that are set."""
        words = ["a"]
        if self.size:
            words.append(self.size)
        if self.color:
            words.append(self.color)
        words.append(self.shape or "shape")
        if self.position:
            words.append(self.position)
        if self.background:
            words.append(f"on a {self.background} background")
        return " ".join(words)

    def said(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def vocabulary() -> list[str]:
    """Every word a caption can contain (each becomes one token of the embedded tokenizer)."""
    words = {"a", "shape", "on", "background"} | set(SIZES) | set(COLORS) | set(SHAPES)
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def parse_caption(caption: str) -> Scene:
    """The partial scene a grammar caption says (unknown words are ignored)."""
    text = " " + " ".join(caption.lower().split()) + " "
    said: dict = {}
    for position in POSITIONS:
        if f" {position} " in text:
            said["position"] = position
            text = text.replace(f" {position} ", " ")
    words = text.split()
    if "background" in words:
        i = words.index("background")
        if i >= 1 and words[i - 1] in COLORS:
            said["background"] = words[i - 1]
            del words[i - 1:i + 1]
    for word in words:
        if word in SIZES:
            said.setdefault("size", word)
        elif word in COLORS:
            said.setdefault("color", word)
        elif word in SHAPES:
            said.setdefault("shape", word)
    return Scene(**said)


def complete(partial: Scene, rng: np.random.Generator) -> Scene:
    """Fill the fields `partial` leaves open at random, keeping the object's color off the background's."""
    colors = list(COLORS)
    size = partial.size or SIZES[rng.integers(len(SIZES))]
    shape = partial.shape or SHAPES[rng.integers(len(SHAPES))]
    position = partial.position or POSITIONS[rng.integers(len(POSITIONS))]
    background = partial.background
    color = partial.color or rng.choice([c for c in colors if c != background])
    if background is None:
        background = rng.choice([c for c in colors if c != color])
    if color == background:
        raise ValueError(f"the object and the background are both {color}")
    return Scene(size=size, color=str(color), shape=shape, position=position, background=str(background))


def render(scene: Scene, rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """Draw a complete scene as uint8 RGB (resolution, resolution, 3), with a little random jitter."""
    big = resolution * SUPERSAMPLE
    dx, dy = _DIRECTIONS[scene.position]
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    cx = (0.5 + dx * OFFSET + jitter[0]) * big
    cy = (0.5 + dy * OFFSET + jitter[1]) * big
    r = DIAMETER[scene.size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * big / 2
    image = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:  # an upright isosceles triangle filling the same r x r box
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def random_scene(rng: np.random.Generator, keep: float = 0.8) -> tuple[Scene, Scene]:
    """(full scene, partial scene its caption says): each part is said with probability `keep`."""
    full = complete(Scene(), rng)
    said = {k: v for k, v in full.said().items() if rng.random() < keep}
    return full, Scene(**said)


def sample(index: int, seed: int = 0, resolution: int = 64, keep: float = 0.8) -> tuple[str, np.ndarray, Scene]:
    """Training example `index` of the data set `seed`: (caption, uint8 image, full scene)."""
    rng = np.random.default_rng([seed, index])
    full, partial = random_scene(rng, keep)
    return partial.caption(), render(full, rng, resolution), full


def make_dataset(n: int, seed: int = 0, resolution: int = 64, keep: float = 0.8) -> tuple[np.ndarray, list[str]]:
    """n examples: images uint8 (n, resolution, resolution, 3) and their captions."""
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    captions = []
    for i in range(n):
        caption, images[i], _ = sample(i, seed, resolution, keep)
        captions.append(caption)
    return images, captions


def evaluation_captions(n: int, seed: int = 1234) -> list[str]:
    """n full captions (every part said) drawn from the grammar: what the quality evaluation asks for."""
    rng = np.random.default_rng(seed)
    return [complete(Scene(), rng).caption() for _ in range(n)]
