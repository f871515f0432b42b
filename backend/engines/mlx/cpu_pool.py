"""One worker thread per core for the CPU inference kernels written in numpy (cpu_attention, cpu_rowwise).

MLX's CPU backend runs every elementwise op and reduction on one thread; numpy releases the GIL inside its
ufuncs and matrix products, so the same work cut into cache-sized blocks runs on every core from Python
threads. `run(work, shares)` calls work(share) for each share on the pool and waits; numpy's BLAS (and any
other the process loaded) is held to one thread meanwhile, and oneMKL to one thread in each worker, so the
workers do not oversubscribe the cores. MLX itself is not called from the workers: they read numpy views of
evaluated MLX arrays (`as_numpy`) and write numpy arrays that the caller turns back into MLX arrays (`to_mlx`).
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from backend import blas

_pool = None
_blas = None
_lock = threading.Lock()


def workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _setup():
    global _pool, _blas
    with _lock:
        if _pool is None:
            from threadpoolctl import ThreadpoolController
            _blas = ThreadpoolController()
            _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="cpu-kernels",
                                       initializer=blas.one_thread_here)
    return _pool, _blas


#: Calls over fewer elements than this run all their shares in the calling thread: handing work to the workers
#: and waiting costs ~0.04-0.1 ms here, more than half of a LayerNorm over CLIP's 154 x 768 rows (~0.15 ms).
INLINE_ELEMENTS = 1 << 17


def run(work: Callable, shares: Sequence, elements: int | None = None) -> None:
    """work(share) for every share, one per worker at a time (in the calling thread where there is one share, or
    where the call covers fewer than INLINE_ELEMENTS `elements`); the first exception is raised here."""
    pool, blas_threads = _setup()
    with blas_threads.limit(limits=1, user_api="blas"):
        if len(shares) == 1 or (elements is not None and elements < INLINE_ELEMENTS):
            for share in shares:
                work(share)
            return
        for done in [pool.submit(work, share) for share in shares]:
            done.result()


def deal(items: list) -> list:
    """`items` dealt round-robin to the workers: one list per worker (fewer when there are fewer items)."""
    n = max(1, min(len(items), workers()))
    return [items[i::n] for i in range(n)]


def claimed(groups: list) -> list:
    """One share per worker (fewer when there are fewer items), each an iterator over the items of the groups its
    worker claims: the next unclaimed group whenever it is free, so a worker slowed by something else on its core
    takes fewer groups instead of holding the call up. A group's items (a head's blocks) stay with one worker, in
    order, unless there are fewer groups than workers (the VAE's one head): then items are claimed one by one, so
    that every worker has work (the VAE's 4096x4096 attention 430 -> 238 ms against its one head on one worker).
    SD3's joint attention (2x24 heads), one process, alternating, against a fixed half of the heads each: 1178 keys
    159 -> 147 ms a call (medians of 11), 4250 keys 2140 -> 2071 ms (medians of 5)."""
    if len(groups) < workers():
        groups = [[item] for group in groups for item in group]
    counter = itertools.count()  # its next() is atomic under the GIL: each group goes to exactly one worker

    def share():
        for index in counter:
            if index >= len(groups):
                return
            yield from groups[index]
    return [share() for _ in range(max(1, min(len(groups), workers())))]


def row_shares(rows: int, block: int) -> list:
    """[start, stop) blocks of `block` rows covering `rows`, dealt to the workers."""
    return deal([(r, min(rows, r + block)) for r in range(0, rows, block)])


def block_rows(row_elements: int, block_elements: int = 1 << 18) -> int:
    """Rows per block so that a block holds about `block_elements` (1 MiB of fp32 by default: cache-sized)."""
    return max(1, block_elements // max(1, row_elements))


#: Where the kernels' buffers start: a cache line. oneMKL's products run slower into an output that starts elsewhere,
#: as numpy's large arrays do (48 bytes past one here): on the AMD EPYC (Zen 3) of the README's "A real AVX2 CPU",
#: 2 threads, 2048x6144 . 6144x1536 ran at 132-171 GFLOP/s into an aligned output and at 112-124 into one 8 bytes
#: off; one worker's attention block (512 queries x 4096 keys, 64-wide heads) 12.8 ms against 16.2 ms.
ALIGNMENT = 64


def empty(shape, dtype=np.float32) -> np.ndarray:
    """np.empty(shape, dtype) whose data starts on an ALIGNMENT boundary (contiguous)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def zeros(shape, dtype=np.float32) -> np.ndarray:
    """np.zeros(shape, dtype) whose data starts on an ALIGNMENT boundary."""
    out = empty(shape, dtype)
    out.fill(0)
    return out


def as_numpy(*arrays):
    """fp32 numpy views of MLX arrays (cast and evaluated first where needed; fp32 numpy arrays pass as they are);
    keep the MLX arrays alive."""
    cast = [a if a.dtype in (mx.float32, np.float32) else a.astype(mx.float32) for a in arrays]
    mx.eval(*[a for a in cast if isinstance(a, mx.array)])
    return cast, [np.asarray(a) for a in cast]


def to_mlx(out: np.ndarray, dtype, shape=None) -> mx.array:
    """A kernel's fp32 numpy result as an MLX array (a copy) of `dtype` (MLX's; fp32 numpy input's dtype is fp32),
    reshaped to `shape` if given."""
    result = mx.array(out if shape is None else out.reshape(shape))
    return result if isinstance(dtype, np.dtype) or dtype == mx.float32 else result.astype(dtype)
