"""One prompt and seed rendered across precision / quantization / engine variants, measured against fp16.

Every variant starts from the same noise (GenerationRequest.latents, drawn once from the seed), because
engines otherwise draw their starting noise from different random generators. Results are cached per
(settings, variant), so ticking one more variant renders only that one. `run_compare` is a generator:
it yields the whole grid's state after each variant, so a front end can fill the grid in as it goes.
"""
from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import numpy as np

from backend.measure import difference_heatmap, psnr, ssim
from backend.session import OutputFolder, PipelineCache, PipelineKey, StopSignal, describe_error, run_to_end
from backend.types import Cancelled, GenerationRequest, UserError


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    engine: str
    precision: str = "fp16"
    quantization: Optional[str] = None


#: the fixed order of the grid and the charts; the first is the reference the others are measured against
VARIANTS = (
    Variant("mlx-fp16", "MLX fp16", "mlx"),
    Variant("mlx-8bit", "MLX 8-bit", "mlx", quantization="q8"),
    Variant("mlx-6bit", "MLX 6-bit", "mlx", quantization="q6"),
    Variant("mlx-4bit", "MLX 4-bit", "mlx", quantization="q4"),
    Variant("mlx-mixed", "MLX mixed-bit", "mlx", quantization="mixed"),
    Variant("coreml-fp16", "Core ML fp16", "coreml"),
    Variant("coreml-6bit", "Core ML 6-bit palettized", "coreml", quantization="q6"),
    Variant("coreml-mixed", "Core ML mixed-bit", "coreml", quantization="mixed"),
)
REFERENCE = VARIANTS[0].key
DEFAULT_SELECTION = ("mlx-fp16", "mlx-8bit", "mlx-4bit")
NOISE_NOTE = ("Every variant starts from the same noise, drawn once from the seed and passed to each engine: "
              "different engines use different random generators, so the same seed alone would not give the "
              "same starting point.")


def variant(key: str) -> Variant:
    for v in VARIANTS:
        if v.key == key:
            return v
    raise UserError(f"unknown variant '{key}': choose from {', '.join(v.key for v in VARIANTS)}")


@dataclass(frozen=True)
class CompareSettings:
    prompt: str
    model: str
    seed: int = -1
    negative_prompt: str = ""
    steps: Optional[int] = None
    guidance: Optional[float] = None
    scheduler: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    compute_units: str = "auto"


@dataclass
class VariantResult:
    variant: Variant
    status: str = "pending"          # pending, running, done, error, skipped
    image: object = None             # PIL image
    path: Optional[str] = None       # the PNG, with its parameters chunk
    heatmap: Optional[np.ndarray] = None
    heatmap_path: Optional[str] = None
    seconds: float = 0.0             # whole generation (load excluded)
    load_seconds: float = 0.0
    steps_per_second: float = 0.0
    peak_bytes: int = 0
    weight_bytes: int = 0
    disk_bytes: int = 0
    psnr: Optional[float] = None     # dB against the reference; inf for identical images
    ssim: Optional[float] = None
    error: str = ""
    engine_info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.variant.label

    def summary(self) -> dict:
        finite = None if self.psnr is None else (self.psnr if np.isfinite(self.psnr) else None)
        return {"variant": self.variant.key, "label": self.label, "status": self.status, "error": self.error,
                "png": self.path, "seconds": self.seconds, "load_seconds": self.load_seconds,
                "steps_per_second": self.steps_per_second, "peak_bytes": self.peak_bytes,
                "weight_bytes": self.weight_bytes, "disk_bytes": self.disk_bytes,
                "psnr": finite, "identical": self.psnr is not None and not np.isfinite(self.psnr),
                "ssim": self.ssim, "engine": self.engine_info}


@dataclass
class CompareState:
    settings: CompareSettings
    seed: int
    results: list                    # VariantResult, in VARIANTS order
    message: str = ""
    finished: bool = False

    def get(self, key: str) -> Optional[VariantResult]:
        return next((r for r in self.results if r.variant.key == key), None)

    def summary(self) -> dict:
        return {"seed": self.seed, "reference": REFERENCE, "note": NOISE_NOTE, "message": self.message,
                "variants": [r.summary() for r in self.results]}


