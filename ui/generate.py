"""The Generate tab: prompt, model and engine, sampling, start image and inpainting, LoRA; the result with its
progress and measurements; the session gallery and PNG drop that restore settings. Also the /generate API's
handler and the /stop endpoint."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from backend.engines import machine
from backend.png import read_parameters
from backend.session import PRECISION_CHOICES, model_defaults, preview_image, prompt_help, request_settings
from backend.types import UserError
from ui import present
from ui.common import ENGINE, EXAMPLE_PROMPT, PRIVATE, AppBase, make_request, opt
from ui.generate_inputs import image_fields, lora_label, lora_table, lora_table_update, restore_lora_scales

ENGINES = [("Auto", "auto"), ("Core ML", "coreml"), ("MLX", "mlx")]
UNITS = [("Auto (Apple's choice)", "auto"), ("All (CPU, GPU, ANE)", "ALL"), ("CPU and Neural Engine", "CPU_AND_NE"),
         ("CPU and GPU", "CPU_AND_GPU"), ("CPU only", "CPU_ONLY")]
SETTING_NAMES = ("prompt", "negative_prompt", "model", "engine", "compute_units", "precision", "scheduler", "steps",
                 "guidance", "width", "height", "seed", "t5")


def scheduler_choices(names=None) -> list:
    """The dropdown's choices: `names` (a model's schedulers), else every scheduler."""
    from backend.schedulers import FLOW_SCHEDULERS, SCHEDULERS
    names = names or SCHEDULERS + FLOW_SCHEDULERS
    return [("Model default", "default")] + [(name.replace("_", " "), name) for name in names]


class GenerateTab(AppBase):
    """The Generate tab's handlers and layout, and the /generate API's handler."""

    def generate_ui(self, prompt, negative, model, engine, units, precision, scheduler, steps, guidance, width,
                    height, seed, t5, editor, mask, strength, mask_blur, loras, history, request: gr.Request):
        u = self.ui
        stop = self._signal(request, fresh=False)  # armed by the click: a Stop while queued counts
        try:
            req = make_request(prompt, negative, scheduler, steps, guidance, width, height, seed,
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
                fields.update(init_image=init_image, mask=mask or None, strength=opt(strength, float),
                              mask_blur=int(mask_blur or 0))
            elif mask:
                raise UserError("a mask needs a start image (init_image)")
            req = make_request(prompt, negative_prompt, scheduler, steps, guidance, width, height, seed, **fields)
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
                                                  label="Precision or quantization", min_width=140)
                        blocked = machine.coreml_unavailable_reason()  # the control does nothing here: say why
                        u.units = gr.Dropdown(UNITS, value="auto", label="Compute units (Core ML)", min_width=200,
                                              interactive=blocked is None, elem_id="units",
                                              info=f"Off here: {blocked}" if blocked else None)
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
        gr.on([u.prompt.change, u.model.input], lambda model, prompt: present.prompt_help_html(
            prompt_help(model, prompt)), [u.model, u.prompt], u.prompt_help, queue=False, show_progress="hidden",
            **PRIVATE)
        u.model.input(self.on_model_change, u.model, [u.steps, u.guidance, u.scheduler, u.width, u.height],
                      queue=False, **PRIVATE)
        restored = settings + [u.editor, u.strength, u.mask_blur, u.loras, u.progress]
        u.gallery.select(self.restore_from_gallery, [u.history, u.loras], restored + [u.image], queue=False,
                         **PRIVATE)
        u.drop.upload(self.restore, [u.drop, u.loras], restored, queue=False, **PRIVATE)
        u.use_result.click(lambda path: gr.skip() if not path else {"background": path, "layers": [],
                                                                      "composite": path},
                           u.image, u.editor, queue=False, **PRIVATE)
        u.lora_refresh.click(lora_table_update, None, u.loras, queue=False, **PRIVATE)
        return settings
