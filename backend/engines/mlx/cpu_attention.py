"""Softmax attention for inference on the CPU, on every core: numpy kernels over blocks of query rows.

MLX's CPU backend runs each elementwise op and reduction on one thread, scalar for its reductions: the
softmax of an SD 1.5 self-attention at 512x512 (2 x 8 heads x 4096 x 4096 scores) costs it ~1.3 s of the
call's 1.6 s even with cpu_kernels' exp. Here the work is cut into blocks of query rows (one head, a few MB
of scores each, their rows on whole cache lines), and one worker thread per core claims whole heads as it
comes free and takes their blocks through: scores by a matrix product, the exp in place (after subtracting
each row's maximum only where the scores could leave exp's range: SAFE_LOGIT) with each row's sum
(cpu_native's compiled loop; without it oneMKL's or numpy's exp, and an extra column of ones in the values
gives the sums), and the value product (the products by oneMKL where it is the loaded BLAS, else numpy's).
On a 2-core Xeon (AVX-512), oneMKL: 0.19-0.20 s for the call above, torch's 0.23 s (tools/bench_attention.py).
Where oneMKL and cpu_native are both there, a worker hands each run of query rows to cpu_native's attention_rows
instead, which takes them in QUERY_BLOCK x KEY_CHUNK blocks in C, without coming back to Python between them.

Only for inference (`cpu_kernels.eager_chunks` active): it evaluates its inputs and returns a new array, so
no gradient flows through it. layers.attention picks it; training and the GPU keep their own paths.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from backend import blas
from backend.engines.mlx import cpu_native, cpu_pool

#: Calls with at most this many scores in all run at once in the calling thread (CLIP's 2 x 12 x 77 x 77: 3.7 ->
#: <1 ms a layer).
SMALL_SCORES = 1 << 18
#: Scores one block holds (fp32): 8 MiB (measured best among 2-16 MiB here: 0.38 s against 0.40 at 4 MiB).
BLOCK_SCORES = 1 << 21
#: Softmax needs no shift by the row maximum where every score of a block is within +-SAFE_LOGIT: exp(60) times
#: the most keys summed stays far below fp32's largest value and exp(-60) far above its smallest normal one, so the
#: quotients come out as precise as with the shift. Cauchy-Schwarz bounds the scores (scale |q| max|k|) before
#: they are computed; SD's attentions are well within it, and a block that is not takes the shift.
SAFE_LOGIT = 60.0
#: cpu_native's attention_rows (oneMKL loaded): query rows and keys per block, whose 512 KiB of scores stay in a
#: core's cache between the two products and the exp (torch's flash attention on the CPU takes the same).
QUERY_BLOCK, KEY_CHUNK = 256, 512


def _numpy_exp(x, out) -> None:
    np.exp(x, out=out)


def padded(keys: int) -> int:
    """A scores row's stride (floats): keys rounded up to a whole number of 64-byte lines. oneMKL's products write
    and read rows that all start on a line faster. SD3's joint attention (2 x 24 heads, d = 64, image and text
    parts), one process, alternating: 1178 keys (512 px) 184 -> 151 ms a call (medians of 9; torch's sdpa 127),
    4250 keys (1024 px) 2243 -> 1807 ms (medians of 3; torch 1699)."""
    return -(-keys // 16) * 16


def block_rows(keys: int) -> int:
    """Query rows per block: BLOCK_SCORES scores, at least 16 rows."""
    return max(16, BLOCK_SCORES // padded(max(1, keys)))


def _item_rows(n_q: int, n_kv: int, driver: bool) -> int:
    """Query rows a worker claims at a time: a block of BLOCK_SCORES scores, for the driver whole QUERY_BLOCKs."""
    rows = min(n_q, block_rows(n_kv))
    return min(n_q, -(-rows // QUERY_BLOCK) * QUERY_BLOCK) if driver else rows


def held_scores(batch_heads: int, n_q: int, n_kv: int) -> int:
    """The most scores (elements, fp32) a call holds at once: all of them for a small call, else one block per
    busy worker (as cpu_kernels.attention_chunk_scores says for the training path); with cpu_native's
    attention_rows one QUERY_BLOCK x KEY_CHUNK block."""
    if batch_heads * n_q * n_kv <= SMALL_SCORES:
        return batch_heads * n_q * n_kv
    driver = cpu_native.attention_rows() is not None
    rows = _item_rows(n_q, n_kv, driver)
    block = QUERY_BLOCK * padded(KEY_CHUNK) if driver else rows * padded(n_kv)
    return min(batch_heads * -(-n_q // rows), cpu_pool.workers()) * block


def token_parts(x) -> list:
    """An attention input as its list of parts along the token axis (one part where it is one array)."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def attention(q, k, v, scale: float, causal: bool = False, rows: bool = False):
    """softmax(q k^T * scale) v for (B, H, N, d) queries and (B, H, M, d) keys/values, computed in fp32 and
    returned in q's dtype as a (B, H, N, d_v) array (a transposed view of a (B, N, H, d_v) buffer, the layout
    the callers' output projection wants). `causal` (N = M, CLIP's text encoder): query i sees keys 0..i.

    q, k and v may each be a list of parts along the token axis (SD3's image and context tokens), read where
    they lie instead of concatenated first; each part an MLX array or an fp32 numpy array. With `rows`, the fp32
    numpy (B, N, H, d_v) buffer itself, for a product that follows in numpy (cpu_rowwise.project)."""
    q_parts, k_parts, v_parts = token_parts(q), token_parts(k), token_parts(v)
    out_dtype = q_parts[0].dtype
    keep, views = cpu_pool.as_numpy(*q_parts, *k_parts, *v_parts)  # views of MLX's buffers, any strides
    qn, kn, vn = views[:len(q_parts)], views[len(q_parts):-len(v_parts)], views[-len(v_parts):]
    batch, heads = qn[0].shape[:2]
    n_q, n_kv, d_v = sum(p.shape[2] for p in qn), sum(p.shape[2] for p in kn), vn[0].shape[3]
    out = cpu_pool.empty((batch, n_q, heads, d_v))
    if causal and n_q != n_kv:
        raise ValueError(f"causal attention needs as many queries as keys, got {n_q} and {n_kv}")
    future = np.triu(np.full((n_q, n_kv), -np.inf, np.float32), 1) if causal else None
    if batch * heads * n_q * n_kv <= SMALL_SCORES:  # CLIP's 77 tokens: batched numpy calls beat the workers' dispatch
        qa, ka, va = (p[0] if len(p) == 1 else np.concatenate(p, axis=2) for p in (qn, kn, vn))
        s = np.matmul(qa, ka.swapaxes(-1, -2))
        s *= np.float32(scale)
        shift = not (s.max() <= SAFE_LOGIT and s.min() >= -SAFE_LOGIT)  # two fast reductions, not one per row
        if future is not None:
            s += future
        if shift:
            s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        o = np.matmul(s, va)
        np.divide(o.transpose(0, 2, 1, 3), s.sum(axis=-1, keepdims=True).transpose(0, 2, 1, 3), out=out)
    else:
        _in_blocks(qn, kn, vn, scale, future, out)
    del keep
    return out if rows else cpu_pool.to_mlx(out, out_dtype).transpose(0, 2, 1, 3)


def _in_blocks(qn: list, kn: list, vn: list, scale: float, future, out: np.ndarray) -> None:
    """The attention of (B, H, N_i, d) numpy views (parts along the token axis) into out (B, N, H, d_v), blocks of
    query rows on the workers. A worker gathers a head's queries and keys that come in several parts into one buffer
    each (its values too, where they are read as one): one product per block instead of one per part (SD3 at 512,
    image and context parts: ~100 -> ~89 ms a call)."""
    batch, heads = qn[0].shape[:2]
    n_q, n_kv, d, d_v = out.shape[1], sum(p.shape[2] for p in kn), qn[0].shape[3], out.shape[3]
    driver = cpu_native.attention_rows() if future is None else None
    rows = _item_rows(n_q, n_kv, driver is not None)
    # Whole heads to each worker as it comes free: a head's buffers are gathered once, when its first block comes.
    shares = cpu_pool.claimed([[(b, h, r) for r in range(0, n_q, rows)] for b in range(batch) for h in range(heads)])

    # The softmax denominators: each row's sum, taken by cpu_native's exp in the same pass where it is built. Else
    # from a column of ones added to the values, the value product's widths padded to a multiple of 16 (its kernels'
    # tile: 40 -> 48 columns costs less than 41). Also for widths already a multiple of 16 (64 -> 80) this costs less
    # than a separate row-sum product: SD3 at 1024 (2x24x4250x4250, d = 64) 0.98 against 1.07 s, SDXL's
    # 2x10x4096x4096 0.37 against 0.38 s; the VAE's 512-wide head the same either way.
    exp_rows = cpu_native.exp_rows()
    width = d_v if exp_rows else -(-(d_v + 1) // 16) * 16

    def rows_of(parts, b, h, into):
        """A head's rows of all parts: the part itself where there is one (any row stride), else gathered."""
        if len(parts) == 1 and into is None:
            return parts[0][b, h]
        first = 0
        for part in parts:
            into[first:first + part.shape[2]] = part[b, h]
            first += part.shape[2]
        return into

    def run(share):
        queries, keys = (cpu_pool.empty((n, d)) if len(parts) > 1 else None
                         for n, parts in ((n_q, qn), (n_kv, kn)))
        # Values with the column of ones, or (cpu_native's row sums) read in place where they come in one part.
        values = None if exp_rows and len(vn) == 1 else cpu_pool.zeros((n_kv, width))
        if not exp_rows:
            values[:, d_v] = 1.0
        if driver:
            work = cpu_pool.empty(cpu_native.attention_work(QUERY_BLOCK, KEY_CHUNK, d_v))
        else:  # rows on whole lines where the exp takes strided rows (cpu_native's); oneMKL's wants them adjacent
            scores = cpu_pool.empty((rows, padded(n_kv) if exp_rows else n_kv))[:, :n_kv]
            products, sums = cpu_pool.empty((rows, width)), cpu_pool.empty(rows)
        head = None
        for b, h, r in share:
            if head != (b, h):
                head_q, head_k = rows_of(qn, b, h, queries), rows_of(kn, b, h, keys)
                head_v = rows_of(vn, b, h, None if values is None else values[:, :d_v])
                if not exp_rows:
                    head_v = values  # with its column of ones
                key_norm = np.sqrt(np.einsum("ij,ij->i", head_k, head_k).max())
                head = (b, h)
            n = min(rows, n_q - r)
            q = head_q[r:r + n]
            shift = abs(scale) * np.sqrt(np.einsum("ij,ij->i", q, q).max()) * key_norm > SAFE_LOGIT
            if driver:
                driver(q, head_k, head_v, out[b, r:r + n, h], scale, shift, QUERY_BLOCK, KEY_CHUNK, work)
                continue
            s, o = scores[:n], products[:n]
            matmul(q, head_k, s, scale, b_transposed=True)
            if future is not None:
                s += future[r:r + n]
            if shift:
                s -= s.max(axis=1, keepdims=True)
            if exp_rows:
                exp_rows(s, sums[:n])
            else:
                exp(s, s)
            matmul(s, head_v, o)
            np.divide(o[:, :d_v], sums[:n, None] if exp_rows else o[:, d_v:d_v + 1], out=out[b, r:r + n, h])

    matmul = blas.product()
    exp = blas.vector_math("Exp") or _numpy_exp
    cpu_pool.run(run, shares)
