"""What a long-lived interactive front end needs around the pipeline: loaded pipelines kept in a small
LRU, one generation at a time on the machine, a run streamed step by step on the engine thread with a
stop between two steps, errors turned into one sentence, and PNG settings mapped back to a request.

Nothing here knows about Gradio; the app (app.py) only wires these to widgets.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

from backend.types import Cancelled, GenerationRequest, GenerationResult, StepInfo, UserError

log = logging.getLogger("silicon_diffusion.session")



class EngineThread:
    """The one thread every streamed run computes on, taking jobs in turn, so two generations never share the
    machine (it replaces an engine lock around a thread per run). MLX keeps per-thread state that a
    finished thread does not give back (a fresh thread per run grew the process by ~3 MB a run: 118 -> 897 MB
    over 300 runs of the embedded model; flat on one thread). A daemon thread idling on its queue, so that
    exiting the process never waits for it or tears MLX down under it (a thread pool's worker, joined at exit,
    made the interpreter abort in MLX's destructors)."""

    def __init__(self):
        self._jobs: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> threading.Event:
        """Run `job` after the jobs before it; the returned event is set when it has finished."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="engine", daemon=True)
                self._thread.start()
        finished = threading.Event()
        self._jobs.put((job, finished))
        return finished

    def _serve(self) -> None:
        while True:
            job, finished = self._jobs.get()
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job reports its own errors; the thread keeps serving
                log.exception("engine job failed")
            finally:
                finished.set()


ENGINE_THREAD = EngineThread()

#: the app's "precision or quantization" choices -> load_pipeline options. "auto" is fp16 on a GPU and fp32
#: on a CPU (MLX has no fast half-precision matrix products there); quantized weights compute likewise.
PRECISION_CHOICES = {
    "auto": ("auto", None), "fp16": ("fp16", None), "fp32": ("fp32", None), "bf16": ("bf16", None),
    "8-bit": ("auto", "q8"), "6-bit": ("auto", "q6"), "4-bit": ("auto", "q4"), "mixed-bit": ("auto", "mixed"),
}
COMPUTE_UNITS = ("auto", "ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")


def default_model() -> str:
    """The model the app starts with: $SILICON_DIFFUSION_DEFAULT_MODEL, else the embedded model."""
    from backend.registry import DEFAULT_MODEL
    return os.environ.get("SILICON_DIFFUSION_DEFAULT_MODEL") or DEFAULT_MODEL


def home() -> Path:
    return Path(os.environ.get("SILICON_DIFFUSION_HOME", Path.home() / ".silicon-diffusion"))


@dataclass(frozen=True)
class PipelineKey:
    model: str
    engine: str = "auto"
    precision: str = "auto"
    quantization: Optional[str] = None
    compute_units: str = "auto"
    t5: bool = False   # SD3's T5 encoder (~9.5 GB at fp16): off unless asked, as in Apple's and DiffusionKit's apps

    @classmethod
    def from_choice(cls, model: str, engine: str, precision_choice: str, compute_units: str,
                    t5: bool = False) -> "PipelineKey":
        if precision_choice not in PRECISION_CHOICES:
            raise UserError(f"unknown precision '{precision_choice}': choose one of {', '.join(PRECISION_CHOICES)}")
        precision, quantization = PRECISION_CHOICES[precision_choice]
        return cls((model or "").strip(), engine or "auto", precision, quantization, compute_units or "auto", bool(t5))

    def label(self) -> str:
        q = f" {self.quantization}" if self.quantization else ""
        return f"{self.model} · {self.engine} · {self.precision}{q}"


class PipelineCache:
    """Loaded pipelines by (model, engine, precision, quantization, compute units), least recently used out."""

    def __init__(self, capacity: int = 2, loader: Optional[Callable] = None, allow_large: bool = False):
        self.capacity = max(1, capacity)
        self._loader = loader
        self.allow_large = allow_large  # the server's --allow-large: sizes beyond twice a model's native one
        self._items: "OrderedDict[PipelineKey, object]" = OrderedDict()
        self._lock = threading.Lock()

    def _load(self, key: PipelineKey, progress):
        if self._loader is not None:
            return self._loader(key, progress)
        from backend.pipeline import load_pipeline
        return load_pipeline(key.model, engine=key.engine, precision=key.precision, quantization=key.quantization,
                             compute_units=key.compute_units, progress=progress, t5=key.t5)

    def get(self, key: PipelineKey, progress: Optional[Callable[[str], None]] = None) -> tuple[object, bool]:
        """(pipeline, was_cached). Loading happens outside the cache's own lock, on the engine thread."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
        pipe = self._load(key, progress)
        if self.allow_large:
            pipe.allow_large = True
        with self._lock:
            self._items[key] = pipe
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return pipe, False

    def keys(self) -> list[PipelineKey]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def describe_error(exc: BaseException) -> str:
    """The sentence a user sees for a failed run: a UserError's message as it is, otherwise short and plain."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, Cancelled):
        return f"Stopped: {exc}"
    if isinstance(exc, MemoryError):
        return "The machine ran out of memory: try a smaller size, a quantized variant or fewer cached models."
    if isinstance(exc, (ImportError, ModuleNotFoundError)):
        return f"This engine is not available in this installation ({exc})."
    return f"The generation failed unexpectedly ({type(exc).__name__}); the details are in the server log."


@dataclass
class RunEvent:
    """One thing a streamed run reports: 'status' (a message), 'step', 'done', 'stopped' or 'error'."""
    kind: str
    message: str = ""
    step: Optional[StepInfo] = None
    result: Optional[GenerationResult] = None
    pipeline: object = None
    cached: bool = False
    error: Optional[BaseException] = None
    denoise_seconds: float = 0.0     # step events: the sum of every step's time so far

    @property
    def steps_per_second(self) -> float:
        return self.step.step / self.denoise_seconds if self.step and self.denoise_seconds > 0 else 0.0


@dataclass
class StopSignal:
    """Set from anywhere (a Stop button, a closed connection); the run ends between two steps."""
    event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def stream_generation(cache: PipelineCache, key: PipelineKey, request: GenerationRequest,
                      stop: Optional[StopSignal] = None, min_interval: float = 0.0) -> Iterator[RunEvent]:
    """Load (through the cache) and generate on the engine thread, yielding RunEvents as they happen.

    Step events are coalesced to the newest one when the reader is slower than the steps, and at most
    one per `min_interval` seconds is yielded (the final one always is); a step left out passes its preview on to
    the next one yielded that has none. Closing the iterator early stops the run.
    """
    stop = stop or StopSignal()
    abandoned = threading.Event()   # the reader went away (a cancelled request): stop too
    events: "queue.Queue[RunEvent]" = queue.Queue()

    elapsed = [0.0]

    def on_step(info: StepInfo):
        elapsed[0] += info.seconds
        events.put(RunEvent("step", step=info, denoise_seconds=elapsed[0]))
        return not (stop.is_set() or abandoned.is_set())

    def work():
        try:
            if stop.is_set() or abandoned.is_set():
                raise Cancelled("stopped before it started")
            events.put(RunEvent("status", message=f"Loading {key.label()}…"))
            pipe, cached = cache.get(key, progress=lambda msg: events.put(RunEvent("status", message=msg)))
            events.put(RunEvent("status", message="Running", pipeline=pipe, cached=cached))
            result = pipe.generate(request, callback=on_step,
                                   should_stop=lambda: stop.is_set() or abandoned.is_set())
            events.put(RunEvent("done", result=result, pipeline=pipe, cached=cached))
        except Cancelled as exc:
            events.put(RunEvent("stopped", message=f"Stopped: {exc}", error=exc))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message, the app keeps serving
            if not isinstance(exc, UserError):
                log.exception("generation failed")
            events.put(RunEvent("error", message=describe_error(exc), error=exc))

    worker = ENGINE_THREAD.submit(work)
    last_step_yield = 0.0
    held: Optional[RunEvent] = None
    unshown = None  # the newest preview of a step left out (coalesced, or too soon): shown with the next step
    try:
        while True:
            event, held = (held, None) if held is not None else (events.get(), None)
            if event.kind == "step":
                while True:  # coalesce: only the newest step matters to a viewer
                    try:
                        newer = events.get_nowait()
                    except queue.Empty:
                        break
                    if newer.kind != "step":
                        held = newer
                        break
                    unshown = unshown if event.step.preview is None else event.step.preview
                    event = newer
                final = event.step.step == event.step.total
                now = time.perf_counter()
                if not final and held is None and now - last_step_yield < min_interval:
                    unshown = unshown if event.step.preview is None else event.step.preview
                    continue
                last_step_yield = now
                if event.step.preview is None and unshown is not None:  # previews every N steps: none is lost
                    event.step = replace(event.step, preview=unshown)
                unshown = None
            if event.kind in ("done", "stopped", "error"):
                yield event
                return
            yield event
    finally:
        abandoned.set()     # harmless after the end; before it, the run stops between two steps
        worker.wait(timeout=0.1)


def run_to_end(cache: PipelineCache, key: PipelineKey, request: GenerationRequest,
               stop: Optional[StopSignal] = None) -> GenerationResult:
    """The non-streaming form: the result, or the run's exception raised again."""
    for event in stream_generation(cache, key, request, stop):
        if event.kind == "done":
            return event.result
        if event.kind in ("stopped", "error"):
            raise event.error
    raise RuntimeError("the run ended without a result")


def preview_image(info: StepInfo, width: int, height: int) -> Optional[Image.Image]:
    """The step's preview (its predicted final image: backend/preview.py), scaled to the image's size for display."""
    if info.preview is None:
        return None
    return Image.fromarray(np.asarray(info.preview, dtype=np.uint8)).resize((width, height), Image.BILINEAR)


@dataclass(frozen=True)
class Retention:
    """How much the app's folder keeps: at most `files` files and `bytes` bytes; the oldest go first. Files
    younger than `grace` seconds stay (an upload about to be used, the image being shown)."""
    files: int = 1000
    bytes: int = 4 * 2**30
    grace: float = 600.0


class OutputFolder:
    """The app's one folder for files: the PNGs it writes (each with its `parameters` text chunk), the start
    images and masks it keeps for them (inputs/), and Gradio's uploads and served files (the app points
    GRADIO_TEMP_DIR here, so an image it shows is served from where it was saved, not copied). A retention
    policy bounds it (`prune`, after every save)."""

    def __init__(self, folder: Optional[Path] = None, retention: Retention = Retention()):
        self.folder = Path(folder) if folder else home() / "outputs"
        self.retention = retention
        self._count = 0
        self._lock = threading.Lock()

    def save(self, image: Image.Image, parameters: dict, stem: str = "") -> Path:
        from backend.png import save_png
        with self._lock:
            self._count += 1
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{self._count:04d}-{stem or parameters.get('seed', 'image')}.png"
        path = save_png(image, self.folder / name, parameters)
        self.prune()
        return path

    def prune(self, now: Optional[float] = None) -> list[Path]:
        """Delete the oldest files beyond the retention policy (never one younger than its grace period);
        returns what was deleted. Empty folders Gradio made for uploads go with their last file."""
        now = time.time() if now is None else now
        files = []
        for path in self.folder.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink():
                    st = path.stat()
                    files.append((st.st_mtime, st.st_size, path))
            except OSError:
                continue
        files.sort(key=lambda f: (f[0], str(f[2])))
        count, total = len(files), sum(size for _, size, _ in files)
        deleted = []
        for mtime, size, path in files:
            if count <= self.retention.files and total <= self.retention.bytes:
                break
            if now - mtime < self.retention.grace:
                break  # sorted by age: everything after it is younger still
            try:
                path.unlink()
            except OSError:
                continue
            count, total = count - 1, total - size
            deleted.append(path)
            if path.parent != self.folder and path.parent.name != "inputs":
                try:
                    path.parent.rmdir()  # an upload's own folder, once empty
                except OSError:
                    pass
        if deleted:
            log.info("retention: deleted %d old files from %s", len(deleted), self.folder)
        return deleted

    def keep_inputs(self, parameters: dict, request: GenerationRequest) -> None:
        """Keep a run's start image and mask under inputs/<their hash>.png (the hash its parameters record), so
        that its PNG restores them; each is written once."""
        for key, image in (("init_image", request.init_image), ("mask", request.mask)):
            digest = parameters.get(key)
            if digest and isinstance(image, Image.Image):
                path = self.folder / "inputs" / f"{digest}.png"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path, format="PNG")

    def editor_value(self, parameters: dict) -> Optional[dict]:
        """The image editor's value a PNG's parameters restore: the kept start image, the mask as a painted layer."""
        digest = parameters.get("init_image")
        background = self.folder / "inputs" / f"{digest}.png" if digest else None
        if background is None or not background.is_file():
            return None
        layers = []
        mask = self.folder / "inputs" / f"{parameters.get('mask')}.png" if parameters.get("mask") else None
        if mask is not None and mask.is_file():
            painted = self.folder / "inputs" / f"{parameters['mask']}-layer.png"
            if not painted.exists():
                white = np.asarray(Image.open(mask).convert("L")) > 127
                rgba = np.zeros(white.shape + (4,), np.uint8)
                rgba[white] = 255
                Image.fromarray(rgba, "RGBA").save(painted, format="PNG")
            layers.append(str(painted))
        return {"background": str(background), "layers": layers, "composite": str(background)}

    def save_plain(self, pixels: np.ndarray, stem: str) -> Path:
        """A PNG without parameters (a heatmap, a preview)."""
        with self._lock:
            self._count += 1
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{self._count:04d}-{stem}.png"
        self.folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(self.folder / name, format="PNG")
        return self.folder / name


