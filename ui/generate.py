"""The Generate tab: prompt, model and engine, sampling, start image and inpainting, LoRA; the result with its
progress (time left included) and measurements; a batch's grid; the gallery (ui/gallery.py) and PNG drop that
restore settings. Also the /generate API's handler and the /stop endpoint."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from backend.engines import machine
from backend.png import read_parameters
from backend.session import PRECISION_CHOICES, model_defaults, preview_image, prompt_help, request_settings
from backend.types import UserError
from ui import cpu_speed, present
from ui.common import ENGINE, EXAMPLE_PROMPT, PRIVATE, RawSlider, UploadedImage, make_request, number
from ui.gallery import GalleryPart, gallery_value
from ui.generate_inputs import image_fields, lora_label, lora_table, lora_table_update, restore_lora_scales

ENGINES = [("Auto", "auto"), ("Core ML", "coreml"), ("MLX", "mlx")]
UNITS = [("Auto (Apple's choice)", "auto"), ("All (CPU, GPU, ANE)", "ALL"), ("CPU and Neural Engine", "CPU_AND_NE"),
         ("CPU and GPU", "CPU_AND_GPU"), ("CPU only", "CPU_ONLY")]
PREVIEWS = [("Off", "off"), ("Fast: latent colours", "fast"), ("Sharp: tiny VAE", "sharp")]  # backend/preview.py
SETTING_NAMES = ("prompt", "negative_prompt", "model", "engine", "compute_units", "precision", "scheduler", "steps",
                 "guidance", "width", "height", "seed", "t5")


def scheduler_choices(names=None) -> list:
    """The dropdown's choices: `names` (a model's schedulers), else every scheduler."""
    from backend.schedulers import FLOW_SCHEDULERS, SCHEDULERS
    names = names or SCHEDULERS + FLOW_SCHEDULERS
    return [("Model default", "default")] + [(name.replace("_", " "), name) for name in names]


class GenerateTab(GalleryPart):
    """The Generate tab's handlers and layout, and the /generate API's handler."""

    def generate_ui(self, prompt, negative, model, engine, units, precision, scheduler, steps, guidance, width,
                    height, seed, t5, editor, mask, strength, mask_blur, loras, batch, history,
                    preview_mode="fast", preview_every=1, request: gr.Request = None):
        u = self.ui
        stop = self._signal(request, fresh=False)  # armed by the click: a Stop while queued counts
        try:
            req = make_request(prompt, negative, scheduler, steps, guidance, width, height, seed,
                               batch_size=int(batch or 1), **image_fields(editor, mask, strength, mask_blur, loras),
                               preview=preview_mode or "fast", preview_every=int(preview_every or 1))
            size = (req.width or self.defaults["width"], req.height or self.defaults["height"])
            pipe = None
            for ev in self._stream(model, engine, units, precision, req, stop, t5=t5):
                if ev.kind == "status":
                    if ev.pipeline is not None:  # loaded: previews take the model's own size
                        native = ev.pipeline.spec.native_size
                        size, pipe = (req.width or native, req.height or native), ev.pipeline
                    yield {u.progress: present.progress_html("loading", ev.message)}
                elif ev.kind == "step":
                    s = ev.step
                    yield {u.image: preview_image(s, *size) if s.preview is not None else gr.skip(),
                           u.progress: present.progress_html("running", "Denoising", s.step, s.total,
                                                             ev.steps_per_second, eta=present.eta_seconds(
                                                                 s.step, s.total, ev.denoise_seconds,
                                                                 self.decode_estimate(pipe, size, req.batch_size)))}
                elif ev.kind == "done":
                    r = ev.result
                    self.remember_decode(pipe, size, r)
                    items, history = self.save_images(r, req, history)
                    t = r.timings
                    grid = gallery_value(items) if len(items) > 1 else []
                    yield {u.image: items[0]["path"], u.history: history, u.last_seed: r.seed,
                           u.gallery: gallery_value(history), u.saved_history: [h["path"] for h in history],
                           u.batch_grid: gr.update(value=grid, visible=bool(grid)), u.batch_items: items,
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
                     loras="", batch_size=1, request: gr.Request = None, progress=gr.Progress()):
        """Text to image, or image to image with `init_image` (and inpainting with `mask`: white = repaint),
        with LoRAs as in the CLI ("file.safetensors:0.8, other.safetensors") and `batch_size` images (seed,
        seed + 1, ...): the first PNG (its `parameters` text chunk reproduces it) and the measurements as JSON, with
        every image's path and seed under "images" and "seeds"."""
        from backend.lora_files import parse_lora_list
        stop = self._signal(request, fresh=True)
        try:
            # without an init image, a mask, strength or blur is refused (backend/images.py), not ignored
            fields = {"loras": parse_lora_list(loras), "init_image": init_image or None, "mask": mask or None,
                      "strength": number(strength, "strength"),
                      "mask_blur": number(mask_blur, "mask blur", whole=True) or 0}
            req = make_request(prompt, negative_prompt, scheduler, steps, guidance, width, height, seed,
                               batch_size=number(batch_size, "batch size", whole=True) or 1, **fields)
            for ev in self._stream(model, engine, compute_units, precision, req, stop, min_interval=0.1, t5=bool(t5)):
                if ev.kind == "status":
                    progress(0, desc=ev.message)
                elif ev.kind == "step":
                    progress((ev.step.step, ev.step.total), desc="denoising", unit="steps")
                    # a generator, so that a cancelled job (a client gone) closes this run at its next step
                    # event (the stream's end stops the engine: session.stream_generation), instead of the
                    # engine finishing for no one
                    yield None, None  # not gr.skip(): Gradio builds (and keeps) a component for every update
                elif ev.kind == "done":
                    r = ev.result
                    # a batch: every image saved with its own seed (backend/seeds.py); the first is the output
                    paths = [str(self.outputs.save(image, r.image_parameters(i))) for i, image in enumerate(r.images)]
                    yield paths[0], {**r.measurements(), "images": paths, "seeds": list(r.seeds or [r.seed])}
                    return
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

    def remember_decode(self, pipe, size, result) -> None:
        """The VAE decode's time per image, by pipeline and size: the next run's ETA counts it."""
        if pipe is not None and result.images:
            self.__dict__.setdefault("_decodes", {})[(id(pipe), *size)] = result.timings.vae_decode / len(
                result.images)

    def decode_estimate(self, pipe, size, batch: int):
        """Seconds the decode of `batch` images should take, from the last run of this pipeline at this size."""
        per_image = self.__dict__.get("_decodes", {}).get((id(pipe), *size))
        return None if per_image is None else per_image * batch

    @staticmethod
    def on_model_change(model):
        d = model_defaults(model)
        if not d:
            return [gr.skip()] * 5
        size = dict(minimum=d["size_min"], step=d["size_step"])
        return [d["steps"], d["guidance"], gr.update(choices=scheduler_choices(d["schedulers"]), value="default"),
                gr.update(value=d["width"], **size), gr.update(value=d["height"], **size)]

    def generate_tab(self, models, d) -> list:
        """The tab's layout and events; returns its settings widgets (the Presenter tab runs on them)."""
        u = self.ui
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=340):
                u.prompt = gr.Textbox(label="Prompt", lines=3, value=EXAMPLE_PROMPT, elem_id="prompt",
                                      placeholder="Describe the image")
                u.prompt_help = gr.HTML(present.prompt_help_html(prompt_help(self.model, EXAMPLE_PROMPT)),
                                        elem_id="prompt-help")
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
                                                  label="Precision or quantization", min_width=140,
                                                  elem_id="precision")
                        blocked = machine.coreml_unavailable_reason()  # the control does nothing here: say why
                        u.units = gr.Dropdown(UNITS, value="auto", label="Compute units (Core ML)", min_width=200,
                                              interactive=blocked is None, elem_id="units",
                                              info=f"Off here: {blocked}" if blocked else None)
                    slow = cpu_speed.note()  # on a CPU: how much slower than fp32 each choice was measured
                    u.precision_note = gr.HTML(present.note_html(slow) if slow else "", elem_id="precision-note",
                                               visible=bool(slow))
                    u.t5 = gr.Checkbox(False, label="T5 text encoder (SD3 models)",
                                       info="Better prompt following and text in images, ~9.5 GB more at fp16 "
                                            "(19 GB at fp32). Off: its tokens are zeros, as in Apple's app")
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        u.scheduler = gr.Dropdown(scheduler_choices(), value="default", label="Scheduler")
                        u.steps = RawSlider(1, 150, value=d["steps"], step=1, label="Steps", elem_id="steps")
                    with gr.Row():
                        u.width = RawSlider(d["size_min"], 2048, value=d["width"], step=d["size_step"], label="Width")
                        u.height = RawSlider(d["size_min"], 2048, value=d["height"], step=d["size_step"],
                                             label="Height")
                    with gr.Row(equal_height=True):
                        u.guidance = RawSlider(0, 20, value=d["guidance"], step=0.5, label="Guidance")
                        u.seed = gr.Textbox("-1", label="Seed", max_lines=1, elem_id="seed",
                                            info="-1: a new random seed each run (any whole number to 2^64 - 1)")
                    with gr.Row():
                        u.random = gr.Button("Random seed", size="sm")
                        u.reuse = gr.Button("Reuse last seed", size="sm")
                    with gr.Row():  # the predicted final image, shown while the steps run
                        u.preview_mode = gr.Dropdown(PREVIEWS, value="fast", label="Live preview",
                                                     elem_id="preview-mode",
                                                     info="Sharp decodes with a tiny VAE (downloaded once; "
                                                          "seconds at 512² on a CPU: preview less often there)")
                        u.preview_every = gr.Slider(1, 20, value=1, step=1, label="Preview every N steps",
                                                    elem_id="preview-every")
                    u.batch = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="batch",
                                        info="Images per run, shown as a grid; image i has seed + i, which "
                                             "reproduces it alone")
                with gr.Accordion("Start image and inpainting", open=False):
                    u.editor = gr.ImageEditor(label="Start image: paint over what to repaint", type="filepath",
                                              sources=["upload", "clipboard"], layers=False, transforms=(),
                                              brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff",
                                                             color_mode="fixed", default_size="auto"),
                                              height=320, elem_id="init-editor")
                    u.mask = UploadedImage(label="Mask instead of painting (white = repaint)", sources=["upload"],
                                           height=140, elem_id="mask-upload")
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
                u.batch_grid = gr.Gallery(label="This batch: click an image to show it and its settings",
                                          format="png", columns=4, height="auto", allow_preview=False,
                                          visible=False, object_fit="contain", elem_id="batch-grid",
                                          elem_classes=["sd-px", "sd-thumbs"])
                u.batch_items = gr.State([])
                u.stats = gr.HTML(present.empty_html("Time per stage, peak memory, weight size and the engine used "
                                                     "(and why) appear here after each image."), elem_id="stats")
        self.gallery_row()
        settings = [u.prompt, u.negative, u.model, u.engine, u.units, u.precision, u.scheduler, u.steps, u.guidance,
                    u.width, u.height, u.seed, u.t5]
        image_inputs = [u.editor, u.mask, u.strength, u.mask_blur, u.loras]
        gr.on([u.go.click, u.prompt.submit], self.arm, None, None, queue=False, **PRIVATE).then(
            self.generate_ui, settings + image_inputs + [u.batch, u.history, u.preview_mode, u.preview_every],
            [u.image, u.progress, u.stats, u.gallery, u.history, u.last_seed, u.saved_history, u.batch_grid,
             u.batch_items], show_progress_on=[u.progress],
            **ENGINE, **PRIVATE)
        u.stop.click(self.stop, None, gr.Textbox(visible=False, label="stop"), queue=False, api_name="stop")
        u.random.click(lambda: -1, None, u.seed, queue=False, **PRIVATE)
        u.reuse.click(lambda s: gr.skip() if s is None else s, u.last_seed, u.seed, queue=False, **PRIVATE)
        gr.on([u.prompt.change, u.model.input], lambda model, prompt: present.prompt_help_html(
            prompt_help(model, prompt)), [u.model, u.prompt], u.prompt_help, queue=False, show_progress="hidden",
            **PRIVATE)
        u.model.input(self.on_model_change, u.model, [u.steps, u.guidance, u.scheduler, u.width, u.height],
                      queue=False, **PRIVATE)
        restored = settings + [u.editor, u.strength, u.mask_blur, u.loras, u.progress]
        self.wire_gallery(restored)
        u.drop.upload(self.restore, [u.drop, u.loras], restored, queue=False, **PRIVATE)
        u.use_result.click(lambda path: gr.skip() if not path else {"background": path, "layers": [],
                                                                      "composite": path},
                           u.image, u.editor, queue=False, **PRIVATE)
        u.lora_refresh.click(lora_table_update, None, u.loras, queue=False, **PRIVATE)
        return settings
