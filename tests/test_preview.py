"""Live previews (backend/preview.py): the schedulers' predicted final latents against diffusers', the
per-family projections, the MLX tiny VAE decoder against diffusers' AutoencoderTiny, the fallback when the tiny
VAE cannot be had, and the embedded model's preview showing the prompt's colours from the first step."""
import backend  # noqa: F401  (OpenBLAS before mlx)

from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch

from backend import families, preview
from backend.schedulers import make_scheduler
from backend.types import GenerationRequest, UserError

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "tiny-shapes"
PROMPT = "a large red circle in the center on a blue background"
_SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
           clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class TorchNoise:
    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape):
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).numpy()


# name, diffusers class, config, what diffusers calls the prediction after step()
X0_CASES = [
    ("euler", "EulerDiscreteScheduler", dict(_SD, prediction_type="epsilon", timestep_spacing="leading"),
     lambda out, sched: out.pred_original_sample),
    ("euler_a", "EulerAncestralDiscreteScheduler", dict(_SD, prediction_type="v_prediction"),
     lambda out, sched: out.pred_original_sample),
    ("ddim", "DDIMScheduler", dict(_SD, prediction_type="v_prediction"), lambda out, sched: out.pred_original_sample),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", dict(_SD, prediction_type="epsilon"),
     lambda out, sched: sched.model_outputs[-1]),  # the converted (data) prediction the solver steps with
    ("lcm", "LCMScheduler", dict(_SD, set_alpha_to_one=True, timestep_spacing="leading"),
     lambda out, sched: out.denoised),
]


