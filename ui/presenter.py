"""The Presenter tab: warm runs with big numbers and per-step latency, and prompt-to-image as you type, on
the model, engine and precision chosen on the Generate tab."""
from __future__ import annotations

import gradio as gr

from backend.types import UserError
from ui import charts, present
from ui.common import ENGINE, EXAMPLE_PROMPT, PRIVATE, AppBase, make_request


def _mean(values):
    return sum(values) / len(values) if values else None


def latency_chart(rows: list) -> str:
    """Per-step latency over every warm run, in order (rows: step, ms, run)."""
    return charts.line_chart_html("Per-step latency across the warm runs",
                                  [(r["step"], r["ms"], r["run"]) for r in rows], "ms",
                                  "step (all runs in order; dashed: a new run)")


class PresenterTab(AppBase):
    """The Presenter tab's handlers and layout."""

    def warm_runs(self, prompt, runs, model, engine, units, precision, request: gr.Request):
        u = self.ui
        stop = self._signal(request, fresh=False)
        rows, totals, rates = [], [], []
        req = make_request(prompt or EXAMPLE_PROMPT, "", None, None, None, None, None, 0)
        try:
            for run in range(int(runs) + 1):  # run 0 warms up (loads, first-call setup) and is not counted
                label = "warm-up" if run == 0 else f"run {run}"
                for ev in self._stream(model, engine, units, precision, req, stop, min_interval=0.1):
                    if ev.kind == "status":
                        yield {u.p_status: present.progress_html("loading", f"{label}: {ev.message}", run, int(runs),
                                                                 unit="run")}
                    elif ev.kind == "step" and run > 0:
                        live = [{"step": len(rows) + 1, "ms": 1000 * ev.step.seconds, "run": label}]
                        yield {u.latency: latency_chart(rows + live)}
                    elif ev.kind == "done":
                        t = ev.result.timings
                        if run > 0:
                            totals.append(t.total)
                            rates.append(t.steps_per_second)
                            rows += [{"step": len(rows) + i + 1, "ms": 1000 * s, "run": label}
                                     for i, s in enumerate(t.steps)]
                        yield {u.p_status: present.progress_html("running", f"{label} done", run, int(runs),
                                                                 unit="run"),
                               u.latency: latency_chart(rows),
                               u.p_image: ev.result.image,
                               u.big: present.big_numbers_html(_mean(totals), _mean(rates), len(totals))}
                    elif ev.kind in ("stopped", "error"):
                        yield {u.p_status: present.progress_html(ev.kind, ev.message)}
                        return
            yield {u.p_status: present.progress_html("done", f"{present.plural(len(totals), 'warm run')}, seed 0",
                                                     len(totals),
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
            req = make_request(prompt, "", None, steps, None, None, None, 0)
            for ev in self._stream(model, engine, units, precision, req, None):
                if ev.kind == "done":
                    t = ev.result.timings
                    return ev.result.image, present.big_numbers_html(t.total, t.steps_per_second, len(t.steps),
                                                                     "step", ", as you type")
                if ev.kind in ("stopped", "error"):
                    return gr.skip(), present.progress_html("error", ev.message)
        except UserError as exc:
            return gr.skip(), present.progress_html("error", str(exc))
        return gr.skip(), gr.skip()

    def presenter_tab(self, settings):
        """The tab's layout and events; `settings` are the Generate tab's (its model, engine, units, precision)."""
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
        u.latency = gr.HTML(latency_chart([]), elem_id="latency-chart")
        model_settings = [settings[2], settings[3], settings[4], settings[5]]  # model, engine, units, precision
        u.p_go.click(self.arm, None, None, queue=False, **PRIVATE).then(
            self.warm_runs, [u.p_prompt, u.runs, *model_settings], [u.p_status, u.latency, u.p_image, u.big],
            show_progress_on=[u.p_status], **ENGINE, **PRIVATE)
        u.p_stop.click(self.stop_quietly, None, None, queue=False, **PRIVATE)
        gr.on([u.p_prompt.change, u.live_on.change], self.live,
              [u.live_on, u.p_prompt, u.live_steps, *model_settings], [u.p_image, u.big], trigger_mode="always_last",
              show_progress="hidden", **ENGINE, **PRIVATE)
