"""The CPU inference kernels in numpy (cpu_attention, cpu_rowwise), the Winograd Conv2d and the allocator setting:
each against a float64 reference or MLX's own path, over shapes that cut into several blocks with a ragged last one."""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from backend import allocator, blas
from backend.engines.mlx import (clip, cpu_attention, cpu_kernels, cpu_native, cpu_pool, cpu_rowwise, cpu_winograd,
                                 layers)

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels need MLX's CPU compiler")

_erf = np.vectorize(math.erf)


def _ref_attention(q, k, v, scale, causal=False):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q @ k.swapaxes(-1, -2) * scale
    if causal:
        s = s + np.triu(np.full(s.shape[-2:], -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _heads_view(shape, seed):
    """(B, H, N, d) as the models pass it: a transposed view of a (B, N, H, d) projection."""
    b, h, n, d = shape
    x = mx.random.normal((b, n, h, d), key=mx.random.key(seed)).transpose(0, 2, 1, 3)
    mx.eval(x)
    return x


def _kernels(monkeypatch, use_mkl: bool, native) -> None:
    """The attention's kernels as on a machine with or without oneMKL, and with cpu_native's whole-head driver
    ("driver": oneMKL's products called from C), its exp alone ("exp") or neither (False)."""
    if native and cpu_native.exp_rows() is None:
        pytest.skip("no C compiler here for cpu_native")
    if native == "driver" and (not use_mkl or cpu_native.attention_rows() is None):
        pytest.skip("cpu_native's attention driver needs oneMKL")
    if native != "driver":  # blocks run from Python
        monkeypatch.setattr(cpu_native, "attention_rows", lambda: None)
    if not native:  # oneMKL's (or numpy's) exp and the column of ones
        monkeypatch.setattr(cpu_native, "exp_rows", lambda: None)
    if not use_mkl:  # numpy's matmul and exp, as without oneMKL
        monkeypatch.setattr(blas, "sgemm", lambda: None)
        monkeypatch.setattr(blas, "vector_math", lambda name, inputs=1, scalars=0: None)


def _small_blocks(monkeypatch, block_scores: int) -> None:
    """Several blocks per head, the last one ragged, on every path: BLOCK_SCORES for the blocks run from Python, and
    the driver's items of two 8-row query blocks each against chunks of 24 keys (70 = 24 + 24 + 22)."""
    monkeypatch.setattr(cpu_attention, "SMALL_SCORES", 0)
    monkeypatch.setattr(cpu_attention, "BLOCK_SCORES", block_scores)
    monkeypatch.setattr(cpu_attention, "QUERY_BLOCK", 8)
    monkeypatch.setattr(cpu_attention, "KEY_CHUNK", 24)


_ATTENTION_KERNELS = [(True, "driver", True), (True, "exp", True), (True, False, True), (False, False, True),
                      (False, "exp", True), (True, False, False)]  # use_mkl, native, in_blocks


@pytest.mark.parametrize("use_mkl,native,in_blocks", _ATTENTION_KERNELS)
@pytest.mark.parametrize("shape_q,shape_kv", [((2, 3, 70, 16), (2, 3, 70, 16)), ((1, 2, 50, 8), (1, 2, 77, 8)),
                                              ((1, 2, 40, 40), (1, 2, 60, 40))])
# scores within SAFE_LOGIT (no shift), and beyond it (the shift: unshifted, exp would overflow); larger scores carry
# larger fp32 rounding
@pytest.mark.parametrize("scale,atol", [(0.3, 2e-6), (10.0, 5e-5)])
def test_attention_matches_a_float64_softmax(monkeypatch, use_mkl, native, in_blocks, shape_q, shape_kv, scale,
                                             atol):
    if in_blocks:  # on the workers, several blocks per head, the last one ragged; else all at once (small calls)
        _small_blocks(monkeypatch, 1024)
    _kernels(monkeypatch, use_mkl, native)
    q, k, v = _heads_view(shape_q, 1), _heads_view(shape_kv, 2), _heads_view(shape_kv, 3)
    out = cpu_attention.attention(q, k, v, scale)
    assert out.shape == shape_q[:3] + (shape_kv[3],) and out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), _ref_attention(np.array(q), np.array(k), np.array(v), scale),
                               rtol=0, atol=atol)


