"""What the tabs share: the App's state and the stop plumbing of every run, the event settings (one engine
queue; handlers private to the page), the model choices, and a GenerationRequest from the widgets' values."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from backend import compare, registry
from backend.session import (OutputFolder, PipelineCache, PipelineKey, StopSignal, default_model, model_defaults,
                             stream_generation)
from backend.types import GenerationRequest

ENGINE = dict(concurrency_id="engine", concurrency_limit=1)  # one generation at a time, whatever starts it
PRIVATE = dict(api_visibility="private")
FALLBACK_DEFAULTS = {"steps": 25, "guidance": 7.5, "scheduler": "default", "width": 512, "height": 512,
                     "size_step": 64, "size_min": 64}
EXAMPLE_PROMPT = "a large red circle in the center on a blue background"


def model_choices(extra: str = "") -> list:
    choices = [(m.title, m.name) for m in registry.list_models() if not m.refines]  # refiners: second stages
    if extra and extra not in [c[1] for c in choices]:
        choices.insert(0, (f"{Path(extra).name} (folder)", extra))
    return choices


def opt(value, cast):
    """None for "the model's default" (empty, negative or 'default'), else the value cast."""
    if value is None or value == "" or value == "default" or (isinstance(value, (int, float)) and value < 0):
        return None
    return cast(value)


def make_request(prompt, negative, scheduler, steps, guidance, width, height, seed,
                 **image_fields) -> GenerationRequest:
    """The request the widgets describe; every setting left at "the model's default" is None."""
    return GenerationRequest(prompt=prompt or "", negative_prompt=negative or "", scheduler=opt(scheduler, str),
                             steps=opt(steps, int), guidance=opt(guidance, float), width=opt(width, int),
                             height=opt(height, int), seed=opt(seed, int), **image_fields)


def typed_frame(rows: list, **dtypes) -> pd.DataFrame:
    """A typed frame (an empty object-typed one would make the plots treat numbers as categories)."""
    return pd.DataFrame({k: pd.Series([r[k] for r in rows], dtype=t) for k, t in dtypes.items()})


class AppBase:
    """Shared state (loaded pipelines, cached compare variants, outputs, stop signals, the widgets in `ui`) and
    the stop plumbing every tab's handlers use. Each tab adds its layout and handlers (ui/generate.py,
    ui/compare.py, ui/presenter.py, ui/models.py); app.App puts them together."""

    def __init__(self, model: str = "", cache_size: int = 2, allow_large: bool = False):
        self.model = model or default_model()
        self.pipelines = PipelineCache(cache_size, allow_large=allow_large)
        self.variants = compare.ResultCache()
        self.outputs = OutputFolder()
        self.stops: dict[str, StopSignal] = {}
        self.defaults = {**FALLBACK_DEFAULTS, **(model_defaults(self.model) or {})}
        self.ui = SimpleNamespace()

    # -- stop: a Stop press reaches the runs of the same browser session or API client -------------------
    def arm(self, request: gr.Request):
        self.stops[request.session_hash] = StopSignal()

    def _signal(self, request: gr.Request, fresh: bool) -> StopSignal:
        session = getattr(request, "session_hash", None) or "-"
        if fresh or session not in self.stops:
            self.stops[session] = StopSignal()
        return self.stops[session]

    def _release(self, request: gr.Request, signal: StopSignal):
        session = getattr(request, "session_hash", None) or "-"
        if self.stops.get(session) is signal:
            del self.stops[session]

    def stop(self, request: gr.Request) -> str:
        signal = self.stops.get(request.session_hash)
        if signal is None:
            return "nothing is running"
        signal.set()
        return "stopping between two steps"

    def stop_quietly(self, request: gr.Request) -> None:
        """Stop for a button with no output to show the answer in (a returned string would be a stray value)."""
        self.stop(request)

    def _stream(self, model, engine, units, precision, request, stop, min_interval=0.05, t5=False):
        key = PipelineKey.from_choice(model or self.model, engine, precision, units, t5)
        return stream_generation(self.pipelines, key, request, stop, min_interval=min_interval)
