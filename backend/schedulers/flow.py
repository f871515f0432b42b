"""Flow-matching samplers (Stable Diffusion 3 / 3.5): diffusers' FlowMatchEulerDiscreteScheduler, and the
fixed few-step sigma lists that distilled SD3 models are trained for.

A flow model predicts the velocity v = noise - x0 at sample = (1 - sigma) x0 + sigma noise; an Euler step is
sample + (sigma_next - sigma) v. The model is given timestep = sigma * num_train_timesteps.

`flow_euler` reproduces diffusers' schedule for a checkpoint's config: `shift`, or `use_dynamic_shifting`
with the resolution-dependent mu of the SD3 pipeline (`calculate_shift` over the image's patch count), then
`shift_terminal`, Karras/exponential sigmas, `invert_sigmas`. Beta sigmas (scipy) and stochastic sampling
are refused, not approximated.

The fixed schedules are used exactly as listed (no shift on top): they are the sigmas the distilled model
saw in training, terminal zero included.
"""
from __future__ import annotations

import math

import numpy as np

from backend.schedulers.base import Scheduler
from backend.schedulers.tables import karras_sigmas
from backend.types import UserError

# Few-step schedules of distilled SD3 Medium models: name -> sigmas, the final 0 included.
# MobileDiffuser's 2- and 4-step schedules (see README, "Stable Diffusion 3").
FIXED_SIGMAS = {
    "flow_2step": (1.0, 0.75, 0.0),
    "flow_4step": (1.0, 0.9, 0.75, 0.5, 0.0),
}


class FlowMatchEuler(Scheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler (deterministic Euler), or a fixed sigma list."""

    defaults = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
                    shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False,
                    prediction_type="flow", timestep_spacing="linspace")
    prediction_types = ("flow",)
    strength_in_float = True  # StableDiffusion3Img2ImgPipeline.get_timesteps

    def __init__(self, name: str, config: dict, fixed_sigmas=None):
        config = dict(config, prediction_type="flow", timestep_spacing="linspace")
        super().__init__(name, config)
        for key in ("use_beta_sigmas", "stochastic_sampling"):
            if config[key]:
                raise UserError(f"the scheduler config sets {key}, which Silicon Diffusion does not implement")
        if config["time_shift_type"] not in ("exponential", "linear"):
            raise UserError(f"unknown time_shift_type {config['time_shift_type']!r} in the scheduler config")
        self.fixed_sigmas = None if fixed_sigmas is None else np.asarray(fixed_sigmas, dtype=np.float32)
        train = self.train_steps
        # The training schedule, in float32 as diffusers builds it; its ends bound the inference schedule.
        sigmas = np.linspace(1, train, train, dtype=np.float32)[::-1] / np.float32(train)
        if not config["use_dynamic_shifting"]:
            shift = np.float32(config["shift"])
            sigmas = shift * sigmas / (np.float32(1) + (shift - np.float32(1)) * sigmas)
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])
        self.sigmas = np.zeros(1, dtype=np.float32)

    @property
    def fixed_steps(self):
        """The number of steps a fixed schedule has (None: any number)."""
        return None if self.fixed_sigmas is None else len(self.fixed_sigmas) - 1

    def mu(self, image_seq_len: int) -> float:
        """The SD3 pipeline's `calculate_shift`: mu linear in the patch count between the config's two ends."""
        c = self.config
        m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        return image_seq_len * m + (c["base_shift"] - m * c["base_image_seq_len"])

    def set_timesteps(self, num_steps: int, image_seq_len: int | None = None) -> None:
        """`image_seq_len`: the denoiser's patch count, needed when the config uses dynamic shifting."""
        if self.fixed_steps is not None and num_steps != self.fixed_steps:
            raise UserError(f"the {self.name} schedule has {self.fixed_steps} steps; set steps to "
                            f"{self.fixed_steps} (asked for {num_steps})")
        self._image_seq_len = image_seq_len
        super().set_timesteps(num_steps)

    def _make_schedule(self, n: int) -> None:
        if self.fixed_sigmas is not None:
            sigmas = self.fixed_sigmas
            self.timesteps = (sigmas[:-1] * np.float32(self.train_steps)).astype(np.float32)
            self.sigmas = sigmas.copy()
            return
        c, train = self.config, self.train_steps
        sigmas = np.linspace(self.sigma_max * train, self.sigma_min * train, n) / train  # float64, as numpy there
        if c["use_dynamic_shifting"]:
            if self._image_seq_len is None:
                raise ValueError("this flow schedule shifts with the image size: pass image_seq_len")
            sigmas = self._time_shift(self.mu(self._image_seq_len), sigmas)
        else:
            sigmas = c["shift"] * sigmas / (1 + (c["shift"] - 1) * sigmas)
        if c["shift_terminal"]:
            if n < 2:
                raise UserError("this model's schedule stretches to a terminal sigma, which needs at least 2 steps")
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))
        if c["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
        elif c["use_exponential_sigmas"]:
            sigmas = np.exp(np.linspace(math.log(sigmas[0]), math.log(sigmas[-1]), n))
        sigmas = sigmas.astype(np.float32)
        timesteps = sigmas * np.float32(train)
        last = np.float32(0.0)
        if c["invert_sigmas"]:
            sigmas = np.float32(1.0) - sigmas
            timesteps = sigmas * np.float32(train)
            last = np.float32(1.0)
        self.timesteps = timesteps.astype(np.float32)
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        if self.config["time_shift_type"] == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        return mu / (mu + (1 / t - 1))

    def add_noise(self, original, noise, t):
        """diffusers' `scale_noise`, the flow forward process: sigma noise + (1 - sigma) original at t's step."""
        sigma = self.sigmas[self._noise_index(t)]
        return (sigma * noise.astype(np.float32) + (np.float32(1.0) - sigma) * original.astype(np.float32)) \
            .astype(np.float32)

    def step(self, model_output, t, sample, rng=None):
        i = self._step_index(t)
        sigma = self.sigmas[i]
        # x0 = sample - sigma v, computed only if asked (diffusers' flow scheduler returns no prediction)
        self._x0 = lambda v=model_output, x=sample: (x.astype(np.float32) - sigma * v.astype(np.float32)) \
            .astype(np.float32)
        dt = self.sigmas[i + 1] - self.sigmas[i]  # float32, as diffusers' tensors
        self._index += 1
        return (sample.astype(np.float32) + dt * model_output.astype(np.float32)).astype(np.float32)

