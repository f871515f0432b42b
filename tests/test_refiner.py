"""SDXL base then refiner against diffusers: StableDiffusionXLPipeline(denoising_end=f, output_type="latent"),
then StableDiffusionXLImg2ImgPipeline(denoising_start=f) on those latents; the schedulers' split of one schedule;
the CLI's refiner arguments."""
import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backend import GenerationRequest, guidance as cfg
from backend.measure import psnr
from backend.pipeline import load_pipeline
from backend.schedulers import SCHEDULERS, make_scheduler
from backend.types import UserError
from tests.test_cli import run_cli
from tests.test_pipeline_parity import SIZE, diffusers_scheduler
from tests.test_schedulers import CONFIGS, SHAPE, TorchNoise, reference
from tests.tiny_models import save_pipeline

PROMPT = "a red circle at the top"
STEPS = 6  # euler: 831 665 499 333 167 1; dpmpp_2m: 853 711 569 427 285 143 (leading, offset 1)


@pytest.fixture(scope="module")
def models(tiny_pipelines, tmp_path_factory):
    base, base_folder = tiny_pipelines("sdxl")
    refiner, refiner_folder = save_pipeline("sdxl-refiner", tmp_path_factory.mktemp("tiny-sdxl-refiner"))
    return base, base_folder, refiner, refiner_folder


@pytest.fixture(scope="module")
def mine(models):
    _, base_folder, _, refiner_folder = models
    return load_pipeline(str(base_folder), engine="mlx", precision="fp32", refiner=str(refiner_folder))


def noise_for(seed=7):
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)


def reference_image(models, scheduler, start, guidance, seed=7):
    """diffusers' two pipelines, each with `scheduler` built from its own saved config."""
    base, base_folder, refiner, refiner_folder = models
    for pipe, folder in ((base, base_folder), (refiner, refiner_folder)):
        pipe.scheduler = diffusers_scheduler(
            scheduler, json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    common = dict(num_inference_steps=STEPS, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed))
    latents = base(PROMPT, height=SIZE, width=SIZE, latents=torch.from_numpy(noise_for(seed)), denoising_end=start,
                   output_type="latent", **common).images
    return refiner(PROMPT, image=latents, denoising_start=start, output_type="np", **common).images[0]


@pytest.mark.parametrize("scheduler, start, guidance", [
    ("euler", 0.8, 5.0), ("euler", 0.5, 5.0), ("dpmpp_2m", 0.8, 5.0), ("dpmpp_2m", 0.5, 5.0), ("euler", 0.8, 1.0),
])
def test_base_then_refiner_matches_diffusers(models, mine, scheduler, start, guidance):
    ref = reference_image(models, scheduler, start, guidance)
    steps = []
    result = mine.generate(GenerationRequest(prompt=PROMPT, steps=STEPS, guidance=guidance, scheduler=scheduler,
                                             width=SIZE, height=SIZE, seed=7, latents=noise_for(),
                                             refiner_start=start), callback=lambda info: steps.append(info.total))
    value = psnr(result.pixels[0], ref)
    print(f"{scheduler} start {start} guidance {guidance}: {value:.1f} dB")
    assert value >= 45.0
    assert len(result.timings.steps) == len(steps) == steps[0] == STEPS  # every step of both, one schedule
    assert 0 < result.timings.refiner_text_encoder <= result.timings.text_encoder
    assert result.parameters["refiner_start"] == start and result.parameters["refiner"] == mine.refiner.name


def test_aesthetic_time_ids_match_diffusers(models):
    """The refiner's 5 time ids, 6.0 / 2.5 aesthetic scores (diffusers' defaults), unconditional half first."""
    refiner = models[2]
    defaults = inspect.signature(refiner.__call__).parameters
    size, crop = (24, 40), (0, 0)
    cond, uncond = refiner._get_add_time_ids(size, crop, size, defaults["aesthetic_score"].default,
                                             defaults["negative_aesthetic_score"].default, size, crop, size,
                                             dtype=torch.float32, text_encoder_projection_dim=32)
    expected = torch.cat([uncond.repeat(2, 1), cond.repeat(2, 1)]).numpy()
    np.testing.assert_array_equal(cfg.time_ids("size+aesthetic", 24, 40, 2, do_cfg=True), expected)
    np.testing.assert_array_equal(cfg.time_ids("size+aesthetic", 24, 40, 1, do_cfg=False), cond.numpy())


def test_refiner_changes_the_image_and_defaults_to_0_8(models, mine):
    """Without a request fraction the refiner's default (0.8) applies; the refiner's own VAE decodes."""
    ref = reference_image(models, "euler", 0.8, 5.0)
    result = mine.generate(GenerationRequest(prompt=PROMPT, steps=STEPS, guidance=5.0, scheduler="euler",
                                             width=SIZE, height=SIZE, seed=7, latents=noise_for()))
    assert result.parameters["refiner_start"] == 0.8 and psnr(result.pixels[0], ref) >= 45.0
    base_only = load_pipeline(str(models[1]), engine="mlx", precision="fp32").generate(GenerationRequest(
        prompt=PROMPT, steps=STEPS, guidance=5.0, scheduler="euler", width=SIZE, height=SIZE, seed=7,
        latents=noise_for()))
    assert psnr(base_only.pixels[0], ref) < 30.0


