"""Image to image and inpainting against diffusers' own pipelines on tiny random-weight models.

The references: StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
and StableDiffusionInpaintPipeline (9-channel and 4-channel UNets), built from the same components. Two things
are forced in them, in the pipeline's module: `retrieve_latents` returns the posterior's mode (diffusers samples
it with the generator; this project uses the mean), and `randn_tensor` returns the noise given to the CLI with
`--latents`. The CLI's PNG must match at >= 45 dB PSNR. Then: every scheduler's add_noise and strength rule,
the image and mask preparation against VaeImageProcessor, the lazily loaded VAE encoder, and the refusals.
"""
import json
import sys

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from backend import GenerationRequest
from backend.images import ImageInputs, latent_mask
from backend.measure import psnr
from backend.pipeline import load_pipeline
from backend.png import read_parameters
from backend.schedulers import SCHEDULERS, make_scheduler
from backend.types import UserError
from tests.test_cli import run_cli
from tests.test_pipeline_parity import TorchNoise, diffusers_scheduler
from tests.test_schedulers import CONFIGS, reference

PROMPT = "a red circle at the top"
SIZE = 32
STEPS = 4


def init_image(width=SIZE, height=SIZE) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1)
    rgb[height // 4:height * 5 // 8, width // 3:width * 3 // 4] = [0.9, 0.1, 0.2]
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def mask_image(width=SIZE, height=SIZE) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    m[height // 8:height * 5 // 8, width // 5:width * 4 // 5] = 255
    m[height * 3 // 4:, :width // 4] = 140  # just above half intensity: repainted
    m[height * 3 // 4:, width * 3 // 4:] = 120  # just below: kept
    return Image.fromarray(m)


def noise_for(channels, width, height, seed=7):
    return np.random.default_rng(seed).standard_normal((1, channels, height // 2, width // 2)).astype(np.float32)


REFERENCE_CLASSES = {"sdxl": "StableDiffusionXLImg2ImgPipeline", "sd3": "StableDiffusion3Img2ImgPipeline"}


def reference_image(monkeypatch, pipe, folder, family, scheduler, strength, guidance, noise, image, mask=None):
    """diffusers' image-to-image (or inpainting) pipeline on the same components, posterior mode and our noise."""
    name = "StableDiffusionInpaintPipeline" if mask is not None else \
        REFERENCE_CLASSES.get(family, "StableDiffusionImg2ImgPipeline")
    cls = getattr(diffusers, name)
    ref = pipe if type(pipe) is cls else cls.from_pipe(pipe)
    if scheduler != "flow_euler":
        saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        ref.scheduler = diffusers_scheduler(scheduler, saved)
    module = sys.modules[cls.__module__]

    def our_noise(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise.copy())
    monkeypatch.setattr(module, "randn_tensor", our_noise)
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    kwargs = dict(image=image, strength=strength, num_inference_steps=STEPS, guidance_scale=guidance,
                  output_type="np", generator=torch.Generator().manual_seed(7))
    if mask is not None:
        kwargs.update(mask_image=mask, width=image.size[0], height=image.size[1])
    return ref(PROMPT, **kwargs).images[0]


def cli_png(folder, tmp_path, noise, image, scheduler, strength, guidance, mask=None, *extra):
    image.save(tmp_path / "init.png")
    np.save(tmp_path / "noise.npy", noise)
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--steps", str(STEPS), "--guidance", str(guidance),
            "--scheduler", scheduler, "--seed", "7", "--latents", str(tmp_path / "noise.npy"), "--backend", "mlx",
            "--precision", "fp32", "--init-image", str(tmp_path / "init.png"), "--strength", str(strength),
            "--out", str(tmp_path / "out.png"), "--json", *extra]
    if mask is not None:
        mask.save(tmp_path / "mask.png")
        args += ["--mask", str(tmp_path / "mask.png")]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return np.asarray(Image.open(tmp_path / "out.png").convert("RGB"), dtype=np.float32) / 255.0, report


STOCHASTIC = ("euler_a", "lcm")  # schedulers that draw noise at each step
CASES = [  # family, scheduler, strength, guidance, inpainting, init image size
    ("sd1", "euler", 0.3, 6.0, False, (SIZE, SIZE)),
    ("sd1", "euler", 0.75, 6.0, False, (SIZE, SIZE)),
    ("sd1", "euler", 1.0, 6.0, False, (SIZE, SIZE)),
    ("sd1", "ddim", 0.3, 6.0, False, (SIZE, SIZE)),
    ("sd1", "ddim", 0.75, 6.0, False, (SIZE, SIZE)),
    ("sd1", "ddim", 1.0, 6.0, False, (SIZE, SIZE)),
    ("sd1", "dpmpp_2m", 0.3, 6.0, False, (SIZE, SIZE)),
    ("sd1", "dpmpp_2m", 0.75, 6.0, False, (SIZE, SIZE)),
    ("sd1", "dpmpp_2m", 1.0, 6.0, False, (SIZE, SIZE)),
    ("sd1", "euler", 0.75, 6.0, False, (35, 45)),  # no size given: the image's, rounded down (34x44)
    ("sd1", "euler_a", 0.75, 6.0, False, (SIZE, SIZE)),  # step noise: through the API with torch's generator
    ("sd1", "pndm", 0.75, 1.0, False, (SIZE, SIZE)),
    ("sd2", "ddim", 0.75, 6.0, False, (SIZE, SIZE)),  # v-prediction
    ("sd2", "euler", 0.5, 6.0, False, (SIZE, 48)),
    ("sdxl", "euler", 0.75, 5.0, False, (SIZE, SIZE)),
    ("sdxl", "dpmpp_2m", 0.3, 5.0, False, (48, SIZE)),
    ("lcm", "lcm", 0.75, 1.0, False, (SIZE, SIZE)),  # StableDiffusionImg2ImgPipeline's rule, with LCMScheduler
    ("sd3", "flow_euler", 0.75, 5.0, False, (SIZE, SIZE)),
    ("sd3", "flow_euler", 0.3, 1.0, False, (SIZE, SIZE)),
    ("sd1-inpaint", "euler", 1.0, 6.0, True, (SIZE, SIZE)),  # 9-channel UNet
    ("sd1-inpaint", "dpmpp_2m", 0.75, 6.0, True, (SIZE, SIZE)),
    ("sd1-inpaint", "ddim", 0.5, 1.0, True, (SIZE, SIZE)),
    ("sd1", "euler", 1.0, 6.0, True, (SIZE, SIZE)),  # 4-channel UNet: the known region blended back
    ("sd1", "ddim", 0.75, 6.0, True, (SIZE, SIZE)),
    ("sd1", "dpmpp_2m", 0.5, 1.0, True, (SIZE, 48)),
]


@pytest.mark.parametrize("family, scheduler, strength, guidance, inpainting, size", CASES)
def test_cli_matches_diffusers(tiny_pipelines, monkeypatch, tmp_path, family, scheduler, strength, guidance,
                               inpainting, size):
    pipe, folder = tiny_pipelines(family)
    width, height = size[0] // 2 * 2, size[1] // 2 * 2
    noise = noise_for(16 if family == "sd3" else 4, width, height)
    image, mask = init_image(*size), (mask_image(*size) if inpainting else None)
    ref = reference_image(monkeypatch, pipe, folder, family, scheduler, strength, guidance, noise, image, mask)
    if scheduler in STOCHASTIC:  # drawn as diffusers draws them; the CLI draws from numpy
        result = load_pipeline(str(folder), engine="mlx", precision="fp32").generate(GenerationRequest(
            prompt=PROMPT, steps=STEPS, guidance=guidance, scheduler=scheduler, seed=7, latents=noise,
            init_image=image, strength=strength, mask=mask), noise_rng=TorchNoise(7))
        mine, report = result.pixels[0], result.measurements()
        value = psnr(mine, ref)
    else:
        mine, report = cli_png(folder, tmp_path, noise, image, scheduler, strength, guidance, mask)
        value = psnr(mine, np.round(ref * 255) / 255)  # the PNG holds 8-bit pixels: compare at that rounding
    assert mine.shape == ref.shape == (height, width, 3)
    print(f"{family} {scheduler} strength {strength} guidance {guidance} {'inpaint' if inpainting else 'img2img'} "
          f"{width}x{height}: {value:.1f} dB")
    assert value >= 45.0
    p = report["parameters"]
    assert p["strength"] == strength and len(p["init_image"]) == 64 and (("mask" in p) == inpainting)
    kept = STEPS - int(STEPS - STEPS * strength) if family == "sd3" else min(int(STEPS * strength), STEPS)
    assert len(report["seconds"]["steps"]) == kept + (scheduler == "pndm")  # PLMS repeats one timestep
    assert report["seconds"]["image_encoder"] > 0


def test_defaults_batch_and_mask_blur_match_diffusers(tiny_pipelines, monkeypatch):
    """Default strengths (0.8; inpainting 1.0), a batch of two, and a blurred mask (diffusers' mask_processor.blur)."""
    pipe, folder = tiny_pipelines("sd1")
    mine = load_pipeline(str(folder), engine="mlx", precision="fp32")
    noise = noise_for(4, SIZE, SIZE)
    result = mine.generate(GenerationRequest(prompt=PROMPT, steps=5, guidance=6.0, scheduler="euler", latents=noise,
                                             init_image=init_image()))
    assert result.parameters["strength"] == 0.8 and len(result.timings.steps) == 4  # int(5 * 0.8)
    from diffusers.image_processor import VaeImageProcessor
    blurred = VaeImageProcessor.blur(mask_image(), blur_factor=3)
    ref = reference_image(monkeypatch, pipe, folder, "sd1", "ddim", 1.0, 6.0, noise, init_image(), blurred)
    result = mine.generate(GenerationRequest(prompt=PROMPT, steps=STEPS, guidance=6.0, scheduler="ddim",
                                             latents=noise, init_image=init_image(), mask=mask_image(), mask_blur=3,
                                             batch_size=2))
    assert result.parameters["strength"] == 1.0 and result.parameters["mask_blur"] == 3
    for pixels in result.pixels:
        assert psnr(pixels, ref) >= 45.0


# -- schedulers: add_noise and the strength rule ------------------------------------------------------------------

NOISE_CONFIGS = ("sd15", "sd21", "sdxl", "turbo", "zero_snr")


@pytest.mark.parametrize("name, config_name",
                         [(n, c) for n in SCHEDULERS for c in (["lcm"] if n == "lcm" else NOISE_CONFIGS)])
def test_add_noise_and_strength_start_match_diffusers(name, config_name):
    config = CONFIGS[config_name]
    rng = np.random.default_rng(0)
    x, noise = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2))
    for steps in (1, 4, 10, 25):
        for strength in (0.1, 0.3, 0.5, 0.75, 0.99, 1.0):
            ref, ours = reference(name, config), make_scheduler(name, config)
            ref.set_timesteps(steps)
            ours.set_timesteps(steps)
            kept = min(int(steps * strength), steps)  # diffusers' get_timesteps
            t_start = max(steps - kept, 0)
            if kept == 0:
                with pytest.raises(UserError, match="leaves no step"):
                    ours.strength_start(strength)
                continue
            assert ours.strength_start(strength) == t_start * ref.order
            if hasattr(ref, "set_begin_index"):
                ref.set_begin_index(t_start * ref.order)
            t_ref, t_ours = ref.timesteps[t_start:t_start + 1], ours.timesteps[t_start]
            assert float(t_ours) == float(t_ref[0])
            theirs = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), t_ref.repeat(2)).numpy()
            mine = ours.add_noise(x, noise, t_ours)
            where = f"{name} / {config_name} / {steps} steps / strength {strength}"
            assert mine.dtype == np.float32
            assert np.abs(mine - theirs).max() <= 1e-6 * np.abs(theirs).max(), where


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddim", "lcm"])
def test_add_noise_after_a_step_uses_the_next_sigma(name):
    """Inpainting with a 4-channel UNet noises the known region to the next timestep after each step."""
    config = CONFIGS["lcm" if name == "lcm" else "sdxl"]
    ref, ours = reference(name, config), make_scheduler(name, config)
    ref.set_timesteps(6)
    ours.set_timesteps(6)
    begin = ours.strength_start(0.5)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    rng = np.random.default_rng(1)
    x, noise, out = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(3))
    kwargs = {"generator": torch.Generator().manual_seed(0)} if name == "lcm" else {}
    ref.step(torch.from_numpy(out), ref.timesteps[3], torch.from_numpy(x), **kwargs)
    ours.step(out, ours.timesteps[3], x, rng=TorchNoise(0))
    theirs = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref.timesteps[4:5]).numpy()
    np.testing.assert_allclose(ours.add_noise(x, noise, ours.timesteps[4]), theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift, steps", [(3.0, 4), (3.0, 28), (1.0, 10)])
def test_flow_scale_noise_and_sd3_strength_rule(shift, steps):
    """SD3's img2img keeps steps * strength unrounded before truncating t_start; add_noise is scale_noise."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import \
        StableDiffusion3Img2ImgPipeline
    rng = np.random.default_rng(2)
    x, noise = (rng.standard_normal((1, 16, 8, 8)).astype(np.float32) for _ in range(2))
    for strength in (0.3, 0.6, 0.75, 1.0):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        ours = make_scheduler("flow_euler", dict(ref.config, _class_name="FlowMatchEulerDiscreteScheduler"))
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        holder = type("P", (), {"scheduler": ref})()
        timesteps, _ = StableDiffusion3Img2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
        begin = ours.strength_start(strength)
        np.testing.assert_array_equal(ours.timesteps[begin:], timesteps.numpy())
        theirs = ref.scale_noise(torch.from_numpy(x), timesteps[:1], torch.from_numpy(noise)).numpy()
        np.testing.assert_allclose(ours.add_noise(x, noise, ours.timesteps[begin]), theirs, rtol=1e-6, atol=1e-6)


# -- images and masks -----------------------------------------------------------------------------------------------

def test_pixels_mask_and_latent_mask_are_diffusers():
    from diffusers.image_processor import VaeImageProcessor
    image, mask = init_image(40, 24), mask_image(40, 24)
    inputs = ImageInputs.from_request(GenerationRequest(prompt="x", init_image=image, mask=mask, mask_blur=2))
    for width, height in ((40, 24), (32, 32), (56, 40)):  # unchanged, squeezed, enlarged: plain Lanczos resize
        theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=height, width=width).numpy()
        np.testing.assert_array_equal(inputs.pixels(width, height), theirs)
        processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                      do_convert_grayscale=True)
        blurred = processor.blur(mask.convert("L"), blur_factor=2)
        theirs_mask = processor.preprocess(blurred, height=height, width=width)
        np.testing.assert_array_equal(inputs.mask_pixels(width, height), theirs_mask.numpy())
        small = torch.nn.functional.interpolate(theirs_mask, size=(height // 8, width // 8)).numpy()
        np.testing.assert_array_equal(latent_mask(inputs.mask_pixels(width, height), height // 8, width // 8), small)
    assert inputs.size(None, None, 16) == (32, 16) and inputs.size(64, None, 8) == (64, 24)


def test_bad_inputs_are_one_sentence(tmp_path):
    (tmp_path / "not.png").write_text("not an image")
    init_image().save(tmp_path / "ok.png")
    mask_image(40, 24).save(tmp_path / "small.png")
    cases = [
        (dict(init_image=str(tmp_path / "missing.png")), "does not exist"),
        (dict(init_image=str(tmp_path / "not.png")), "is not an image"),
        (dict(init_image=str(tmp_path / "ok.png"), mask=str(tmp_path / "small.png")), "same size"),
        (dict(init_image=str(tmp_path / "ok.png"), strength=0.0), "above 0 and at most 1"),
        (dict(init_image=str(tmp_path / "ok.png"), strength=1.5), "above 0 and at most 1"),
        (dict(mask=str(tmp_path / "ok.png")), "needs an init image"),
        (dict(strength=0.5), "needs an init image"),
        (dict(init_image=str(tmp_path / "ok.png"), mask_blur=3), "needs a mask"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            ImageInputs.from_request(GenerationRequest(prompt="x", **kwargs))


@pytest.mark.parametrize("args, message", [
    (["--init-image", "MISSING"], "does not exist"),
    (["--init-image", "NOT_IMAGE"], "is not an image"),
    (["--init-image", "OK", "--mask", "SMALL"], "same size"),
    (["--init-image", "OK", "--strength", "0"], "above 0 and at most 1"),
    (["--init-image", "OK", "--strength", "1.2"], "above 0 and at most 1"),
    (["--mask", "OK"], "--mask needs --init-image"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--init-image", "OK", "--strength", "0.1", "--steps", "4"], "leaves no step"),
])
def test_cli_bad_image_arguments_exit_with_one_line(tiny_pipelines, tmp_path, args, message):
    (tmp_path / "not.png").write_text("not an image")
    init_image().save(tmp_path / "ok.png")
    mask_image(40, 24).save(tmp_path / "small.png")
    names = {"MISSING": tmp_path / "missing.png", "NOT_IMAGE": tmp_path / "not.png", "OK": tmp_path / "ok.png",
             "SMALL": tmp_path / "small.png"}
    args = [str(names.get(a, a)) for a in args]
    proc = run_cli("generate", "--model", str(tiny_pipelines("sd1")[1]), "--prompt", "a cat", "--steps", "2",
                   "--backend", "mlx", "--out", str(tmp_path / "x.png"), *args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


# -- the engine and the pipeline ------------------------------------------------------------------------------------

def test_vae_encoder_is_loaded_on_first_use_and_released_with_reduce_memory(tiny_pipelines, tmp_path):
    from backend.engines.mlx.engine import MLXStages
    from backend.checkpoint import ModelSpec
    pipe, folder = tiny_pipelines("sd1")
    spec = ModelSpec.from_folder(folder)
    stages = MLXStages(spec, precision="fp32")
    assert "encoder" not in stages.vae and "quant_conv" not in stages.vae
    before = stages.weight_bytes()
    pixels = ImageInputs.from_request(GenerationRequest(prompt="x", init_image=init_image())).pixels(SIZE, SIZE)
    mean = stages.encode_image(pixels)
    with torch.no_grad():
        theirs = pipe.vae.encode(torch.from_numpy(pixels)).latent_dist.mode().numpy()
    assert mean.shape == theirs.shape == (1, 4, 16, 16)
    assert np.abs(mean - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert "encoder" in stages.vae and stages.weight_bytes() > before

    lean = load_pipeline(str(folder), engine="mlx", precision="fp32", reduce_memory=True)
    result = lean.generate(GenerationRequest(prompt=PROMPT, steps=2, init_image=init_image(), strength=0.5))
    assert "encoder" not in lean.stages.vae and result.timings.image_encoder > 0
    plain = load_pipeline(str(folder), engine="mlx", precision="fp32")
    plain.generate(GenerationRequest(prompt=PROMPT, steps=2))
    assert "encoder" not in plain.stages.vae  # text to image never loads it


def test_quantized_variant_keeps_the_encoder_and_loads_without_it(tiny_pipelines, tmp_path):
    from backend.quantize import quantize_mlx
    _, folder = tiny_pipelines("sd1")
    out, _, _ = quantize_mlx(folder, "mlx", 8, out=tmp_path / "q8")
    pipe = load_pipeline(str(out), engine="mlx")
    assert "encoder" not in pipe.stages.vae
    result = pipe.generate(GenerationRequest(prompt=PROMPT, steps=2, init_image=init_image(), strength=0.5))
    assert np.isfinite(result.pixels).all() and "encoder" in pipe.stages.vae


def test_inpainting_model_and_refiner_refusals(tiny_pipelines):
    inpaint = load_pipeline(str(tiny_pipelines("sd1-inpaint")[1]), engine="mlx", precision="fp32")
    for request in (GenerationRequest(prompt=PROMPT, steps=2),
                    GenerationRequest(prompt=PROMPT, steps=2, init_image=init_image())):
        with pytest.raises(UserError, match="inpainting model"):
            inpaint.generate(request)
    base = load_pipeline(str(tiny_pipelines("sdxl")[1]), engine="mlx", precision="fp32")
    base.refiner = base  # only the request check runs
    with pytest.raises(UserError, match="cannot be combined with a refiner"):
        base.generate(GenerationRequest(prompt=PROMPT, steps=2, refiner_start=0.5, init_image=init_image()))


def test_png_records_the_images_by_hash(tiny_pipelines, tmp_path):
    import hashlib
    _, folder = tiny_pipelines("sd1")
    init_image().save(tmp_path / "init.png")
    mask_image().save(tmp_path / "mask.png")
    proc = run_cli("generate", "--model", str(folder), "--prompt", PROMPT, "--steps", "2", "--backend", "mlx",
                   "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--mask-blur", "1",
                   "--out", str(tmp_path / "out.png"))
    assert proc.returncode == 0, proc.stderr
    params = read_parameters(tmp_path / "out.png")
    sha = lambda name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()  # noqa: E731
    assert params["init_image"] == sha("init.png") and params["mask"] == sha("mask.png")
    assert params["strength"] == 1.0 and params["mask_blur"] == 1 and (params["width"], params["height"]) == (32, 32)
