"""Parity of the MLX AutoencoderKL with diffusers: decode, encode, old attention names, fp16."""
import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

from mlx.utils import tree_flatten

from tests.arrays import nchw, nhwc, relative_error
from backend.engines.mlx import weights
from backend.engines.mlx.vae import AutoencoderKL, VAEConfig

CONFIG = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              norm_num_groups=32, sample_size=32, scaling_factor=0.13025, force_upcast=False)



def old_attention_names(state: dict) -> dict:
    """The state dict as pre-0.14 diffusers checkpoints name the mid-block attention."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for name, value in state.items():
        for new, old in renames.items():
            name = name.replace(new, old)
        if ".attentions." in name and value.ndim == 2:  # and as 1x1 conv kernels, like the original LDM VAE
            value = value[:, :, None, None]
        out[name] = value
    return out


@pytest.fixture(scope="module")
def vaes():
    torch.manual_seed(0)
    torch_vae = TorchVAE(**CONFIG).eval()
    with torch.no_grad():
        for name, p in torch_vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
    mlx_vae = weights.load_into(AutoencoderKL(dict(torch_vae.config)), state)
    return torch_vae, mlx_vae, state


def test_config_exposes_latent_scaling():
    cfg = VAEConfig.from_dict({**CONFIG, "shift_factor": 0.1159, "_class_name": "AutoencoderKL", "new_key": 1})
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.force_upcast) == (0.13025, 0.1159, False)
    assert VAEConfig.from_dict({}).scaling_factor == 0.18215 and VAEConfig.from_dict({}).force_upcast
    with pytest.raises(ValueError, match="not supported"):
        VAEConfig.from_dict({**CONFIG, "up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")})


@pytest.mark.parametrize("scaling_factor", [0.18215, 0.13025])  # the SD 1.x/2.x and SDXL VAEs
def test_full_size_config_builds_diffusers_parameters(scaling_factor):
    cfg = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=512,
               scaling_factor=scaling_factor)
    with torch.device("meta"):
        torch_vae = TorchVAE(**cfg)
    mine = {k: tuple(v.shape) for k, v in tree_flatten(AutoencoderKL(dict(torch_vae.config)).parameters())}
    theirs = {k: tuple(v.shape) for k, v in torch_vae.state_dict().items()}
    assert set(mine) == set(theirs)
    for name, shape in theirs.items():
        moved = (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else shape
        assert mine[name] in (shape, moved, shape[:2] if shape[2:] == (1, 1) else shape), name


def test_decode_matches_diffusers(vaes):
    torch_vae, mlx_vae, _ = vaes
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_vae.decode(z).sample.numpy()
    mine = nchw(mlx_vae.decode(nhwc(z)))
    assert mine.shape == ref.shape == (2, 3, 16, 16)
    assert relative_error(mine, ref) <= 1e-4


def test_encode_matches_diffusers(vaes):
    torch_vae, mlx_vae, _ = vaes
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist = torch_vae.encode(x).latent_dist
    mean, logvar = mlx_vae.encode(nhwc(x))
    assert relative_error(nchw(mean), dist.mean.numpy()) <= 1e-4
    assert relative_error(nchw(logvar), dist.logvar.numpy()) <= 1e-4


def test_old_attention_names_load_to_the_same_model(vaes):
    torch_vae, mlx_vae, state = vaes
    old = old_attention_names(state)
    assert any(".proj_attn." in name for name in old)
    legacy = weights.load_into(AutoencoderKL(dict(torch_vae.config)), old)
    z = mx.random.normal((1, 8, 8, 4), key=mx.random.key(3))
    assert np.array_equal(np.array(legacy.decode(z)), np.array(mlx_vae.decode(z)))


def test_no_mid_attention_and_no_quant_convs():
    torch.manual_seed(0)
    cfg = {**CONFIG, "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False}
    torch_vae = TorchVAE(**cfg).eval()
    mlx_vae = weights.load_into(AutoencoderKL(dict(torch_vae.config)),
                                {k: v.numpy() for k, v in torch_vae.state_dict().items()})
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_vae.decode(z).sample.numpy()
    assert relative_error(nchw(mlx_vae.decode(nhwc(z))), ref) <= 1e-4


def test_fp16_decode_is_finite_and_close(vaes):
    torch_vae, mlx_vae, state = vaes
    half = weights.load_into(AutoencoderKL(dict(torch_vae.config)), state, dtype=mx.float16)
    z = mx.random.normal((1, 8, 8, 4), key=mx.random.key(4))
    fp32 = np.array(mlx_vae.decode(z))
    fp16 = np.array(half.decode(z.astype(mx.float16)).astype(mx.float32))
    assert np.isfinite(fp16).all()
    assert relative_error(fp16, fp32) < 2e-2
