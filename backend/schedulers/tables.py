"""Noise-schedule tables as diffusers builds them: betas, cumulative alphas, sigmas, timestep spacings.

Tables are float32 and bit-identical to diffusers' where torch's float32 ops are correctly rounded
(torch's CPU sqrt is not always, so sigmas may differ in the last bit).
"""
from __future__ import annotations

import math

import numpy as np

from backend.types import UserError

SPACINGS = ("leading", "trailing", "linspace")


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(..., dtype=float32) bit for bit: float32 step, fused multiply-add from both ends."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    from_start = (np.float64(start32) + step * i).astype(np.float32)
    from_end = (np.float64(end32) - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, from_start, from_end)


def make_betas(cfg) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    schedule = cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float32)
    if schedule == "linear":
        return linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    if schedule == "scaled_linear":
        root = linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
        return root * root
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=np.float32)
    raise UserError(f"Unsupported beta_schedule {schedule!r} in the scheduler config; "
                    "expected linear, scaled_linear or squaredcos_cap_v2.")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero signal (arXiv 2305.08891)."""
    root = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * (first / (first - last))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def cumulative_alphas(cfg, zero_snr_floor: bool) -> np.ndarray:
    """float32 cumulative alphas; `zero_snr_floor` keeps the last one off zero (the sigma-based classes)."""
    betas = make_betas(cfg)
    zero_snr = cfg.get("rescale_betas_zero_snr", False)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    # torch accumulates a float32 cumprod in float64 on CPU and rounds each entry
    cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
    if zero_snr and zero_snr_floor:
        cumprod[-1] = 2.0 ** -24
    return cumprod


def sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def spaced_timesteps(spacing: str, n: int, train: int, offset: int) -> np.ndarray:
    """Descending float64 timesteps for 'leading' or 'trailing' spacing, as diffusers makes them."""
    if spacing == "leading":
        return (np.arange(0, n) * (train // n)).round()[::-1] + offset
    return np.arange(train, 0, -train / n).round() - 1


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose (log-interpolated) sigma is each of `sigmas`."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
