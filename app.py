"""Silicon Diffusion's web app: Gradio widgets wired to backend/ (no model logic lives here).

    python app.py [--share] [--host 127.0.0.1] [--port 7860] [--queue-size 16] [--model NAME_OR_FOLDER]

Tabs: Generate, Compare, Presenter, Models; API endpoints /generate, /compare and /stop. One generation
runs at a time on the machine (every engine event shares one concurrency group, and backend.session
holds an engine lock); the others wait in a bounded queue and see their place in it.
"""
from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no analytics, no telemetry

import argparse  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import backend  # noqa: E402,F401  (optimized BLAS before MLX)
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from backend import compare, present, registry  # noqa: E402
from backend.png import read_parameters  # noqa: E402
from backend.session import (PRECISION_CHOICES, OutputFolder, PipelineCache, PipelineKey, StopSignal,  # noqa: E402
                             default_model, model_defaults, preview_image, request_settings, stream_generation)
from backend.types import GenerationRequest, UserError  # noqa: E402

ENGINE = dict(concurrency_id="engine", concurrency_limit=1)  # one generation at a time, whatever starts it
PRIVATE = dict(api_visibility="private")
ENGINES = [("Auto", "auto"), ("Core ML", "coreml"), ("MLX", "mlx")]
UNITS = [("Auto (Apple's choice)", "auto"), ("All (CPU, GPU, ANE)", "ALL"), ("CPU and Neural Engine", "CPU_AND_NE"), ("CPU and GPU", "CPU_AND_GPU"),
         ("CPU only", "CPU_ONLY")]
SETTING_NAMES = ("prompt", "negative_prompt", "model", "engine", "compute_units", "precision", "scheduler", "steps",
                 "guidance", "width", "height", "seed", "t5")
FALLBACK_DEFAULTS = {"steps": 25, "guidance": 7.5, "scheduler": "default", "width": 512, "height": 512,
                     "size_step": 64, "size_min": 64}
EXAMPLE_PROMPT = "a large red circle in the center on a blue background"
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="sky", neutral_hue="slate",
                       font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def scheduler_choices(names=None) -> list:
    """The dropdown's choices: `names` (a model's schedulers), else every scheduler."""
    from backend.schedulers import FLOW_SCHEDULERS, SCHEDULERS
    names = names or SCHEDULERS + FLOW_SCHEDULERS
    return [("Model default", "default")] + [(name.replace("_", " "), name) for name in names]


def model_choices(extra: str = "") -> list:
    choices = [(m.title, m.name) for m in registry.list_models() if not m.refines]  # refiners: second stages
    if extra and extra not in [c[1] for c in choices]:
        choices.insert(0, (f"{Path(extra).name} (folder)", extra))
    return choices


def _opt(value, cast):
    """None for "the model's default" (empty, negative or 'default'), else the value cast."""
    if value is None or value == "" or value == "default" or (isinstance(value, (int, float)) and value < 0):
        return None
    return cast(value)


def _request(prompt, negative, scheduler, steps, guidance, width, height, seed, **image_fields) -> GenerationRequest:
    return GenerationRequest(prompt=prompt or "", negative_prompt=negative or "", scheduler=_opt(scheduler, str),
                             steps=_opt(steps, int), guidance=_opt(guidance, float), width=_opt(width, int),
                             height=_opt(height, int), seed=_opt(seed, int), **image_fields)


def editor_image_and_mask(value, uploaded_mask=None) -> tuple:
    """(start image, mask) from the ImageEditor's value: its background, and a white-on-black mask of what was
    painted over it (an uploaded mask wins). (None, None) when no start image is given."""
    from PIL import Image
    if not value or value.get("background") is None:
        return None, None
    background = value["background"].convert("RGB")
    if uploaded_mask is not None:
        return background, uploaded_mask.convert("L")
    painted = None
    for layer in value.get("layers") or []:
        alpha = np.asarray(layer.convert("RGBA").getchannel("A")) > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return background, None
    return background, Image.fromarray(painted.astype(np.uint8) * 255).resize(background.size, Image.NEAREST)


def image_fields(editor, uploaded_mask, strength, mask_blur, lora_rows) -> dict:
    """The request's start image, mask, strength, feather and LoRAs from the Generate tab's controls."""
    init, mask = editor_image_and_mask(editor, uploaded_mask)
    fields = {"loras": lora_choice(lora_rows)}
    if init is not None:
        fields.update(init_image=init, mask=mask, strength=float(strength), mask_blur=int(mask_blur or 0))
    return fields


def lora_choice(rows) -> list:
    """(file, scale) for every LoRA row with a scale other than 0."""
    values = rows.values.tolist() if hasattr(rows, "values") else list(rows or [])
    chosen = []
    for row in values:
        if len(row) >= 3 and row[0] and row[2] not in (None, "") and float(row[2]) != 0.0:
            chosen.append((str(row[1]), float(row[2])))
    return chosen


