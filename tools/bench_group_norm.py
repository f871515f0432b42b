"""Micro-benchmark: the CPU GroupNorm + SiLU with cpu_native's compiled passes against its numpy passes, and torch.

    python tools/bench_group_norm.py                 # the UNet's and the VAE's shapes
    python tools/bench_group_norm.py --vae-decode 5  # also an SD 1.5 VAE decode at 512 px, 5 rounds each way

Each case runs `cpu_rowwise.group_norm(..., silu=True)` (32 groups, fp32, channels-last) with the compiled
passes (`cpu_native.channel_sums`, `affine_rows`) and with them turned off (numpy's passes), alternating in one
process, and torch's GroupNorm + SiLU on the same values; medians of `--repeat`, and the largest difference
from torch. `--vae-decode N` times whole decodes (random weights from configs/reference/sd-1.5), the two ways
taking turns N times. Prints the CPU and BLAS first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import backend  # noqa: E402,F401  (loads the optimized BLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from backend import blas  # noqa: E402
from backend.bench import CONFIGS, cpu_model  # noqa: E402
from backend.engines.mlx import cpu_kernels, cpu_native, cpu_rowwise  # noqa: E402

CASES = ((2, 64, 64, 320), (2, 32, 32, 640), (1, 256, 256, 512), (1, 512, 512, 128))
COMPILED = (cpu_native.channel_sums, cpu_native.affine_rows)


def passes(compiled: bool) -> None:
    """Turn cpu_native's GroupNorm passes on (as the engine runs) or off (cpu_rowwise's numpy passes)."""
    cpu_native.channel_sums, cpu_native.affine_rows = COMPILED if compiled else (lambda: None, lambda: None)


def alternated(runs: dict, rounds: int) -> dict:
    """{name: median seconds} of each function in `runs`, after one untimed call each, taking turns."""
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def group_norm_cases(repeat: int) -> None:
    import torch
    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    for shape in CASES:
        x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
        w, b = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
        xm, wm, bm = mx.array(x), mx.array(w), mx.array(b)
        norm = torch.nn.GroupNorm(32, shape[-1], eps=1e-5)
        norm.weight.copy_(torch.from_numpy(w))
        norm.bias.copy_(torch.from_numpy(b))
        tx = torch.from_numpy(x).permute(0, 3, 1, 2)

        def ours(compiled: bool):
            def run():
                passes(compiled)
                return mx.eval(cpu_rowwise.group_norm(xm, 32, wm, bm, 1e-5, silu=True))
            return run
        medians = alternated({"compiled": ours(True), "numpy": ours(False),
                              "torch": lambda: torch.nn.functional.silu(norm(tx))}, repeat)
        reference = torch.nn.functional.silu(norm(tx)).permute(0, 2, 3, 1).numpy()
        passes(True)
        error = float(np.abs(np.array(cpu_rowwise.group_norm(xm, 32, wm, bm, 1e-5, silu=True)) - reference).max())
        print(f"  {'x'.join(map(str, shape)):>16}: compiled {medians['compiled'] * 1e3:7.1f} ms, numpy passes "
              f"{medians['numpy'] * 1e3:7.1f} ms, torch {medians['torch'] * 1e3:7.1f} ms; max |difference| from "
              f"torch {error:.1e}")


def vae_decode(rounds: int) -> None:
    from backend.engines.mlx.vae import AutoencoderKL, VAEConfig
    vae = AutoencoderKL(VAEConfig.from_dict(json.loads((CONFIGS / "sd-1.5" / "vae" / "config.json").read_text())))
    mx.eval(vae.parameters())
    z = mx.random.normal((1, 64, 64, 4))

    def decode(compiled: bool):
        def run():
            passes(compiled)
            with cpu_kernels.eager_chunks():  # as engine.decode runs it
                mx.eval(vae.decode(z))
        return run
    medians = alternated({"compiled": decode(True), "numpy": decode(False)}, rounds)
    print(f"  SD 1.5 VAE decode, 512 px: compiled {medians['compiled']:.2f} s, numpy passes {medians['numpy']:.2f} s "
          f"(medians of {rounds}, taking turns)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--vae-decode", type=int, default=0, metavar="N", help="also N decodes each way")
    a = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}; BLAS: {blas.describe()}")
    if COMPILED[0]() is None or COMPILED[1]() is None:
        print("cpu_native's GroupNorm passes are not built here (no working C compiler, or SILICON_DIFFUSION_NATIVE=0)")
        return 1
    print("GroupNorm (32 groups) + SiLU, fp32, channels-last:")
    group_norm_cases(a.repeat)
    if a.vae_decode:
        vae_decode(a.vae_decode)
    passes(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
