"""Every sampler, once, in numpy: the MLX and Core ML engines both step their latents through these.

    scheduler = make_scheduler("dpmpp_2m", scheduler_config_dict)
    scheduler.set_timesteps(25)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(unet(model_in, t), t, latents, rng=rng)

A second stage (the SDXL refiner) continues a schedule: the base runs the first
`scheduler.denoising_end(f)` timesteps, the refiner's own scheduler starts at `denoising_start(f)` (base.py).
Image to image starts at `strength_start(strength)` with the image noised by `add_noise(image, noise, t)`, each
class's diffusers `add_noise` (the flow class's `scale_noise`).

Flow-matching models (SD3, `FlowMatchEulerDiscreteScheduler` configs) take the flow schedulers only, and
the others take the rest; `schedulers_for(config)` lists a model's choices.

Each name reproduces one diffusers class built with `Class.from_config(scheduler_config)` plus the
overrides the name implies: same timesteps, same sigmas, same step results within float32 rounding.
Only the keys that class accepts are read from the config, each falling back to that class's default, as
`from_config` does; other keys are ignored. Not implemented (treated as off): thresholding, Euler's
continuous timesteps and log-linear interpolation, exponential/beta/Lu sigmas, PNDM's PRK warm-up
(SD configs skip it), DDIM eta > 0.

Arrays are float32 NCHW. Tables are float32 like diffusers'; a step's scalar coefficients are computed in
float64 from those tables and applied in float32. `rng` is anything with `standard_normal(shape)`.
"""
from __future__ import annotations

from backend.schedulers.alpha import DDIM, LCM, PNDM
from backend.schedulers.base import Scheduler
from backend.schedulers.flow import FIXED_SIGMAS, FlowMatchEuler
from backend.schedulers.sigma import DPMSolverPP2M, Euler, EulerAncestral
from backend.types import UserError

__all__ = ["SCHEDULERS", "FLOW_SCHEDULERS", "Scheduler", "make_scheduler", "describe", "is_flow", "schedulers_for"]

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "pndm")
FLOW_SCHEDULERS = ("flow_euler", *FIXED_SIGMAS)

# name -> (class, config overrides the name implies)
_REGISTRY = {
    "ddim": (DDIM, {}),
    "euler": (Euler, {}),
    "euler_a": (EulerAncestral, {}),
    "dpmpp_2m": (DPMSolverPP2M, dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
    "dpmpp_2m_karras": (DPMSolverPP2M, dict(algorithm_type="dpmsolver++", solver_order=2,
                                            use_karras_sigmas=True)),
    "lcm": (LCM, {}),
    "pndm": (PNDM, dict(skip_prk_steps=True)),
    "flow_euler": (FlowMatchEuler, {}),
    **{name: (FlowMatchEuler, {}) for name in FIXED_SIGMAS},
}

_DESCRIPTIONS = {
    "ddim": "DDIM: deterministic, good quality from ~20 steps.",
    "euler": "Euler: simple and deterministic, fast and predictable.",
    "euler_a": "Euler ancestral: fresh noise each step; softer, varied images that change with step count.",
    "dpmpp_2m": "DPM++ 2M: second-order multistep; sharp results in 15-25 steps.",
    "dpmpp_2m_karras": "DPM++ 2M Karras: DPM++ 2M on the Karras noise schedule; often the best at few steps.",
    "lcm": "LCM: for latent-consistency (LCM) models only; 2-8 steps, guidance around 1-2.",
    "pndm": "PNDM (PLMS): Stable Diffusion 1.x's original sampler; wants ~50 steps.",
    "flow_euler": "Flow-matching Euler: SD3's own sampler, shifted as the model's config says; 28-40 steps.",
    "flow_2step": "2-step flow schedule (sigmas 1, 0.75, 0) for SD3 models distilled to 2 steps.",
    "flow_4step": "4-step flow schedule (sigmas 1, 0.9, 0.75, 0.5, 0) for SD3 models distilled to 4 steps.",
}


def describe(name: str) -> str:
    """One line for the UI saying what scheduler `name` is and what it is good for."""
    _check_name(name)
    return _DESCRIPTIONS[name]


def is_flow(config: dict) -> bool:
    """Whether a scheduler_config.json belongs to a flow-matching model (SD3 and its kin)."""
    return str((config or {}).get("_class_name", "")).startswith("FlowMatch")


def schedulers_for(config: dict) -> tuple:
    """The scheduler names a model with this scheduler config can use."""
    return FLOW_SCHEDULERS if is_flow(config) else SCHEDULERS


def make_scheduler(name: str, config: dict) -> Scheduler:
    """The scheduler `name` configured from a checkpoint's scheduler_config.json dict."""
    _check_name(name)
    choices = schedulers_for(config)
    if name not in choices:
        kind = "a flow-matching model" if is_flow(config) else "not a flow-matching model"
        raise UserError(f"Scheduler {name!r} does not fit this model ({kind}); choose one of: {', '.join(choices)}.")
    cls, overrides = _REGISTRY[name]
    resolved = _resolve(cls.defaults, config or {}, overrides)
    if name in FIXED_SIGMAS:
        return cls(name, resolved, fixed_sigmas=FIXED_SIGMAS[name])
    return cls(name, resolved)


def _check_name(name) -> None:
    if name not in _REGISTRY:
        raise UserError(f"Unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS + FLOW_SCHEDULERS)}.")


def _resolve(defaults: dict, config: dict, overrides: dict) -> dict:
    """What `from_config` does: the class's own keys from the config, its defaults for the rest."""
    defaulted = set(config.get("_use_default_values", []))
    resolved = dict(defaults)
    resolved.update({k: v for k, v in config.items() if k in defaults and k not in defaulted})
    resolved.update(overrides)
    return resolved