def restore_lora_scales(rows, used: list) -> tuple:
    """The LoRA table with the scales a PNG records (matched by file name, then hash), and the names not found."""
    from backend.lora_files import file_sha256
    table = rows.copy() if hasattr(rows, "copy") else pd.DataFrame(rows, columns=["LoRA", "File", "Scale"])
    table["Scale"] = 0.0
    missing = []
    for lora in used:
        hits = [i for i, name in enumerate(table["LoRA"]) if name == lora.get("name")
                and (not lora.get("sha256") or file_sha256(table["File"][i]).startswith(lora["sha256"]))]
        if hits:
            table.loc[hits[0], "Scale"] = float(lora.get("scale", 1.0))
        else:
            missing.append(str(lora.get("name")))
    return table, missing


def lora_label(table) -> str:
    from backend.lora_files import lora_folder
    if len(table) == 0:
        return f"No LoRA files found: put .safetensors LoRAs in {lora_folder()} and look again"
    return "Scale 0 leaves a LoRA off; several may be on at once"


def lora_table(files=None) -> pd.DataFrame:
    from backend.lora_files import find_lora_files
    files = find_lora_files() if files is None else files
    return pd.DataFrame([[f.name, str(f), 0.0] for f in files], columns=["LoRA", "File", "Scale"])


def _mean(values):
    return sum(values) / len(values) if values else None


def _frame(rows: list, **dtypes) -> pd.DataFrame:
    """A typed frame (an empty object-typed one would make the plots treat numbers as categories)."""
    return pd.DataFrame({k: pd.Series([r[k] for r in rows], dtype=t) for k, t in dtypes.items()})


def compare_frames(state) -> list:
    """PSNR, weight size and seconds per finished variant, in the fixed variant order."""
    done = [r for r in state.results if r.status == "done"] if state is not None else []
    quality = [{"variant": r.label, "dB": r.psnr} for r in done if r.psnr is not None and math.isfinite(r.psnr)]
    return [_frame(quality, variant=str, dB=float),
            _frame([{"variant": r.label, "MB": (r.weight_bytes or r.disk_bytes) / 1e6} for r in done],
                   variant=str, MB=float),
            _frame([{"variant": r.label, "s": r.seconds} for r in done], variant=str, s=float)]


def latency_frame(rows: list) -> pd.DataFrame:
    return _frame(rows, step=int, ms=float, run=str)


