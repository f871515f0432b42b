"""Parity of the MLX UNet2DConditionModel (and its layers) with diffusers, on tiny random-weight configs."""
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from mlx.utils import tree_flatten

from tests.arrays import nchw, nhwc, relative_error
from backend.engines.mlx import cpu_kernels, layers, weights
from backend.engines.mlx.unet import UNet2DConditionModel, UNetConfig

COMMON = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(32, 64))
CONFIGS = {
    # SD 1.x: conv proj_in/out, the head count given as an int "attention_head_dim".
    "sd1": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8),
    # SD 2.x: linear projections, per-level head counts, upcast attention, all levels with attention.
    "sd2": dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
    # SDXL: first level without attention, 2 transformer layers deeper down, text_time micro-conditioning.
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                 attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32),
    # LCM: guidance embedding through time_embedding.cond_proj.
    "lcm": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                time_cond_proj_dim=32),
    # Options the big configs don't exercise: 3 levels, per-level layers, scale_shift, no mid block.
    "misc": dict(block_out_channels=(32, 32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D",
                 "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                 layers_per_block=(1, 2, 1), cross_attention_dim=32, attention_head_dim=4,
                 resnet_time_scale_shift="scale_shift", only_cross_attention=(True, False, False),
                 mid_block_type=None, flip_sin_to_cos=False, freq_shift=1),
}


# The published configs (non-default fields; nulls as in the files) of the full-size UNets.
SD15 = dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], sample_size=64,
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, num_class_embeds=None)
REAL_CONFIGS = {
    "sd15": SD15,
    "sd21": {**SD15, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
             "upcast_attention": True, "num_attention_heads": None},
    "lcm-sd15": {**SD15, "time_cond_proj_dim": 256},
    "sdxl": dict(addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
                 use_linear_projection=True, upcast_attention=None, sample_size=128, time_cond_proj_dim=None),
}


def assert_same_parameters(torch_module, mlx_module):
    """Every checkpoint tensor has a model parameter of a shape weights.py maps it onto, and back."""
    mine = {k: tuple(v.shape) for k, v in tree_flatten(mlx_module.parameters())}
    theirs = {weights.rename(k): tuple(v.shape) for k, v in torch_module.state_dict().items()}
    assert set(mine) == set(theirs)
    for name, shape in theirs.items():
        fits = {shape}
        if len(shape) == 4:
            fits |= {(shape[0], shape[2], shape[3], shape[1]), shape[:2] if shape[2:] == (1, 1) else shape}
        assert mine[name] in fits, (name, mine[name], shape)



def build(name: str):
    torch.manual_seed(0)
    torch_unet = TorchUNet(**{**COMMON, **CONFIGS[name]}).eval()
    # Norms start at weight 1, bias 0: perturb them so a misplaced norm parameter would show.
    with torch.no_grad():
        for pname, p in torch_unet.named_parameters():
            if "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    mlx_unet = UNet2DConditionModel(dict(torch_unet.config))
    state = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    weights.load_into(mlx_unet, state)
    return torch_unet, mlx_unet


def inputs(torch_unet, batch=2, size=16, seed=0):
    cfg = torch_unet.config
    g = torch.Generator().manual_seed(seed)
    cross = cfg.cross_attention_dim
    args = dict(sample=torch.randn(batch, 4, size, size, generator=g),
                timestep=torch.tensor([999.0, 1.0][:batch]),
                encoder_hidden_states=torch.randn(batch, 77, cross, generator=g))
    extra = {}
    if cfg.addition_embed_type == "text_time":
        extra["text_embeds"] = torch.randn(batch, 32, generator=g)
        extra["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch)
    if cfg.time_cond_proj_dim:
        w = torch.tensor([4.5, 7.0][:batch])
        from diffusers import LatentConsistencyModelPipeline
        extra["timestep_cond"] = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, w, embedding_dim=cfg.time_cond_proj_dim)
    return args, extra


def run_mlx(mlx_unet, args, extra, dtype=mx.float32):
    out = mlx_unet(nhwc(args["sample"]).astype(dtype), mx.array(args["timestep"].numpy()),
                   mx.array(args["encoder_hidden_states"].numpy()).astype(dtype),
                   **{k: mx.array(v.numpy()).astype(dtype) for k, v in extra.items()})
    return nchw(out)