@pytest.mark.parametrize("use_mkl,native,in_blocks", _ATTENTION_KERNELS)
def test_attention_reads_token_parts_in_place(monkeypatch, use_mkl, native, in_blocks):
    """SD3's joint attention: image and context tokens as separate parts of q, k and v, as if concatenated."""
    if in_blocks:  # blocks that end at the parts' boundary and blocks within each part
        _small_blocks(monkeypatch, 2048)
    _kernels(monkeypatch, use_mkl, native)
    image = [_heads_view((2, 3, 45, 16), s) for s in (11, 12, 13)]
    context = [_heads_view((2, 3, 9, 16), s) for s in (14, 15, 16)]
    parts = [[image[i], context[i]] for i in range(3)]
    expected = _ref_attention(*(np.concatenate([np.array(p) for p in pair], axis=2) for pair in parts), 0.3)
    np.testing.assert_allclose(np.array(cpu_attention.attention(*parts, 0.3)), expected, rtol=0, atol=2e-6)
    # image queries only (SD3's last block), keys and values of both parts
    np.testing.assert_allclose(np.array(cpu_attention.attention([image[0]], parts[1], parts[2], 0.3)),
                               expected[:, :, :45], rtol=0, atol=2e-6)
    with cpu_kernels.eager_chunks():  # layers.attention: the same parts, read in place or joined
        monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
        np.testing.assert_allclose(np.array(layers.attention(*parts, 0.3)), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.array(layers.attention(*parts, 0.3)), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("native,in_blocks", [("driver", True), (False, True), ("driver", False)])
def test_causal_attention_and_half_precision_inputs(monkeypatch, native, in_blocks):
    """Causal calls keep the blocks run from Python (the driver takes no mask); half precision goes either way."""
    if in_blocks:
        _small_blocks(monkeypatch, 512)
    _kernels(monkeypatch, True, native)
    q, k, v = (_heads_view((2, 4, 77, 16), s) for s in (4, 5, 6))
    causal = cpu_attention.attention(q, k, v, 0.25, causal=True)
    expected = _ref_attention(np.array(q), np.array(k), np.array(v), 0.25, causal=True)
    np.testing.assert_allclose(np.array(causal), expected, rtol=0, atol=2e-6)
    # the first query sees only the first key
    np.testing.assert_allclose(np.array(causal)[:, :, 0], np.array(v)[:, :, 0], rtol=0, atol=1e-6)
    half = cpu_attention.attention(*(a.astype(mx.float16) for a in (q, k, v)), 0.25, causal=True)
    assert half.dtype == mx.float16
    np.testing.assert_allclose(np.array(half.astype(mx.float32)), expected, rtol=0, atol=5e-3)
    with pytest.raises(ValueError, match="as many queries as keys"):
        cpu_attention.attention(q, k[:, :, :10], v[:, :, :10], 0.25, causal=True)


def test_layers_attention_takes_the_cpu_kernel_only_at_inference(monkeypatch):
    q, k, v = (_heads_view((1, 2, 64, 8), s) for s in (7, 8, 9))
    with cpu_kernels.eager_chunks():  # 8192 scores: too few for the numpy kernels, MLX's path
        layers.AttentionStats.reset()
        layers.attention(q, k, v, 0.35)
        assert set(layers.AttentionStats.calls) == {"cpu"}
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
    layers.AttentionStats.reset()
    training = layers.attention(q, k, v, 0.35)
    assert set(layers.AttentionStats.calls) == {"cpu"}
    layers.AttentionStats.reset()
    with cpu_kernels.eager_chunks():
        inference = layers.attention(q, k, v, 0.35)
    assert set(layers.AttentionStats.calls) == {"cpu_blocks"}
    assert layers.AttentionStats.largest_scores == 4 * 2 * 64 * 64  # a small call holds all its scores at once
    if cpu_native.attention_rows() is not None:  # else a block per worker: the driver's 256 x 512 scores
        assert cpu_attention.held_scores(16, 4096, 4096) == cpu_pool.workers() * 256 * 512
    monkeypatch.setattr(cpu_native, "attention_rows", lambda: None)  # blocks run from Python: 512 rows of 4096
    assert cpu_attention.held_scores(16, 4096, 4096) == cpu_pool.workers() * 512 * 4096
    # rows on whole 64-byte lines: SD3's 1178 keys at 512 px take 1184 floats a row
    assert cpu_attention.held_scores(48, 1178, 1178) == cpu_pool.workers() * 1178 * 1184
    np.testing.assert_allclose(np.array(inference), np.array(training), rtol=0, atol=1e-6)


def _gelu64(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("use_mkl", [True, False])
def test_geglu_gelus_and_quick_gelu_match_float64(monkeypatch, with_bias, use_mkl):
    monkeypatch.setattr(cpu_pool, "block_rows", lambda row, block=0: 7)  # 7-row blocks: ragged, many
    if not use_mkl:
        # the erfc polynomial, as without oneMKL
        monkeypatch.setattr(blas, "vector_math", lambda name, inputs=1, scalars=0: None)
    rng = np.random.default_rng(0)
    h = (rng.standard_normal((2, 25, 24)) * 4).astype(np.float32)
    h[0, 0, 12:] = [-30, -12, -6, 0, 1e-8, 6, 12, 30, 80, -80, 3, -3]  # tails of the erf polynomial
    bias = rng.standard_normal(24).astype(np.float32) if with_bias else None
    hb = h.astype(np.float64) + (0 if bias is None else bias)
    got = cpu_rowwise.geglu(mx.array(h), None if bias is None else mx.array(bias))
    # oneMKL's normal CDF, g Phi(g), has no cancellation in the tail (torch's 1 + erf does: ~4e-6 absolute here);
    # the polynomial without oneMKL is within 4e-6
    atol = 1e-6 if use_mkl else 4e-6
    np.testing.assert_allclose(np.array(got), hb[..., :12] * _gelu64(hb[..., 12:]), rtol=1e-6, atol=atol)
    tanh_ref = 0.5 * hb * (1 + np.tanh(math.sqrt(2 / math.pi) * (hb + 0.044715 * hb ** 3)))
    got = cpu_rowwise.gelu_tanh(mx.array(h), None if bias is None else mx.array(bias))
    np.testing.assert_allclose(np.array(got), tanh_ref, rtol=1e-6, atol=2e-6)
    got = cpu_rowwise.quick_gelu(mx.array(h), None if bias is None else mx.array(bias))  # CLIP's: x sigmoid(1.702 x)
    np.testing.assert_allclose(np.array(got), hb / (1 + np.exp(-1.702 * hb)), rtol=1e-6, atol=2e-6)
    got = cpu_rowwise.gelu(mx.array(h), None if bias is None else mx.array(bias))  # OpenCLIP's exact GELU
    np.testing.assert_allclose(np.array(got), _gelu64(hb), rtol=1e-6, atol=atol)
    # in place over the caller's numpy rows (the rows a product wrote): the same values, no second buffer
    for kernel, expected in ((cpu_rowwise.gelu, _gelu64(hb)), (cpu_rowwise.quick_gelu, hb / (1 + np.exp(-1.702 * hb))),
                             (cpu_rowwise.gelu_tanh, tanh_ref)):
        rows = h.reshape(-1, 24).copy()
        got = kernel(rows, None if bias is None else mx.array(bias), rows=True, in_place=True)
        assert np.shares_memory(got, rows)
        np.testing.assert_allclose(got.reshape(h.shape), expected, rtol=1e-6, atol=atol)
        # (B, L, C) rows in place: the result as (B * L, C) rows, or as an MLX array of h's shape
        for as_rows in (True, False):
            got = kernel(h.copy(), None if bias is None else mx.array(bias), rows=as_rows, in_place=True)
            assert got.shape == ((h.shape[0] * h.shape[1], h.shape[2]) if as_rows else h.shape)
            assert isinstance(got, np.ndarray) == as_rows
            np.testing.assert_allclose(np.array(got).reshape(h.shape), expected, rtol=1e-6, atol=atol)
    with pytest.raises(ValueError, match="in_place"):
        cpu_rowwise.gelu(mx.array(h), rows=True, in_place=True)  # an MLX array is not the caller's to overwrite


def test_layer_norm_and_group_norm_match_float64(monkeypatch):
    monkeypatch.setattr(cpu_pool, "block_rows", lambda row, block=0: 5)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 6, 7, 32)) * 3 + 5).astype(np.float32)  # an offset mean: cancellation
    w, b = rng.standard_normal(32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    ln = (x64 - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.array(cpu_rowwise.layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5)),
                               ln * w + b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(cpu_rowwise.layer_norm(mx.array(x), None, None, 1e-6)),
                               (x64 - mean) / np.sqrt(var + 1e-6), rtol=0, atol=1e-5)
    # on the workers, in 5-row blocks, with one affine for all images and with one per image (SD3's modulation)
    per_image_w = rng.standard_normal((2, 1, 32)).astype(np.float32)
    for inline in (cpu_rowwise.NORM_INLINE_ELEMENTS, 0):
        monkeypatch.setattr(cpu_rowwise, "NORM_INLINE_ELEMENTS", inline)
        np.testing.assert_allclose(np.array(cpu_rowwise.layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5)),
                                   ln * w + b, rtol=0, atol=1e-5)
        got = cpu_rowwise.layer_norm(mx.array(x), mx.array(per_image_w), mx.array(b), 1e-5)
        np.testing.assert_allclose(np.array(got), ln * per_image_w[:, None] + b, rtol=0, atol=1e-5)
    groups = x64.reshape(2, -1, 8, 4)
    g_mean, g_var = groups.mean(axis=(1, 3), keepdims=True), groups.var(axis=(1, 3), keepdims=True)
    gn = ((groups - g_mean) / np.sqrt(g_var + 1e-6)).reshape(x.shape) * w + b
    for compiled in (cpu_native.channel_sums, cpu_native.affine_rows), (lambda: None, lambda: None):  # C, numpy
        monkeypatch.setattr(cpu_native, "channel_sums", compiled[0])
        monkeypatch.setattr(cpu_native, "affine_rows", compiled[1])
        got = cpu_rowwise.group_norm(mx.array(x), 8, mx.array(w), mx.array(b), 1e-6)
        np.testing.assert_allclose(np.array(got), gn, rtol=0, atol=1e-5)
        got = cpu_rowwise.group_norm(mx.array(x), 8, mx.array(w), mx.array(b), 1e-6, silu=True)
        np.testing.assert_allclose(np.array(got), gn / (1 + np.exp(-gn)), rtol=0, atol=1e-5)
        got = cpu_rowwise.group_norm(mx.array(x).astype(mx.float16), 8, mx.array(w), mx.array(b), 1e-6, silu=True)
        assert got.dtype == mx.float16
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), gn / (1 + np.exp(-gn)), rtol=0, atol=2e-2)


