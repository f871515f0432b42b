"""The CPU decoder's row bands and Winograd convolution compute what the one-graph decoder computes."""
import math

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest

from tests.arrays import relative_error
from tests.tiny_models import cast_vae, perturbed_vae
from backend.engines.mlx import cpu_kernels, vae_bands, winograd


pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the band decoder is the CPU path")


@pytest.fixture(scope="module")
def vae():
    return perturbed_vae()


@pytest.fixture
def tiny_bands(monkeypatch):
    """Bands of one tile of rows and one-row convolution calls: every halo and border case is used."""
    monkeypatch.setattr(vae_bands, "BAND_BYTES", 1)
    monkeypatch.setattr(vae_bands, "UNFOLD_BYTES", 1)


@pytest.mark.parametrize("tile", [4, 2, 0])  # Winograd F(4x4), F(2x2), MLX's convolution
@pytest.mark.parametrize("shape", [(2, 6, 8, 4), (1, 9, 7, 4)])  # sizes that are not whole tiles
def test_banded_decode_matches_the_graph(vae, tiny_bands, monkeypatch, shape, tile):
    monkeypatch.setattr(vae_bands, "WINOGRAD_TILE", tile)
    z = mx.random.normal(shape, key=mx.random.key(1))
    banded = np.array(vae.decoder(z))
    assert banded.shape == (shape[0], 2 * shape[1], 2 * shape[2], 3)
    assert relative_error(banded, np.array(vae.decoder.graph(z))) <= 1e-5


@pytest.mark.parametrize("tile", [4, 0])
@pytest.mark.parametrize("shape", [(2, 12, 16, 3), (1, 17, 13, 3), (1, 8, 8, 3)])  # odd sizes: the downsampler's padding
def test_banded_encode_matches_the_graph(vae, tiny_bands, monkeypatch, shape, tile):
    monkeypatch.setattr(vae_bands, "WINOGRAD_TILE", tile)
    x = mx.random.uniform(-1, 1, shape, key=mx.random.key(3))
    banded = np.array(vae.encoder(x))
    graph = np.array(vae.encoder.graph(x))
    assert banded.shape == graph.shape == (shape[0], (shape[1] - 2) // 2 + 1, (shape[2] - 2) // 2 + 1, 8)
    assert relative_error(banded, graph) <= 1e-5


def test_default_bands_match_the_graph(vae):
    z = mx.random.normal((1, 16, 16, 4), key=mx.random.key(2))
    assert relative_error(np.array(vae.decoder(z)), np.array(vae.decoder.graph(z))) <= 1e-5


@pytest.mark.parametrize("tile", [4, 0])
def test_fp16_bands_stay_fp16(vae, tiny_bands, monkeypatch, tile):
    monkeypatch.setattr(vae_bands, "WINOGRAD_TILE", tile)
    half = cast_vae(vae, mx.float16)
    z = mx.random.normal((1, 6, 6, 4), key=mx.random.key(3)).astype(mx.float16)
    banded = half.decoder(z)
    assert banded.dtype == mx.float16
    ref = np.array(half.decoder.graph(z).astype(mx.float32))
    assert relative_error(np.array(banded.astype(mx.float32)), ref) < 1e-2


def test_gradients_through_the_bands_match_the_graph(vae, tiny_bands):
    z = mx.random.normal((1, 4, 6, 4), key=mx.random.key(4))
    target = mx.random.normal((1, 8, 12, 3), key=mx.random.key(5))

    def loss(params, z, forward):
        vae.decoder.update(params)
        return mx.mean(mx.square(forward(z) - target))
    params = vae.decoder.trainable_parameters()
    grads_bands = mx.grad(loss, argnums=(0, 1))(params, z, vae.decoder)
    grads_graph = mx.grad(loss, argnums=(0, 1))(params, z, vae.decoder.graph)
    vae.decoder.update(params)
    flat_bands = dict(tree_flatten(grads_bands))
    flat_graph = dict(tree_flatten(grads_graph))
    assert flat_bands.keys() == flat_graph.keys()
    scale = max(float(mx.abs(g).max()) for g in flat_graph.values())
    for name, ref in flat_graph.items():  # (the key biases' true gradient is 0: compare on one scale)
        np.testing.assert_allclose(np.array(flat_bands[name]), np.array(ref), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)


def test_compiled_decoder_keeps_one_graph(vae):
    z = mx.random.normal((1, 4, 4, 4), key=mx.random.key(6))
    compiled = mx.compile(vae.decoder)
    assert relative_error(np.array(compiled(z)), np.array(vae.decoder.graph(z))) <= 1e-6


def test_cache_limit_is_restored(vae):
    previous = mx.set_cache_limit(40 << 20)
    try:
        vae.decoder(mx.zeros((1, 4, 4, 4)))
        assert mx.set_cache_limit(40 << 20) == 40 << 20
    finally:
        mx.set_cache_limit(previous)


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("b, rows, cols, c_in, c_out", [(1, 4, 4, 3, 5), (2, 8, 12, 16, 8), (1, 12, 4, 64, 32)])
def test_winograd_matches_direct_convolution(b, rows, cols, c_in, c_out, m):
    keys = mx.random.split(mx.random.key(7), 3)
    padded = mx.random.normal((b, rows + 2, cols + 2, c_in), key=keys[0])
    weight = mx.random.normal((c_out, 3, 3, c_in), key=keys[1]) / math.sqrt(9 * c_in)
    residual = mx.random.normal((b, rows, cols, c_out), key=keys[2])
    bias = mx.arange(c_out, dtype=mx.float32)
    ref = mx.conv2d(padded, weight) + bias + residual
    u = winograd.transform_weight(weight, m)
    out = winograd.conv3x3(padded, u, m, [bias, residual])
    assert out.shape == ref.shape
    assert relative_error(np.array(out), np.array(ref)) <= 1e-6
    plain = winograd.conv3x3(padded, u, m)
    assert relative_error(np.array(plain), np.array(mx.conv2d(padded, weight))) <= (1e-6 if m == 2 else 1e-5)


def test_affine_silu_and_its_gradients():
    keys = mx.random.split(mx.random.key(8), 3)
    x = mx.random.normal((2, 3, 4, 8), key=keys[0]) * 4
    scale, shift = mx.random.normal((2, 1, 1, 8), key=keys[1]), mx.random.normal((1, 1, 1, 8), key=keys[2])

    def reference(x, scale, shift):
        a = x * scale + shift
        return a * mx.sigmoid(a)
    assert relative_error(np.array(cpu_kernels.affine_silu(x, scale, shift)), np.array(reference(x, scale, shift))) <= 1e-6
    weights = mx.cos(x)
    mine = mx.grad(lambda *a: (cpu_kernels.affine_silu(*a) * weights).sum(), argnums=(0, 1, 2))(x, scale, shift)
    ref = mx.grad(lambda *a: (reference(*a) * weights).sum(), argnums=(0, 1, 2))(x, scale, shift)
    for m, r in zip(mine, ref):
        assert m.shape == r.shape
        assert relative_error(np.array(m), np.array(r)) <= 1e-5
