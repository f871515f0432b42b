"""Parity of the MLX SD3Transformer2DModel (MMDiT) with diffusers, on tiny random-weight configs,
and of the tanh-GELU kernel it uses with torch."""
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel as TorchSD3
from mlx.utils import tree_flatten

from tests.arrays import nchw, nhwc, relative_error
from backend.engines.mlx import cpu_kernels, layers
from backend.engines.mlx.mmdit import SD3Config, SD3Transformer2DModel, load_sd3_transformer, sincos_pos_embed

COMMON = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=8,
              num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
              pos_embed_max_size=32)
CONFIGS = {
    # SD3: no q/k norm, 3 layers (two full blocks, then the context_pre_only one).
    "sd3": dict(num_layers=3),
    # SD3.5 Medium-style: RMS q/k norms and dual attention, here also in the last (context_pre_only) block.
    "sd35": dict(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    # SD3.5 Large-style (q/k norms, no dual attention) with 3 layers, one dual block in the middle.
    "sd35-mixed": dict(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(1,)),
    # No pos_embed_max_size: the embedding is not saved, computed for the latent's grid.
    "no-max-size": dict(num_layers=2, sample_size=16, pos_embed_max_size=None),
}
CONTEXT_TOKENS = 24


def build(name: str, folder, dtype=mx.float32):
    """(diffusers model, MLX model loaded from its save_pretrained folder)."""
    torch.manual_seed(0)
    model = TorchSD3(**{**COMMON, **CONFIGS[name]}).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm_q" in pname or "norm_k" in pname or "norm_added" in pname:
                p.add_(0.2 * torch.randn_like(p))  # RMS norms start at 1: a misplaced one would not show
            elif ".linear." in pname and "norm" in pname:
                p.mul_(5)  # adaLN shifts, scales and gates O(1) as in trained models, not ~0.2: every branch shows
    model.save_pretrained(str(folder), safe_serialization=True)
    return model, load_sd3_transformer(folder, dtype)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


def inputs(model, batch=2, height=32, width=32, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, cfg.in_channels, height, width, generator=g),
                timestep=torch.tensor([1000.0, 437.5, 12.0][:batch]),
                encoder_hidden_states=torch.randn(batch, CONTEXT_TOKENS, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g))


def run_mlx(mlx_model, args, dtype=mx.float32) -> np.ndarray:
    cast = lambda t: mx.array(t.numpy()).astype(dtype)  # noqa: E731
    out = mlx_model(nhwc(args["hidden_states"]).astype(dtype), mx.array(args["timestep"].numpy()),
                    cast(args["encoder_hidden_states"]), cast(args["pooled_projections"]))
    assert out.dtype == dtype
    return nchw(out)


def run_torch(model, args) -> np.ndarray:
    with torch.no_grad():
        return model(**args).sample.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("height,width", [(32, 32), (16, 24), (64, 64)])
def test_transformer_matches_diffusers(models, name, height, width):
    # 32x32 and 16x24 crop the 32x32-patch position table (16x24: non-square); 64x64 uses all of it.
    if name == "no-max-size" and (height, width) == (64, 64):
        height, width = 24, 16  # non-square the other way round, on the computed embedding
    torch_model, mlx_model = models(name)
    args = inputs(torch_model, height=height, width=width)
    mine, ref = run_mlx(mlx_model, args), run_torch(torch_model, args)
    assert mine.shape == ref.shape == (2, 16, height, width)
    assert relative_error(mine, ref) < 1e-4


def test_batch_rows_are_independent(models):
    torch_model, mlx_model = models("sd35")
    args = inputs(torch_model, batch=3, height=16, width=16)
    whole = run_mlx(mlx_model, args)
    alone = run_mlx(mlx_model, {k: v[1:2] for k, v in args.items()})
    assert relative_error(whole[1:2], alone) < 1e-5


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_transformer_fp16_is_finite_and_close(models, tmp_path, name):
    torch_model, _ = models(name)
    torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
    half = load_sd3_transformer(tmp_path, mx.float16)
    assert {v.dtype for _, v in tree_flatten(half.parameters())} == {mx.float16}
    args = inputs(torch_model, height=16, width=24)
    mine = run_mlx(half, args, mx.float16)
    assert np.isfinite(mine).all()
    assert relative_error(mine, run_torch(torch_model, args)) < 2e-2