def test_modules_give_the_same_output_at_inference_as_in_training(monkeypatch):
    """GEGLU, the transformer block (LayerNorms, attention: self and cross-only, its projections and residuals in
    numpy), the Transformer2DModel around it (proj_in, proj_out with the residual), the resnet (GroupNorm + SiLU,
    Winograd convolutions at 32x32, the 1x1 shortcut) and CLIP's encoder layer (causal attention, quick GELU)
    through the numpy kernels against the MLX path used in training."""
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)  # these small calls would otherwise keep MLX's ops
    mx.random.seed(3)
    block = layers.BasicTransformerBlock(32, 2, 16, cross_attention_dim=24)
    cross_only = layers.BasicTransformerBlock(32, 2, 16, cross_attention_dim=24, only_cross_attention=True)
    transformer = layers.Transformer2DModel(2, 16, 32, 1, cross_attention_dim=24, norm_num_groups=4)
    resnet = layers.ResnetBlock2D(16, 32, temb_channels=8, groups=4, eps=1e-6)
    text_layer = clip.CLIPEncoderLayer(clip.CLIPTextConfig(hidden_size=32, intermediate_size=64,
                                                          num_attention_heads=4))
    modules = (block, cross_only, transformer, resnet, text_layer)
    mx.eval(*(m.parameters() for m in modules))
    tokens, context = mx.random.normal((2, 40, 32)), mx.random.normal((2, 7, 24))
    image, temb = mx.random.normal((2, 32, 32, 16)), mx.random.normal((2, 8))
    latents = mx.random.normal((2, 6, 5, 32))

    def run():
        return (block(tokens, context), cross_only(tokens, context), transformer(latents, context),
                resnet(image, temb), text_layer(tokens))

    plain = run()
    with cpu_kernels.eager_chunks():
        assert block.attn1.takes_rows(tokens) and block.ff.takes_rows(tokens)
        fast = run()
    for a, b in zip(fast, plain):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=5e-5)


