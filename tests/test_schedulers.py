"""backend.schedulers against diffusers: every name, on real checkpoint configs, step by step."""
import inspect

import diffusers
import numpy as np
import pytest
import torch

from backend.schedulers import SCHEDULERS, describe, make_scheduler
from backend.types import UserError

# The diffusers class each name stands for, and the config overrides the name implies (written out
# here independently of the implementation's own table).
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True)),
}

_SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
           trained_betas=None, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
CONFIGS = {  # scheduler_config.json contents as the checkpoints ship them
    "sd15": dict(_SD, _class_name="PNDMScheduler", _diffusers_version="0.6.0"),
    "sd21": dict(_SD, _class_name="DDIMScheduler", prediction_type="v_prediction"),
    "sd21_trailing": dict(_SD, _class_name="DDIMScheduler", prediction_type="v_prediction",
                          timestep_spacing="trailing"),
    "sd21_linspace": dict(_SD, _class_name="DDIMScheduler", prediction_type="v_prediction",
                          timestep_spacing="linspace"),
    "sdxl": dict(_SD, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                 prediction_type="epsilon", sample_max_value=1.0, timestep_spacing="leading",
                 use_karras_sigmas=False),
    "lcm": dict(_SD, _class_name="LCMScheduler", set_alpha_to_one=True, original_inference_steps=50,
                prediction_type="epsilon", timestep_scaling=10.0, timestep_spacing="leading", thresholding=False),
    "turbo": dict(_SD, _class_name="EulerDiscreteScheduler", timestep_spacing="trailing",
                  prediction_type="epsilon", use_karras_sigmas=False),
    # less common keys: zero terminal SNR, cosine betas, Karras Euler ending at sigma_min, linear betas
    "zero_snr": dict(_SD, _class_name="DDIMScheduler", prediction_type="v_prediction",
                     timestep_spacing="trailing", rescale_betas_zero_snr=True, set_alpha_to_one=True),
    "cosine_sample": dict(_class_name="DDIMScheduler", beta_schedule="squaredcos_cap_v2", clip_sample=True,
                          prediction_type="sample", steps_offset=0, final_sigmas_type="sigma_min"),
    "karras_linear": dict(_class_name="EulerDiscreteScheduler", beta_schedule="linear", use_karras_sigmas=True,
                          final_sigmas_type="sigma_min", timestep_spacing="leading", steps_offset=1,
                          unknown_future_key=123),
}
# prediction types diffusers itself rejects for these classes
UNSUPPORTED = {("euler_a", "cosine_sample"), ("pndm", "cosine_sample")}
# Zero terminal SNR starts the sigma schedulers at sigma 4096: float32 holds such samples to ~1e-3, and
# one-ulp differences in torch's own sigma table (its vectorized sqrt is not correctly rounded) move the
# following O(1) samples by that much. There we compare in units of the largest sample seen so far.
ILL_CONDITIONED = {"zero_snr"}

STEP_COUNTS = (1, 2, 4, 25)
SHAPE = (2, 4, 8, 8)


class TorchNoise:
    """`standard_normal` drawing from a torch generator, so noise matches diffusers' pipelines."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape):
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).numpy()


def reference(name, config):
    class_name, overrides = REFERENCE[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def relative_error(ours, theirs):
    theirs = np.asarray(theirs, dtype=np.float64)
    return float(np.abs(np.asarray(ours, dtype=np.float64) - theirs).max() / np.abs(theirs).max())


def run_both(name, config, steps, seed=0):
    """Denoise random model outputs through both implementations the way the pipelines do; yield pairs."""
    ref, ours = reference(name, config), make_scheduler(name, config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    # diffusers' pipelines hand `generator` to step() whenever it accepts one (eta stays 0)
    step_kwargs = {"generator": torch.Generator().manual_seed(seed + 1)} \
        if "generator" in inspect.signature(ref.step).parameters else {}
    noise = TorchNoise(seed + 1)
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(SHAPE).astype(np.float32)
    ours_x = start * np.float32(ours.init_noise_sigma)
    ref_x = torch.from_numpy(start) * ref.init_noise_sigma
    yield "init", ours, ref, ours_x, ref_x
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        yield "input", ours, ref, ours.scale_model_input(ours_x, t_ours), ref.scale_model_input(ref_x, t_ref)
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        ours_x = ours.step(model_output, t_ours, ours_x, rng=noise)
        out = ref.step(torch.from_numpy(model_output), t_ref, ref_x, **step_kwargs)
        ref_x = out.prev_sample
        yield "step", ours, ref, ours_x, out


CASES = [(name, cfg) for name in SCHEDULERS for cfg in CONFIGS if (name, cfg) not in UNSUPPORTED]


@pytest.mark.parametrize("name,config_name", CASES)
def test_matches_diffusers(name, config_name):
    config = CONFIGS[config_name]
    for steps in STEP_COUNTS:
        if first_timestep_repeats(name, config, steps):
            continue  # diffusers starts such a schedule at its 2nd entry and runs off the end
        n_steps, largest = 0, 0.0
        for kind, ours, ref, a, b in run_both(name, config, steps):
            where = f"{name} / {config_name} / {steps} steps / {kind} {n_steps}"
            if kind == "init":
                ref_t = ref.timesteps.numpy()
                assert ours.timesteps.dtype == ref_t.dtype, where
                if ours.timesteps.dtype.kind == "f" and config.get("use_karras_sigmas"):
                    # fractional Karras timesteps inherit torch's last-bit sigma rounding
                    np.testing.assert_allclose(ours.timesteps, ref_t, rtol=1e-5, atol=1e-3, err_msg=where)
                else:
                    np.testing.assert_array_equal(ours.timesteps, ref_t, err_msg=where)
                if hasattr(ours, "sigmas"):
                    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5, err_msg=where)
                assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6), where
                largest = float(np.abs(b.numpy()).max())
                continue
            theirs = (b if kind == "input" else b.prev_sample).numpy()
            assert a.dtype == np.float32 and a.shape == SHAPE, where
            largest = max(largest, float(np.abs(theirs).max()))
            tolerance = 1e-5 * np.abs(theirs).max()
            if config_name in ILL_CONDITIONED:
                tolerance = max(tolerance, 1e-6 * largest)
            assert np.abs(a - theirs).max() <= tolerance, where
            n_steps += kind == "step"
        assert n_steps == len(ours.timesteps) >= steps, where
        if name == "lcm":  # the LCM pipeline decodes `denoised` of the last step
            assert relative_error(a, b.denoised.numpy()) <= 1e-5, where


def first_timestep_repeats(name, config, steps):
    ref = reference(name, config)
    ref.set_timesteps(steps)
    return name != "pndm" and len(ref.timesteps) > 1 and ref.timesteps[0] == ref.timesteps[1]


def test_repeated_first_timestep_runs_to_the_end():
    """Karras sigmas on cosine betas repeat t=998; diffusers' txt2img fails there, ours walks every entry."""
    scheduler = make_scheduler("dpmpp_2m_karras", CONFIGS["cosine_sample"])
    scheduler.set_timesteps(25)
    assert scheduler.timesteps[0] == scheduler.timesteps[1]
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        x = scheduler.step(np.zeros(SHAPE, np.float32), t, x)
    assert np.isfinite(x).all()


