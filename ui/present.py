"""How measurements look in the app: the progress bar, the timing / memory / engine panel with its stage
chart, the compare grid's cells and the presenter's big numbers, as small self-contained HTML (styled by CSS).

Pure functions of results; no Gradio, no model code.
"""
from __future__ import annotations

import html
import math
from typing import Callable, Optional

from backend.types import GenerationResult

STAGES = (("load", "Load", "#94a3b8"), ("text_encoder", "Text encoding", "#38bdf8"),
          ("denoise", "Denoising", "#6366f1"), ("vae_decode", "Decode", "#f472b6"))

#: Ctrl+Enter (Cmd+Enter on a Mac) generates from anywhere on the Generate tab, as in other image tools
SHORTCUTS = """<script>
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    const button = document.querySelector("#generate-btn");
    if (button && button.offsetParent !== null) { e.preventDefault(); button.click(); }
  }
});
</script>"""

CSS = """
.sd-header {display:flex; align-items:center; gap:14px; padding:6px 2px 2px;}
.sd-logo {width:38px; height:38px; border-radius:10px; flex:none;
  background:conic-gradient(from 200deg, #6366f1, #38bdf8, #f472b6, #6366f1);}
.sd-header h1 {font-size:1.45rem; margin:0; font-weight:700; letter-spacing:-0.01em;}
.sd-header p {margin:0; opacity:.7; font-size:.9rem;}
.sd-progress {border:1px solid var(--border-color-primary); border-radius:10px; padding:10px 12px;
  background:var(--block-background-fill);}
.sd-progress .row {display:flex; justify-content:space-between; font-size:.85rem; margin-bottom:6px; gap:8px;}
.sd-progress .msg {opacity:.8; overflow:hidden; text-overflow:ellipsis; white-space:nowrap;}
.sd-track {height:8px; border-radius:99px; background:var(--border-color-primary); overflow:hidden;}
.sd-fill {height:100%; border-radius:99px; background:linear-gradient(90deg,#6366f1,#38bdf8); transition:width .15s;}
.sd-progress.done .sd-fill {background:#22c55e;} .sd-progress.stopped .sd-fill {background:#f59e0b;}
.sd-progress.idle .msg {white-space:normal;}
.sd-progress.error {border-color:#ef4444;} .sd-progress.error .msg {color:#ef4444; opacity:1; white-space:normal;}
.sd-stats {display:grid; grid-template-columns:repeat(3, minmax(0,1fr)); gap:8px; font-size:.85rem;}
.sd-card {border:1px solid var(--border-color-primary); border-radius:10px; padding:8px 10px;
  background:var(--block-background-fill); min-width:0;}
.sd-card .k {font-size:.72rem; text-transform:uppercase; letter-spacing:.04em; opacity:.65;}
.sd-card .v {font-size:1.15rem; font-weight:650; font-variant-numeric:tabular-nums;}
.sd-card .s {font-size:.75rem; opacity:.7; overflow-wrap:anywhere;}
.sd-wide {grid-column:1 / -1;}
.sd-bar {display:flex; height:14px; border-radius:6px; overflow:hidden; margin:6px 0 4px;
  background:var(--border-color-primary);}
.sd-legend {display:flex; flex-wrap:wrap; gap:4px 12px; font-size:.75rem;}
.sd-legend i {display:inline-block; width:9px; height:9px; border-radius:2px; margin-right:4px;}
.sd-spark {width:100%; height:34px; display:block;}
.sd-warn {color:#b45309; font-size:.8rem;}
.sd-empty {opacity:.6; font-size:.9rem; padding:14px; text-align:center; border:1px dashed var(--border-color-primary);
  border-radius:10px;}
.sd-grid {display:grid; grid-template-columns:repeat(auto-fill, minmax(210px, 1fr)); gap:12px;}
.sd-cell {border:1px solid var(--border-color-primary); border-radius:12px; padding:8px; background:var(--block-background-fill);}
.sd-cell h4 {margin:0 0 6px; font-size:.9rem;}
.sd-cell .pair {display:grid; grid-template-columns:1fr 1fr; gap:6px;}
.sd-cell img {width:100%; aspect-ratio:1; object-fit:contain; border-radius:6px; background:#0b0b0f;
  image-rendering:auto;}
.sd-cell .cap {font-size:.76rem; line-height:1.45; margin-top:6px; font-variant-numeric:tabular-nums;}
.sd-cell .err {color:#ef4444; font-size:.8rem; overflow-wrap:anywhere;}
.sd-cell .wait {height:90px; display:flex; align-items:center; justify-content:center; opacity:.6; font-size:.85rem;}
.sd-cell.running {border-color:#6366f1;}
.sd-big {display:grid; grid-template-columns:repeat(3, minmax(0,1fr)); gap:12px;}
.sd-big div {border:1px solid var(--border-color-primary); border-radius:14px; padding:16px 18px;
  background:var(--block-background-fill);}
.sd-big b {display:block; font-size:clamp(1.25rem, 6vw, 3.2rem); line-height:1.05; font-weight:750;
           font-variant-numeric:tabular-nums; white-space:nowrap;}
@media (max-width: 520px) {.sd-big {gap:8px;} .sd-big div {padding:10px 10px;}}
.sd-big span {opacity:.7; font-size:.9rem;}
.sd-note {font-size:.85rem; opacity:.8;}
.sd-info {border-left:3px solid #6366f1; padding:8px 12px; border-radius:6px; font-size:.88rem;
  background:var(--block-background-fill);}
.sd-info.warn {border-left-color:#f59e0b;}
.sd-px img {image-rendering:pixelated;}
.sd-fit img {width:100%; height:100%; object-fit:contain;}
.sd-cell img.px {image-rendering:pixelated;}
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def fmt_defaults(defaults: dict) -> str:
    """A registry entry's default settings in one short line ("28 steps, guidance 7, flow euler, 1024 px")."""
    if not defaults:
        return "the model's own"
    parts = []
    if "steps" in defaults:
        parts.append(f"{defaults['steps']} steps")
    if "guidance" in defaults:
        parts.append(f"guidance {defaults['guidance']:g}")
    if "scheduler" in defaults:
        parts.append(defaults["scheduler"].replace("_", " "))
    if "size" in defaults:
        parts.append(f"{defaults['size']} px")
    return ", ".join(parts)


