"""Silicon Diffusion's web app: Gradio widgets wired to backend/ (no model logic lives here).

    python app.py [--share] [--host 127.0.0.1] [--port 7860] [--queue-size 16] [--model NAME_OR_FOLDER]
                  [--allow-add-folder [local|any]]

Tabs: Generate, Compare, Presenter, Models; API endpoints /generate, /compare and /stop. One generation
runs at a time on the machine (every engine event shares one concurrency group, and backend.session
runs them on one engine thread); the others wait in a bounded queue and see their place in it.

Each tab's layout and handlers live in ui/ under the tab's name (ui/generate.py ...); this file puts them
together into one page with the API endpoints, and serves it.
"""
from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no analytics, no telemetry

import argparse  # noqa: E402

import backend  # noqa: E402,F401  (optimized BLAS before MLX)
import gradio as gr  # noqa: E402

from backend import compare, images  # noqa: E402
from backend.session import Retention  # noqa: E402
from ui import charts, gallery, present  # noqa: E402
from ui.common import ADD_FOLDER_MODES, ENGINE, RawNumber, UploadedImage, model_choices  # noqa: E402
from ui.compare import CompareTab  # noqa: E402
from ui.generate import GenerateTab  # noqa: E402
from ui.models import ModelsTab  # noqa: E402
from ui.presenter import PresenterTab  # noqa: E402

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="sky", neutral_hue="slate",
                       font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


class App(GenerateTab, CompareTab, PresenterTab, ModelsTab):
    """The whole app: the state and handlers of every tab (ui/), laid out in one page with the API endpoints."""

    def build(self) -> gr.Blocks:
        u, d = self.ui, self.defaults
        models = model_choices(self.model)
        with gr.Blocks(title="Silicon Diffusion") as demo:
            gr.HTML(present.header_html())
            u.history, u.last_seed, u.cmp_state = gr.State([]), gr.State(None), gr.State(None)
            with gr.Tabs():
                with gr.Tab("Generate", id="generate"):
                    settings = self.generate_tab(models, d)
                with gr.Tab("Compare", id="compare"):
                    self.compare_tab(models, d)
                with gr.Tab("Presenter", id="presenter"):
                    self.presenter_tab(settings)
                with gr.Tab("Models", id="models") as models_page:
                    self.models_tab(models_page)
            # the model lists as they are now (a folder added or a model downloaded since the server started)
            demo.load(self.model_lists, None, [u.model, u.cmp_model], queue=False, api_visibility="private")
            self._api(d)
            self.wire_reload(demo)  # the gallery the browser kept (ui/gallery.py)
            demo.unload(self.stop_quietly)  # a closed page stops its runs (and drops its waiting ones)
        return demo

    def _api(self, d):
        """Endpoints for scripts: /generate and /compare, the prompt first and every other argument defaulted."""
        with gr.Column(visible=False):
            gen_in = [gr.Textbox(None, label="prompt"), gr.Textbox("", label="negative_prompt"),
                      gr.Textbox(self.model, label="model"), gr.Textbox("auto", label="engine"),
                      gr.Textbox("auto", label="compute_units"), gr.Textbox("auto", label="precision"),
                      gr.Textbox("default", label="scheduler"), RawNumber(-1, label="steps"),
                      RawNumber(-1, label="guidance"), RawNumber(-1, label="width"),
                      RawNumber(-1, label="height"), RawNumber(-1, label="seed"),
                      gr.Checkbox(False, label="t5"), UploadedImage(None, label="init_image"),
                      RawNumber(-1, label="strength"), UploadedImage(None, label="mask"),
                      RawNumber(0, label="mask_blur"), gr.Textbox("", label="loras"),
                      RawNumber(1, label="batch_size")]
            gen_out = [gr.Image(format="png", type="filepath", label="image"), gr.JSON(label="measurements")]
            cmp_in = [gr.Textbox(None, label="prompt"), gr.Textbox("", label="negative_prompt"),
                      gr.Textbox(self.model, label="model"),
                      gr.CheckboxGroup([v.key for v in compare.VARIANTS], value=list(compare.DEFAULT_SELECTION),
                                       label="variants"),
                      RawNumber(-1, label="seed"), RawNumber(-1, label="steps")]
            cmp_out = [gr.Gallery(format="png", label="images"), gr.JSON(label="measurements")]
            trigger = gr.Button(visible=False)
        trigger.click(self.generate_api, gen_in, gen_out, api_name="generate", **ENGINE)
        trigger.click(self.compare_api, cmp_in, cmp_out, api_name="compare", **ENGINE)