def test_checkpoint_carries_the_position_table(models, tmp_path):
    from safetensors.numpy import load_file
    torch_model, mlx_model = models("sd3")
    torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
    saved = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert saved["pos_embed.pos_embed"].shape == (1, 32 * 32, 32)
    np.testing.assert_array_equal(np.array(mlx_model.pos_embed.pos_embed), saved["pos_embed.pos_embed"])
    # ... frozen: not a trainable parameter
    assert "pos_embed.pos_embed" not in dict(tree_flatten(mlx_model.trainable_parameters()))
    # and equal to the sin-cos table diffusers computed at construction
    np.testing.assert_allclose(sincos_pos_embed(32, 32, 32, base_size=16), saved["pos_embed.pos_embed"][0], atol=1e-6)
    # without pos_embed_max_size diffusers does not save it
    assert "pos_embed.pos_embed" not in dict(models("no-max-size")[0].state_dict())


def test_sincos_pos_embed_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    for dim, (h, w), base in [(32, (5, 7), 8), (64, (12, 4), 16), (16, (3, 3), 3)]:
        ref = get_2d_sincos_pos_embed(dim, (h, w), base_size=base, output_type="pt").float().numpy()
        np.testing.assert_allclose(sincos_pos_embed(dim, h, w, base), ref, atol=1e-6)


def test_latent_size_limits(models):
    torch_model, mlx_model = models("sd3")
    assert mlx_model.max_latent_size == 64
    args = inputs(torch_model, batch=1, height=66, width=32)
    with pytest.raises(ValueError, match="limit of 64x64"):
        run_mlx(mlx_model, args)
    with pytest.raises(ValueError):  # diffusers refuses it too
        run_torch(torch_model, args)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        run_mlx(mlx_model, inputs(torch_model, batch=1, height=15, width=16))
    with pytest.raises(ValueError, match="NHWC"):
        mlx_model(mx.zeros((1, 16, 8, 8)), mx.array([1.0]), mx.zeros((1, CONTEXT_TOKENS, 32)), mx.zeros((1, 64)))