def test_names_and_descriptions():
    assert SCHEDULERS == ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "pndm")
    for name in SCHEDULERS:
        text = describe(name)
        assert isinstance(text, str) and 10 < len(text) < 120 and "\n" not in text
    with pytest.raises(UserError, match="dpmpp_2m_karras"):
        describe("heun")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UserError) as error:
        make_scheduler("k_lms", CONFIGS["sd15"])
    for name in SCHEDULERS:
        assert name in str(error.value)


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_step_count_out_of_range(steps):
    scheduler = make_scheduler("euler", CONFIGS["sd15"])
    with pytest.raises(UserError, match="steps"):
        scheduler.set_timesteps(steps)


def test_lcm_cannot_exceed_its_original_steps():
    with pytest.raises(UserError, match="at most 50 steps"):
        make_scheduler("lcm", CONFIGS["lcm"]).set_timesteps(51)


def test_unsupported_config_values_are_user_errors():
    with pytest.raises(UserError, match="prediction_type"):
        make_scheduler("euler_a", CONFIGS["cosine_sample"])
    with pytest.raises(UserError, match="timestep_spacing"):
        make_scheduler("ddim", dict(CONFIGS["sd15"], timestep_spacing="sideways"))
    with pytest.raises(UserError, match="beta_schedule"):
        make_scheduler("ddim", dict(CONFIGS["sd15"], beta_schedule="quadratic"))


def test_noise_needs_and_rng():
    noisy = {name for name in SCHEDULERS if make_scheduler(name, CONFIGS["sd15"]).needs_noise}
    assert noisy == {"euler_a", "lcm"}
    scheduler = make_scheduler("euler_a", CONFIGS["sd15"])
    scheduler.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="rng"):
        scheduler.step(x, scheduler.timesteps[0], x)
    # a numpy Generator is a valid rng as it is
    scheduler.set_timesteps(4)
    out = scheduler.step(x, scheduler.timesteps[0], x, rng=np.random.default_rng(0))
    assert out.dtype == np.float32 and np.abs(out).max() > 0


def test_use_default_values_and_set_timesteps_resets():
    # configs saved by newer diffusers name the keys that were defaults; from_config drops them
    config = dict(CONFIGS["sd21"], timestep_spacing="trailing", _use_default_values=["timestep_spacing"])
    ours, ref = make_scheduler("ddim", config), reference("ddim", config)
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    # a second run on the same object starts over (DPM's history, PNDM's counter, the step index)
    for name in ("dpmpp_2m", "pndm", "euler"):
        scheduler = make_scheduler(name, CONFIGS["sd15"])
        results = []
        for _ in range(2):
            scheduler.set_timesteps(4)
            x = np.ones(SHAPE, np.float32)
            for t in scheduler.timesteps:
                scheduler.scale_model_input(x, t)
                x = scheduler.step(np.full(SHAPE, 0.1, np.float32), t, x)
            results.append(x)
        np.testing.assert_array_equal(results[0], results[1])


def test_step_rejects_a_timestep_out_of_order():
    scheduler = make_scheduler("euler", CONFIGS["sdxl"])
    scheduler.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="expected timestep"):
        scheduler.step(x, scheduler.timesteps[1], x)
