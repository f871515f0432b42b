"""What the tabs share: the App's state and the stop plumbing of every run, the event settings (one engine
queue; handlers private to the page), the model choices, and a GenerationRequest from the widgets' values."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from backend import compare, registry
from backend.session import (OutputFolder, PipelineCache, PipelineKey, StopSignal, default_model, model_defaults,
                             stream_generation)
from backend.types import GenerationRequest, UserError

ENGINE = dict(concurrency_id="engine", concurrency_limit=1)  # one generation at a time, whatever starts it
PRIVATE = dict(api_visibility="private")
FALLBACK_DEFAULTS = {"steps": 25, "guidance": 7.5, "scheduler": "default", "width": 512, "height": 512,
                     "size_step": 64, "size_min": 64}
EXAMPLE_PROMPT = "a large red circle in the center on a blue background"
ADD_FOLDER_MODES = ("off", "local", "any")  # app.py's --allow-add-folder


def model_choices(extra: str = "") -> list:
    """(label, name) of every model to generate with (refiners are second stages); a model not downloaded yet
    says so in its label (one scan of the Hub cache)."""
    repos = {r.repo_id: r for r in registry.cached_repos()}
    choices = []
    for m in registry.list_models():
        if not m.refines:
            status = registry.model_status(m, repos, token=True)
            mark = ("" if status.downloaded else " (folder missing)" if status.state == "missing"
                    else " (not downloaded)")
            choices.append((m.title + mark, m.name))
    if extra and extra not in [c[1] for c in choices]:
        choices.insert(0, (f"{Path(extra).name} (folder)", extra))
    return choices


class RawNumber(gr.Number):
    """A number field whose value reaches the handler as it was sent: Gradio's own Number rounds (precision)
    and refuses out-of-range values with its sentence before the app sees them; here `number()` checks it."""

    def get_block_name(self) -> str:
        return "number"

    def preprocess(self, payload):
        return payload


class RawSlider(gr.Slider):
    """A slider whose value reaches the handler as sent (a typed value beyond its range included): see RawNumber."""

    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload):
        return payload


class UploadedImage(gr.Image):
    """An image input that hands the handler the uploaded file's path without decoding it (Gradio's gr.Image
    opens every upload itself, so a corrupt file or a decompression bomb would fail there, without the app's
    sentence): backend/images.py checks its size and pixels from the header before decoding."""

    def get_block_name(self) -> str:
        return "image"

    def preprocess(self, payload):
        return None if payload is None else payload.path


DEFAULT_MARKS = (None, "", "default", "-1", -1)


def number(value, name: str, whole: bool = False):
    """A control's value as a number, or None for "the model's default" (empty, 'default' or -1); anything else
    that is not a finite, non-negative number (a whole one where `whole`) is refused with a sentence."""
    if isinstance(value, str):
        value = value.strip()
    if any(value == mark and type(value) is type(mark) for mark in DEFAULT_MARKS) or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{name} must be a number (got {value!r})")
    if isinstance(value, str):
        try:
            value = int(value) if value.lstrip("+").isdigit() else float(value)
        except ValueError:
            raise UserError(f"{name} must be a number (got {value!r})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number (got {value})")
    if value < 0:
        meaning = "a new random seed" if name == "seed" else "the model's default"
        raise UserError(f"{name} cannot be negative (got {value:g}); -1 or empty means {meaning}")
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise UserError(f"{name} must be a whole number (got {value:g})")
        return int(value)
    return float(value)


def opt(value, cast):
    """None for "the model's default" ('default' or empty), else the value cast (strings such as a scheduler)."""
    return None if value in (None, "", "default") else cast(value)


def make_request(prompt, negative, scheduler, steps, guidance, width, height, seed,
                 **image_fields) -> GenerationRequest:
    """The request the widgets describe; every setting left at "the model's default" is None."""
    return GenerationRequest(prompt=prompt or "", negative_prompt=negative or "", scheduler=opt(scheduler, str),
                             steps=number(steps, "steps", whole=True), guidance=number(guidance, "guidance"),
                             width=number(width, "width", whole=True), height=number(height, "height", whole=True),
                             seed=number(seed, "seed", whole=True), **image_fields)


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "-"


class AppBase:
    """Shared state (loaded pipelines, cached compare variants, outputs, stop signals, the widgets in `ui`) and
    the stop plumbing every tab's handlers use. Each tab adds its layout and handlers (ui/generate.py,
    ui/compare.py, ui/presenter.py, ui/models.py); app.App puts them together."""

    def __init__(self, model: str = "", cache_size: int = 2, allow_large: bool = False, add_folder: str = "off"):
        self.model = model or default_model()
        # adding model folders from the browser (the server's --allow-add-folder): "off", "local" (loopback
        # clients only) or "any"; `shared` (a public link) makes every client remote (ui/models.py)
        if add_folder not in ADD_FOLDER_MODES:
            raise ValueError(f"add_folder must be one of {', '.join(ADD_FOLDER_MODES)} (got {add_folder!r})")
        self.add_folder_mode = add_folder
        self.shared = False
        self.pipelines = PipelineCache(cache_size, allow_large=allow_large)
        self.variants = compare.ResultCache()
        self.outputs = OutputFolder()
        self.stops: dict[str, list[StopSignal]] = {}   # per session: the signals of its running requests
        self.armed: dict[str, list[StopSignal]] = {}   # per session: signals of clicks whose run has not started
        self.defaults = {**FALLBACK_DEFAULTS, **(model_defaults(self.model) or {})}
        self.ui = SimpleNamespace()

    # -- stop: a Stop press reaches the runs of the same browser session or API client -------------------
    # A click arms a signal at once (queue=False) and the queued handler claims it when it starts, so that a
    # Stop pressed while the request waits ends it the moment it reaches the engine, before anything loads.
    def arm(self, request: gr.Request):
        self.armed.setdefault(_session(request), []).append(StopSignal())

    def _signal(self, request: gr.Request, fresh: bool) -> StopSignal:
        session = _session(request)
        armed = self.armed.get(session)
        signal = armed.pop(0) if armed and not fresh else StopSignal()
        self.stops.setdefault(session, []).append(signal)
        return signal

    def _release(self, request: gr.Request, signal: StopSignal):
        running = self.stops.get(_session(request), [])
        if signal in running:
            running.remove(signal)
        if not running:
            self.stops.pop(_session(request), None)

    def stop(self, request: gr.Request) -> str:
        """Stop every run of this session: running ones inside their stage, waiting ones before they start."""
        session = _session(request)
        signals = self.stops.get(session, []) + self.armed.pop(session, [])
        for signal in signals:
            signal.set()
        return "stopping" if signals else "nothing is running"

    def stop_quietly(self, request: gr.Request) -> None:
        """Stop for a button with no output to show the answer in (a returned string would be a stray value),
        and for a closed page (demo.unload)."""
        self.stop(request)

    def _stream(self, model, engine, units, precision, request, stop, min_interval=0.05, t5=False):
        key = PipelineKey.from_choice(model or self.model, engine, precision, units, t5)
        return stream_generation(self.pipelines, key, request, stop, min_interval=min_interval)
