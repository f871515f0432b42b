"""Micro-benchmark: the engine's attention kernel vs the two matmuls it cannot avoid.

    python tools/bench_attention.py            # SD 1.5 sizes: self-attention at 64x64 latents
    python tools/bench_attention.py --tokens 1024 --heads 8 --dim 80 --batch 2

Prints the best of `--repeat` wall-clock runs of: q k^T and p v as two plain batched matmuls,
`layers.attention`, and MLX's `mx.fast.scaled_dot_product_attention`, plus the kernel's error.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backend  # noqa: E402,F401  (loads the optimized BLAS before MLX)
import mlx.core as mx  # noqa: E402

from backend.engines.mlx.layers import attention  # noqa: E402


def best_time(fn, repeat: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="query tokens (64x64 latents = 4096)")
    parser.add_argument("--kv-tokens", type=int, default=None, help="key tokens (default: same; 77 = cross)")
    parser.add_argument("--dim", type=int, default=40, help="head dimension")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    n_kv = args.kv_tokens or args.tokens
    mx.random.seed(0)
    q = mx.random.normal((args.batch, args.heads, args.tokens, args.dim))
    k = mx.random.normal((args.batch, args.heads, n_kv, args.dim))
    v = mx.random.normal((args.batch, args.heads, n_kv, args.dim))
    scale = args.dim ** -0.5
    scores = (q * scale) @ k.swapaxes(-1, -2)
    mx.eval(q, k, v, scores)

    print(f"device {mx.default_device()}  B={args.batch} H={args.heads} N={args.tokens} M={n_kv} d={args.dim}")
    t_qk = best_time(lambda: (q * scale) @ k.swapaxes(-1, -2), args.repeat)
    t_pv = best_time(lambda: scores @ v, args.repeat)
    t_ours = best_time(lambda: attention(q, k, v, scale), args.repeat)
    t_fast = best_time(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), args.repeat)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    out = attention(q, k, v, scale)
    error = (mx.linalg.norm(out - ref) / mx.linalg.norm(ref)).item()
    print(f"matmuls q@k^T + p@v : {t_qk + t_pv:7.3f} s  ({t_qk:.3f} + {t_pv:.3f})")
    print(f"layers.attention    : {t_ours:7.3f} s  ({t_ours / (t_qk + t_pv):.2f}x the matmuls)")
    print(f"mx.fast.sdpa        : {t_fast:7.3f} s  ({t_fast / (t_qk + t_pv):.2f}x the matmuls)")
    print(f"relative error vs mx.fast.sdpa: {error:.2e}")


if __name__ == "__main__":
    main()
