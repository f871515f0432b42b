"""`python -m backend doctor`: the Core ML check a Mac user runs in one command.

It takes the registry's Core ML entry with the smallest download (or the one given), loads it once per
compute unit and makes one image with each, and prints load time, first-image time, seconds per step
and the process's peak memory per unit: the figures the README's Core ML table is filled from. Off
macOS it says in one sentence that Core ML prediction needs macOS, and exits non-zero.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

from backend.types import GenerationRequest, UserError

UNITS = ("CPU_AND_GPU", "CPU_AND_NE", "ALL", "CPU_ONLY")
PROMPT = "a photo of an astronaut riding a horse on mars"


def smallest_entry(sizes: Optional[Callable[[object], Optional[int]]] = None) -> str:
    """The registry's Core ML entry whose planned download is smallest (the Hub's sizes), else the first."""
    from backend import registry
    from backend.engines.coreml.sources import planned_download_bytes
    sizes = sizes or planned_download_bytes
    entries = [e for e in registry.list_models() if e.coreml]
    if not entries:
        raise UserError("the registry has no Core ML entry")
    measured = [(n, e.name) for e in entries if (n := sizes(e)) is not None]
    return min(measured)[1] if measured else entries[0].name


def run(model: str, units=UNITS, steps: int = 10, load: Optional[Callable] = None, echo=print) -> list:
    """One image per compute unit; returns (and prints) one row of measurements per unit."""
    from backend.pipeline import load_pipeline
    rows = []
    for unit in units:
        started = time.perf_counter()
        pipe = (load or load_pipeline)(model, engine="coreml", compute_units=unit, progress=echo)
        loaded = time.perf_counter() - started
        result = pipe.generate(GenerationRequest(prompt=PROMPT, steps=steps, seed=0))
        t = result.timings
        row = {"model": model, "compute_units": unit, "attention": pipe.info.get("attention"),
               "load_s": round(loaded, 2), "first_image_s": round(loaded + t.total, 2),
               "s_per_step": round(t.denoise / max(len(t.steps), 1), 3),
               "text_encoder_s": round(t.text_encoder, 3), "vae_decode_s": round(t.vae_decode, 3),
               "peak_memory_gib": round(result.memory.peak_process_bytes / 2**30, 2),
               "size": f"{result.parameters['width']}x{result.parameters['height']}"}
        rows.append(row)
        echo(f"{unit:12s} {row['attention']:13s} load {row['load_s']:7.2f} s  first image {row['first_image_s']:7.2f} s"
             f"  {row['s_per_step']:.3f} s/step  peak {row['peak_memory_gib']:.2f} GiB")
        del pipe
    return rows


def cmd_doctor(a) -> int:
    import platform
    from backend import blas
    from backend.engines import machine
    blocked = machine.coreml_unavailable_reason()
    if blocked:
        raise UserError(f"{blocked}: the Core ML check runs on an Apple Silicon Mac (the MLX engine runs here)")
    model = a.model or smallest_entry()
    print(f"{platform.platform()}, {platform.machine()}; {blas.describe()}; model {model}, {a.steps} steps")
    rows = run(model, a.units, a.steps)
    if a.json:
        print(json.dumps(rows))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("doctor", help="on a Mac: one Core ML image per compute unit, with load/step/memory figures")
    p.add_argument("--model", help="a Core ML registry entry or resources folder (default: the smallest download)")
    p.add_argument("--units", nargs="+", default=list(UNITS), choices=UNITS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    p.set_defaults(func=cmd_doctor)
