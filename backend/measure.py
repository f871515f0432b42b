"""The one place that measures: stage timers, peak process memory, bytes on disk, image metrics."""
from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def timed(store: dict, key: str):
    """Add the seconds spent in the block to store[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


class ProcessPeak:
    """Peak resident memory of this process over a span of work.

    Linux: the kernel's high-water mark (VmHWM) is reset at the start (writing 5 to clear_refs), so the
    figure is this span's own peak. Elsewhere: getrusage's lifetime peak, an upper bound.
    """

    def __init__(self):
        self.exact = False

    def reset(self) -> None:
        if sys.platform.startswith("linux"):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.exact = True
            except OSError:
                self.exact = False

    def peak_bytes(self) -> int:
        if sys.platform.startswith("linux"):
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
            except OSError:
                pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class StagePeaks:
    """Peak memory per stage of one generation: the engine's own counter (MLX's; Core ML's resident model bytes)
    and the process's high-water mark, both reset when a stage begins, so each figure is that stage's own
    (elsewhere than on Linux the process figure is the lifetime peak, an upper bound). The generation's peaks are
    the largest of all its stretches, stages and what runs between them."""

    def __init__(self, stages):
        self.stages = stages  # the engine's Stages (peak_memory, reset_peak_memory)
        self.process = ProcessPeak()
        self.per_stage: dict = {}
        self.engine_bytes = 0
        self.process_bytes = 0
        self.weight_bytes = 0

    def reset(self) -> None:
        self.process.reset()
        self.stages.reset_peak_memory()

    def _fold(self) -> tuple[int, int]:
        """This stretch's peaks (since the last reset), folded into the generation's."""
        engine, process = int(self.stages.peak_memory()), int(self.process.peak_bytes())
        self.engine_bytes, self.process_bytes = max(self.engine_bytes, engine), max(self.process_bytes, process)
        # the most weight bytes resident at once (the engine's own figure is reset with each stage)
        self.weight_bytes = max(self.weight_bytes, int(self.stages.weight_bytes()))
        return engine, process

    @contextmanager
    def stage(self, name):
        """Measure the block as stage `name` (None: measure nothing apart); a stage that runs twice (a refiner's
        text encoder, denoising) keeps its larger peak."""
        if name is None:
            yield
            return
        self._fold()
        self.reset()
        try:
            yield
        finally:
            engine, process = self._fold()
            entry = self.per_stage.setdefault(name, {"peak_engine_bytes": 0, "peak_process_bytes": 0})
            entry["peak_engine_bytes"] = max(entry["peak_engine_bytes"], engine)
            entry["peak_process_bytes"] = max(entry["peak_process_bytes"], process)
            self.reset()

    def totals(self) -> tuple[int, int]:
        """(engine peak, process peak) of the whole generation so far."""
        self._fold()
        return self.engine_bytes, self.process_bytes


def current_rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def disk_bytes(path) -> int:
    """Bytes of a file or of every file under a folder (symlinks followed, as the Hub cache uses them)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p, followlinks=True):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass
    return total


def _as_float(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    return a / 255.0 if a.max() > 1.0 + 1e-6 else a


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two images (uint8 or float in [0, 1])."""
    x, y = _as_float(a), _as_float(b)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma * sigma))
    return g / g.sum()


def _blur(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    # separable 'valid' convolution over the two spatial axes
    k = len(w)
    x = sum(w[i] * x[i:x.shape[0] - k + 1 + i] for i in range(k))
    return sum(w[i] * x[:, i:x.shape[1] - k + 1 + i] for i in range(k))


def ssim(a, b) -> float:
    """Structural similarity (Wang et al. 2004, 11x11 Gaussian window), mean over channels."""
    x, y = _as_float(a), _as_float(b)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    w = _gaussian_window(min(11, x.shape[0], x.shape[1]) | 1)
    mu_x, mu_y = _blur(x, w), _blur(y, w)
    sxx = _blur(x * x, w) - mu_x ** 2
    syy = _blur(y * y, w) - mu_y ** 2
    sxy = _blur(x * y, w) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def difference_heatmap(a, b, gain: float = 4.0) -> np.ndarray:
    """Per-pixel absolute difference, amplified, as an RGB uint8 heatmap (black = identical)."""
    d = np.abs(_as_float(a) - _as_float(b)).mean(axis=-1)
    d = np.clip(d * gain, 0, 1)
    r = np.clip(3 * d, 0, 1)
    g = np.clip(3 * d - 1, 0, 1)
    bl = np.clip(3 * d - 2, 0, 1)
    return (np.stack([r, g, bl], axis=-1) * 255).round().astype(np.uint8)
