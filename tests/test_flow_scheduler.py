"""backend.schedulers' flow-matching samplers against diffusers' FlowMatchEulerDiscreteScheduler."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from backend.schedulers import FLOW_SCHEDULERS, describe, is_flow, make_scheduler, schedulers_for
from backend.types import UserError

CONFIGS = {  # keyword arguments of FlowMatchEulerDiscreteScheduler
    "sd3": dict(shift=3.0),                   # stable-diffusion-3-medium-diffusers
    "plain": dict(shift=1.0),
    "dynamic": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    "dynamic_linear": dict(use_dynamic_shifting=True, time_shift_type="linear"),
    "terminal": dict(shift=3.0, shift_terminal=0.1),
    "inverted": dict(shift=3.0, invert_sigmas=True),
    "karras": dict(shift=3.0, use_karras_sigmas=True),
    "exponential": dict(shift=3.0, use_exponential_sigmas=True),
}


def both(kwargs):
    ref = FlowMatchEulerDiscreteScheduler(**kwargs)
    config = dict(ref.config, _class_name="FlowMatchEulerDiscreteScheduler")
    return ref, make_scheduler("flow_euler", config)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [2, 4, 28])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_sigmas_timesteps_and_steps_are_diffusers(name, steps, image_seq_len):
    ref, mine = both(CONFIGS[name])
    kwargs = {}
    if ref.config.use_dynamic_shifting:
        c = ref.config
        kwargs["mu"] = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                                       c.max_shift)
    ref.set_timesteps(steps, **kwargs)
    mine.set_timesteps(steps, image_seq_len=image_seq_len)
    np.testing.assert_array_equal(mine.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(mine.sigmas, ref.sigmas.numpy())
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    expected = torch.from_numpy(sample.copy())
    for t in mine.timesteps:
        velocity = rng.standard_normal(sample.shape).astype(np.float32)
        sample = mine.step(velocity, t, sample)
        expected = ref.step(torch.from_numpy(velocity), torch.tensor(t), expected).prev_sample
    np.testing.assert_array_equal(sample, expected.numpy())


def test_fixed_schedules_are_used_as_listed():
    config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config, _class_name="FlowMatchEulerDiscreteScheduler")
    two, four = make_scheduler("flow_2step", config), make_scheduler("flow_4step", config)
    two.set_timesteps(2)
    four.set_timesteps(4)
    np.testing.assert_array_equal(two.sigmas, np.float32([1.0, 0.75, 0.0]))
    np.testing.assert_array_equal(four.timesteps, np.float32([1000, 900, 750, 500]))
    with pytest.raises(UserError, match="has 2 steps"):
        two.set_timesteps(3)


def test_models_get_the_schedulers_that_fit_them():
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    assert is_flow(flow) and schedulers_for(flow) == FLOW_SCHEDULERS
    assert "flow_euler" not in schedulers_for({"_class_name": "PNDMScheduler"})
    with pytest.raises(UserError, match="flow-matching"):
        make_scheduler("euler", flow)
    with pytest.raises(UserError, match="not a flow-matching"):
        make_scheduler("flow_euler", {"_class_name": "EulerDiscreteScheduler"})
    assert all(describe(name) for name in FLOW_SCHEDULERS)


def test_unimplemented_options_are_refused():
    with pytest.raises(UserError, match="stochastic_sampling"):
        make_scheduler("flow_euler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True})
    terminal = make_scheduler("flow_euler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": 0.1})
    with pytest.raises(UserError, match="at least 2 steps"):
        terminal.set_timesteps(1)