def test_kernel_buffers_start_on_a_cache_line():
    """cpu_pool.empty / zeros: contiguous arrays of the asked shape and dtype whose data starts on a 64-byte line
    (np.empty's large arrays start 48 bytes past one here, where oneMKL's products run slower)."""
    for shape in [(3,), (1000, 7), (2, 4096, 40), (0, 5)]:
        for dtype in (np.float32, np.float64):
            a, z = cpu_pool.empty(shape, dtype), cpu_pool.zeros(shape, dtype)
            for arr in (a, z):
                assert arr.shape == shape and arr.dtype == dtype and arr.flags.c_contiguous and arr.flags.writeable
                assert arr.size == 0 or arr.ctypes.data % cpu_pool.ALIGNMENT == 0
            assert not z.any()
    assert cpu_pool.empty(5).shape == (5,)


def test_claimed_shares_give_every_group_to_one_worker_in_order(monkeypatch):
    """cpu_pool.claimed: the workers, one of them slowed, together take every group's items exactly once, each
    group whole and in order on one worker, and the slowed worker claims fewer groups."""
    import threading
    import time
    cores = cpu_pool.workers()
    monkeypatch.setattr(cpu_pool, "workers", lambda: 2)  # fewer workers than groups, whatever the machine
    groups = [[(g, i) for i in range(3)] for g in range(12)]
    taken, lock = [], threading.Lock()

    def work(share):
        with lock:
            slow = not taken  # the first share to start sleeps on every item
            mine = []
            taken.append(mine)
        for item in share:
            mine.append(item)
            if slow:
                time.sleep(0.01)

    shares = cpu_pool.claimed(groups)
    assert len(shares) == 2
    cpu_pool.run(work, shares)
    assert sorted(item for mine in taken for item in mine) == sorted(item for group in groups for item in group)
    for mine in taken:
        assert all(mine[i:i + 3] == groups[mine[i][0]] for i in range(0, len(mine), 3))
    if cores > 1:  # two shares side by side (one core runs them one after the other)
        assert len(taken[0]) < max(len(mine) for mine in taken)
    assert [list(share) for share in cpu_pool.claimed([])] == [[]]
    # fewer groups than workers: their items are claimed one by one, so every worker has work
    one_group = [(0, i) for i in range(5)]
    shares = cpu_pool.claimed([one_group])
    assert len(shares) == 2
    assert sorted(item for share in shares for item in share) == one_group