def run_both(torch_unet, mlx_unet, args, extra):
    with torch.no_grad():
        added = {k: extra[k] for k in ("text_embeds", "time_ids") if k in extra} or None
        ref = torch_unet(**args, added_cond_kwargs=added, timestep_cond=extra.get("timestep_cond")).sample.numpy()
    return run_mlx(mlx_unet, args, extra), ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(name):
    torch_unet, mlx_unet = build(name)
    args, extra = inputs(torch_unet)
    mine, ref = run_both(torch_unet, mlx_unet, args, extra)
    assert mine.shape == ref.shape
    assert relative_error(mine, ref) <= 1e-4


def test_unet_odd_latent_size_upsamples_to_skip_size():
    torch_unet, mlx_unet = build("sd1")
    args, extra = inputs(torch_unet, batch=1, size=13)
    mine, ref = run_both(torch_unet, mlx_unet, args, extra)
    assert mine.shape == ref.shape == (1, 4, 13, 13)
    assert relative_error(mine, ref) <= 1e-4


def test_unet_fp16_is_finite_and_close_to_fp32():
    torch_unet, mlx_unet = build("sdxl")
    args, extra = inputs(torch_unet)
    fp32 = run_mlx(mlx_unet, args, extra)
    mlx_unet.set_dtype(mx.float16)
    fp16 = run_mlx(mlx_unet, args, extra, dtype=mx.float16)
    assert np.isfinite(fp16).all()
    assert relative_error(fp16, fp32) < 2e-2


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_full_size_configs_build_diffusers_parameters(name):
    with torch.device("meta"):  # shapes only: no memory for the full-size weights
        torch_unet = TorchUNet(**REAL_CONFIGS[name])
    mlx_unet = UNet2DConditionModel(dict(torch_unet.config))  # MLX initializes lazily: nothing is allocated
    assert_same_parameters(torch_unet, mlx_unet)


