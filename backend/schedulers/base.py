"""The Scheduler base class: the surface every sampler shares, and the config keys they all accept."""
from __future__ import annotations

import numpy as np

from backend.schedulers.tables import SPACINGS
from backend.types import UserError

# Keys every diffusers scheduler here accepts, with the defaults most of them use.
COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                       trained_betas=None, prediction_type="epsilon", steps_offset=0,
                       rescale_betas_zero_snr=False)


class Scheduler:
    """Call set_timesteps(n), then for each t in .timesteps: scale_model_input, the UNet, step.

    timesteps: what the UNet is given, in diffusers' dtype (int64, or float32 for the Euler family);
    init_noise_sigma: the factor for the initial standard-normal latents; needs_noise: whether step()
    draws from its `rng` (anything with `standard_normal(shape)`, e.g. a numpy Generator).

    Two stages can share one schedule (SDXL base, then refiner): the first runs the `denoising_end(f)` first
    timesteps of its scheduler, the second calls `denoising_start(f)` on its own and runs from there.
    """

    defaults: dict = {}
    prediction_types = ("epsilon", "v_prediction", "sample")
    needs_noise = False
    init_noise_sigma = 1.0
    order = 1  # diffusers' `order`: 2 for solvers that evaluate twice per step (Heun, KDPM2); none here
    _x0 = None  # the last step's predicted final latents: an array, or a function that computes them on demand
    strength_in_float = False  # strength_start's rounding: SD3's img2img pipeline keeps n * strength unrounded

    def __init__(self, name: str, config: dict):
        self.name = name
        self.config = config
        self.train_steps = int(config["num_train_timesteps"])
        if config["prediction_type"] not in self.prediction_types:
            raise UserError(f"Scheduler {name!r} does not support prediction_type "
                            f"{config['prediction_type']!r}; it supports {', '.join(self.prediction_types)}.")
        if config["timestep_spacing"] not in SPACINGS:
            raise UserError(f"Unsupported timestep_spacing {config['timestep_spacing']!r} in the scheduler "
                            f"config; expected {', '.join(SPACINGS)}.")
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.num_inference_steps = 0
        self._index = 0

    def set_timesteps(self, num_steps: int, image_seq_len=None) -> None:
        """Build the schedule for `num_steps` UNet evaluations (PNDM adds one) and reset all state.

        `image_seq_len` (the denoiser's token count) matters only to resolution-shifted flow schedules."""
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise UserError(f"The number of steps must be a whole number of at least 1 (got {num_steps!r}).")
        if num_steps > self.train_steps:
            raise UserError(f"The number of steps ({num_steps}) cannot exceed the {self.train_steps} "
                            "timesteps this model was trained with.")
        self.num_inference_steps = int(num_steps)
        self._index = 0
        self._x0 = None
        self._make_schedule(int(num_steps))

    def set_begin_index(self, index: int) -> None:
        """Start at timesteps[index] (after set_timesteps), as diffusers' set_begin_index: the first step() is
        there, and a multistep solver starts afresh (its first step is first order)."""
        if not 0 <= index <= len(self.timesteps):
            raise ValueError(f"begin index {index} is outside the {len(self.timesteps)} timesteps")
        self._index = int(index)

    def _cutoff(self, fraction: float) -> int:
        """diffusers' discrete_timestep_cutoff: the training timestep at which `fraction` of the noise is removed."""
        return int(round(self.train_steps - fraction * self.train_steps))

    def denoising_end(self, fraction: float) -> int:
        """How many of the timesteps a first stage runs to stop at `fraction` (diffusers' denoising_end)."""
        return int(np.sum(self.timesteps >= self._cutoff(fraction)))

    def denoising_start(self, fraction: float) -> int:
        """Begin a second stage at `fraction` (diffusers' denoising_start): set and return the begin index. A
        second-order scheduler is not cut between the two evaluations of one step."""
        count = int(np.sum(self.timesteps < self._cutoff(fraction)))
        if self.order == 2 and count % 2 == 0:
            count += 1
        self.set_begin_index(len(self.timesteps) - count)
        return len(self.timesteps) - count

    def strength_start(self, strength: float) -> int:
        """Begin image-to-image at `strength` (after set_timesteps): set and return the begin index.

        diffusers' img2img `get_timesteps`: of the n steps set, int(n * strength) are kept (capped at n), the first
        t_start = n - kept are skipped, and the scheduler begins at t_start * order (`set_begin_index`). The image
        latents are noised with `add_noise` at the first kept timestep. Flow schedulers (SD3's img2img pipeline)
        keep n * strength before truncating t_start instead (`strength_in_float`). Zero steps left is refused."""
        n = self.num_inference_steps
        kept = min(n * strength, n) if self.strength_in_float else min(int(n * strength), n)
        t_start = int(max(n - kept, 0))
        if n - t_start < 1:
            raise UserError(f"strength {strength} of {n} steps leaves no step to run: raise the strength or the "
                            "number of steps")
        self.set_begin_index(t_start * self.order)
        return t_start * self.order

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        """The forward process at timestep t, as the diffusers class's `add_noise` (float32): here the
        alpha-indexed classes' sqrt(alphas_cumprod[t]) x + sqrt(1 - alphas_cumprod[t]) noise."""
        alpha = self.alphas_cumprod[int(t)]
        a, b = np.sqrt(alpha), np.sqrt(np.float32(1.0) - alpha)
        return (a * original.astype(np.float32) + b * noise.astype(np.float32)).astype(np.float32)

    def _noise_index(self, t) -> int:
        """diffusers' index for add_noise on sigma schedules: the current step (the begin index before the first
        step, the next one after a step) when it holds t, else t's place in the schedule (its second entry if
        repeated, as `index_for_timestep`)."""
        i = self._index
        if i < len(self.timesteps) and self.timesteps[i] == t:
            return i
        found = np.flatnonzero(self.timesteps == t)
        if not len(found):
            raise ValueError(f"timestep {t} is not in the {self.name} schedule")
        return int(found[1] if len(found) > 1 else found[0])

    def scale_model_input(self, sample: np.ndarray, t) -> np.ndarray:
        """The UNet's input for the current step's latents (call once per step, before step)."""
        return sample

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, rng=None) -> np.ndarray:
        """The latents after timestep t (float32 NCHW); after LCM's last step, its denoised sample."""
        raise NotImplementedError

    def predicted_original(self):
        """The last step()'s prediction of the final (fully denoised) latents, float32 NCHW, or None before the
        first step: diffusers' `pred_original_sample` (DDIM, Euler, Euler ancestral), the data prediction
        DPM-Solver++ steps with (its `model_outputs[-1]`), LCM's `denoised`, and for PNDM and flow matching the
        x0 the current model output implies (flow: x0 = sample - sigma v). Live previews show it. Only read, never
        fed back, so sampling is unchanged; where step() does not already hold it, it is computed on this call."""
        if callable(self._x0):
            self._x0 = self._x0()
        return self._x0

    # -- helpers shared by the subclasses
    def _make_schedule(self, n: int) -> None:
        raise NotImplementedError

    def _step_index(self, t) -> int:
        """Position in the schedule: counted from 0 by step(); t must be the timestep found there."""
        i = self._index
        if i >= len(self.timesteps) or self.timesteps[i] != t:
            raise ValueError(f"scheduler {self.name!r} expected timestep "
                             f"{self.timesteps[i] if i < len(self.timesteps) else 'none'} at step {i}, got {t}")
        return i

    def _noise(self, rng, shape) -> np.ndarray:
        if rng is None:
            raise ValueError(f"scheduler {self.name!r} adds noise at each step: pass rng")
        return np.asarray(rng.standard_normal(tuple(shape)), dtype=np.float32)

    def _x0_from_alphas(self, model_output, sample, alpha_prod_t):
        """(predicted x0, predicted noise) for the alpha-parameterized (DDIM-family) schedulers."""
        a, b = np.float32(alpha_prod_t ** 0.5), np.float32((1 - alpha_prod_t) ** 0.5)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (sample - b * model_output) / a, model_output
        if kind == "sample":
            return model_output, (sample - a * model_output) / b
        return a * sample - b * model_output, a * model_output + b * sample
