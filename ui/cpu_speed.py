"""Why a precision is slow here: when MLX computes on the CPU, the note under the Generate tab's precision dropdown
says how much slower fp16, bf16 and the quantized modes were measured to be than fp32, and on which CPU. The
figures are data, measured by `python tools/bench_cpu_precisions.py` into configs/cpu_speed.json, never guesses;
without that file (or on a GPU) there is no note.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

DATA = Path(__file__).resolve().parent.parent / "configs" / "cpu_speed.json"
SHOWN = ("fp16", "bf16", "8-bit", "4-bit")  # the choices the note names, in this order


def mlx_on_cpu() -> bool:
    """Whether MLX computes on the CPU here (no Metal GPU): then auto is fp32 and the note applies."""
    try:
        import mlx.core as mx
        return mx.default_device() != mx.gpu
    except ImportError:
        return False


def load(path: Path = DATA) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("choices"), dict) else None


def _factor(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def note(data: Optional[dict] = None, on_cpu: Optional[bool] = None) -> Optional[str]:
    """'MLX runs on the CPU here, where auto (fp32) is the fastest. Slower than fp32, as measured: fp16 9.2x, ...
    (Intel Xeon Processor (AVX-512), an SD 1.5 UNet step at 128 px). ...', or None on a GPU or without figures."""
    if not (mlx_on_cpu() if on_cpu is None else on_cpu):
        return None
    data = load() if data is None else data
    if not data:
        return None
    rows = data["choices"]
    parts = [f"{name} {_factor(rows[name]['factor'])}" for name in SHOWN
             if isinstance(rows.get(name), dict) and isinstance(rows[name].get("factor"), (int, float))]
    if not parts:
        return None
    size = data.get("size")
    cpu = str(data.get("cpu") or "this CPU").replace("(R)", "").replace("(TM)", "")
    where = cpu + (f", an SD 1.5 UNet step at {size} px" if size else "")
    return (f"MLX runs on the CPU here, where auto (fp32) is the fastest. Slower than fp32, as measured: "
            f"{', '.join(parts)} ({where}). Quantized weights save memory, not time, on a CPU.")