class App:
    """Shared state (loaded pipelines, cached compare variants, outputs, stop signals) and the handlers."""

    def __init__(self, model: str = "", cache_size: int = 2):
        self.model = model or default_model()
        self.pipelines = PipelineCache(cache_size)
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

    def _stream(self, model, engine, units, precision, request, stop, min_interval=0.05, t5=False):
        key = PipelineKey.from_choice(model or self.model, engine, precision, units, t5)
        return stream_generation(self.pipelines, key, request, stop, min_interval=min_interval)

    # -- Generate tab ------------------------------------------------------------------------------------
    def generate_ui(self, prompt, negative, model, engine, units, precision, scheduler, steps, guidance, width,
                    height, seed, t5, editor, mask, strength, mask_blur, loras, history, request: gr.Request):
        u = self.ui
        stop = self._signal(request, fresh=False)  # armed by the click: a Stop while queued counts
        try:
            req = _request(prompt, negative, scheduler, steps, guidance, width, height, seed,
                           **image_fields(editor, mask, strength, mask_blur, loras))
            size = (req.width or self.defaults["width"], req.height or self.defaults["height"])
            for ev in self._stream(model, engine, units, precision, req, stop, t5=t5):
                if ev.kind == "status":
                    if ev.pipeline is not None:  # loaded: previews take the model's own size
                        native = ev.pipeline.spec.native_size
                        size = (req.width or native, req.height or native)
                    yield {u.progress: present.progress_html("loading", ev.message)}
                elif ev.kind == "step":
                    s = ev.step
                    yield {u.image: preview_image(s, *size) if s.preview is not None else gr.skip(),
                           u.progress: present.progress_html("running", "Denoising", s.step, s.total,
                                                             ev.steps_per_second)}
                elif ev.kind == "done":
                    r = ev.result
                    path = str(self.outputs.save(r.image, r.parameters))
                    self.outputs.keep_inputs(r.parameters, req)  # so that the PNG restores its start image and mask
                    item = {"path": path, "caption": f"{r.parameters['prompt'][:48]} · seed {r.seed}"}
                    history = ([item] + list(history or []))[:48]
                    t = r.timings
                    yield {u.image: path, u.history: history, u.last_seed: r.seed,
                           u.gallery: [(h["path"], h["caption"]) for h in history],
                           u.stats: present.stats_html(r, ev.cached),
                           u.progress: present.progress_html("done", "Done in " + present.fmt_seconds(
                                                                 present.total_seconds(r)),
                                                             len(t.steps), len(t.steps), t.steps_per_second)}
                else:
                    yield {u.progress: present.progress_html(ev.kind, ev.message)}
        except UserError as exc:
            yield {u.progress: present.progress_html("error", str(exc))}
        finally:
            self._release(request, stop)

    def generate_api(self, prompt, negative_prompt, model, engine, compute_units, precision, scheduler, steps,
                     guidance, width, height, seed, t5=False, init_image=None, strength=-1, mask=None, mask_blur=0,
                     loras="", request: gr.Request = None, progress=gr.Progress()):
        """Text to image, or image to image with `init_image` (and inpainting with `mask`: white = repaint),
        with LoRAs as in the CLI ("file.safetensors:0.8, other.safetensors"): the PNG (its `parameters` text
        chunk reproduces it) and the measurements as JSON."""
        from backend.lora_files import parse_lora_list
        stop = self._signal(request, fresh=True)
        try:
            fields = {"loras": parse_lora_list(loras)}
            if init_image:
                fields.update(init_image=init_image, mask=mask or None, strength=_opt(strength, float),
                              mask_blur=int(mask_blur or 0))
            elif mask:
                raise UserError("a mask needs a start image (init_image)")
            req = _request(prompt, negative_prompt, scheduler, steps, guidance, width, height, seed, **fields)
            for ev in self._stream(model, engine, compute_units, precision, req, stop, min_interval=0.1, t5=bool(t5)):
                if ev.kind == "status":
                    progress(0, desc=ev.message)
                elif ev.kind == "step":
                    progress((ev.step.step, ev.step.total), desc="denoising", unit="steps")
                elif ev.kind == "done":
                    r = ev.result
                    return str(self.outputs.save(r.image, r.parameters)), r.measurements()
                else:
                    raise gr.Error(ev.message, print_exception=False)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False)
        finally:
            self._release(request, stop)
        raise gr.Error("the run ended without an image")

    def restore(self, path, lora_rows=None):
        """Settings from a PNG made by the app (its parameters chunk) back into the Generate tab: the start image
        and mask when this app still keeps them (by hash), the LoRA scales by file name and hash."""
        params = read_parameters(path) if path else None
        extra = 4  # editor, strength, mask feather, LoRA table
        if not params:
            note = present.progress_html("error", "This image carries no generation parameters.") if path \
                else gr.skip()
            return [gr.skip()] * (len(SETTING_NAMES) + extra) + [note]
        s = request_settings(params)
        if s.get("scheduler") not in [c[1] for c in scheduler_choices()]:
            s.pop("scheduler", None)
        editor = self.outputs.editor_value(params)
        table = lora_table() if lora_rows is None else lora_rows
        rows, missing = restore_lora_scales(table, params.get("loras") or [])
        notes = [f"Settings restored from {Path(path).name} (seed {s.get('seed', '—')})"]
        if params.get("init_image") and editor is None:
            notes.append("its start image is no longer kept here")
        if missing:
            notes.append(f"LoRA not found: {', '.join(missing)}")
        return [gr.update(value=s[n]) if n in s else gr.skip() for n in SETTING_NAMES] + [
            editor if editor is not None else gr.skip(),
            params["strength"] if params.get("strength") is not None else gr.skip(),
            params["mask_blur"] if params.get("mask_blur") is not None else gr.skip(),
            rows, present.progress_html("error" if missing else "idle", "; ".join(notes))]

    def restore_from_gallery(self, history, lora_rows, evt: gr.SelectData):
        """A thumbnail's settings restored, and the image shown (so that it can become the start image)."""
        if not history or evt.index is None or evt.index >= len(history):
            return [gr.skip()] * (len(SETTING_NAMES) + 6)
        path = history[evt.index]["path"]
        return self.restore(path, lora_rows) + [path]

    @staticmethod
    def on_model_change(model):
        d = model_defaults(model)
        if not d:
            return [gr.skip()] * 5
        size = dict(minimum=d["size_min"], step=d["size_step"])
        return [d["steps"], d["guidance"], gr.update(choices=scheduler_choices(d["schedulers"]), value="default"),
                gr.update(value=d["width"], **size), gr.update(value=d["height"], **size)]

    # -- Compare tab -------------------------------------------------------------------------------------
    def _compare(self, prompt, negative, model, keys, seed, steps, stop):
        settings = compare.CompareSettings(prompt=prompt or "", model=model or self.model,
                                           seed=-1 if seed is None else int(seed), negative_prompt=negative or "",
                                           steps=_opt(steps, int))
        return compare.run_compare(self.pipelines, settings, keys, self.variants, self.outputs, stop)

    def compare_ui(self, prompt, negative, model, keys, seed, steps, request: gr.Request):
        u = self.ui
        stop = self._signal(request, fresh=False)
        try:
            for state in self._compare(prompt, negative, model, keys, seed, steps, stop):
                finished = sum(r.status not in ("pending", "running") for r in state.results)
                out = {u.cmp_grid: present.compare_grid_html(state, lambda p: f"gradio_api/file={p}"),
                       u.cmp_state: state, u.cmp_seed: state.seed,
                       u.cmp_status: present.progress_html("done" if state.finished else "running", state.message,
                                                           finished, len(state.results), unit="variant")}
                out.update(zip(u.cmp_plots, compare_frames(state)))
                done = [(r.label, r.variant.key) for r in state.results if r.status == "done"]
                if state.finished and done:
                    a, b = done[0][1], done[-1][1]
                    out.update({u.ab_a: gr.update(choices=done, value=a), u.ab_b: gr.update(choices=done, value=b),
                                u.ab_slider: self.ab_value(state, a, b)})
                yield out
        except UserError as exc:
            yield {u.cmp_status: present.progress_html("error", str(exc))}
        finally:
            self._release(request, stop)

    @staticmethod
    def ab_value(state, a, b):
        ra, rb = (state.get(a), state.get(b)) if state is not None else (None, None)
        if ra is None or rb is None or not ra.path or not rb.path:
            return gr.skip()
        return (ra.path, rb.path)

    def compare_api(self, prompt, negative_prompt, model, variants, seed, steps, request: gr.Request):
        """One prompt and seed across variants: the images, and a JSON of size, time, memory, PSNR and SSIM."""
        stop = self._signal(request, fresh=True)
        state = None
        try:
            for state in self._compare(prompt, negative_prompt, model, variants, seed, steps, stop):
                pass
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False)
        finally:
            self._release(request, stop)
        return [(r.path, r.label) for r in state.results if r.status == "done"], state.summary()

    # -- Presenter tab -----------------------------------------------------------------------------------
    def warm_runs(self, prompt, runs, model, engine, units, precision, request: gr.Request):
        u = self.ui
        stop = self._signal(request, fresh=False)
        rows, totals, rates = [], [], []
        req = _request(prompt or EXAMPLE_PROMPT, "", None, None, None, None, None, 0)
        try:
            for run in range(int(runs) + 1):  # run 0 warms up (loads, first-call setup) and is not counted
                label = "warm-up" if run == 0 else f"run {run}"
                for ev in self._stream(model, engine, units, precision, req, stop, min_interval=0.1):
                    if ev.kind == "status":
                        yield {u.p_status: present.progress_html("loading", f"{label}: {ev.message}", run, int(runs),
                                                                 unit="run")}
                    elif ev.kind == "step" and run > 0:
                        live = [{"step": len(rows) + 1, "ms": 1000 * ev.step.seconds, "run": label}]
                        yield {u.latency: latency_frame(rows + live)}
                    elif ev.kind == "done":
                        t = ev.result.timings
                        if run > 0:
                            totals.append(t.total)
                            rates.append(t.steps_per_second)
                            rows += [{"step": len(rows) + i + 1, "ms": 1000 * s, "run": label}
                                     for i, s in enumerate(t.steps)]
                        yield {u.p_status: present.progress_html("running", f"{label} done", run, int(runs),
                                                                 unit="run"),
                               u.latency: latency_frame(rows),
                               u.p_image: ev.result.image,
                               u.big: present.big_numbers_html(_mean(totals), _mean(rates), len(totals))}
                    elif ev.kind in ("stopped", "error"):
                        yield {u.p_status: present.progress_html(ev.kind, ev.message)}
                        return
            yield {u.p_status: present.progress_html("done", f"{len(totals)} warm runs, seed 0", len(totals),
                                                     len(totals), unit="run")}
        except UserError as exc:
            yield {u.p_status: present.progress_html("error", str(exc))}
        finally:
            self._release(request, stop)

    def live(self, enabled, prompt, steps, model, engine, units, precision):
        """Prompt-to-image as you type: fixed seed, so only the words change the picture."""
        if not enabled or not (prompt or "").strip():
            return gr.skip(), gr.skip()
        try:
            req = _request(prompt, "", None, steps, None, None, None, 0)
            for ev in self._stream(model, engine, units, precision, req, None):
                if ev.kind == "done":
                    t = ev.result.timings
                    return ev.result.image, present.big_numbers_html(t.total, t.steps_per_second, len(t.steps),
                                                                     "steps, as you type")
                if ev.kind in ("stopped", "error"):
                    return gr.skip(), present.progress_html("error", ev.message)
        except UserError as exc:
            return gr.skip(), present.progress_html("error", str(exc))
        return gr.skip(), gr.skip()

    # -- Models tab --------------------------------------------------------------------------------------
    @staticmethod
    def cached_table():
        rows = [[c["repo"], present.fmt_bytes(c["bytes"])] for c in registry.cached_models()]
        return pd.DataFrame(rows or [["No models downloaded yet", "—"]], columns=["Repository", "Size on disk"])

    @staticmethod
    def cached_names():
        return [c["repo"] for c in registry.cached_models()]

    def download(self, name, progress=gr.Progress(track_tqdm=True)):
        entry = registry.get_entry(name)
        if entry is not None and entry.local_folder is not None:
            return (present.progress_html("done", f"{entry.title} ships with the app: nothing to download", 1, 1),
                    gr.skip(), gr.skip())
        repo = entry.hub if entry is not None else (name or "").strip()
        if not repo:
            return present.progress_html("error", "Pick a model to download"), gr.skip(), gr.skip()
        try:
            progress(0, desc=f"Contacting the Hugging Face Hub for {repo}")
            folder = registry.download(repo, progress=lambda msg: progress(0.02, desc=msg))
        except UserError as exc:
            return present.progress_html("error", str(exc)), gr.skip(), gr.skip()
        size = present.fmt_bytes(registry.folder_bytes(folder))
        return (present.progress_html("done", f"{repo} is ready ({size})", 1, 1), self.cached_table(),
                gr.update(choices=self.cached_names()))

    def delete(self, repo):
        if not repo:
            return present.progress_html("idle", "Pick a cached repository to delete"), gr.skip(), gr.skip()
        try:
            freed = registry.delete_cached(repo)
        except UserError as exc:
            return present.progress_html("error", str(exc)), gr.skip(), gr.skip()
        self.pipelines.clear()
        return (present.progress_html("done", f"Deleted {repo}: {present.fmt_bytes(freed)} freed", 1, 1),
                self.cached_table(), gr.update(choices=self.cached_names(), value=None))

    def add_folder(self, folder, name):
        try:
            entry = registry.add_local_model(folder or "", (name or "").strip() or None)
        except UserError as exc:
            return [present.progress_html("error", str(exc))] + [gr.skip()] * 3
        choices = model_choices(self.model)
        return [present.progress_html("done", f"Added {entry.name}: pick it in the model lists", 1, 1)] + [
            gr.update(choices=choices)] * 3

    @staticmethod
    def models_note() -> str:
        if registry.offline():
            return present.note_html("Offline (HF_HUB_OFFLINE=1): cached models and the embedded model work; "
                                     "downloading is off.", warn=True)
        return present.note_html("Downloads fetch only what the engines read: configs, tokenizers and safetensors "
                                 "weights (the fp16 variant where the repository has one). Pickle files are refused.")

    @staticmethod
    def registry_table():
        cached = {c["repo"] for c in registry.cached_models()}
        rows = []
        for m in registry.list_models():
            if m.local_folder is not None:
                source = "in the app" if not Path(m.path).is_absolute() else str(m.local_folder)
                status = "ready" if m.local_folder.is_dir() else "missing"
            else:
                source = m.hub + (f" + {m.transformer_file['repo']}" if m.transformer_file else "")
                status = "downloaded" if m.hub in cached else (
                    "not downloaded (gated: needs a Hub login)" if m.gated else "not downloaded")
            rows.append([m.name, m.title, source, registry.coreml_availability(m), present.fmt_defaults(m.defaults),
                         status])
        return pd.DataFrame(rows, columns=["Name", "Model", "Weights (MLX)", "Core ML", "Defaults", "Status"])

    # -- layout --------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        u, d = self.ui, self.defaults
        models = model_choices(self.model)
        with gr.Blocks(title="Silicon Diffusion") as demo:
            gr.HTML(present.header_html())
            u.history, u.last_seed, u.cmp_state = gr.State([]), gr.State(None), gr.State(None)
            with gr.Tabs():
                with gr.Tab("Generate", id="generate"):
                    settings = self._generate_tab(models, d)
                with gr.Tab("Compare", id="compare"):
                    self._compare_tab(models, d)
                with gr.Tab("Presenter", id="presenter"):
                    self._presenter_tab(settings)
                with gr.Tab("Models", id="models") as models_tab:
                    self._models_tab()
            models_tab.select(lambda: (self.registry_table(), self.cached_table(),
                                       gr.update(choices=self.cached_names())),
                              None, [u.m_registry, u.m_table, u.m_delete_pick], queue=False, **PRIVATE)
            self._api(d)
        return demo

    def _generate_tab(self, models, d) -> list:
        u = self.ui
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=340):
                u.prompt = gr.Textbox(label="Prompt", lines=3, value=EXAMPLE_PROMPT, elem_id="prompt",
                                      placeholder="Describe the image")
                u.negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="What to avoid (optional)")
                with gr.Row():
                    u.go = gr.Button("Generate", variant="primary", scale=3, elem_id="generate-btn")
                    u.stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-btn")
                with gr.Accordion("Model and engine", open=True):
                    u.model = gr.Dropdown(models, value=self.model, label="Model", allow_custom_value=True,
                                          info="A registry model, a Hub id (owner/name) or a model folder")
                    u.engine = gr.Radio(ENGINES, value="auto", label="Engine",
                                        info="Auto picks Core ML where this Mac can run it, MLX otherwise")
                    with gr.Row():
                        u.precision = gr.Dropdown(list(PRECISION_CHOICES), value="auto",
                                                  label="Precision or quantization", min_width=140)
                        u.units = gr.Dropdown(UNITS, value="auto", label="Compute units (Core ML)", min_width=200)
                    u.t5 = gr.Checkbox(False, label="T5 text encoder (SD3 models)",
                                       info="Better prompt following and text in images, ~9.5 GB more at fp16 "
                                            "(19 GB at fp32). Off: its tokens are zeros, as in Apple's app")
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        u.scheduler = gr.Dropdown(scheduler_choices(), value="default", label="Scheduler")
                        u.steps = gr.Slider(1, 150, value=d["steps"], step=1, label="Steps", elem_id="steps")
                    with gr.Row():
                        u.width = gr.Slider(d["size_min"], 2048, value=d["width"], step=d["size_step"], label="Width")
                        u.height = gr.Slider(d["size_min"], 2048, value=d["height"], step=d["size_step"],
                                             label="Height")
                    with gr.Row(equal_height=True):
                        u.guidance = gr.Slider(0, 20, value=d["guidance"], step=0.5, label="Guidance")
                        u.seed = gr.Number(-1, label="Seed", precision=0, info="-1: a new random seed each run")
                    with gr.Row():
                        u.random = gr.Button("Random seed", size="sm")
                        u.reuse = gr.Button("Reuse last seed", size="sm")
                with gr.Accordion("Start image and inpainting", open=False):
                    u.editor = gr.ImageEditor(label="Start image: paint over what to repaint", type="pil",
                                              sources=["upload", "clipboard"], layers=False, transforms=(),
                                              brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff",
                                                             color_mode="fixed", default_size="auto"),
                                              height=320, elem_id="init-editor")
                    u.mask = gr.Image(label="Mask instead of painting (white = repaint)", type="pil",
                                      sources=["upload"], image_mode="L", height=140, elem_id="mask-upload")
                    with gr.Row():
                        u.strength = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Strength",
                                               info="How much changes (1: all)")
                        u.mask_blur = gr.Slider(0, 32, value=4, step=1, label="Mask feather (px)",
                                                info="0: a hard edge")
                    u.use_result = gr.Button("Use the shown image as start image", size="sm",
                                             elem_id="use-result")
                with gr.Accordion("LoRA", open=False):
                    found = lora_table()
                    u.loras = gr.Dataframe(found, datatype=["str", "str", "number"], interactive=True,
                                           static_columns=[0, 1], column_widths=["35%", "50%", "15%"], max_height=220,
                                           label=lora_label(found), elem_id="lora-table")
                    u.lora_refresh = gr.Button("Look for LoRA files again", size="sm")
            with gr.Column(scale=7, min_width=380):
                u.progress = gr.HTML(present.progress_html(), elem_id="progress")
                u.image = gr.Image(format="png", type="filepath", label="Image", interactive=False, height=440,
                                   buttons=["download", "fullscreen"], elem_id="result",
                                   elem_classes=["sd-px", "sd-fit"])
                u.stats = gr.HTML(present.empty_html("Time per stage, peak memory, weight size and the engine used "
                                                     "(and why) appear here after each image."), elem_id="stats")
        with gr.Row(equal_height=True):
            u.gallery = gr.Gallery(label="This session: click an image to restore its settings", format="png",
                                   columns=8, height=210, allow_preview=False, scale=5, elem_id="session-gallery",
                                   fit_columns=False, object_fit="contain", elem_classes=["sd-px"])
            u.drop = gr.Image(label="Drop a PNG made by this app", type="filepath", format="png",
                              sources=["upload"], height=210, scale=1, min_width=200)
        settings = [u.prompt, u.negative, u.model, u.engine, u.units, u.precision, u.scheduler, u.steps, u.guidance,
                    u.width, u.height, u.seed, u.t5]
        image_inputs = [u.editor, u.mask, u.strength, u.mask_blur, u.loras]
        gr.on([u.go.click, u.prompt.submit], self.arm, None, None, queue=False, **PRIVATE).then(
            self.generate_ui, settings + image_inputs + [u.history],
            [u.image, u.progress, u.stats, u.gallery, u.history, u.last_seed], show_progress_on=[u.progress],
            **ENGINE, **PRIVATE)
        u.stop.click(self.stop, None, gr.Textbox(visible=False, label="stop"), queue=False, api_name="stop")
        u.random.click(lambda: -1, None, u.seed, queue=False, **PRIVATE)
        u.reuse.click(lambda s: gr.skip() if s is None else s, u.last_seed, u.seed, queue=False, **PRIVATE)
        u.model.input(self.on_model_change, u.model, [u.steps, u.guidance, u.scheduler, u.width, u.height],
                      queue=False, **PRIVATE)
        restored = settings + [u.editor, u.strength, u.mask_blur, u.loras, u.progress]
        u.gallery.select(self.restore_from_gallery, [u.history, u.loras], restored + [u.image], queue=False,
                         **PRIVATE)
        u.drop.upload(self.restore, [u.drop, u.loras], restored, queue=False, **PRIVATE)
        u.use_result.click(lambda path: gr.skip() if not path else {"background": path, "layers": [],
                                                                      "composite": path},
                           u.image, u.editor, queue=False, **PRIVATE)
        u.lora_refresh.click(lambda: (lambda t: gr.update(value=t, label=lora_label(t)))(lora_table()),
                             None, u.loras, queue=False, **PRIVATE)
        return settings

    def _compare_tab(self, models, d):
        u = self.ui
        gr.HTML(f"<p class='sd-note'>{present.esc(compare.NOISE_NOTE)} PSNR and SSIM are measured against the "
                "fp16 image; the heatmap beside each image shows where it differs (×4).</p>")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                u.cmp_prompt = gr.Textbox(label="Prompt", lines=2, value=EXAMPLE_PROMPT)
                u.cmp_negative = gr.Textbox(label="Negative prompt", placeholder="Optional")
                u.cmp_model = gr.Dropdown(models, value=self.model, label="Model", allow_custom_value=True)
                u.cmp_variants = gr.CheckboxGroup([(v.label, v.key) for v in compare.VARIANTS],
                                                  value=list(compare.DEFAULT_SELECTION), label="Variants")
                with gr.Row():
                    u.cmp_seed = gr.Number(-1, label="Seed", precision=0, info="-1 picks one; then kept")
                    u.cmp_steps = gr.Slider(1, 150, value=d["steps"], step=1, label="Steps")
                with gr.Row():
                    u.cmp_go = gr.Button("Compare", variant="primary", scale=3)
                    u.cmp_stop = gr.Button("Stop", variant="stop", scale=1)
            with gr.Column(scale=8):
                u.cmp_status = gr.HTML(present.progress_html("idle", "Variants are rendered on demand and cached"),
                                       elem_id="compare-status")
                u.cmp_grid = gr.HTML(present.compare_grid_html(None, str), elem_id="compare-grid")
        with gr.Row():
            order = [v.label for v in compare.VARIANTS]
            u.cmp_plots = [gr.BarPlot(frame, x="variant", y=frame.columns[1], sort=order, y_lim=[0, None],
                                      title=title, height=240, x_title=" ")
                           for frame, title in zip(compare_frames(None), (
                               "Quality: PSNR vs fp16 (dB)", "Size: weights in memory (MB)",
                               "Time: seconds per image"))]
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=220):
                u.ab_a = gr.Dropdown([], label="A (left)")
                u.ab_b = gr.Dropdown([], label="B (right)")
            u.ab_slider = gr.ImageSlider(label="A / B: drag to compare", format="png", type="filepath", scale=3,
                                         max_height=420, elem_classes=["sd-px"])
        inputs = [u.cmp_prompt, u.cmp_negative, u.cmp_model, u.cmp_variants, u.cmp_seed, u.cmp_steps]
        u.cmp_go.click(self.arm, None, None, queue=False, **PRIVATE).then(
            self.compare_ui, inputs, [u.cmp_grid, u.cmp_state, u.cmp_seed, u.cmp_status, *u.cmp_plots, u.ab_a,
                                      u.ab_b, u.ab_slider], show_progress_on=[u.cmp_status], **ENGINE, **PRIVATE)
        u.cmp_stop.click(self.stop, None, None, queue=False, **PRIVATE)
        gr.on([u.ab_a.input, u.ab_b.input], self.ab_value, [u.cmp_state, u.ab_a, u.ab_b], u.ab_slider, queue=False,
              **PRIVATE)

    def _presenter_tab(self, settings):
        u = self.ui
        u.big = gr.HTML(present.big_numbers_html(None, None, 0), elem_id="big-numbers")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=340):
                u.p_prompt = gr.Textbox(label="Prompt", lines=2, value=EXAMPLE_PROMPT, elem_id="presenter-prompt")
                with gr.Row():
                    u.live_on = gr.Checkbox(label="Prompt-to-image as you type",
                                            info="For one- and few-step models (Turbo, LCM, the embedded model)")
                    u.live_steps = gr.Slider(1, 8, value=min(4, int(self.defaults["steps"])), step=1,
                                             label="Steps while typing")
                u.runs = gr.Slider(2, 20, value=5, step=1, label="Warm runs",
                                   info="One warm-up run first (not counted), then these, same prompt and seed")
                with gr.Row():
                    u.p_go = gr.Button("Run warm", variant="primary", scale=3)
                    u.p_stop = gr.Button("Stop", variant="stop", scale=1)
                u.p_status = gr.HTML(present.progress_html("idle", "Uses the model, engine and precision chosen on "
                                                                   "the Generate tab"), elem_id="presenter-status")
            with gr.Column(scale=7, min_width=340):
                u.p_image = gr.Image(format="png", label="Latest image", interactive=False, height=380,
                                     elem_classes=["sd-px", "sd-fit"])
        # one line over all runs: Gradio's plots drop streamed series whose color was not in the first value
        u.latency = gr.LinePlot(latency_frame([]), x="step", y="ms", title="Per-step latency across the warm runs",
                                x_title="step (all runs in order)", y_title="ms per step", y_lim=[0, None],
                                tooltip=["run", "step", "ms"], height=260)
        model_settings = [settings[2], settings[3], settings[4], settings[5]]  # model, engine, units, precision
        u.p_go.click(self.arm, None, None, queue=False, **PRIVATE).then(
            self.warm_runs, [u.p_prompt, u.runs, *model_settings], [u.p_status, u.latency, u.p_image, u.big],
            show_progress_on=[u.p_status], **ENGINE, **PRIVATE)
        u.p_stop.click(self.stop, None, None, queue=False, **PRIVATE)
        gr.on([u.p_prompt.change, u.live_on.change], self.live,
              [u.live_on, u.p_prompt, u.live_steps, *model_settings], [u.p_image, u.big], trigger_mode="always_last",
              show_progress="hidden", **ENGINE, **PRIVATE)

    def _models_tab(self):
        u = self.ui
        gr.HTML(self.models_note())
        hub = [(m.title, m.name) for m in registry.list_models() if m.hub]
        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("#### Download from the Hugging Face Hub")
                u.m_pick = gr.Dropdown(hub, value=hub[0][1] if hub else None, label="Model",
                                       allow_custom_value=True, info="Or type a Hub id: owner/name")
                u.m_download = gr.Button("Download", variant="primary")
                u.m_progress = gr.HTML(present.progress_html("idle", "Nothing downloading"))
                gr.Markdown("#### Add a model folder")
                u.m_folder = gr.Textbox(label="Folder", placeholder="/path/to/a/diffusers/model")
                u.m_name = gr.Textbox(label="Name (optional)")
                u.m_add = gr.Button("Add folder")
            with gr.Column():
                gr.Markdown("#### Cached models")
                u.m_table = gr.Dataframe(self.cached_table(), interactive=False, wrap=True, max_height=260)
                with gr.Row():
                    u.m_delete_pick = gr.Dropdown(self.cached_names(), label="Repository", scale=3)
                    u.m_delete = gr.Button("Delete", variant="stop", scale=1)
        gr.Markdown("#### Registry")
        u.m_registry = gr.Dataframe(self.registry_table(), interactive=False, wrap=True, max_height=460,
                                    column_widths=["13%", "23%", "22%", "17%", "15%", "10%"])
        u.m_download.click(self.download, u.m_pick, [u.m_progress, u.m_table, u.m_delete_pick],
                           show_progress_on=[u.m_progress], concurrency_id="download", concurrency_limit=1, **PRIVATE)
        u.m_delete.click(self.delete, u.m_delete_pick, [u.m_progress, u.m_table, u.m_delete_pick],
                         js="(repo) => (repo && confirm('Delete ' + repo + ' from the cache?')) ? repo : null",
                         **PRIVATE)
        u.m_add.click(self.add_folder, [u.m_folder, u.m_name], [u.m_progress, u.model, u.cmp_model, u.m_pick],
                      **PRIVATE)

    def _api(self, d):
        """Endpoints for scripts: /generate and /compare, the prompt first and every other argument defaulted."""
        with gr.Column(visible=False):
            gen_in = [gr.Textbox(None, label="prompt"), gr.Textbox("", label="negative_prompt"),
                      gr.Textbox(self.model, label="model"), gr.Textbox("auto", label="engine"),
                      gr.Textbox("auto", label="compute_units"), gr.Textbox("auto", label="precision"),
                      gr.Textbox("default", label="scheduler"), gr.Number(-1, label="steps", precision=0),
                      gr.Number(-1, label="guidance"), gr.Number(-1, label="width", precision=0),
                      gr.Number(-1, label="height", precision=0), gr.Number(-1, label="seed", precision=0),
                      gr.Checkbox(False, label="t5"), gr.Image(None, type="pil", label="init_image"),
                      gr.Number(-1, label="strength"), gr.Image(None, type="pil", image_mode="L", label="mask"),
                      gr.Number(0, label="mask_blur", precision=0), gr.Textbox("", label="loras")]
            gen_out = [gr.Image(format="png", type="filepath", label="image"), gr.JSON(label="measurements")]
            cmp_in = [gr.Textbox(None, label="prompt"), gr.Textbox("", label="negative_prompt"),
                      gr.Textbox(self.model, label="model"),
                      gr.CheckboxGroup([v.key for v in compare.VARIANTS], value=list(compare.DEFAULT_SELECTION),
                                       label="variants"),
                      gr.Number(-1, label="seed", precision=0), gr.Number(-1, label="steps", precision=0)]
            cmp_out = [gr.Gallery(format="png", label="images"), gr.JSON(label="measurements")]
            trigger = gr.Button(visible=False)
        trigger.click(self.generate_api, gen_in, gen_out, api_name="generate", **ENGINE)
        trigger.click(self.compare_api, cmp_in, cmp_out, api_name="compare", **ENGINE)


def launch(app: App, host: str = "127.0.0.1", port: int | None = None, share: bool = False, queue_size: int = 16,
           **kwargs):
    """Build and serve the app; returns (blocks, local_url)."""
    demo = app.build()
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    port = port or int(os.environ.get("GRADIO_SERVER_PORT", 7860))
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=present.CSS,
                            allowed_paths=[str(app.outputs.folder)], ssr_mode=False, footer_links=["api"],
                            favicon_path=None, **kwargs)
    return demo, url


def main(argv=None):
    p = argparse.ArgumentParser(description="Silicon Diffusion web app")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the engine")
    p.add_argument("--model", default="", help="the model selected at start (default: tiny-shapes)")
    p.add_argument("--cache-size", type=int, default=2, help="loaded pipelines kept in memory")
    a = p.parse_args(argv)
    launch(App(a.model, a.cache_size), a.host, a.port, a.share, a.queue_size)


if __name__ == "__main__":
    main()