def request_settings(parameters: dict) -> dict:
    """The settings a PNG's parameters restore, under the names the app's controls use (missing keys omitted)."""
    out = {}
    for key in ("prompt", "negative_prompt", "model", "scheduler"):
        if parameters.get(key) not in (None, ""):
            out[key] = str(parameters[key])
    # the engine and compute units actually used; MLX reports its device ("CPU", "GPU") as compute units
    if parameters.get("engine") in ("auto", "coreml", "mlx"):
        out["engine"] = parameters["engine"]
    if parameters.get("compute_units") in COMPUTE_UNITS:
        out["compute_units"] = parameters["compute_units"]
    if parameters.get("t5") in ("loaded", "skipped", "absent"):
        out["t5"] = parameters["t5"] == "loaded"
    for key, cast in (("steps", int), ("width", int), ("height", int), ("seed", int), ("guidance", float)):
        try:
            if parameters.get(key) is not None:
                out[key] = cast(parameters[key])
        except (TypeError, ValueError):
            pass
    quantization = parameters.get("quantization")
    precision = parameters.get("precision")
    by_quant = {q: name for name, (_, q) in PRECISION_CHOICES.items() if q}
    if quantization and quantization != "none" and quantization in by_quant:
        out["precision"] = by_quant[quantization]
    elif precision in PRECISION_CHOICES:
        out["precision"] = precision
    return out