def fmt_bytes(n: Optional[int]) -> str:
    if not n:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{n} B"


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 0.001:
        return "<1 ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def header_html() -> str:
    from backend import blas
    slow = blas.report_once()  # Linux on MLX's reference BLAS: said in the header, and once in the server log
    return ("<div class='sd-header'><div class='sd-logo'></div><div><h1>Silicon Diffusion</h1>"
            "<p>Stable Diffusion on Apple Silicon — Core ML and MLX, measured.</p>"
            + (f"<p class='sd-blas-warning' style='color:#b45309;opacity:1'>⚠ {esc(slow)}</p>" if slow else "")
            + "</div></div>")


def eta_seconds(step: int, total: int, denoise_seconds: float, decode_seconds: Optional[float] = None) -> float:
    """What is left of a run: the steps to go at the mean step time so far, plus the decode's estimate (None: not
    known yet, counted as nothing)."""
    mean = denoise_seconds / step if step else 0.0
    return max(0, total - step) * mean + (decode_seconds or 0.0)


def fmt_eta(seconds: Optional[float]) -> str:
    """'about 40 s left', 'about 3 min left', '' for nothing known."""
    if seconds is None or seconds <= 0:
        return ""
    if seconds < 60:
        return f"about {max(1, round(seconds))} s left"
    if seconds < 3600:
        return f"about {round(seconds / 60)} min left"
    return f"about {seconds / 3600:.1f} h left"


def progress_html(state: str = "idle", message: str = "", step: int = 0, total: int = 0,
                  steps_per_second: float = 0.0, unit: str = "step", eta: Optional[float] = None) -> str:
    """state: idle, loading, running, done, stopped or error. `eta`: seconds left (eta_seconds), while running."""
    fraction = 1.0 if state == "done" else (step / total if total else 0.0)
    right = f"{unit} {step} / {total}" if total else ""
    if steps_per_second and state in ("running", "done", "stopped"):
        right += f" · {steps_per_second:.2f} steps/s"
    if state == "running" and fmt_eta(eta):
        right += f" · {fmt_eta(eta)}"
    if state == "idle" and not message:
        message = "Ready"
    return (f"<div class='sd-progress {esc(state)}'><div class='row'><span class='msg'>{esc(message)}</span>"
            f"<span>{esc(right)}</span></div><div class='sd-track'><div class='sd-fill' "
            f"style='width:{100 * fraction:.1f}%'></div></div></div>")


