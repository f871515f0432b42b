"""How much slower each "precision or quantization" choice of the app is than fp32 on this CPU: one guided SD 1.5
UNet step (batch 2, random weights from configs/reference/, the engine's eager chunks) per choice, each in its
own process, one warm-up then `--repeats` timed steps; the choices take turns for `--rounds` rounds (so that
another job's load on a shared machine falls on all of them), and each figure is the fastest of its steps (the
one least disturbed by other work; every step's time is kept in the file).

    python tools/bench_cpu_precisions.py [--size 128] [--repeats 1] [--rounds 3] [--out configs/cpu_speed.json]

Writes the figures, the CPU model and the BLAS kernels to `--out`; the Generate tab reads that file to say, beside
the precision dropdown, how much slower fp16, bf16 and the quantized modes are when MLX runs on the CPU (MLX has
no fast half-precision matrix products there, and quantized weights are dequantized when used). The factor is
the step time over fp32's at the same size; it holds roughly at other sizes (the step is matrix products and
convolutions at every size), not exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: the app's choices (backend.session.PRECISION_CHOICES) -> (compute dtype, quantization bits or None)
CHOICES = {"fp32": ("fp32", None), "fp16": ("fp16", None), "bf16": ("bf16", None), "8-bit": ("fp32", 8),
           "4-bit": ("fp32", 4)}


def worker(choice: str, size: int, repeats: int) -> dict:
    import backend  # noqa: F401  (OpenBLAS before MLX)
    import mlx.core as mx
    from backend.bench import _cfg
    from backend.engines.mlx import cpu_kernels
    from backend.engines.mlx.quantize import quantize_module, uniform_recipe
    from backend.engines.mlx.unet import UNet2DConditionModel, UNetConfig
    precision, bits = CHOICES[choice]
    dtype = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}[precision]
    config = _cfg("sd-1.5", "unet")
    unet = UNet2DConditionModel(UNetConfig.from_dict(config))
    unet.set_dtype(dtype)
    mx.eval(unet.parameters())
    if bits:  # as the app's quantized modes: fp16-rounded weights quantized, compute in the precision's dtype
        quantize_module(unet, "unet", uniform_recipe(bits))
    mx.clear_cache()
    latent = size // 8
    x = mx.random.normal((2, latent, latent, 4)).astype(dtype)
    ctx = mx.random.normal((2, 77, config["cross_attention_dim"])).astype(dtype)
    t = mx.array([500.0, 500.0])

    def step():
        with cpu_kernels.eager_chunks():
            mx.eval(unet(x, t, ctx))
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    from backend import blas
    return {"seconds": statistics.median(times), "times": times, "blas": blas.describe()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per process, after a warm-up step")
    p.add_argument("--rounds", type=int, default=3, help="processes per choice, the choices taking turns")
    p.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    p.add_argument("--out", default=str(ROOT / "configs" / "cpu_speed.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.size, a.repeats)))
        return 0
    from backend.bench import cpu_model
    times: dict = {}
    libraries = set()  # the BLAS each worker loaded (the figures hold for that library)
    load_before = os.getloadavg()[0]
    for round_ in range(a.rounds):
        for choice in a.choices:
            proc = subprocess.run([sys.executable, __file__, "--worker", choice, "--size", str(a.size), "--repeats",
                                   str(a.repeats)], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{choice}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            times.setdefault(choice, []).extend(out["times"])
            libraries.add(out["blas"])
            print(f"round {round_ + 1}, {choice}: {times[choice][-1]:.2f} s per step", flush=True)
    rows = {choice: {"seconds": round(min(t), 3), "times": [round(x, 3) for x in t]}
            for choice, t in times.items()}
    base = rows.get("fp32", {}).get("seconds")
    for row in rows.values():
        row["factor"] = round(row["seconds"] / base, 2) if base else None
    result = {"what": f"one guided SD 1.5 UNet step (batch 2) at {a.size}x{a.size}, MLX on the CPU, random weights; "
                      f"fastest of {a.rounds} x {a.repeats} steps, each process after a warm-up step; "
                      "factor = seconds / fp32's",
              "size": a.size, "cpu": cpu_model(), "blas": "; ".join(sorted(libraries)), "cpu_count": os.cpu_count(),
              "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after (1 min)
              "measured": time.strftime("%Y-%m-%d"), "command": "python tools/bench_cpu_precisions.py "
                                                                 f"--size {a.size} --repeats {a.repeats} "
                                                                 f"--rounds {a.rounds}",
              "choices": rows}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
