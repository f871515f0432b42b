"""End-to-end parity: the MLX pipeline against diffusers on tiny random-weight models, same noise,
every scheduler, fp32: image PSNR >= 45 dB."""
import json

import numpy as np
import pytest
import torch

from backend import GenerationRequest
from backend.measure import psnr
from backend.pipeline import load_pipeline
from backend.schedulers import SCHEDULERS

SIZE = 32  # pixels; the tiny VAE downsamples by 2


class TorchNoise:
    """Draws step noise the way diffusers' pipelines do, so ancestral samplers can match."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape):
        return torch.randn(tuple(shape), generator=self.generator).numpy()


def diffusers_scheduler(name, config):
    import diffusers as d
    table = {
        "ddim": (d.DDIMScheduler, {}),
        "euler": (d.EulerDiscreteScheduler, {}),
        "euler_a": (d.EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_karras": (d.DPMSolverMultistepScheduler,
                            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
        "lcm": (d.LCMScheduler, {}),
        "pndm": (d.PNDMScheduler, {"skip_prk_steps": True}),
    }
    cls, overrides = table[name]
    return cls.from_config(config, **overrides)


def run_both(family, pipe, folder, scheduler, steps, guidance, seed=7, negative="", width=SIZE, height=SIZE):
    noise = np.random.default_rng(seed).standard_normal((1, 4, height // 2, width // 2)).astype(np.float32)
    # from the saved file, as diffusers would load it (an in-memory config also carries which keys were defaults)
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, output_type="np",
                  latents=torch.from_numpy(noise), generator=torch.Generator().manual_seed(seed))
    if family != "lcm":
        kwargs["negative_prompt"] = negative or None
    own = pipe.scheduler  # the tiny pipelines are shared with other test files: put it back after
    pipe.scheduler = diffusers_scheduler(scheduler, saved)
    try:
        ref = pipe("a red circle at the top", **kwargs).images[0]
    finally:
        pipe.scheduler = own
    mine = load_pipeline(str(folder), engine="mlx", precision="fp32").generate(
        GenerationRequest(prompt="a red circle at the top", negative_prompt=negative, steps=steps,
                          guidance=guidance, scheduler=scheduler, width=width, height=height, seed=seed,
                          latents=noise), noise_rng=TorchNoise(seed))
    return ref, mine


@pytest.mark.parametrize("scheduler", [s for s in SCHEDULERS if s != "lcm"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_images_match_diffusers(tiny_pipelines, family, scheduler):
    pipe, folder = tiny_pipelines(family)
    ref, mine = run_both(family, pipe, folder, scheduler, steps=4, guidance=6.0)
    assert mine.pixels[0].shape == ref.shape
    assert psnr(mine.pixels[0], ref) >= 45.0


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_matches_diffusers(tiny_pipelines, steps):
    pipe, folder = tiny_pipelines("lcm")
    ref, mine = run_both("lcm", pipe, folder, "lcm", steps=steps, guidance=8.0)
    assert psnr(mine.pixels[0], ref) >= 45.0


def test_negative_prompt_and_no_guidance(tiny_pipelines):
    pipe, folder = tiny_pipelines("sd1")
    ref, mine = run_both("sd1", pipe, folder, "euler", steps=3, guidance=7.0, negative="blue square")
    assert psnr(mine.pixels[0], ref) >= 45.0
    ref, mine = run_both("sd1", pipe, folder, "ddim", steps=3, guidance=1.0)
    assert psnr(mine.pixels[0], ref) >= 45.0


def test_latent_size_not_divisible_by_the_unet(tiny_pipelines):
    """Odd latent sizes: the UNet upsamples to each skip's size, as diffusers does (SD allows any multiple of 8)."""
    from backend.checkpoint import ModelSpec
    from backend.engines.mlx.engine import MLXStages
    pipe, folder = tiny_pipelines("sd1")
    stages = MLXStages(ModelSpec.from_folder(folder), precision="fp32")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 17, 13)).astype(np.float32)
    hidden = rng.standard_normal((2, 77, 32)).astype(np.float32)
    mine = stages.predict_noise(latents, 500.0, hidden)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(latents), 500.0, torch.from_numpy(hidden)).sample.numpy()
    assert mine.shape == ref.shape == (2, 4, 17, 13)
    assert np.linalg.norm(mine - ref) / np.linalg.norm(ref) < 1e-4