def test_one_head_in_blocks_is_shared_by_every_worker(monkeypatch):
    """A call with fewer heads than workers (the VAE's one 512-wide head) hands its blocks out one by one, so every
    worker takes part, and gives the same result."""
    _small_blocks(monkeypatch, 1024)
    monkeypatch.setattr(cpu_pool, "workers", lambda: 2)
    counts = []
    real_run = cpu_pool.run
    monkeypatch.setattr(cpu_pool, "run", lambda work, shares, elements=None: (counts.append(len(shares)),
                                                                                real_run(work, shares, elements)))
    q, k, v = _heads_view((1, 1, 70, 16), 1), _heads_view((1, 1, 70, 16), 2), _heads_view((1, 1, 70, 16), 3)
    out = cpu_attention.attention(q, k, v, 0.3)
    assert counts == [2]
    np.testing.assert_allclose(np.array(out), _ref_attention(np.array(q), np.array(k), np.array(v), 0.3),
                               rtol=0, atol=2e-6)


def test_winograd_convolution_follows_its_weight(monkeypatch):
    conv = layers.Conv2d(8, 12, 3, padding=1)
    small = mx.random.normal((1, 32, 32, 8))
    mx.eval(conv.parameters(), small)
    with cpu_kernels.eager_chunks():  # under NUMPY_KERNEL_MIN output elements: MLX's convolution (the embedded model)
        assert not conv._winograd_applies(small)
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
    x = mx.random.normal((1, 32, 32, 8))
    mx.eval(conv.parameters(), x)
    direct = nn.Conv2d.__call__(conv, x)
    with cpu_kernels.eager_chunks():
        assert conv._winograd_applies(x)
        first = conv(x)
        np.testing.assert_allclose(np.array(first), np.array(direct), rtol=0, atol=2e-5)
        conv.weight = conv.weight * 2  # a new weight (a LoRA fused, weights reloaded)
        np.testing.assert_allclose(np.array(conv(x)), 2 * np.array(direct) - np.array(conv.bias), rtol=0, atol=4e-5)
        ragged = x[:, :30, :21]  # sides not multiples of 4: the last tiles read zeros, their extra outputs dropped
        assert conv._winograd_applies(ragged)
        np.testing.assert_allclose(np.array(conv(ragged)), np.array(nn.Conv2d.__call__(conv, ragged)), rtol=0, atol=4e-5)
        assert not conv._winograd_applies(x[:, :8, :8])  # below 16x16: MLX's direct convolution


