"""Samplers that index the cumulative alphas by integer timestep: DDIM, LCM and PNDM (PLMS)."""
from __future__ import annotations

import numpy as np

from backend.schedulers.base import COMMON_DEFAULTS, Scheduler
from backend.schedulers.tables import cumulative_alphas, spaced_timesteps
from backend.types import UserError


class DDIM(Scheduler):
    """diffusers' DDIMScheduler with eta = 0 (what the pipelines use)."""

    defaults = dict(COMMON_DEFAULTS, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
                    timestep_spacing="leading")

    def __init__(self, name, config):
        super().__init__(name, config)
        self.alphas_cumprod = cumulative_alphas(config, zero_snr_floor=False)
        self.final_alpha_cumprod = 1.0 if config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _make_schedule(self, n):
        cfg = self.config
        if cfg["timestep_spacing"] == "linspace":
            steps = np.linspace(0, self.train_steps - 1, n).round()[::-1]
        else:
            steps = spaced_timesteps(cfg["timestep_spacing"], n, self.train_steps, cfg["steps_offset"])
        self.timesteps = steps.astype(np.int64)

    def step(self, model_output, t, sample, rng=None):
        t = int(t)
        prev_t = t - self.train_steps // self.num_inference_steps
        alpha_t = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        x0, eps = self._x0_from_alphas(model_output, sample, alpha_t)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = np.clip(x0, -limit, limit)
        self._x0 = x0  # diffusers' pred_original_sample (after the clip)
        prev = np.float32(alpha_prev ** 0.5) * x0 + np.float32((1 - alpha_prev) ** 0.5) * eps
        return prev.astype(np.float32)


class LCM(Scheduler):
    """diffusers' LCMScheduler; the last step returns the denoised sample the LCM pipeline decodes."""

    defaults = dict(COMMON_DEFAULTS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                    set_alpha_to_one=True, timestep_spacing="leading", timestep_scaling=10.0)
    needs_noise = True

    def __init__(self, name, config):
        super().__init__(name, config)
        self.alphas_cumprod = cumulative_alphas(config, zero_snr_floor=False)
        self.final_alpha_cumprod = 1.0 if config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _make_schedule(self, n):
        original = int(self.config["original_inference_steps"])
        if original > self.train_steps:
            raise UserError(f"original_inference_steps ({original}) in the scheduler config exceeds "
                            f"num_train_timesteps ({self.train_steps}).")
        if n > original:
            raise UserError(f"LCM can take at most {original} steps with this model (got {n}).")
        origin = (np.arange(1, original + 1) * (self.train_steps // original) - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.int64)

    def step(self, model_output, t, sample, rng=None):
        i = self._step_index(t)
        t = int(t)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        alpha_t = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        scaled_t = t * self.config["timestep_scaling"]
        c_skip = 0.25 / (scaled_t ** 2 + 0.25)               # sigma_data = 0.5
        c_out = scaled_t / (scaled_t ** 2 + 0.25) ** 0.5

        x0, _ = self._x0_from_alphas(model_output, sample, alpha_t)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = np.clip(x0, -limit, limit)
        denoised = np.float32(c_out) * x0 + np.float32(c_skip) * sample
        self._x0 = denoised  # what the LCM pipeline decodes (diffusers' `denoised`)
        self._index += 1
        if i == self.num_inference_steps - 1:
            return denoised.astype(np.float32)
        noise = self._noise(rng, model_output.shape)
        prev = np.float32(alpha_prev ** 0.5) * denoised + np.float32((1 - alpha_prev) ** 0.5) * noise
        return prev.astype(np.float32)


class PNDM(Scheduler):
    """diffusers' PNDMScheduler with skip_prk_steps (PLMS only), as Stable Diffusion configures it."""

    defaults = {**{k: v for k, v in COMMON_DEFAULTS.items() if k != "rescale_betas_zero_snr"},  # not PNDM's
                "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}
    prediction_types = ("epsilon", "v_prediction")

    def __init__(self, name, config):
        super().__init__(name, config)
        self.alphas_cumprod = cumulative_alphas(config, zero_snr_floor=False)
        self.final_alpha_cumprod = 1.0 if config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _make_schedule(self, n):
        cfg = self.config
        if cfg["timestep_spacing"] == "linspace":
            ascending = np.linspace(0, self.train_steps - 1, n).round()
        else:
            spaced = spaced_timesteps(cfg["timestep_spacing"], n, self.train_steps, cfg["steps_offset"])
            ascending = spaced[::-1]
        # the second-to-last training step is repeated: PLMS's first step is a two-evaluation warm-up
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        self.timesteps = plms.astype(np.int64)
        self._history = []
        self._counter = 0
        self._first_sample = None

    def step(self, model_output, t, sample, rng=None):
        stride = self.train_steps // self.num_inference_steps
        t = int(t)
        # the x0 this evaluation implies at (sample, t), computed only if asked (diffusers' PNDM returns none);
        # the arguments are bound now, as the names are reassigned below
        alpha_t = float(self.alphas_cumprod[t])
        self._x0 = lambda out=model_output, x=sample: self._x0_from_alphas(out, x, alpha_t)[0]
        prev_t = t - stride
        if self._counter != 1:
            self._history = self._history[-3:] + [model_output]
        else:
            prev_t, t = t, t + stride
        ets = self._history
        if len(ets) == 1 and self._counter == 0:
            self._first_sample = sample
        elif len(ets) == 1 and self._counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self._first_sample = self._first_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self._counter += 1
        return self._previous_sample(sample, t, prev_t, model_output)

    def _previous_sample(self, sample, t, prev_t, model_output):
        alpha_t = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = np.float32(alpha_t ** 0.5) * model_output + np.float32(beta_t ** 0.5) * sample
        sample_coeff = (alpha_prev / alpha_t) ** 0.5
        denom = alpha_t * beta_prev ** 0.5 + (alpha_t * beta_t * alpha_prev) ** 0.5
        step = np.float32(alpha_prev - alpha_t) * model_output / np.float32(denom)
        prev = np.float32(sample_coeff) * sample - step
        return prev.astype(np.float32)
