"""How long Stop takes at SD 1.5 size: from the stop to the engine being free and the next request starting.

    python tools/stop_latency.py [--size 512] [--work .cache/bench-image-inputs]

Uses SD 1.5 with random weights (built once by tools/bench_image_inputs.py), fp32 on MLX, guidance 7.5, through
the app's own session code (backend/session.py): a run is stopped at several moments inside its second UNet step
and once inside the VAE decode; each time the next request (one step) is started at once, and the time from the
stop to its first event (the engine lock taken) is measured. Prints the CPU and BLAS with the figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-image-inputs"))
    a = p.parse_args(argv)
    import backend  # noqa: F401  (the optimized BLAS before MLX)
    from backend import blas
    from backend.pipeline import load_pipeline
    from backend.session import PipelineCache, PipelineKey, StopSignal, stream_generation
    from backend.types import GenerationRequest
    from tools.bench_image_inputs import build_model
    from tools.load_test import cpu_model

    folder = Path(a.work) / "sd15-random"
    if not folder.exists():
        build_model(folder)
    pipe = load_pipeline(str(folder), engine="mlx", precision="fp32")
    cache = PipelineCache(1, loader=lambda key, progress: pipe)
    key = PipelineKey(str(folder), engine="mlx", precision="fp32")
    request = dict(prompt="a photo of an astronaut", width=a.size, height=a.size, guidance=7.5, seed=0)

    # one step and the decode alone, to place the stops
    result = pipe.generate(GenerationRequest(steps=1, **request))
    step, decode = result.timings.steps[0], result.timings.vae_decode
    print(f"machine: {cpu_model()}; BLAS: {blas.loaded or 'reference'}; SD 1.5 {a.size}² fp32 random weights: "
          f"one UNet step {step:.2f} s, VAE decode {decode:.2f} s")

    rows = []
    for label, steps, delay in [(f"step 2 at {f:.0%}", 3, None) for f in (0.1, 0.5, 0.9)] + [
            ("VAE decode at 50%", 1, None)]:
        stop = StopSignal()
        events = stream_generation(cache, key, GenerationRequest(steps=steps, **request), stop)
        fraction = float(label.split(" at ")[1].rstrip("%")) / 100
        if label.startswith("step"):
            for event in events:  # the end of step 1, then into step 2
                if event.kind == "step":
                    break
            timer = threading.Timer(fraction * step, stop.set)
        else:
            for event in events:
                if event.kind == "step" and event.step.step == event.step.total:
                    break
            timer = threading.Timer(fraction * decode, stop.set)
        timer.start()
        timer.join()
        stopped_at = time.perf_counter()
        outcome = [e.kind for e in events][-1]
        freed = time.perf_counter() - stopped_at
        second = stream_generation(cache, key, GenerationRequest(steps=1, **request))
        next(second)
        started = time.perf_counter() - stopped_at
        for _ in second:
            pass
        rows.append((label, outcome, freed, started))
        print(f"  stop during {label}: {outcome}; engine free after {freed:.2f} s, next request started after "
              f"{started:.2f} s")
    starts = [r[3] for r in rows]
    print(f"stop -> next request started: median {statistics.median(starts):.2f} s, max {max(starts):.2f} s "
          f"(a whole UNet step is {step:.2f} s)")
    return 0 if all(r[1] == "stopped" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