class ResultCache:
    """Finished variants by (settings with the seed resolved, variant key); least recently used out."""

    def __init__(self, capacity: int = 48):
        self.capacity = capacity
        self._items: "OrderedDict[tuple, VariantResult]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Optional[VariantResult]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple, result: VariantResult) -> None:
        with self._lock:
            self._items[key] = result
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def shared_noise(model: str, width: Optional[int], height: Optional[int], seed: int) -> np.ndarray:
    """The standard-normal starting latents every variant gets: (1, C, H/f, W/f) from numpy's PCG64(seed)."""
    from backend import registry
    from backend.checkpoint import resolve_dims
    spec, _ = registry.load_spec(model)
    w, h = resolve_dims(spec, width, height)
    f = spec.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((1, spec.latent_channels, h // f, w // f)).astype(np.float32)


def _peak(memory) -> int:
    return int(memory.peak_engine_bytes or memory.peak_process_bytes)


def mlx_variant_folder(model: str, quantization: str) -> str:
    """An MLX quantized variant written once to disk (backend/quantize.py) under the app's home, so its
    size on disk is real and later runs load it directly."""
    import hashlib
    from backend import quantize, registry
    from backend.session import home
    spec, t5 = registry.load_spec(model)
    source = spec.folder.resolve()
    # the same folder serves several registry entries (distilled transformers, without T5): each its own variant
    identity = json.dumps([str(source), {k: [str(f) for f in v] for k, v in spec.weight_files.items()}, t5])
    tag = hashlib.sha256(identity.encode()).hexdigest()[:8]
    method, bits = ("mixed", None) if quantization == "mixed" else ("mlx", int(quantization[1:]))
    out = home() / "variants" / f"{source.name}-{tag}-mlx-{quantization}"
    folder, _, _ = quantize.quantize_mlx(source, method, bits, out=out, spec=spec, t5=t5)
    return str(folder)


def _render(pipelines: PipelineCache, s: CompareSettings, v: Variant, seed: int, latents: np.ndarray,
            outputs: OutputFolder, stop: StopSignal) -> VariantResult:
    if v.engine == "mlx" and v.quantization:
        key = PipelineKey(mlx_variant_folder(s.model, v.quantization), v.engine, v.precision, None, s.compute_units)
    else:
        key = PipelineKey(s.model, v.engine, v.precision, v.quantization, s.compute_units)
    request = GenerationRequest(prompt=s.prompt, negative_prompt=s.negative_prompt, steps=s.steps,
                                guidance=s.guidance, scheduler=s.scheduler, width=s.width, height=s.height,
                                seed=seed, latents=latents)
    r = VariantResult(v)
    result = run_to_end(pipelines, key, request, stop)
    t = result.timings
    r.status, r.image = "done", result.image
    r.seconds, r.load_seconds = t.total, t.load
    r.steps_per_second = t.steps_per_second
    r.peak_bytes, r.weight_bytes, r.disk_bytes = _peak(result.memory), result.memory.weight_bytes, \
        result.memory.disk_bytes
    r.engine_info = dict(result.engine)
    r.path = str(outputs.save(result.image, {**result.parameters, "variant": v.key}, stem=f"{seed}-{v.key}"))
    return r


def _measure(r: VariantResult, reference: Optional[VariantResult], outputs: OutputFolder) -> None:
    if reference is None or reference.status != "done" or r.status != "done":
        return
    a, b = np.asarray(reference.image), np.asarray(r.image)
    if a.shape != b.shape:
        return
    r.psnr, r.ssim = psnr(a, b), ssim(a, b)
    if r is not reference:
        r.heatmap = difference_heatmap(a, b)
        r.heatmap_path = str(outputs.save_plain(r.heatmap, f"diff-{r.variant.key}"))


def run_compare(pipelines: PipelineCache, settings: CompareSettings, keys, cache: ResultCache,
                outputs: OutputFolder, stop: Optional[StopSignal] = None) -> Iterator[CompareState]:
    """Render the ticked variants (the fp16 reference always first), yielding the grid after each one."""
    if not isinstance(settings.prompt, str) or not settings.prompt.strip():
        raise UserError("enter a prompt: it is empty")
    wanted = {variant(k).key for k in keys or ()}
    if not wanted:
        raise UserError("tick at least one variant to compare")
    wanted.add(REFERENCE)
    stop = stop or StopSignal()
    seed = secrets.randbelow(2**32) if settings.seed is None or settings.seed < 0 else int(settings.seed)
    settings = replace(settings, seed=seed)
    state = CompareState(settings, seed, [VariantResult(v) for v in VARIANTS if v.key in wanted])
    latents = shared_noise(settings.model, settings.width, settings.height, seed)
    reference = state.get(REFERENCE)
    for index, slot in enumerate(state.results):
        cache_key = (settings, slot.variant.key)
        cached = cache.get(cache_key)
        if cached is None:
            if stop.is_set():
                slot.status, slot.error = "skipped", "stopped before this variant"
                continue
            slot.status = "running"
            state.message = f"Rendering {slot.label} ({index + 1} of {len(state.results)})…"
            yield state
            try:
                done = _render(pipelines, settings, slot.variant, seed, latents, outputs, stop)
            except Cancelled:
                slot.status, slot.error = "skipped", "stopped"
                continue
            except Exception as exc:  # noqa: BLE001 - a variant that cannot load shows why in its own cell
                done = VariantResult(slot.variant, status="error", error=describe_error(exc))
            if done.status == "done":
                cache.put(cache_key, done)
        else:
            done = cached
        done = replace(done)  # metrics belong to this grid's reference, not to the cached copy
        state.results[index] = done
        if slot.variant.key == REFERENCE:
            reference = done
        _measure(done, reference, outputs)
        yield state
    state.finished = True
    ok = sum(r.status == "done" for r in state.results)
    state.message = f"{ok} of {len(state.results)} variants rendered with seed {seed}" + (
        " (stopped)" if stop.is_set() else "")
    yield state
