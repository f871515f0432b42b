"""Samplers that walk a sigma schedule: Euler, Euler ancestral and DPM-Solver++ 2M (optionally Karras)."""
from __future__ import annotations

import math

import numpy as np

from backend.schedulers.base import COMMON_DEFAULTS, Scheduler
from backend.schedulers.tables import (cumulative_alphas, karras_sigmas, sigma_table, sigma_to_t,
                                       spaced_timesteps)


class _SigmaScheduler(Scheduler):
    """The k-diffusion style classes: sample = x0 + sigma * noise, UNet input scaled by 1/sqrt(sigma^2+1)."""

    def __init__(self, name, config):
        super().__init__(name, config)
        self.alphas_cumprod = cumulative_alphas(config, zero_snr_floor=True)
        self.sigmas = np.zeros(1, dtype=np.float32)

    def _timesteps_for(self, n):
        """float32 descending timesteps; 'linspace' ones are fractional, not rounded (as in diffusers)."""
        cfg = self.config
        if cfg["timestep_spacing"] == "linspace":
            return np.linspace(0, self.train_steps - 1, n).astype(np.float32)[::-1].copy()
        steps = spaced_timesteps(cfg["timestep_spacing"], n, self.train_steps, cfg["steps_offset"])
        return steps.astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:
        top = float(self.sigmas.max())
        return top if self.config["timestep_spacing"] in ("linspace", "trailing") else (top * top + 1) ** 0.5

    def add_noise(self, original, noise, t):
        """diffusers' Euler / Euler ancestral add_noise: original + noise * sigma at t's step."""
        sigma = self.sigmas[self._noise_index(t)]
        return (original.astype(np.float32) + noise.astype(np.float32) * sigma).astype(np.float32)

    def scale_model_input(self, sample, t):
        sigma = float(self.sigmas[self._step_index(t)])
        return (sample / np.float32((sigma * sigma + 1) ** 0.5)).astype(np.float32)

    def _x0_from_sigma(self, model_output, sample, sigma):
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return sample - np.float32(sigma) * model_output
        if kind == "v_prediction":
            c_out, c_skip = -sigma / (sigma * sigma + 1) ** 0.5, sigma * sigma + 1
            return model_output * np.float32(c_out) + sample / np.float32(c_skip)
        return model_output  # "sample" (or Euler's older name for it, "original_sample")


