"""The Compare tab: one prompt and seed across precisions, quantizations and engines, with PSNR/SSIM against
fp16, heatmaps, bar charts and an A/B slider. Also the /compare API's handler."""
from __future__ import annotations

import math

import gradio as gr

from backend import compare
from backend.types import UserError
from ui import charts, present
from ui.common import ENGINE, EXAMPLE_PROMPT, PRIVATE, AppBase, number


def compare_charts(state) -> list:
    """PSNR, weight size and seconds per finished variant, in the fixed variant order, as three bar charts (the
    variants finished before a Stop keep theirs)."""
    done = [r for r in state.results if r.status == "done"] if state is not None else []
    quality = [(r.label, r.psnr) for r in done if r.psnr is not None and math.isfinite(r.psnr)]
    return [charts.bar_chart_html("Quality: PSNR vs fp16 (dB)", quality, lambda v: f"{v:.1f} dB"),
            charts.bar_chart_html("Size: weights in memory (MB)",
                                  [(r.label, (r.weight_bytes or r.disk_bytes) / 1e6) for r in done],
                                  lambda v: f"{v:.3g} MB"),
            charts.bar_chart_html("Time: seconds per image", [(r.label, r.seconds) for r in done],
                                  present.fmt_seconds)]


def compare_progress(state) -> str:
    """The status bar: variants finished (rendered or failed) of those ticked; a stopped run stays where it was."""
    finished = sum(r.status in ("done", "error") for r in state.results)
    stopped = state.finished and any(r.status == "skipped" for r in state.results)
    kind = "stopped" if stopped else "done" if state.finished else "running"
    return present.progress_html(kind, state.message, finished, len(state.results), unit="variant")


def _or(value, default):
    return default if value is None else value


class CompareTab(AppBase):
    """The Compare tab's handlers and layout, and the /compare API's handler."""

    def _compare(self, prompt, negative, model, keys, seed, steps, stop):
        settings = compare.CompareSettings(prompt=prompt or "", model=model or self.model,
                                           seed=_or(number(seed, "seed", whole=True), -1),
                                           negative_prompt=negative or "", steps=number(steps, "steps", whole=True))
        return compare.run_compare(self.pipelines, settings, keys, self.variants, self.outputs, stop)

    def compare_ui(self, prompt, negative, model, keys, seed, steps, request: gr.Request):
        u = self.ui
        stop = self._signal(request, fresh=False)
        try:
            for state in self._compare(prompt, negative, model, keys, seed, steps, stop):
                out = {u.cmp_grid: present.compare_grid_html(state, lambda p: f"gradio_api/file={p}"),
                       u.cmp_state: state, u.cmp_seed: state.seed, u.cmp_status: compare_progress(state)}
                out.update(zip(u.cmp_plots, compare_charts(state)))
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

    def compare_tab(self, models, d):
        """The tab's layout and events."""
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
                    u.cmp_seed = gr.Textbox("-1", label="Seed", info="-1 picks one; then kept", max_lines=1)
                    u.cmp_steps = gr.Slider(1, 150, value=d["steps"], step=1, label="Steps")
                with gr.Row():
                    u.cmp_go = gr.Button("Compare", variant="primary", scale=3)
                    u.cmp_stop = gr.Button("Stop", variant="stop", scale=1)
            with gr.Column(scale=8):
                u.cmp_status = gr.HTML(present.progress_html("idle", "Variants are rendered on demand and cached"),
                                       elem_id="compare-status")
                u.cmp_grid = gr.HTML(present.compare_grid_html(None, str), elem_id="compare-grid")
        with gr.Row():
            u.cmp_plots = [gr.HTML(chart, elem_id=f"compare-chart-{i}")
                           for i, chart in enumerate(compare_charts(None))]
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
        u.cmp_stop.click(self.stop_quietly, None, None, queue=False, **PRIVATE)
        gr.on([u.ab_a.input, u.ab_b.input], self.ab_value, [u.cmp_state, u.ab_a, u.ab_b], u.ab_slider, queue=False,
              **PRIVATE)