def test_convolution_adds_a_per_image_bias_and_a_residual_in_place_of_mlx_adds(monkeypatch):
    """A resnet's time embedding (per image) and skip connection, folded into the Winograd convolution, against a
    plain convolution followed by MLX's adds; a convolution that is not layers.Conv2d adds them after."""
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
    conv = layers.Conv2d(8, 12, 3, padding=1)
    x, image_bias, residual = mx.random.normal((2, 32, 32, 8)), mx.random.normal((2, 12)), mx.random.normal((2, 32, 32, 12))
    mx.eval(conv.parameters(), x, image_bias, residual)
    expected = np.array(nn.Conv2d.__call__(conv, x) + image_bias[:, None, None, :] + residual)
    plain = nn.Conv2d(8, 12, 3, padding=1)
    plain.update(conv.parameters())
    with cpu_kernels.eager_chunks():
        assert conv._winograd_applies(x)
        for c in (conv, plain):
            np.testing.assert_allclose(np.array(layers.convolve(c, x, image_bias, residual)), expected,
                                       rtol=0, atol=4e-5)


def _reference_conv(x: np.ndarray, weight: np.ndarray, rows: int, halo: bool) -> np.ndarray:
    """The 3x3 convolution in float64: zero padding on every side (or only the columns, with `halo` rows)."""
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0) if halo else (1, 1), (1, 1), (0, 0)])
    width = x.shape[2]
    return sum(np.einsum("bhwc,oc->bhwo", padded[:, i:i + rows, j:j + width], weight[:, i, j].astype(np.float64))
               for i in range(3) for j in range(3))