class Euler(_SigmaScheduler):
    """diffusers' EulerDiscreteScheduler (no churn, as the pipelines call it)."""

    defaults = dict(COMMON_DEFAULTS, use_karras_sigmas=False, sigma_min=None, sigma_max=None,
                    timestep_spacing="linspace", final_sigmas_type="zero")
    prediction_types = ("epsilon", "v_prediction", "sample", "original_sample")

    def _make_schedule(self, n):
        cfg = self.config
        timesteps = self._timesteps_for(n)
        table = sigma_table(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        if cfg["use_karras_sigmas"]:
            lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, np.log(table))
        last = float(table[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)

    def step(self, model_output, t, sample, rng=None):
        i = self._step_index(t)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        sample = sample.astype(np.float32)
        x0 = self._x0 = self._x0_from_sigma(model_output, sample, sigma)  # diffusers' pred_original_sample
        derivative = (sample - x0) / np.float32(sigma)
        self._index += 1
        return (sample + derivative * np.float32(sigma_next - sigma)).astype(np.float32)


class EulerAncestral(_SigmaScheduler):
    """diffusers' EulerAncestralDiscreteScheduler: an Euler step to sigma_down, then noise of sigma_up."""

    defaults = dict(COMMON_DEFAULTS, timestep_spacing="linspace")
    prediction_types = ("epsilon", "v_prediction")
    needs_noise = True

    def _make_schedule(self, n):
        timesteps = self._timesteps_for(n)
        table = sigma_table(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps

    def step(self, model_output, t, sample, rng=None):
        i = self._step_index(t)
        sigma, sigma_to = float(self.sigmas[i]), float(self.sigmas[i + 1])
        sample = sample.astype(np.float32)
        x0 = self._x0 = self._x0_from_sigma(model_output, sample, sigma)  # diffusers' pred_original_sample
        sigma_up = (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5
        sigma_down = max(sigma_to ** 2 - sigma_up ** 2, 0.0) ** 0.5
        derivative = (sample - x0) / np.float32(sigma)
        prev = sample + derivative * np.float32(sigma_down - sigma)
        # drawn on every step, the last included, so the generator advances exactly as in diffusers
        noise = self._noise(rng, model_output.shape)
        self._index += 1
        return (prev + noise * np.float32(sigma_up)).astype(np.float32)


class DPMSolverPP2M(Scheduler):
    """diffusers' DPMSolverMultistepScheduler, algorithm dpmsolver++, solver order 2."""

    defaults = dict(COMMON_DEFAULTS, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                    lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                    final_sigmas_type="zero", lambda_min_clipped=-float("inf"), timestep_spacing="linspace")

    def __init__(self, name, config):
        super().__init__(name, config)
        self.alphas_cumprod = cumulative_alphas(config, zero_snr_floor=True)
        ac = self.alphas_cumprod
        self.lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        self.sigmas = np.zeros(1, dtype=np.float32)

    def _make_schedule(self, n):
        cfg, train = self.config, self.train_steps
        clipped = int(np.searchsorted(self.lambdas[::-1], cfg["lambda_min_clipped"]))
        last_t = train - clipped
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(0, n + 1) * (last_t // (n + 1))).round()[::-1][:-1] + cfg["steps_offset"]
        else:
            timesteps = np.arange(last_t, 0, -train / n).round() - 1
        timesteps = timesteps.astype(np.int64)
        table = sigma_table(self.alphas_cumprod)
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
            timesteps = sigma_to_t(sigmas, np.log(table))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(table)), table)
        last = float(table[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._previous_x0 = None
        self._steps_done = 0

    def add_noise(self, original, noise, t):
        """diffusers' DPM-Solver add_noise: alpha_t original + sigma_t noise for the sigma at t's step."""
        sigma = self.sigmas[self._noise_index(t)]
        alpha_t = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
        sigma_t = sigma * alpha_t
        return (alpha_t * original.astype(np.float32) + sigma_t * noise.astype(np.float32)).astype(np.float32)

    @staticmethod
    def _alpha_sigma_lambda(sigma: float):
        alpha = 1 / (sigma * sigma + 1) ** 0.5
        sigma_t = sigma * alpha
        with np.errstate(divide="ignore"):
            lam = float(np.log(alpha) - np.log(np.float64(sigma_t)))  # +inf at sigma 0
        return alpha, sigma_t, lam

    def step(self, model_output, t, sample, rng=None):
        cfg, n = self.config, len(self.timesteps)
        i = self._step_index(t)
        few_steps = cfg["lower_order_final"] and n < 15
        first_order_final = i == n - 1 and (cfg["euler_at_final"] or few_steps
                                            or cfg["final_sigmas_type"] == "zero")
        sample = sample.astype(np.float32)

        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(float(self.sigmas[i]))
        kind = cfg["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - np.float32(sigma_s) * model_output) / np.float32(alpha_s)
        elif kind == "v_prediction":
            x0 = np.float32(alpha_s) * sample - np.float32(sigma_s) * model_output
        else:
            x0 = model_output
        previous_x0, self._previous_x0 = self._previous_x0, x0
        self._x0 = x0  # the data prediction (diffusers' convert_model_output, kept in model_outputs[-1])

        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(float(self.sigmas[i + 1]))
        h = lambda_t - lambda_s
        decay = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
        prev = np.float32(sigma_t / sigma_s) * sample - np.float32(alpha_t * decay) * x0
        if self._steps_done >= 1 and not first_order_final:
            _, _, lambda_s1 = self._alpha_sigma_lambda(float(self.sigmas[i - 1]))
            d1 = np.float32(h / (lambda_s - lambda_s1)) * (x0 - previous_x0)
            if cfg["solver_type"] == "heun":
                prev = prev + np.float32(alpha_t * (decay / h + 1.0)) * d1
            else:
                prev = prev - np.float32(0.5 * alpha_t * decay) * d1
        self._steps_done += 1
        self._index += 1
        return prev.astype(np.float32)
