"""Reads a shape scene back from an image with plain image analysis (no model), to judge generations.

- background: the median color of the border ring, named by the nearest palette color;
- object: each pixel's opacity is its position on the line from the background color to the object
  color (the color of the pixels that differ most from the background), so anti-aliased or blurry
  edges count partly;
- position: the opacity-weighted centroid, "in the center" near the middle, else the dominant axis;
- shape: first triangle or not, by the nearest ideal shape in (fill ratio of the bounding box, share of
  the mass in its top half): circle (pi/4, 1/2), square (1, 1/2), upright triangle (1/2, 1/4); then
  circle or square, by the nearest in (fill ratio, coverage of the box's four corners): circle (pi/4, 0),
  square (1, 1). The corners tell a square from a circle where the fill alone cannot: a square drawn
  with slightly bowed sides fills less of its box, but its corners are there; a rounded one's are not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from backend.embedded.dataset import COLORS, OFFSET

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], np.float32)
# A corner is the triangle u + v < CORNER at each corner of the box (u, v in box widths): an inscribed
# circle does not reach it, a square fills it.
_OUTLINE_PROTOTYPES = {"circle": (np.pi / 4, 0.5), "square": (1.0, 0.5), "triangle": (0.5, 0.25)}
_CORNER_PROTOTYPES = {"circle": (np.pi / 4, 0.0), "square": (1.0, 1.0)}
CORNER = 0.3
MIN_CONTRAST = 40.0      # an object must differ from the background by this much (RGB distance)
CENTER_RADIUS = OFFSET / 2
LOW = 0.2                # opacity ramp: [LOW, 1 - LOW] -> [0, 1]


@dataclass
class Reading:
    """What the analysis sees in one image; object fields are None when no object stands out."""
    background: str
    color: Optional[str] = None
    position: Optional[str] = None
    shape: Optional[str] = None
    fill: float = 0.0            # object area / its bounding box area
    top_share: float = 0.0       # share of the object's mass above its bounding box's middle
    corners: float = 0.0         # mean opacity in the four corners of its bounding box
    centroid: tuple = (0.0, 0.0)  # (x, y) in [0, 1]
    coverage: float = 0.0        # object area / image area

    def matches(self, expected: dict) -> dict:
        """{field: bool} for each field of `expected` (e.g. Scene.said()) this reading can check."""
        return {k: getattr(self, k) == v for k, v in expected.items() if k != "size"}


def nearest_color(rgb) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(-1)))]


def _border(image: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3),
                           image[:, :width].reshape(-1, 3), image[:, -width:].reshape(-1, 3)])


def object_opacity(image: np.ndarray, background_rgb: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(opacity map in [0, 1], object color) or (zeros, None) when nothing stands out."""
    pixels = image.astype(np.float32)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    strongest = float(np.percentile(distance, 99.5))
    if strongest < MIN_CONTRAST:
        return np.zeros(distance.shape, np.float32), None
    core = distance >= 0.75 * strongest
    object_rgb = np.median(pixels[core], axis=0)
    axis = object_rgb - background_rgb
    opacity = ((pixels - background_rgb) @ axis) / float(axis @ axis)
    # Noise near either end is not coverage: below LOW counts as background, above 1 - LOW as object.
    return np.clip((opacity - LOW) / (1 - 2 * LOW), 0.0, 1.0), object_rgb


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "in the center"
    if abs(dy) >= abs(dx):
        return "at the top" if dy < 0 else "at the bottom"
    return "on the left" if dx < 0 else "on the right"


def _nearest(prototypes: dict, features: tuple) -> str:
    return min(prototypes, key=lambda name: sum((f - p) ** 2 for f, p in zip(features, prototypes[name])))


def _corners(opacity: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """Mean opacity inside the corner triangles of the box of `rows` and `cols` (those at least half covered)."""
    if len(cols) == 0 or len(rows) == 0:
        return 0.0
    ys, xs = np.mgrid[0:opacity.shape[0], 0:opacity.shape[1]]
    u = (xs + 0.5 - cols[0]) / (cols[-1] + 1 - cols[0])
    v = (ys + 0.5 - rows[0]) / (rows[-1] + 1 - rows[0])
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    corner = inside & (np.minimum(u, 1 - u) + np.minimum(v, 1 - v) < CORNER)
    return float(opacity[corner].mean()) if corner.any() else 0.0


def _shape(opacity: np.ndarray) -> tuple[str, float, float, float]:
    """(shape name, fill ratio, top share, corner coverage) of the object's opacity map."""
    col_cover, row_cover = opacity.max(axis=0), opacity.max(axis=1)
    width = float(col_cover.sum())     # soft extents: partly covered columns count partly
    height = float(row_cover.sum())
    area = float(opacity.sum())
    fill = area / max(width * height, 1e-6)
    rows, cols = np.nonzero(row_cover >= 0.5)[0], np.nonzero(col_cover >= 0.5)[0]
    middle = (rows[0] + rows[-1] + 1) / 2 if len(rows) else opacity.shape[0] / 2
    row_mass = opacity.sum(axis=1)
    whole = int(np.floor(middle))
    top = row_mass[:whole].sum() + (middle - whole) * (row_mass[whole] if whole < len(row_mass) else 0.0)
    top_share = float(top / max(area, 1e-6))
    corners = _corners(opacity, rows, cols)
    name = _nearest(_OUTLINE_PROTOTYPES, (fill, top_share))
    if name != "triangle":
        name = _nearest(_CORNER_PROTOTYPES, (fill, corners))
    return name, fill, top_share, corners


def read_scene(image) -> Reading:
    """Analyse one RGB image (PIL image or uint8 array (H, W, 3))."""
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    h, w = image.shape[:2]
    background_rgb = np.median(_border(image, max(1, min(h, w) // 32)).astype(np.float32), axis=0)
    reading = Reading(background=nearest_color(background_rgb))
    opacity, object_rgb = object_opacity(image, background_rgb)
    if object_rgb is None or opacity.sum() < 4:
        return reading
    ys, xs = np.mgrid[0:h, 0:w]
    mass = float(opacity.sum())
    cx = float((opacity * (xs + 0.5)).sum() / mass / w)
    cy = float((opacity * (ys + 0.5)).sum() / mass / h)
    shape, fill, top_share, corners = _shape(opacity)
    reading.color = nearest_color(object_rgb)
    reading.position = _position(cx, cy)
    reading.shape, reading.fill, reading.top_share, reading.corners = shape, fill, top_share, corners
    reading.centroid, reading.coverage = (cx, cy), mass / (h * w)
    return reading
