"""Checkpoint loading: the Hub cache layout offline, fp16 variants, sharded weights, refusals."""
import json
import shutil

import numpy as np
import pytest

from backend import registry
from backend.checkpoint import ModelSpec
from backend.engines.mlx import weights as W
from backend.types import UserError
from tests.tiny_models import fake_hub_cache


def test_hub_id_resolves_from_cache_offline(tiny_pipelines, tmp_path, monkeypatch):
    _, folder = tiny_pipelines("sd1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    snapshot = fake_hub_cache(tmp_path / "hub", "someone/tiny-sd", folder)
    assert registry.resolve("someone/tiny-sd") == snapshot
    with pytest.raises(UserError, match="cannot be reached"):
        registry.resolve("someone/not-downloaded")


def test_weight_patterns_prefer_fp16_variant():
    files = ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors"]
    chosen = registry._weight_patterns(files)
    assert chosen == ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                      "vae/diffusion_pytorch_model.safetensors"]


def test_sharded_and_variant_files(tiny_pipelines, tmp_path):
    import mlx.core as mx
    _, folder = tiny_pipelines("sd1")
    unet = tmp_path / "unet"
    unet.mkdir()
    state = W.read_safetensors(W.safetensors_files(folder / "unet"))
    names = sorted(state)
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        mx.save_safetensors(str(unet / fname), {k: state[k] for k in keys})
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    files = W.safetensors_files(unet)
    assert [f.name for f in files] == sorted(shards)
    assert set(W.read_safetensors(files)) == set(names)
    mx.save_safetensors(str(unet / "diffusion_pytorch_model.fp16.safetensors"),
                        {k: v.astype(mx.float16) for k, v in state.items()})
    assert [f.name for f in W.safetensors_files(unet, variant="fp16")] == ["diffusion_pytorch_model.fp16.safetensors"]


def test_pickle_only_component_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(W.WeightError, match="arbitrary code"):
        W.safetensors_files(tmp_path / "unet")


def test_model_spec_reads_family_and_defaults(tiny_pipelines):
    for family, expect in (("sd1", "sd"), ("sdxl", "sdxl"), ("lcm", "sd")):
        spec = ModelSpec.from_folder(tiny_pipelines(family)[1])
        assert spec.family == expect
        assert spec.is_lcm == (family == "lcm")
        assert spec.vae_scale_factor == 2 and spec.native_size == 32
    assert ModelSpec.from_folder(tiny_pipelines("lcm")[1]).default("scheduler") == "lcm"


def test_corrupted_weights_give_a_clear_error(tiny_pipelines, tmp_path):
    from backend.pipeline import load_pipeline
    _, folder = tiny_pipelines("sd1")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    f = next((bad / "unet").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="unet"):
        load_pipeline(str(bad), engine="mlx")


def test_fp16_and_bf16_generate_finite_images(tiny_pipelines):
    from backend import GenerationRequest
    from backend.measure import psnr
    from backend.pipeline import load_pipeline
    _, folder = tiny_pipelines("sd1")
    noise = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    req = GenerationRequest(prompt="a red circle", steps=3, guidance=5.0, width=32, height=32, latents=noise, seed=1)
    ref = load_pipeline(str(folder), engine="mlx", precision="fp32").generate(req).pixels[0]
    for precision in ("fp16", "bf16"):
        out = load_pipeline(str(folder), engine="mlx", precision=precision).generate(req)
        assert np.isfinite(out.pixels).all()
        assert psnr(out.pixels[0], ref) > 30.0
