"""Micro-benchmark: the engine's attention kernel vs the two matmuls it cannot avoid.

    python tools/bench_attention.py        # SD 1.5 at 512x512: UNet self/cross-attention, VAE attention
    python tools/bench_attention.py --batch 2 --heads 10 --tokens 4096 --dim 64   # one custom case

Prints the best of `--repeat` wall-clock runs of: q k^T and p v as two plain batched matmuls,
`layers.attention` at inference (cpu_attention: numpy blocks on every core) and outside it (cpu_kernels,
the training path), MLX's `mx.fast.scaled_dot_product_attention`, and torch's when it is installed, plus
the errors. Prints the CPU and BLAS first.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backend  # noqa: E402,F401  (loads the optimized BLAS before MLX)
import mlx.core as mx  # noqa: E402

from backend.bench import cpu_model  # noqa: E402
from backend.engines.mlx import cpu_kernels  # noqa: E402
from backend.engines.mlx.layers import attention  # noqa: E402


def inference_attention(q, k, v, scale):
    with cpu_kernels.eager_chunks():
        return attention(q, k, v, scale)


def best_time(fn, repeat: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times)


# (name, batch, heads, query tokens, key tokens, head dim) at SD 1.5's 512x512 (64x64 latents)
SD15_CASES = (
    ("unet self-attention, level 0", 2, 8, 4096, 4096, 40),
    ("unet cross-attention, level 0", 2, 8, 4096, 77, 40),
    ("vae mid-block attention", 1, 1, 4096, 4096, 512),
)


def bench(name, batch, heads, n_q, n_kv, dim, repeat):
    mx.random.seed(0)
    q = mx.random.normal((batch, heads, n_q, dim))
    k = mx.random.normal((batch, heads, n_kv, dim))
    v = mx.random.normal((batch, heads, n_kv, dim))
    scale = dim ** -0.5
    scores = (q * scale) @ k.swapaxes(-1, -2)
    mx.eval(q, k, v, scores)
    t_qk = best_time(lambda: (q * scale) @ k.swapaxes(-1, -2), repeat)
    t_pv = best_time(lambda: scores @ v, repeat)
    t_infer = best_time(lambda: inference_attention(q, k, v, scale), repeat)
    t_train = best_time(lambda: attention(q, k, v, scale), repeat)
    t_fast = best_time(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), repeat)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

    def error(out):
        return (mx.linalg.norm(out - ref) / mx.linalg.norm(ref)).item()
    mm = t_qk + t_pv
    print(f"{name} (B={batch} H={heads} N={n_q} M={n_kv} d={dim})")
    print(f"  matmuls q@k^T + p@v      : {mm:7.3f} s")
    print(f"  layers.attention, infer. : {t_infer:7.3f} s  ({t_infer / mm:.2f}x the matmuls, "
          f"rel. error {error(inference_attention(q, k, v, scale)):.1e})")
    print(f"  layers.attention, train. : {t_train:7.3f} s  ({t_train / mm:.2f}x the matmuls, "
          f"rel. error {error(attention(q, k, v, scale)):.1e})")
    print(f"  mx.fast.sdpa             : {t_fast:7.3f} s  ({t_fast / mm:.2f}x the matmuls)")
    try:
        import numpy as np
        import torch
    except ImportError:
        return
    tq, tk, tv = (torch.from_numpy(np.array(a)) for a in (q, k, v))
    with torch.no_grad():
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sdpa(tq, tk, tv, scale=scale)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            sdpa(tq, tk, tv, scale=scale)
            times.append(time.perf_counter() - start)
    print(f"  torch sdpa ({torch.get_num_threads()} threads) : {min(times):7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="run one custom case instead of SD 1.5's")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--kv-tokens", type=int, default=None, help="key tokens (default: same; 77 = cross)")
    parser.add_argument("--dim", type=int, default=40, help="head dimension")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"device {mx.default_device()}, best of {args.repeat} runs; CPU: {cpu_model()}; BLAS: {backend.blas.describe()}")
    if args.batch is None:
        for case in SD15_CASES:
            bench(*case, args.repeat)
    else:
        bench("custom", args.batch, args.heads, args.tokens, args.kv_tokens or args.tokens, args.dim, args.repeat)


if __name__ == "__main__":
    main()