@pytest.mark.parametrize("batch,rows,width,c_in,c_out,halo", [
    (1, 7, 10, 5, 6, False),   # ragged tiles on both sides
    (2, 8, 8, 3, 4, False),
    (1, 9, 13, 4, 3, True),    # a band: its first and last input rows are the halo
    (1, 4, 4, 2, 2, True),     # one tile
    (3, 13, 5, 16, 8, False),  # more units than workers
])
def test_numpy_winograd_matches_a_float64_convolution(monkeypatch, batch, rows, width, c_in, c_out, halo):
    monkeypatch.setattr(cpu_winograd, "UNIT_BYTES", 1)  # one row of tiles per unit: every unit boundary exercised
    rng = np.random.default_rng(rows * width)
    x = rng.standard_normal((batch, rows + 2 if halo else rows, width, c_in)).astype(np.float32)
    weight = rng.standard_normal((c_out, 3, 3, c_in)).astype(np.float32)
    bias = rng.standard_normal(c_out).astype(np.float32)
    residual = rng.standard_normal((batch, rows, width, c_out)).astype(np.float32)
    expected = _reference_conv(x, weight, rows, halo)
    for with_terms in (False, True):
        out = np.full((batch, rows, width, c_out), np.nan, np.float32)
        cpu_winograd.conv3x3(x, cpu_winograd.kernel_transform(weight), out, *((bias, residual) if with_terms else ()),
                             halo=halo)
        reference = expected + (bias + residual if with_terms else 0)
        assert np.abs(out - reference).max() <= 1e-5 * np.abs(reference).max()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only")
def test_allocator_keeps_freed_memory_until_released():
    assert allocator.keep_freed_memory()
    before = _resident_bytes()
    block = np.ones(256 << 20, np.uint8)  # below KEEP_BELOW: from the heap, not a mapping of its own
    del block
    kept = _resident_bytes()
    assert kept - before > 200 << 20  # freed, but kept for the next activation
    allocator.release()
    assert kept - _resident_bytes() > 200 << 20  # given back


def test_vae_decode_at_inference_matches_the_training_path(monkeypatch):
    """The decoder's row bands with the numpy kernels (norm + SiLU into the input band, shifted products for the
    32-channel layers and the first and last, numpy Winograd for the others, moments on the workers) against the
    same bands with MLX's ops: batch 2, every up block."""
    from backend.bench import _cfg
    from backend.engines.mlx import cpu_conv
    from backend.engines.mlx.vae import AutoencoderKL, VAEConfig
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
    cfg = dict(_cfg("sd-1.5", "vae"), block_out_channels=[32, 64, 128, 128], norm_num_groups=8)
    assert cpu_conv.applies(32, 64) == (blas.sgemm() is not None) and not cpu_conv.applies(64, 128)
    vae = AutoencoderKL(VAEConfig.from_dict(cfg))
    mx.eval(vae.parameters())
    z = mx.random.normal((2, 16, 16, 4), key=mx.random.key(4))
    plain = vae.decode(z)
    mx.eval(plain)
    with cpu_kernels.eager_chunks():
        fast = vae.decode(z)
    scale = float(np.abs(np.array(plain)).max())
    np.testing.assert_allclose(np.array(fast), np.array(plain), rtol=0, atol=3e-5 * scale)