def total_seconds(result: GenerationResult) -> float:
    """What the user waited: the generation, plus loading when this run loaded the model."""
    return result.timings.total + result.timings.load


def _sparkline(values: list) -> str:
    if len(values) < 2:
        return ""
    top = max(values) or 1.0
    n = len(values)
    points = " ".join(f"{100 * i / (n - 1):.2f},{30 - 28 * v / top:.2f}" for i, v in enumerate(values))
    return (f"<svg class='sd-spark' viewBox='0 0 100 32' preserveAspectRatio='none'>"
            f"<polyline points='{points}' fill='none' stroke='#6366f1' stroke-width='1.5' "
            f"vector-effect='non-scaling-stroke'/></svg>")


def _card(key: str, value: str, sub: str = "", wide: bool = False) -> str:
    return (f"<div class='sd-card{' sd-wide' if wide else ''}'><div class='k'>{esc(key)}</div>"
            f"<div class='v'>{esc(value)}</div>" + (f"<div class='s'>{esc(sub)}</div>" if sub else "") + "</div>")


def _seeds(result: GenerationResult) -> str:
    seeds = result.seeds or [result.seed]
    return str(seeds[0]) if len(result.images) < 2 else f"{seeds[0]} – {seeds[len(result.images) - 1]}"


def _batch_note(result: GenerationResult) -> str:
    n = len(result.images)
    return f" · batch of {n}: image i has seed + i" if n > 1 else ""


def stats_html(result: GenerationResult, cached: bool = False) -> str:
    """The panel beside an image: time per stage as a chart, memory, sizes, engine and why."""
    t, m, e = result.timings, result.memory, result.engine
    parts = {"load": t.load, "text_encoder": t.text_encoder, "denoise": t.denoise, "vae_decode": t.vae_decode}
    whole = sum(parts.values()) or 1.0
    bar = "".join(f"<div title='{label} {fmt_seconds(parts[k])}' style='width:{100 * parts[k] / whole:.2f}%;"
                  f"background:{color}'></div>" for k, label, color in STAGES if parts[k] > 0)
    reused = {"text_encoder": " (reused)"} if t.text_reused else {}  # the prompt's encoding from an earlier run
    legend = "".join(f"<span><i style='background:{color}'></i>{label} {fmt_seconds(parts[k])}{reused.get(k, '')}"
                     f"</span>" for k, label, color in STAGES)
    per_step = t.denoise / len(t.steps) if t.steps else None
    load_note = "pipeline was already loaded" if cached or not t.load else "includes loading the model"
    units = (e.get("compute_units") or e.get("device") or "—") + (
        f" · {e['attention']} attention" if e.get("engine") == "coreml" and e.get("attention") else "")
    quant = e.get("quantization")
    precision = e.get("precision", "") + (f" · {quant}" if quant and quant != "none" else "") + "".join(
        f" · {stage} on {u}" for stage, u in (e.get("stage_units") or {}).items())
    peak_sub = "engine's own peak" if m.peak_engine_bytes else "process peak resident memory"
    cards = [
        _card("Total", fmt_seconds(total_seconds(result)), load_note),
        _card("Per step", fmt_seconds(per_step), f"{t.steps_per_second:.2f} steps/s · {len(t.steps)} steps"),
        _card("Peak memory", fmt_bytes(m.peak_engine_bytes or m.peak_process_bytes), peak_sub),
        f"<div class='sd-card sd-wide'><div class='k'>Time per stage</div><div class='sd-bar'>{bar}</div>"
        f"<div class='sd-legend'>{legend}</div>{_sparkline(list(t.steps))}</div>",
        _card("Weights", fmt_bytes(m.weight_bytes), f"{fmt_bytes(m.disk_bytes)} on disk"),
        _card("Engine", f"{e.get('engine', '—')} · {units}", precision),
        _card("Seed", _seeds(result), f"{result.parameters.get('width')}×{result.parameters.get('height')} · "
                                      f"{result.parameters.get('scheduler')}" + _batch_note(result)),
        _card("Why this engine", "", e.get("reason", ""), wide=True).replace("<div class='v'></div>", ""),
    ]
    warn = "".join(f"<div class='sd-warn sd-wide'>⚠ {esc(w)}</div>" for w in result.warnings)
    return f"<div class='sd-stats'>{''.join(cards)}{warn}</div>"