def test_config_defaults_extra_and_refusals():
    cfg = SD3Config.from_dict({"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.30.0",
                               "caption_projection_dim": 1152, "dual_attention_layers": [0, 1], "out_channels": None,
                               "some_future_option": 3})
    assert (cfg.num_layers, cfg.pos_embed_max_size, cfg.inner_dim, cfg.out_channels) == (18, 96, 1152, 16)
    assert cfg.dual_attention_layers == (0, 1) and cfg.extra == {"some_future_option": 3}
    with pytest.raises(ValueError, match="qk_norm 'layer_norm'"):
        SD3Config.from_dict({**COMMON, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="caption_projection_dim=48"):
        SD3Config.from_dict({**COMMON, "caption_projection_dim": 48})
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        SD3Config.from_dict({"_class_name": "FluxTransformer2DModel"})


# The published transformer configs (non-default fields) of SD3 Medium, SD3.5 Medium and SD3.5 Large.
SD3_MEDIUM = dict(sample_size=128, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                  pos_embed_max_size=192)
REAL_CONFIGS = {
    "sd3-medium": SD3_MEDIUM,
    "sd3.5-medium": {**SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                     "dual_attention_layers": list(range(13))},
    "sd3.5-large": {**SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                    "qk_norm": "rms_norm", "dual_attention_layers": []},
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_full_size_configs_build_diffusers_parameters(name):
    with torch.device("meta"):  # shapes only: no memory for the full-size weights
        torch_model = TorchSD3(**REAL_CONFIGS[name])
    mlx_model = SD3Transformer2DModel(dict(torch_model.config))  # MLX initializes lazily: nothing is allocated
    mine = {k: tuple(v.shape) for k, v in tree_flatten(mlx_model.parameters())}
    theirs = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert set(mine) == set(theirs)
    for key, shape in theirs.items():
        fits = {shape, (shape[0], *shape[2:], shape[1])} if len(shape) == 4 else {shape}  # conv: OIHW -> OHWI
        assert mine[key] in fits, (key, mine[key], shape)


# ----------------------------------------------------------------------------------------------
# tanh-GELU
# ----------------------------------------------------------------------------------------------

def test_gelu_tanh_matches_torch():
    x = np.concatenate([np.linspace(-30, 30, 20001), [-1e30, -1e4, -100.0, 0.0, 100.0, 1e4, 1e30]]).astype(np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(np.array(cpu_kernels.gelu_tanh(mx.array(x))), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(layers.gelu_tanh(mx.array(x))), ref, rtol=1e-6, atol=1e-6)
    half = cpu_kernels.gelu_tanh(mx.array(x[:20001]).astype(mx.float16))
    assert half.dtype == mx.float16
    np.testing.assert_allclose(np.array(half.astype(mx.float32)), ref[:20001], rtol=2e-3, atol=2e-3)


def test_gelu_tanh_gradient_matches_torch():
    x = np.linspace(-12, 12, 2001).astype(np.float32)
    t = torch.from_numpy(x).requires_grad_()
    weights_out = torch.linspace(-1, 2, x.size)
    (torch.nn.functional.gelu(t, approximate="tanh") * weights_out).sum().backward()
    w = mx.array(weights_out.numpy())
    mine = mx.grad(lambda y: (cpu_kernels.gelu_tanh(y) * w).sum())(mx.array(x))
    np.testing.assert_allclose(np.array(mine), t.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_gelu_tanh_without_a_cpu_compiler_uses_mlx(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_compiled_kernels_work", False)
    x = np.linspace(-6, 6, 101).astype(np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(np.array(layers.gelu_tanh(mx.array(x))), ref, rtol=1e-5, atol=1e-5)


def test_gelu_tanh_eager_chunks_equal_the_lazy_result():
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels need MLX's CPU compiler")
    x = mx.random.normal((3, 1000, 701), key=mx.random.key(0)).astype(mx.float16)  # not a multiple of a chunk
    lazy = layers.gelu_tanh(x)
    with cpu_kernels.eager_chunks():
        eager = layers.gelu_tanh(x)
    assert eager.dtype == mx.float16 and mx.array_equal(lazy, eager).item()


def test_eager_blocks_equal_the_lazy_forward(models):
    torch_model, mlx_model = models("sd35")
    args = inputs(torch_model, height=16, width=16)
    lazy = run_mlx(mlx_model, args)
    with cpu_kernels.eager_chunks():
        eager = run_mlx(mlx_model, args)
    # Inference also swaps the attention kernel (cpu_attention, numpy on every core): the same sums in another
    # order, so equal to fp32 rounding rather than bit for bit.
    np.testing.assert_allclose(eager, lazy, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_blocks_at_cpu_inference_match_diffusers(models, monkeypatch, name):
    """The CPU inference path of every size (NUMPY_KERNEL_MIN lowered): q, k, v products, the q/k RMS norms,
    attention, output projections and gated residuals in numpy (JointAttention._numpy_call, FeedForward's
    project), on every block kind: full, dual attention, the last (context_pre_only) one."""
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels need MLX's CPU compiler")
    from backend.engines.mlx import cpu_rowwise
    torch_model, mlx_model = models(name)
    args = inputs(torch_model, height=16, width=24)
    calls = []
    products = cpu_rowwise.products
    monkeypatch.setattr(cpu_rowwise, "products", lambda x, linears: calls.append(len(linears)) or products(x, linears))
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
    with cpu_kernels.eager_chunks():
        mine = run_mlx(mlx_model, args)
    cfg = mlx_model.config  # image and context streams of every block, the image of every attn2
    assert len([n for n in calls if n > 1]) == 2 * cfg.num_layers + len(cfg.dual_attention_layers)  # q, k, v
    assert len([n for n in calls if n == 1]) == 2 * cfg.num_layers - 1  # each feed-forward's first product
    assert relative_error(mine, run_torch(torch_model, args)) < 1e-4


def test_timestep_scalar_broadcasts(models):
    torch_model, mlx_model = models("sd3")
    args = inputs(torch_model, height=16, width=16)
    args["timestep"] = torch.tensor([500.0, 500.0])
    per_row = run_mlx(mlx_model, args)
    cast = lambda t: mx.array(t.numpy())  # noqa: E731
    scalar = nchw(mlx_model(nhwc(args["hidden_states"]), mx.array(500.0), cast(args["encoder_hidden_states"]),
                            cast(args["pooled_projections"])))
    np.testing.assert_allclose(scalar, per_row, rtol=1e-6, atol=1e-6)
    assert math.isfinite(float(np.abs(scalar).sum()))