def test_cli_base_then_refiner_png(models, tmp_path):
    _, base_folder, _, refiner_folder = models
    ref = reference_image(models, "euler", 0.8, 5.0)
    np.save(tmp_path / "noise.npy", noise_for())
    out = tmp_path / "refined.png"
    proc = run_cli("generate", "--model", str(base_folder), "--refiner", str(refiner_folder), "--refiner-start", "0.8",
                   "--prompt", PROMPT, "--steps", str(STEPS), "--guidance", "5", "--scheduler", "euler",
                   "--width", str(SIZE), "--height", str(SIZE), "--seed", "7", "--latents", str(tmp_path / "noise.npy"),
                   "--backend", "mlx", "--precision", "fp32", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["seconds"]["steps"]) == STEPS and report["parameters"]["refiner_start"] == 0.8
    value = psnr(np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255.0, ref)
    print(f"CLI PNG: {value:.1f} dB")
    assert value >= 45.0


@pytest.mark.parametrize("args, message", [
    (["--refiner", "REFINER", "--refiner-start", "1.0"], "between 0 and 1"),
    (["--refiner", "REFINER", "--refiner-start", "0"], "between 0 and 1"),
    (["--refiner-start", "0.5"], "needs --refiner"),
    (["--refiner", "BASE"], "not a refiner"),
])
def test_cli_refiner_errors_are_one_line(models, tmp_path, args, message):
    _, base_folder, _, refiner_folder = models
    args = [{"REFINER": str(refiner_folder), "BASE": str(base_folder)}.get(a, a) for a in args]
    proc = run_cli("generate", "--model", str(base_folder), "--prompt", "a cat", "--steps", "2", "--width", "32",
                   "--height", "32", "--backend", "mlx", "--out", str(tmp_path / "x.png"), *args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_refiner_alone_and_on_a_non_sdxl_base_are_refused(models, tiny_pipelines):
    _, _, _, refiner_folder = models
    alone = load_pipeline(str(refiner_folder), engine="mlx", precision="fp32")
    assert alone.spec.family == "sdxl-refiner" and len(alone.tokenizers) == 1
    with pytest.raises(UserError, match="is a refiner"):
        alone.generate(GenerationRequest(prompt="a cat", steps=1, width=SIZE, height=SIZE))
    with pytest.raises(UserError, match="refines sdxl models"):
        load_pipeline(str(tiny_pipelines("sd1")[1]), engine="mlx", refiner=str(refiner_folder))
    with pytest.raises(UserError, match="needs a refiner"):
        load_pipeline(str(tiny_pipelines("sdxl")[1]), engine="mlx").generate(
            GenerationRequest(prompt="a cat", steps=1, width=SIZE, height=SIZE, refiner_start=0.5))


# -- one schedule split in two: the schedulers against diffusers ------------------------------------------------

def diffusers_split(ref, start):
    """diffusers' img2img get_timesteps for denoising_start: (begin index, whether it calls set_begin_index)."""
    cutoff = int(round(ref.config.num_train_timesteps - start * ref.config.num_train_timesteps))
    count = int((ref.timesteps < cutoff).sum())
    if ref.order == 2 and count % 2 == 0:
        count += 1
    begin = len(ref.timesteps) - count
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    return begin


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("start", [0.3, 0.5, 0.8])
def test_second_stage_steps_match_diffusers(name, start):
    config = CONFIGS["lcm" if name == "lcm" else "sdxl"]
    for steps in (4, 10):
        ref, ours = reference(name, config), make_scheduler(name, config)
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.order == ref.order == 1
        cutoff = int(round(1000 - start * 1000))
        assert ours.denoising_end(start) == len([t for t in ref.timesteps if t >= cutoff])  # the base's share
        begin = ours.denoising_start(start)
        assert begin == diffusers_split(ref, start)
        step_kwargs = {"generator": torch.Generator().manual_seed(1)} \
            if "generator" in inspect.signature(ref.step).parameters else {}
        noise, rng = TorchNoise(1), np.random.default_rng(0)
        x = rng.standard_normal(SHAPE).astype(np.float32)  # the latents the base handed over, as they are
        ref_x = torch.from_numpy(x)
        for t_ours, t_ref in zip(ours.timesteps[begin:], ref.timesteps[begin:]):
            where = f"{name} / {steps} steps / start {start} / t {t_ref}"
            scaled = ours.scale_model_input(x, t_ours)
            np.testing.assert_allclose(scaled, ref.scale_model_input(ref_x, t_ref).numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=where)
            output = rng.standard_normal(SHAPE).astype(np.float32)
            x = ours.step(output, t_ours, x, rng=noise)
            ref_x = ref.step(torch.from_numpy(output), t_ref, ref_x, **step_kwargs).prev_sample
            theirs = ref_x.numpy()
            assert np.abs(x - theirs).max() <= 1e-5 * np.abs(theirs).max(), where


def test_begin_index_out_of_range():
    scheduler = make_scheduler("euler", CONFIGS["sdxl"])
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="begin index"):
        scheduler.set_begin_index(5)