def prompt_help(model: str, prompt: str) -> Optional[tuple]:
    """(the words the model knows, an example prompt, the words of `prompt` it ignores) for a model that declares
    its vocabulary (the embedded one); None for the others, or when that cannot be known without downloading."""
    from backend import registry
    try:
        entry = registry.get_entry(model)
        if not Path(model).expanduser().is_dir() and entry is None:
            return None
        spec = registry.load_spec(model, local_only=True)[0]
    except (UserError, OSError, ValueError):
        return None
    if not spec.vocabulary:
        return None
    return spec.vocabulary, spec.defaults.get("example_prompt", ""), spec.words_it_ignores(prompt)


def model_defaults(model: str) -> Optional[dict]:
    """A model's default steps, guidance, scheduler and size, and the size grid its denoiser needs (size_step,
    size_min): from its folder when it is on disk, else from its registry entry (`native`), so that choosing a
    model not downloaded yet still shows its settings; None when neither says (a Hub id not downloaded)."""
    from backend import registry
    from backend.schedulers import schedulers_for
    entry = None
    try:
        entry = registry.get_entry(model)
        if not Path(model).expanduser().is_dir() and entry is None:
            return None
        spec = registry.load_spec(model, local_only=True)[0]  # never a download here
    except (UserError, OSError, ValueError):
        return _registry_defaults(entry)
    multiple = spec.size_step
    smallest = max(spec.min_size, -(-min(64, spec.native_size) // multiple) * multiple)
    return {"steps": int(spec.default("steps")), "guidance": float(spec.default("guidance")),
            "scheduler": spec.default("scheduler"), "width": spec.native_size, "height": spec.native_size,
            "size_step": multiple, "size_min": smallest, "schedulers": list(schedulers_for(spec.scheduler_config))}


def _registry_defaults(entry) -> Optional[dict]:
    """model_defaults from a registry entry alone (a model not downloaded): its family gives the size grid (a
    UNet: 8-pixel VAE blocks; SD3's transformer: 16-pixel patches) and the schedulers it can use."""
    from backend import families, registry
    from backend.schedulers import FLOW_SCHEDULERS, SCHEDULERS
    d = registry.native_defaults(entry)
    if d is None or d["family"] not in families.FAMILIES:
        return None
    family = families.get(d["family"])
    step = 16 if family.denoiser == "transformer" else 8
    size = int(d["size"])
    return {"steps": int(d["steps"]), "guidance": float(d["guidance"]), "scheduler": d["scheduler"],
            "width": size, "height": size, "size_step": step, "size_min": 64,
            "schedulers": list(FLOW_SCHEDULERS if family.flow else SCHEDULERS)}