@pytest.mark.parametrize("name,cls,config,theirs", X0_CASES, ids=[c[0] for c in X0_CASES])
def test_predicted_original_is_diffusers(name, cls, config, theirs):
    ours = make_scheduler(name, config)
    ref = getattr(diffusers, cls).from_config(config, **({"algorithm_type": "dpmsolver++", "solver_order": 2}
                                                         if name == "dpmpp_2m" else {}))
    ours.set_timesteps(6)
    ref.set_timesteps(6)
    assert ours.predicted_original() is None
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * np.float32(ours.init_noise_sigma)
    our_noise, ref_noise = TorchNoise(1), TorchNoise(1)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        model_out = rng.standard_normal(sample.shape).astype(np.float32)
        ours.scale_model_input(sample, t_ours)
        ref.scale_model_input(torch.from_numpy(sample), t_ref)
        out = ref.step(torch.from_numpy(model_out), t_ref, torch.from_numpy(sample), generator=ref_noise.generator)
        nxt = ours.step(model_out, t_ours, sample, rng=our_noise)
        expected = theirs(out, ref).numpy()
        np.testing.assert_allclose(ours.predicted_original(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        sample = nxt


def test_flow_x0_is_sample_minus_sigma_velocity():
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    ours = make_scheduler("flow_euler", config)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((1, 16, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    sample = noise
    for i, t in enumerate(ours.timesteps):
        sigma = float(ref.sigmas[i])
        velocity = noise - x0  # the exact flow: every step's prediction is x0 itself
        sample = ours.step(velocity, t, sample)
        np.testing.assert_allclose(ours.predicted_original(), x0, atol=1e-5)
        assert abs(sigma - float(ours.sigmas[i])) < 1e-6


def test_pndm_x0_comes_from_its_current_output():
    ours = make_scheduler("pndm", dict(_SD, prediction_type="epsilon"))
    ours.set_timesteps(5)
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    for t in ours.timesteps[:4]:  # the second is PLMS's warm-up, which re-evaluates at a different sample
        eps = rng.standard_normal(sample.shape).astype(np.float32)
        nxt = ours.step(eps, t, sample)
        a = float(ours.alphas_cumprod[int(t)])
        expected = (sample - (1 - a) ** 0.5 * eps) / a ** 0.5
        np.testing.assert_allclose(ours.predicted_original(), expected, rtol=1e-5, atol=1e-5)
        sample = nxt


# ------------------------------------------------------------------------------------------------
# Projections
# ------------------------------------------------------------------------------------------------
def _spec(family, **defaults):
    return SimpleNamespace(traits=families.get(family), defaults=defaults,
                           vae_config={"scaling_factor": 0.18215})


@pytest.mark.parametrize("family,channels", [("sd", 4), ("sdxl", 4), ("sdxl-refiner", 4), ("sd3", 16)])
def test_each_family_projects_its_own_channels(family, channels):
    factors, bias = families.get(family).preview
    assert np.asarray(factors).shape == (channels, 3) and len(bias) == 3
    previewer = preview.make_previewer(_spec(family), None, "fast", 1, [])
    shown, _ = previewer.render(1, 1, lambda: np.zeros((1, channels, 6, 5), np.float32))
    assert shown.shape == (6, 5, 3) and shown.dtype == np.uint8
    assert np.array_equal(shown[0, 0], preview.to_uint8(np.asarray(bias, np.float32)))  # zeros: the bias


def test_projection_colour_sanity():
    """The published factors: SD's 4th channel negative is blue, SDXL's 1st positive is bright, SD3's last
    channel negative is bright."""
    def colour(family, channel, value, channels):
        z = np.zeros((channels, 1, 1), np.float32)
        z[channel] = value
        factors, bias = families.get(family).preview
        return preview.project(z, factors, bias)[0, 0].astype(int)
    r, g, b = colour("sd", 3, -1.5, 4)
    assert b > 200 and b > r + 60 and b > g + 60
    assert colour("sdxl", 0, 2.0, 4).min() > 200
    assert colour("sd3", 15, -4.0, 16).min() > 200


def test_a_models_own_projection_wins_over_its_familys():
    own = {"factors": [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], "bias": [0, 0, 0]}
    previewer = preview.make_previewer(_spec("sd", preview_rgb=own), None, "fast", 1, [])
    z = np.zeros((1, 4, 1, 1), np.float32)
    z[0, 0] = 1.0
    assert previewer.render(1, 1, lambda: z)[0][0, 0].tolist() == [255, 128, 128]


def test_fit_projection_recovers_a_linear_map():
    rng = np.random.default_rng(4)
    factors, bias = rng.standard_normal((4, 3)) * 0.3, np.array([0.1, -0.2, 0.05])
    latents = rng.standard_normal((6, 4, 5, 5)).astype(np.float32)
    cells = np.einsum("nchw,cr->nhwr", latents, factors) + bias
    images = np.repeat(np.repeat(cells, 4, axis=1), 4, axis=2)
    fit = preview.fit_projection(latents, images, 4)
    np.testing.assert_allclose(fit["factors"], factors, atol=1e-4)
    np.testing.assert_allclose(fit["bias"], bias, atol=1e-4)


def test_modes_and_intervals():
    with pytest.raises(UserError, match="preview mode"):
        preview.make_previewer(_spec("sd"), None, "blurry", 1, [])
    with pytest.raises(UserError, match="preview interval"):
        preview.make_previewer(_spec("sd"), None, "fast", 0, [])
    assert preview.make_previewer(_spec("sd"), None, "off", 1, []) is None
    previewer = preview.make_previewer(_spec("sd"), None, "fast", 3, [])
    assert [s for s in range(1, 9) if previewer.due(s, 8)] == [1, 4, 7, 8]


def test_a_step_left_out_of_the_stream_passes_its_preview_on():
    """With previews every N steps, a coalesced (or too soon) step's preview is shown with the next step yielded."""
    from backend.session import PipelineCache, PipelineKey, stream_generation
    from backend.types import StepInfo

    class Fake:
        def generate(self, request, callback=None, **_):
            for step in range(1, 6):
                callback(StepInfo(step, 5, 0.0, None, preview=np.ones((1, 1, 3), np.uint8) if step == 1 else None))
            return "result"
    cache = PipelineCache(loader=lambda key, progress: Fake())
    events = list(stream_generation(cache, PipelineKey("fake"), GenerationRequest("x"), min_interval=10.0))
    steps = [e.step for e in events if e.kind == "step"]
    assert steps[0].preview is not None and steps[-1].step == 5 and events[-1].kind == "done"


# ------------------------------------------------------------------------------------------------
# The tiny VAE
# ------------------------------------------------------------------------------------------------
def _tiny_vae_folder(folder, latent_channels, scaling_factor=1.0, shift_factor=0.0):
    torch.manual_seed(latent_channels)
    model = diffusers.AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8, 8, 8, 8),
                                      decoder_block_out_channels=(16, 16, 16, 16), num_encoder_blocks=(1, 1, 1, 1),
                                      num_decoder_blocks=(2, 1, 1, 1), scaling_factor=scaling_factor,
                                      shift_factor=shift_factor).eval()
    with torch.no_grad():  # livelier than the default init, so that the comparison is not of near-constants
        for p in model.decoder.parameters():
            p.mul_(1.5)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("channels,scaling,shift", [(4, 1.0, 0.0), (16, 1.5305, 0.0609)], ids=["taesd", "taesd3"])
def test_tiny_vae_matches_diffusers(tmp_path, channels, scaling, shift):
    from backend.engines.mlx.taesd import TinyVAE
    model = _tiny_vae_folder(tmp_path, channels, scaling, shift)
    ours = TinyVAE.from_folder(tmp_path)
    # sides divisible by 4 (Winograd convolutions on the CPU) and not (MLX's own)
    for shape in ((2, channels, 8, 12), (1, channels, 5, 7)):
        latents = np.random.default_rng(5).standard_normal(shape).astype(np.float32) * 2
        with torch.no_grad():  # what the pipelines give a VAE: latents / scaling_factor + shift_factor
            ref = model.decode(torch.from_numpy(latents / np.float32(scaling) + np.float32(shift))).sample
        ref = ref.numpy().transpose(0, 2, 3, 1)
        out = ours.decode(latents)
        assert out.shape == ref.shape == (shape[0], 8 * shape[2], 8 * shape[3], 3) and ref.std() > 0.01
        psnr = 10 * np.log10(4.0 / np.mean((out - ref) ** 2))  # peak-to-peak 2 in [-1, 1]
        assert psnr >= 45, (shape, psnr)


def test_tiny_vae_in_half_precision(tmp_path):
    """fp16 (a GPU's default) runs the compiled module instead of the CPU's Winograd path."""
    import mlx.core as mx
    from backend.engines.mlx.taesd import TinyVAE
    model = _tiny_vae_folder(tmp_path, 4)
    latents = np.random.default_rng(6).standard_normal((1, 4, 8, 12)).astype(np.float32) * 2
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(latents)).sample.numpy().transpose(0, 2, 3, 1)
    out = TinyVAE.from_folder(tmp_path, dtype=mx.float16).decode(latents)
    assert out.dtype == np.float32 and 10 * np.log10(4.0 / np.mean((out - ref) ** 2)) >= 45


def test_sharp_preview_decodes_with_the_tiny_vae(tmp_path):
    _tiny_vae_folder(tmp_path, 4)
    warnings = []
    previewer = preview.make_previewer(_spec("sd", preview_decoder=str(tmp_path)), None, "sharp", 1, warnings)
    shown, seconds = previewer.render(1, 4, lambda: np.zeros((1, 4, 6, 5), np.float32))
    assert previewer.kind == "sharp" and shown.shape == (48, 40, 3) and seconds > 0 and not warnings


def test_sharp_preview_falls_back_to_the_projection_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    warnings = []
    spec = _spec("sd", preview_decoder="silicon-diffusion-tests/no-such-tiny-vae")
    previewer = preview.make_previewer(spec, None, "sharp", 1, warnings)
    assert previewer.kind == "fast" and len(warnings) == 1
    assert "not downloaded" in warnings[0] and "latent colours" in warnings[0]


def test_a_sharp_decoder_failing_mid_run_gives_way_to_the_projection():
    from backend.types import Cancelled

    class Broken:
        def decode(self, latents):
            raise RuntimeError("out of memory")
    warnings = []
    previewer = preview.make_previewer(_spec("sd", preview_decoder="vae"), Broken(), "sharp", 1, warnings)
    for step in (1, 2):
        shown, _ = previewer.render(step, 2, lambda: np.zeros((1, 4, 3, 3), np.float32))
        assert shown.shape == (3, 3, 3)
    assert previewer.kind == "fast" and len(warnings) == 1 and "RuntimeError" in warnings[0]

    class Stopped:
        def decode(self, latents):
            raise Cancelled("stop")
    previewer = preview.make_previewer(_spec("sd", preview_decoder="vae"), Stopped(), "sharp", 1, [])
    with pytest.raises(Cancelled):
        previewer.render(1, 2, lambda: np.zeros((1, 4, 3, 3), np.float32))


# ------------------------------------------------------------------------------------------------
# The embedded model: its previews show the prompt from the first step
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return backend.load_pipeline(str(SHIPPED), engine="mlx")


def _previews(pipe, mode, every=1, steps=8):
    infos = []
    result = pipe.generate(GenerationRequest(PROMPT, steps=steps, seed=0, preview=mode, preview_every=every),
                           callback=infos.append)
    return infos, result


@pytest.mark.parametrize("mode", ["fast", "sharp"])
def test_embedded_preview_shows_the_colours_at_step_one(shipped, mode):
    infos, result = _previews(shipped, mode)
    first = infos[0].preview.astype(int)
    h, w, _ = first.shape
    centre, corner = first[h // 2, w // 2], first[1, 1]
    assert centre[0] > centre[1] + 60 and centre[0] > centre[2] + 60, centre  # red
    assert corner[2] > corner[0] + 60 and corner[2] > corner[1] + 40, corner  # blue
    assert (h, w) == ((64, 64) if mode == "sharp" else (16, 16))  # its own VAE; the fitted 4x3 projection
    assert not result.warnings


def test_embedded_preview_interval_and_off(shipped):
    infos, _ = _previews(shipped, "fast", every=3)
    assert [i.step for i in infos if i.preview is not None] == [1, 4, 7, 8]
    infos, off = _previews(shipped, "off")
    assert all(i.preview is None and i.preview_seconds == 0.0 for i in infos)
    _, fast = _previews(shipped, "fast")
    np.testing.assert_array_equal(off.pixels, fast.pixels)  # previews never change the image


def test_a_missing_tiny_vae_never_fails_the_generation(tiny_pipelines, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = backend.load_pipeline(str(tiny_pipelines("sd1")[1]), engine="mlx")
    pipe.spec.defaults["preview_decoder"] = "silicon-diffusion-tests/no-such-tiny-vae"
    infos = []
    result = pipe.generate(GenerationRequest("a red circle", steps=3, seed=1, preview="sharp"), callback=infos.append)
    assert all(i.preview is not None for i in infos)
    assert sum("sharp preview unavailable" in w for w in result.warnings) == 1
