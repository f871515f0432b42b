"""Softmax attention for inference on the CPU, on every core: numpy kernels over blocks of query rows.

MLX's CPU backend runs each elementwise op and reduction on one thread, scalar for its reductions: the
softmax of an SD 1.5 self-attention at 512x512 (2 x 8 heads x 4096 x 4096 scores) costs it ~1.3 s of the
call's 1.6 s even with cpu_kernels' exp. Here the work is cut into blocks of query rows (one head, a few MB
of scores each, so they stay in cache), and one worker thread per core takes its share of the blocks:
scores by a matrix product, minus the row maximum, numpy's SIMD exp in place, and the value product
whose extra column of ones also gives each row's softmax denominator. numpy releases the GIL in all of
them; its BLAS is held to one thread meanwhile (threadpoolctl), so the workers do not oversubscribe the
cores. On a 2-core Xeon (AVX-512) this is 0.36 s for the call above (tools/bench_attention.py).

Only for inference (`cpu_kernels.eager_chunks` active): it evaluates its inputs and returns a new array, so
no gradient flows through it. layers.attention picks it; training and the GPU keep their own paths.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import mlx.core as mx
import numpy as np

#: Scores one block holds (fp32): 4 MiB, in a core's L2 with room for its rows of queries and the output.
BLOCK_SCORES = 1 << 20

_pool: Optional[ThreadPoolExecutor] = None
_blas_limiter = None
_lock = threading.Lock()


def workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _setup():
    global _pool, _blas_limiter
    with _lock:
        if _pool is None:
            from threadpoolctl import ThreadpoolController
            _blas_limiter = ThreadpoolController()
            _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="cpu-attention")
    return _pool, _blas_limiter


def block_rows(keys: int) -> int:
    """Query rows per block: BLOCK_SCORES scores, at least 16 rows."""
    return max(16, BLOCK_SCORES // max(1, keys))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v for (B, H, N, d) queries and (B, H, M, d) keys/values, computed in fp32 and
    returned in q's dtype as a (B, H, N, d_v) array (a transposed view of a (B, N, H, d_v) buffer, the layout
    the callers' output projection wants)."""
    pool, limiter = _setup()
    out_dtype = q.dtype
    q, k, v = (a if a.dtype == mx.float32 else a.astype(mx.float32) for a in (q, k, v))
    mx.eval(q, k, v)
    qn, kn, vn = np.asarray(q), np.asarray(k), np.asarray(v)  # views of MLX's buffers, any strides
    batch, heads, n_q, _ = qn.shape
    n_kv, d_v = kn.shape[2], vn.shape[3]
    out = np.empty((batch, n_q, heads, d_v), np.float32)
    rows = min(n_q, block_rows(n_kv))
    blocks = [(b, h, r) for b in range(batch) for h in range(heads) for r in range(0, n_q, rows)]
    n_workers = min(len(blocks), pool._max_workers)
    shares = [blocks[i::n_workers] for i in range(n_workers)]

    def run(share):
        scores = np.empty((rows, n_kv), np.float32)
        values = np.empty((n_kv, d_v + 1), np.float32)
        products = np.empty((rows, d_v + 1), np.float32)
        head = None
        for b, h, r in share:
            if head != (b, h):  # this head's values with a column of ones: the product's last column is the denominator
                values[:, :d_v], values[:, d_v] = vn[b, h], 1.0
                head = (b, h)
            n = min(rows, n_q - r)
            s, o = scores[:n], products[:n]
            np.matmul(qn[b, h, r:r + n] * np.float32(scale), kn[b, h].T, out=s)
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            np.matmul(s, values, out=o)
            np.divide(o[:, :d_v], o[:, d_v:], out=out[b, r:r + n, h])

    with limiter.limit(limits=1, user_api="blas"):
        for done in [pool.submit(run, share) for share in shares]:
            done.result()
    result = mx.array(out)
    return (result if out_dtype == mx.float32 else result.astype(out_dtype)).transpose(0, 2, 1, 3)
