"""Small charts as self-contained HTML and SVG: the Compare tab's bars (one per variant, labels beside them so
they never overlap, whatever the number of variants) and the Presenter's per-step latency line.

Gradio's native plots (Vega-Lite) log warnings in the browser console on every render in this Gradio version
(a spec schema older than its bundled Vega-Lite, a band scale's "zero", an empty frame's infinite extent); these
charts need no script at all. Pure functions of numbers; styled by CSS below (app.py adds it to the page).
"""
from __future__ import annotations

import math
from typing import Callable

from ui.present import esc

CSS = """
.sd-chart {border:1px solid var(--border-color-primary); border-radius:10px; padding:10px 12px;
  background:var(--block-background-fill); min-height:120px;}
.sd-chart h5 {margin:0 0 8px; font-size:.85rem; font-weight:600; text-align:center;}
.sd-chart .none {opacity:.6; font-size:.8rem; text-align:center; padding:18px 0;}
.sd-hbar {display:grid; grid-template-columns:minmax(0, 10.5em) 1fr 4.2em; gap:8px; align-items:center;
  font-size:.78rem; margin:3px 0; font-variant-numeric:tabular-nums;}
.sd-hbar .l {overflow:hidden; text-overflow:ellipsis; white-space:nowrap; text-align:right;}
.sd-hbar .t {height:12px; border-radius:4px; background:var(--border-color-primary); overflow:hidden;}
.sd-hbar .t i {display:block; height:100%; border-radius:4px; background:#6366f1;}
.sd-hbar .v {text-align:right; opacity:.85;}
.sd-line svg {width:100%; height:auto; display:block;}
.sd-line text {fill:currentColor; font-size:11px; opacity:.75;}
.sd-line .grid {stroke:var(--border-color-primary); stroke-width:1;}
.sd-line .run {stroke:var(--border-color-primary); stroke-dasharray:3 3;}
"""


def bar_chart_html(title: str, rows: list, fmt: Callable[[float], str] = lambda v: f"{v:.3g}",
                   empty: str = "Appears as variants finish") -> str:
    """Horizontal bars, one per (label, value), in the order given; each bar's length is its share of the
    largest value, and the value is written at its end."""
    rows = [(label, float(v)) for label, v in rows if v is not None and math.isfinite(float(v))]
    if not rows:
        return f"<div class='sd-chart'><h5>{esc(title)}</h5><div class='none'>{esc(empty)}</div></div>"
    top = max(v for _, v in rows) or 1.0
    bars = "".join(f"<div class='sd-hbar' title='{esc(label)}: {esc(fmt(v))}'><span class='l'>{esc(label)}</span>"
                   f"<span class='t'><i style='width:{max(0.0, 100 * v / top):.1f}%'></i></span>"
                   f"<span class='v'>{esc(fmt(v))}</span></div>" for label, v in rows)
    return f"<div class='sd-chart'><h5>{esc(title)}</h5>{bars}</div>"


def _nice_top(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


def line_chart_html(title: str, points: list, y_unit: str = "ms", x_title: str = "",
                    empty: str = "Appears as the runs go") -> str:
    """One line through `points` [(x, y, group)], x in order; a dashed line where the group changes (a new
    run), every point's value as its tooltip, and a y axis from 0 to a round number."""
    if not points:
        return f"<div class='sd-chart sd-line'><h5>{esc(title)}</h5><div class='none'>{esc(empty)}</div></div>"
    w, h, left, right, top_pad, bottom = 1000, 220, 52, 12, 10, 34
    xs = [p[0] for p in points]
    x0, x1 = min(xs), max(xs)
    y_top = _nice_top(max(p[1] for p in points))

    def sx(x: float) -> float:
        return left + (w - left - right) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def sy(y: float) -> float:
        return top_pad + (h - top_pad - bottom) * (1 - y / y_top)

    grid = "".join(f"<line class='grid' x1='{left}' x2='{w - right}' y1='{sy(v):.1f}' y2='{sy(v):.1f}'/>"
                   f"<text x='{left - 6}' y='{sy(v) + 4:.1f}' text-anchor='end'>{v:g}</text>"
                   for v in (y_top * i / 4 for i in range(5)))
    runs, previous = [], None
    for x, _, group in points:
        if previous is not None and group != previous:
            runs.append(f"<line class='run' x1='{sx(x - 0.5):.1f}' x2='{sx(x - 0.5):.1f}' y1='{top_pad}' "
                        f"y2='{h - bottom}'/>")
        previous = group
    step = max(1, math.ceil(len(xs) / 10))
    ticks = "".join(f"<text x='{sx(x):.1f}' y='{h - bottom + 16}' text-anchor='middle'>{x:g}</text>"
                    for x in xs[::step])
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in points)
    dots = "".join(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='#6366f1'><title>{esc(group)} · "
                   f"step {x:g} · {y:.0f} {esc(y_unit)}</title></circle>" for x, y, group in points)
    axis = (f"<text x='{(left + w - right) / 2}' y='{h - 4}' text-anchor='middle'>{esc(x_title)}</text>"
            f"<text x='12' y='{(top_pad + h - bottom) / 2}' text-anchor='middle' "
            f"transform='rotate(-90 12 {(top_pad + h - bottom) / 2})'>{esc(y_unit)}</text>") if x_title else ""
    return (f"<div class='sd-chart sd-line'><h5>{esc(title)}</h5><svg viewBox='0 0 {w} {h}' role='img' "
            f"aria-label='{esc(title)}'>{grid}{''.join(runs)}{ticks}{axis}"
            f"<polyline points='{line}' fill='none' stroke='#6366f1' stroke-width='2'/>{dots}</svg></div>")