STATE_SESSIONS = 200


def launch(app: App, host: str = "127.0.0.1", port: int | None = None, share: bool = False, queue_size: int = 16,
           **kwargs):
    """Build and serve the app; returns (blocks, local_url)."""
    app.shared = share  # behind a public link every client counts as remote (adding folders: ui/models.py)
    # Uploads and the files the page shows live in the app's one folder (its retention policy bounds it), and an
    # image is served from where it was saved instead of being copied to Gradio's temp folder.
    app.outputs.folder.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(app.outputs.folder)
    demo = app.build()
    # Gradio keeps each session's component state, and every API call is a session of its own: at its default of
    # 10000 sessions, 500 API calls in a row grew the server by ~25 KB each. The oldest idle ones go beyond this.
    demo.state_session_capacity = STATE_SESSIONS
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    say_when_full(demo, queue_size)
    port = port or int(os.environ.get("GRADIO_SERVER_PORT", 7860))
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, theme=THEME,
                            css=present.CSS + gallery.CSS + charts.CSS, head=present.SHORTCUTS + gallery.TOOLTIPS,
                            allowed_paths=[str(app.outputs.folder)], ssr_mode=False, footer_links=["api"],
                            favicon_path=None, max_file_size=images.MAX_FILE_BYTES, **kwargs)
    return demo, url


def say_when_full(demo: gr.Blocks, queue_size: int) -> None:
    """A request refused because the queue is full gets the app's sentence instead of Gradio's
    "Queue is full. Max size is 16 and size is 16." (gradio.queueing.Queue.push's answer)."""
    queue, push = demo._queue, demo._queue.push

    async def push_or_refuse(*args, **kwargs):
        ok, message, kind = await push(*args, **kwargs)
        if kind == "queue_full":
            message = (f"The queue is full ({queue_size} requests are waiting for the engine): try again in a "
                       "minute.")
        return ok, message, kind

    queue.push = push_or_refuse


def main(argv=None):
    p = argparse.ArgumentParser(description="Silicon Diffusion web app")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the engine")
    p.add_argument("--model", default="", help="the model selected at start (default: tiny-shapes)")
    p.add_argument("--cache-size", type=int, default=2, help="loaded pipelines kept in memory")
    p.add_argument("--allow-large", action="store_true",
                   help="allow image sizes beyond twice a model's native size (up to what its denoiser takes)")
    p.add_argument("--allow-add-folder", nargs="?", const="local", default="off", choices=ADD_FOLDER_MODES,
                   metavar="local|any",
                   help="let the Models tab add model folders of this machine: 'local' (the option alone) from "
                        "a browser on this machine only (loopback, no public link), 'any' from every client that "
                        "reaches the server (default: off)")
    p.add_argument("--keep-files", type=int, default=Retention.files, metavar="N",
                   help=f"files the app's folder keeps: images, kept start images, uploads (default {Retention.files}; "
                        "the oldest are deleted first)")
    p.add_argument("--keep-gb", type=float, default=Retention.bytes / 2**30, metavar="GB",
                   help=f"the most the app's folder holds in GiB (default {Retention.bytes / 2**30:g})")
    a = p.parse_args(argv)
    if a.keep_files < 1 or not a.keep_gb > 0:
        p.error("--keep-files must be 1 or more and --keep-gb above 0")
    app = App(a.model, a.cache_size, a.allow_large, add_folder=a.allow_add_folder)
    app.outputs.retention = Retention(files=a.keep_files, bytes=int(a.keep_gb * 2**30))
    launch(app, a.host, a.port, a.share, a.queue_size)


if __name__ == "__main__":
    main()
