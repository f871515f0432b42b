"""cpu_native: the attention's exp with row sums, its whole-head driver (oneMKL's products called from C), the
dequantizing loop of quantized weights and GroupNorm's two passes, compiled at first use with the system's C compiler
and cached."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from backend import blas
from backend.engines.mlx import cpu_native

needs_compiler = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
                                    reason="no C compiler here")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A new build into a home of its own (the module keeps the loaded function per process)."""
    monkeypatch.setenv("SILICON_DIFFUSION_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_native, "_library", None)
    monkeypatch.setattr(cpu_native, "_driver", None)
    return tmp_path


@needs_compiler
def test_exp_rows_matches_float64_on_strided_rows_and_is_cached(fresh):
    exp_rows = cpu_native.exp_rows()
    assert exp_rows is not None
    built = list((fresh / "native").glob("attention-*.so"))
    assert len(built) == 1 and not list((fresh / "native").glob("tmp*"))  # the work folder is gone
    rng = np.random.default_rng(0)
    wide = (rng.standard_normal((37, 300)) * 8).astype(np.float32)
    wide[3, 5], wide[4, 7] = -np.inf, -200.0  # a causal mask's -inf, and far below fp32's range: ~0
    block = wide[:, 10:279]  # rows 300 floats apart, 269 of them each: not a multiple of the vector width
    expected = np.exp(block.astype(np.float64))
    untouched = wide[:, :10].copy()
    sums = np.full(37, np.nan, np.float32)
    exp_rows(block, sums)
    np.testing.assert_allclose(block, expected, rtol=5e-6, atol=1e-37)
    np.testing.assert_allclose(sums, expected.sum(axis=1), rtol=5e-6)
    np.testing.assert_array_equal(wide[:, :10], untouched)
    stamp = built[0].stat().st_mtime_ns
    cpu_native._library = None  # as a new process would: the cached library is loaded, not compiled again
    assert cpu_native.exp_rows() is not None and built[0].stat().st_mtime_ns == stamp


@needs_compiler
def test_exp_rows_refuses_what_it_cannot_read(fresh):
    exp_rows = cpu_native.exp_rows()
    with pytest.raises(ValueError, match="adjacent"):
        exp_rows(np.zeros((4, 6), np.float32).T, np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="adjacent"):
        exp_rows(np.zeros((4, 6)), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="sums"):
        exp_rows(np.zeros((4, 6), np.float32), np.zeros(3, np.float32))


def test_without_a_working_compiler_or_when_turned_off_there_is_no_native_exp(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert cpu_native.exp_rows() is None
    assert not (fresh / "native").exists() or not list((fresh / "native").glob("*.so"))
    monkeypatch.delenv("CC")
    monkeypatch.setattr(cpu_native, "_library", None)
    monkeypatch.setenv("SILICON_DIFFUSION_NATIVE", "0")
    assert cpu_native.exp_rows() is None and cpu_native.attention_rows() is None
    assert cpu_native.dequantize_rows() is None
    assert cpu_native.channel_sums() is None and cpu_native.affine_rows() is None


@needs_compiler
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_rows_reads_mlx_codes_as_mlx_does(fresh, bits, group):
    import mlx.core as mx
    dequantize = cpu_native.dequantize_rows()
    assert dequantize is not None
    weight = mx.random.normal((7, 256), key=mx.random.key(bits * group))
    codes, scales, biases = mx.quantize(weight, group, bits)
    expected = np.array(mx.dequantize(codes, scales, biases, group, bits))
    out = np.full((7, 256), np.nan, np.float32)
    packed = np.array(codes).view(np.uint8)
    dequantize(packed, np.array(scales), np.array(biases), bits, group, out, 0, 3)  # two calls: the workers' shares
    assert np.isnan(out[3:]).all()
    dequantize(packed, np.array(scales), np.array(biases), bits, group, out, 3, 7)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@needs_compiler
def test_dequantize_rows_refuses_what_it_cannot_read(fresh):
    dequantize = cpu_native.dequantize_rows()
    packed, scales = np.zeros((2, 64), np.uint8), np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match="8-bit"):  # 64 bytes a row are 64 8-bit codes, not 128
        dequantize(packed, scales, scales, 8, 64, np.zeros((2, 128), np.float32))
    with pytest.raises(ValueError, match="float64"):
        dequantize(packed, scales, scales, 8, 64, np.zeros((2, 64), np.float64))
    with pytest.raises(ValueError):
        dequantize(packed, scales, scales, 7, 64, np.zeros((2, 73), np.float32))


def _softmax_attention64(q, k, v, scale):
    s = q.astype(np.float64) @ k.T.astype(np.float64) * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v.astype(np.float64)


needs_driver = pytest.mark.skipif(not blas.sgemm_address(), reason="cpu_native's attention driver calls oneMKL")


@needs_compiler
@needs_driver
@pytest.mark.parametrize("shift,scale,atol", [(False, 0.3, 2e-6), (True, 0.3, 2e-6), (True, 12.0, 5e-5)])
def test_attention_rows_matches_float64_over_ragged_blocks_on_strided_rows(fresh, shift, scale, atol):
    """Blocks of 8 query rows against chunks of 24 keys: 45 = 5 x 8 + 5 rows, 77 = 3 x 24 + 5 keys; q, k, v and out
    are column ranges of wider buffers (rows apart), the values wider than the queries. At scale 12 scores reach
    ~100, beyond exp's fp32 range: only the running maximum (shift) keeps them, rescaling rows as their maximum grows
    from one chunk to the next."""
    attention_rows = cpu_native.attention_rows()
    assert attention_rows is not None
    rng = np.random.default_rng(1)
    wide = rng.standard_normal((3, 77, 70)).astype(np.float32)
    q, k, v = wide[0, :45, 3:19], wide[1, :, 20:36], wide[2, :, 7:47]
    if shift:  # later keys score higher: each chunk raises the rows' maximum
        k = k + np.linspace(0, 1, 77, dtype=np.float32)[:, None] * np.sign(q.sum(axis=0))[None, :]
    canvas = np.full((45, 64), 7.0, np.float32)
    out = canvas[:, 10:50]
    work = np.empty(cpu_native.attention_work(8, 24, 40), np.float32)
    attention_rows(q, k, v, out, scale, shift, 8, 24, work)
    np.testing.assert_allclose(out, _softmax_attention64(q, k, v, scale), rtol=0, atol=atol)
    assert (canvas[:, :10] == 7).all() and (canvas[:, 50:] == 7).all()  # nothing written beside out


@needs_compiler
@needs_driver
def test_attention_rows_refuses_what_it_cannot_read(fresh):
    attention_rows = cpu_native.attention_rows()
    q, k, v, out = (np.zeros(shape, np.float32) for shape in ((4, 8), (6, 8), (6, 8), (4, 8)))
    work = np.zeros(cpu_native.attention_work(4, 6, 8), np.float32)
    with pytest.raises(ValueError, match="adjacent"):
        attention_rows(np.zeros((8, 4), np.float32).T, k, v, out, 1.0, False, 4, 6, work)
    with pytest.raises(ValueError, match="shapes"):
        attention_rows(q, k[:5], v, out, 1.0, False, 4, 6, work)
    with pytest.raises(ValueError, match="work space"):
        attention_rows(q, k, v, out, 1.0, False, 4, 6, work[:-1])
    with pytest.raises(ValueError, match="work space"):
        attention_rows(q, k, v, out, 1.0, False, 0, 6, work)


@needs_compiler
def test_without_onemkl_there_is_no_attention_driver(fresh, monkeypatch):
    monkeypatch.setattr(blas, "sgemm_address", lambda: None)
    assert cpu_native.exp_rows() is not None and cpu_native.attention_rows() is None


@needs_compiler
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_passes_match_float64_on_rows_any_stride_apart(fresh, silu):
    channel_sums, affine_rows = cpu_native.channel_sums(), cpu_native.affine_rows()
    assert channel_sums is not None and affine_rows is not None
    rng = np.random.default_rng(5)
    padded = (rng.standard_normal((7, 6, 48)) * 20 + 3).astype(np.float32)  # 16 channels, 1 pixel of padding a side
    x = padded.reshape(7, 6, 3, 16)[:, 1:5]  # (7, 4, 3, 16): rows 288 floats apart, 192 wide
    sums = np.ones((2, 16))
    channel_sums(x, sums)
    wide = x.astype(np.float64).reshape(-1, 16)
    np.testing.assert_allclose(sums, [1 + wide.sum(0), 1 + (wide * wide).sum(0)], rtol=1e-12)
    scale, shift = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    y = wide * scale + shift
    expected = y / (1 + np.exp(-np.clip(y, -700, 700))) if silu else y  # SiLU's tails: -0 and y
    out_padded = np.full((7, 6, 3, 16), np.nan, np.float32)
    affine_rows(x, out_padded[:, 1:5], scale, shift, silu)
    np.testing.assert_allclose(out_padded[:, 1:5].reshape(-1, 16), expected, rtol=2e-6, atol=1e-6)
    assert np.isnan(out_padded[:, [0, 5]]).all()  # nothing written outside the rows given
    affine_rows(x, x, scale, shift, silu)  # in place
    np.testing.assert_allclose(x.reshape(-1, 16), expected, rtol=2e-6, atol=1e-6)


@needs_compiler
def test_group_norm_passes_refuse_what_they_cannot_read(fresh):
    channel_sums, affine_rows = cpu_native.channel_sums(), cpu_native.affine_rows()
    x, vector = np.zeros((4, 3, 8), np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="adjacent"):
        channel_sums(x[:, :, ::2], np.zeros((2, 4)))
    with pytest.raises(ValueError, match="adjacent"):
        channel_sums(x.astype(np.float64), np.zeros((2, 8)))
    with pytest.raises(ValueError, match="fp64"):
        channel_sums(x, np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        affine_rows(x, np.zeros((4, 2, 8), np.float32), vector, vector, True)
    with pytest.raises(ValueError, match="scale"):
        affine_rows(x, x, np.zeros(4, np.float32), vector, True)
    with pytest.raises(ValueError, match="shift"):
        affine_rows(x, x, vector, vector.astype(np.float64), False)
