"""Silicon Diffusion's web app: Gradio widgets wired to backend/ (no model logic lives here).

    python app.py [--share] [--host 127.0.0.1] [--port 7860] [--queue-size 16] [--model NAME_OR_FOLDER]

Tabs: Generate, Compare, Presenter, Models; API endpoints /generate, /compare and /stop. One generation
runs at a time on the machine (every engine event shares one concurrency group, and backend.session
holds an engine lock); the others wait in a bounded queue and see their place in it.

Each tab's layout and handlers live in ui/ under the tab's name (ui/generate.py ...); this file puts them
together into one page with the API endpoints, and serves it.
"""
from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no analytics, no telemetry

import argparse  # noqa: E402

import backend  # noqa: E402,F401  (optimized BLAS before MLX)
import gradio as gr  # noqa: E402

from backend import compare  # noqa: E402
from ui import present  # noqa: E402
from ui.common import ENGINE, model_choices  # noqa: E402
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
            self._api(d)
        return demo

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
                            head=present.SHORTCUTS,
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
    p.add_argument("--allow-large", action="store_true",
                   help="allow image sizes beyond twice a model's native size (up to what its denoiser takes)")
    a = p.parse_args(argv)
    launch(App(a.model, a.cache_size, a.allow_large), a.host, a.port, a.share, a.queue_size)


if __name__ == "__main__":
    main()