def test_config_heads_quirk_and_refusals():
    cfg = UNetConfig.from_dict({**COMMON, **CONFIGS["sd2"], "_class_name": "UNet2DConditionModel"})
    assert cfg.heads_per_level == [2, 4]
    assert UNetConfig.from_dict({**COMMON, **CONFIGS["sd1"]}).heads_per_level == [8, 8]
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_dict({**COMMON, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="block type"):
        UNet2DConditionModel({**COMMON, "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
                              "up_block_types": ("UpBlock2D", "UpBlock2D")})


@pytest.mark.parametrize("n_q,n_kv,heads,dim", [(300, 77, 3, 16), (1500, 1500, 2, 8), (64, 64, 1, 512)])
def test_attention_kernel_matches_softmax(n_q, n_kv, heads, dim):
    # Sizes chosen to cover whole-head chunks, row chunks with a remainder, and the VAE's single wide head.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, heads, n, dim)).astype(np.float32) * 3 for n in (n_q, n_kv, n_kv))
    scale = 1 / math.sqrt(dim)
    s = np.einsum("bhnd,bhmd->bhnm", q.astype(np.float64), k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhnm,bhmd->bhnd", p / p.sum(-1, keepdims=True), v)
    out = np.array(cpu_kernels.attention(mx.array(q), mx.array(k), mx.array(v), scale))
    assert relative_error(out, ref) <= 1e-5
    half = np.array(layers.attention(*(mx.array(a).astype(mx.float16) for a in (q, k, v)), scale))
    assert half.dtype == np.float16 and relative_error(half.astype(np.float32), ref) < 5e-3


def test_exp2_kernel_accuracy_and_clamping():
    x = mx.linspace(-125.0, 126.0, 100001)
    rel = mx.abs(cpu_kernels.exp2(x) / mx.power(2.0, x) - 1)
    assert mx.max(rel).item() < 1e-6
    tiny = np.array(cpu_kernels.exp2(mx.array([-200.0, -1e6])))
    huge = np.array(cpu_kernels.exp2(mx.array([200.0])))
    assert np.all(tiny >= 0) and np.all(tiny < 1e-37) and np.isfinite(huge).all() and huge[0] > 1e38


def test_cpu_silu_and_gelu_match_torch():
    x = np.concatenate([np.linspace(-30, 30, 20001), [-1e4, -100.0, 0.0, 100.0, 1e4]]).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(np.array(cpu_kernels.silu(mx.array(x))), torch.nn.functional.silu(t).numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(cpu_kernels.gelu(mx.array(x))), torch.nn.functional.gelu(t).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert cpu_kernels.silu(mx.array(x).astype(mx.float16)).dtype == mx.float16


def test_cpu_kernels_have_the_right_gradients():
    x = mx.linspace(-12, 12, 2001)
    sig, gauss = mx.sigmoid(x), mx.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    for mine, ref in [(cpu_kernels.silu, sig * (1 + x * (1 - sig))),
                      (cpu_kernels.gelu, 0.5 * (1 + mx.erf(x / math.sqrt(2))) + x * gauss)]:
        assert mx.max(mx.abs(mx.grad(lambda y: mine(y).sum())(x) - ref)).item() < 1e-5
    q, k, v = (mx.random.normal((1, 2, 30, 8), key=mx.random.key(i)) for i in range(3))
    weights_out = mx.arange(8, dtype=mx.float32)
    mine = mx.grad(lambda *a: (cpu_kernels.attention(*a, 0.3) * weights_out).sum(), argnums=(0, 1, 2))(q, k, v)
    ref = mx.grad(lambda q, k, v: ((mx.softmax(q @ k.swapaxes(-1, -2) * 0.3, -1) @ v) * weights_out).sum(),
                  argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(mine, ref):
        assert relative_error(np.array(a), np.array(b)) < 1e-5


def test_unet_parameter_gradients_match_torch():
    torch_unet, mlx_unet = build("sd1")
    args, extra = inputs(torch_unet, batch=1, size=8)
    probe = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    torch_unet.zero_grad()
    (torch_unet(**args).sample * probe).sum().backward()
    sample, t = nhwc(args["sample"]), mx.array(args["timestep"].numpy())
    ctx = mx.array(args["encoder_hidden_states"].numpy())

    def loss(params):
        mlx_unet.update(params)
        return (mlx_unet(sample, t, ctx) * nhwc(probe)).sum()

    grads = mx.grad(loss)(mlx_unet.trainable_parameters())
    flat = dict(tree_flatten(grads))
    torch_params = dict(torch_unet.named_parameters())
    for name in ("conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "down_blocks.0.attentions.0.proj_in.weight", "down_blocks.1.resnets.0.norm1.weight",
                 "up_blocks.1.resnets.2.conv2.weight",
                 "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
                 "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "time_embedding.linear_1.weight"):
        ref = torch_params[name].grad.numpy()
        mine = np.array(flat[name])
        mine = mine.transpose(0, 3, 1, 2) if mine.ndim == 4 else mine.reshape(ref.shape)
        assert relative_error(mine, ref) <= 1e-4, name


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = np.array([0.0, 1.0, 261.0, 999.0, 1024.0], np.float32)
    for dim, flip, shift in [(32, True, 0), (33, False, 1), (8, True, 0)]:
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
        mine = np.array(layers.timestep_embedding(mx.array(t), dim, flip, shift))
        np.testing.assert_allclose(mine, ref, atol=2e-5)


def test_without_a_cpu_compiler_mlx_ops_are_used(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_compiled_kernels_work", False)
    assert np.allclose(np.array(layers.gelu(mx.array([1.0]))), 0.8413447, atol=1e-6)
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 50, 8)).astype(np.float32)) for _ in range(3))
    ref = mx.softmax((q @ k.swapaxes(-1, -2)) * 0.5, axis=-1) @ v
    assert relative_error(np.array(layers.attention(q, k, v, 0.5)), np.array(ref)) <= 1e-5


def test_eager_chunked_activations_equal_the_lazy_ones():
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels need MLX's CPU compiler")
    x = mx.random.normal((3, 1000, 701), key=mx.random.key(0)).astype(mx.float16)  # 2.1 M: not a multiple of a chunk
    lazy = [layers.gelu(x), layers.silu(x)]
    with cpu_kernels.eager_chunks():
        eager = [layers.gelu(x), layers.silu(x)]
        assert cpu_kernels.eager_chunks.active
    assert not cpu_kernels.eager_chunks.active
    for a, b in zip(lazy, eager):
        assert a.shape == b.shape == x.shape and a.dtype == b.dtype == mx.float16
        assert mx.array_equal(a, b).item()