def prompt_help_html(help_: Optional[tuple]) -> str:
    """The words a small-vocabulary model knows, an example, and the prompt's words it will ignore."""
    if not help_:
        return ""
    words, example, ignored = help_
    text = f"This model knows only these words: {', '.join(words)}. Example: “{example}”."
    if ignored:
        text += f" Ignored in this prompt: {', '.join(ignored)}."
    return note_html(text, warn=bool(ignored))


def note_html(text: str, warn: bool = False) -> str:
    return f"<div class='sd-info{' warn' if warn else ''}'>{esc(text)}</div>"


def empty_html(text: str) -> str:
    return f"<div class='sd-empty'>{esc(text)}</div>"


def compare_cell_html(r, url: Callable[[str], str]) -> str:
    """One variant's cell: its image and difference heatmap, captioned; or its error; or a placeholder."""
    head = f"<h4>{esc(r.label)}</h4>"
    if r.status in ("pending", "running"):
        return (f"<div class='sd-cell {r.status}'>{head}<div class='wait'>"
                f"{'rendering…' if r.status == 'running' else 'waiting'}</div></div>")
    if r.status != "done":
        return f"<div class='sd-cell'>{head}<div class='err'>{esc(r.error or r.status)}</div></div>"
    px = " class='px'" if r.image is not None and max(r.image.size) < 256 else ""
    heat = (f"<img{px} src='{esc(url(r.heatmap_path))}' alt='difference from fp16' "
            f"title='difference from fp16 (×4)'>" if r.heatmap_path else "<div class='wait'>reference</div>")
    if r.psnr is None:
        quality = "PSNR — · SSIM —"
    elif not math.isfinite(r.psnr):
        quality = "identical to fp16" if r.variant.key != "mlx-fp16" else "reference (fp16)"
    else:
        quality = f"PSNR {r.psnr:.1f} dB · SSIM {r.ssim:.4f}"
    return (f"<div class='sd-cell'>{head}<div class='pair'><img{px} src='{esc(url(r.path))}' alt='{esc(r.label)}'>"
            f"{heat}</div><div class='cap'>{esc(quality)}<br>weights {fmt_bytes(r.weight_bytes)} · disk "
            f"{fmt_bytes(r.disk_bytes)}<br>{fmt_seconds(r.seconds)} · peak {fmt_bytes(r.peak_bytes)}</div></div>")


def compare_grid_html(state, url: Callable[[str], str]) -> str:
    if state is None or not state.results:
        return empty_html("Tick variants and press Compare: each cell fills in as its variant finishes.")
    return "<div class='sd-grid'>" + "".join(compare_cell_html(r, url) for r in state.results) + "</div>"


def plural(count: int, word: str) -> str:
    """'1 warm run', '3 warm runs'."""
    return f"{count} {word}" + ("" if count == 1 else "s")


def big_numbers_html(seconds_per_image: Optional[float], steps_per_second: Optional[float], count: int,
                     unit: str = "warm run", note: str = "") -> str:
    spi = "—" if seconds_per_image is None else (f"{seconds_per_image:.2f}" if seconds_per_image < 100
                                                  else f"{seconds_per_image:.0f}")
    sps = "—" if steps_per_second is None else f"{steps_per_second:.2f}"
    return (f"<div class='sd-big'><div><b>{spi}</b><span>seconds per image</span></div>"
            f"<div><b>{sps}</b><span>steps per second</span></div>"
            f"<div><b>{count}</b><span>{esc(plural(count, unit).split(' ', 1)[1] + note)}</span></div></div>")
