"""The embedded model's trainer, on a toy budget: it runs end to end, resumes, continues, and refuses a mismatch."""
import backend  # noqa: F401  (OpenBLAS before mlx)

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from backend.embedded import train

TOY = dict(examples=48, vae_steps=3, vae_batch=4, vae_warmup=1, unet_steps=3, unet_batch=4, warmup=1,
           checkpoint_every=2)


def options(settings):
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    work, out = root / "work", root / "model"
    train.main(["--work", str(work), "--out", str(out)] + options(TOY))
    return work, out


def test_a_run_writes_a_model_that_generates(finished_run):
    work, out = finished_run
    progress = json.loads((work / "progress.json").read_text())
    assert progress["phase"] == "unet" and progress["step"] == TOY["unet_steps"]
    pipe = backend.load_pipeline(str(out), engine="mlx", precision="fp32")
    result = pipe.generate(backend.GenerationRequest(prompt="a red circle", steps=2, seed=0))
    assert result.image.size == (64, 64)
    assert np.isfinite(np.asarray(result.image, dtype=np.float32)).all()


def test_the_same_settings_give_the_same_weights(finished_run, tmp_path):
    _, out = finished_run
    again = tmp_path / "model"
    train.main(["--work", str(tmp_path / "work"), "--out", str(again)] + options(TOY))
    first, second = unet_weights(out), unet_weights(again)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_a_finished_run_can_be_continued_and_not_changed(finished_run, tmp_path):
    work, out = finished_run
    args = ["--work", str(work), "--out", str(tmp_path / "longer")]
    with pytest.raises(SystemExit, match="unet_lr"):
        train.main(args + options(TOY) + ["--unet-lr=0.01"])
    longer = dict(TOY, unet_steps=TOY["unet_steps"] + 2)
    train.main(args + options(longer))
    assert json.loads((work / "progress.json").read_text())["step"] == longer["unet_steps"]
    before, after = unet_weights(out), unet_weights(tmp_path / "longer")
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_latent_noise_changes_what_the_decoder_sees_only_when_asked():
    import mlx.core as mx
    vae = train.fresh_parts(0).vae
    rng = np.random.default_rng(0)
    images = mx.array(rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
    weights = mx.ones((2, 32, 32, 1))
    noise = mx.array(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
    extra = mx.array(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
    plain = train.vae_loss(vae, images, weights, noise, 1e-6)[0].item()
    assert train.vae_loss(vae, images, weights, noise, 1e-6, 0.0, extra)[0].item() == pytest.approx(plain)
    noisy = train.vae_loss(vae, images, weights, noise, 1e-6, 0.5, extra)[0].item()
    assert noisy != pytest.approx(plain)