@pytest.mark.parametrize("alpha,accumulate", [(1.0, False), (0.5, False), (1.0, True), (0.5, True)])
def test_blas_product_without_onemkl_matches_a_float64_product(monkeypatch, alpha, accumulate):
    """blas.product(): numpy's matmul behind sgemm's signature where oneMKL is not loaded (the kernels' fallback)."""
    monkeypatch.setattr(blas, "sgemm", lambda: None)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal((6, 5)).astype(np.float32)
    out = np.ones((7, 6), np.float32)
    blas.product()(a, b, out, alpha, b_transposed=True, accumulate=accumulate)
    expected = alpha * (a.astype(np.float64) @ b.T.astype(np.float64)) + (1 if accumulate else 0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_small_calls_run_in_the_calling_thread(monkeypatch):
    """Below INLINE_ELEMENTS the shares run in the caller (the workers' hand-off costs more than the work); small fills
    too; larger calls go to the workers where there are several."""
    import threading
    seen = []
    work = lambda share: seen.append((share, threading.get_ident()))  # noqa: E731
    cpu_pool.run(work, [1, 2], elements=cpu_pool.INLINE_ELEMENTS - 1)
    assert seen == [(1, threading.get_ident()), (2, threading.get_ident())]
    if cpu_pool.workers() > 1:
        seen.clear()
        cpu_pool.run(work, [1, 2], elements=cpu_pool.INLINE_ELEMENTS)
        assert sorted(s for s, _ in seen) == [1, 2] and threading.get_ident() not in {t for _, t in seen}
    for inline in (cpu_rowwise.FILL_INLINE_ELEMENTS, 0):  # in the caller, then on the workers
        monkeypatch.setattr(cpu_rowwise, "FILL_INLINE_ELEMENTS", inline)
        out = np.zeros((9, 4), np.float32)
        cpu_rowwise._fill_rows(out, np.arange(4, dtype=np.float32))
        np.testing.assert_array_equal(out, np.tile(np.arange(4, dtype=np.float32), (9, 1)))


def test_products_and_projections_with_gated_residuals_against_float64(monkeypatch):
    """cpu_rowwise.products (several Linears side by side, a bias missing), project from (B, n, K) rows of any
    stride with a per-image gated residual (blocks of 7 rows: 10-row images end mid-block) or a plain one, and the
    per-head RMS norm in place."""
    monkeypatch.setattr(cpu_pool, "block_rows", lambda row_elements, block_elements=0: 7)  # not a divisor of an image's 10 rows
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 10, 12)).astype(np.float32)
    w1, w2, b1 = (rng.standard_normal(s).astype(np.float32) for s in ((6, 12), (4, 12), (6,)))
    rows = cpu_rowwise.products(mx.array(x), [(mx.array(w1), mx.array(b1)), (mx.array(w2), None)])
    flat = x.reshape(-1, 12).astype(np.float64)
    np.testing.assert_allclose(rows, np.concatenate([flat @ w1.T + b1, flat @ w2.T], axis=1), rtol=0, atol=1e-5)

    wide = rng.standard_normal((2, 10, 16)).astype(np.float32)[:, :, 2:14]  # rows of stride 16, not 12
    w, b = rng.standard_normal((5, 12)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    r, gate = rng.standard_normal((2, 10, 5)).astype(np.float32), rng.standard_normal((2, 1, 5)).astype(np.float32)
    y = wide.astype(np.float64) @ w.T + b
    gated = cpu_rowwise.project(wide, mx.array(w), mx.array(b), (2, 10, 5), mx.float32, (mx.array(r), mx.array(gate)))
    np.testing.assert_allclose(np.array(gated), r + gate * y, rtol=0, atol=1e-5)
    plain = cpu_rowwise.project(wide, mx.array(w), None, (2, 10, 5), mx.float16, (mx.array(r), None))
    assert plain.dtype == mx.float16
    np.testing.assert_allclose(np.array(plain.astype(mx.float32)), r + y - b, rtol=0, atol=2e-2)

    # From MLX arrays: a contiguous (B, H, W, K) image (a 1x1 convolution) and a transposed view (a copy first).
    image = rng.standard_normal((2, 3, 4, 12)).astype(np.float32)
    got = cpu_rowwise.project(mx.array(image), mx.array(w), mx.array(b), (2, 3, 4, 5), mx.float32)
    np.testing.assert_allclose(np.array(got), image.astype(np.float64) @ w.T + b, rtol=0, atol=1e-5)
    got = cpu_rowwise.project(mx.array(image).transpose(0, 2, 1, 3), mx.array(w), None, (2, 4, 3, 5), mx.float32)
    np.testing.assert_allclose(np.array(got), image.transpose(0, 2, 1, 3).astype(np.float64) @ w.T, rtol=0, atol=1e-5)

    heads = rng.standard_normal((9, 3, 8)).astype(np.float32)
    weight = rng.standard_normal(8).astype(np.float32)
    expected = heads / np.sqrt((heads.astype(np.float64) ** 2).mean(axis=2, keepdims=True) + 1e-6) * weight
    cpu_rowwise.rms_norm_heads(heads, mx.array(weight), 1e-6)
    np.testing.assert_allclose(heads, expected, rtol=0, atol=1e-5)
