"""The engine-independent generation loop: tokenize, encode, schedule, guide, decode, measure, cancel.

An engine only provides the three stages (backend/engines/base.py); everything else here exists once.
"""
from __future__ import annotations

import secrets
import time
from typing import Optional

import numpy as np
from PIL import Image

from backend import guidance as cfg
from backend.checkpoint import ModelSpec, resolve_dims
from backend.engines.base import Stages
from backend.measure import ProcessPeak, disk_bytes
from backend.families import T5_SEQUENCE_LENGTH
from backend.schedulers import make_scheduler
from backend.schedulers.flow import FIXED_SIGMAS
from backend.types import (Cancelled, GenerationRequest, GenerationResult, Memory, StepCallback, StepInfo,
                           Timings, UserError)

MAX_STEPS = 500


class Pipeline:
    """One loaded model on one engine; load once, generate many times."""

    def __init__(self, spec: ModelSpec, stages: Stages, tokenizers: list, name: str, reason: str,
                 load_seconds: float, disk: Optional[int] = None):
        self.spec = spec
        self.stages = stages
        self.tokenizers = tokenizers
        self.name = name
        self.reason = reason
        self.load_seconds = load_seconds
        self.disk_bytes = disk if disk is not None else disk_bytes(spec.folder)
        self._first_run = True

    @property
    def info(self) -> dict:
        return {**self.stages.info, "model": self.name, "family": self.spec.family, "reason": self.reason}

    # -- request handling -------------------------------------------------------------------------
    def _settings(self, r: GenerationRequest) -> dict:
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise UserError("enter a prompt: it is empty")
        scheduler_name = r.scheduler or self.spec.default("scheduler")
        fixed = FIXED_SIGMAS.get(scheduler_name)
        steps = (len(fixed) - 1 if fixed else self.spec.default("steps")) if r.steps is None else r.steps
        if int(steps) != steps or not 1 <= steps <= MAX_STEPS:
            raise UserError(f"steps must be a whole number from 1 to {MAX_STEPS} (got {steps})")
        guidance = float(self.spec.default("guidance") if r.guidance is None else r.guidance)
        if not np.isfinite(guidance) or not 0.0 <= guidance <= 50.0:
            raise UserError(f"guidance must be between 0 and 50 (got {guidance})")
        width, height = resolve_dims(self.spec, r.width, r.height)
        seed = secrets.randbelow(2**32) if r.seed is None or r.seed < 0 else int(r.seed)
        if r.batch_size < 1 or r.batch_size > 8:
            raise UserError("batch size must be from 1 to 8")
        settings = dict(prompt=r.prompt, negative_prompt=r.negative_prompt or "", steps=int(steps), guidance=guidance,
                        scheduler=scheduler_name, width=width, height=height,
                        seed=seed, model=self.name, batch_size=r.batch_size)
        if self.spec.traits.t5 is not None:
            settings["max_sequence_length"] = self._sequence_length(r.max_sequence_length)
        elif r.max_sequence_length is not None:
            raise UserError("max sequence length is an option of SD3 models (their T5 tokens); this model has none")
        return settings

    def _sequence_length(self, asked: Optional[int]) -> int:
        """T5 tokens after CLIP's 77: as asked, else what the engine's packages fix, else diffusers' 256."""
        fixed = self.stages.info.get("t5_tokens")
        if asked is None:
            return int(fixed or self.spec.defaults.get("max_sequence_length") or T5_SEQUENCE_LENGTH)
        if int(asked) != asked or not 1 <= asked <= 512:
            raise UserError(f"max sequence length must be a whole number from 1 to 512 (got {asked})")
        if fixed and asked != fixed:
            raise UserError(f"these Core ML packages take exactly {fixed} T5 tokens (77 + {fixed} in all); "
                            f"{asked} was asked")
        return int(asked)

    def _initial_latents(self, r: GenerationRequest, p: dict, rng) -> np.ndarray:
        shape = (p["batch_size"], self.spec.latent_channels, p["height"] // self.spec.vae_scale_factor,
                 p["width"] // self.spec.vae_scale_factor)
        if r.latents is None:
            return rng.standard_normal(shape).astype(np.float32)
        latents = np.asarray(r.latents, dtype=np.float32)
        if latents.ndim == 3:
            latents = latents[None]
        if latents.shape[1:] != shape[1:]:
            raise UserError(f"latents have shape {tuple(latents.shape)}; this model at {p['width']}x{p['height']} "
                            f"needs (N, {shape[1]}, {shape[2]}, {shape[3]})")
        if latents.shape[0] != shape[0]:
            latents = np.broadcast_to(latents[:1], shape).copy()
        return latents

    # -- stages -------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], p: dict, warnings: list) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The family's text conditioning for `prompts`: CLIP encoders, then T5 (or T5's zeros)."""
        traits = self.spec.traits
        hiddens, pooleds, t5_hidden = [], [], None
        for index, tokenizer in enumerate(self.tokenizers):
            is_t5 = index == len(traits.encoders)
            ids = []
            for prompt in prompts:
                tokens = tokenizer.encode(prompt, max_length=p["max_sequence_length"]) if is_t5 \
                    else tokenizer.encode(prompt)
                if tokens.truncated and prompt and (index == 0 or is_t5):
                    warnings.append(f"prompt longer than {len(tokens.ids)} {'T5' if is_t5 else 'CLIP'} tokens: "
                                    f"ignored '{tokens.dropped_text.strip()}'")
                ids.append(tokens.ids)
            out = self.stages.encode_text(index, np.stack(ids).astype(np.int32))
            if is_t5:
                t5_hidden = out.hidden
            else:
                hiddens.append(out.hidden)
                pooleds.append(out.pooled)
        joint_dim = self.spec.denoiser_config.get("joint_attention_dim")
        if traits.t5 is not None and t5_hidden is None:
            # no T5 (absent or skipped): diffusers conditions on zeros in its place
            t5_hidden = np.zeros((len(prompts), p["max_sequence_length"], joint_dim), np.float32)
        return traits.join_text(hiddens, pooleds, t5_hidden, joint_dim)

    def _conditioning(self, p: dict, do_cfg: bool, warnings: list):
        batch = p["batch_size"]
        prompts = [p["prompt"]] * batch
        if not do_cfg:
            return self._encode(prompts, p, warnings)
        negatives = [p["negative_prompt"]] * batch
        hidden, pooled = self._encode(negatives + prompts, p, warnings)
        if self.spec.force_zeros_for_empty_prompt and not p["negative_prompt"]:
            hidden[:batch] = 0.0
            if pooled is not None:
                pooled[:batch] = 0.0
        return hidden, pooled

    # -- the loop -----------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, callback: Optional[StepCallback] = None,
                 noise_rng=None) -> GenerationResult:
        """Run one request; `callback(StepInfo)` after every step may return False to stop (Cancelled)."""
        p = self._settings(request)
        scheduler = make_scheduler(p["scheduler"], self.spec.scheduler_config)
        scheduler.set_timesteps(p["steps"], image_seq_len=self.spec.patch_count(p["width"], p["height"]))
        warnings: list[str] = []
        rng = noise_rng or np.random.default_rng(p["seed"])
        timings = Timings(load=self.load_seconds if self._first_run else 0.0)
        peak = ProcessPeak()
        peak.reset()
        self.stages.reset_peak_memory()
        start = time.perf_counter()

        do_cfg = cfg.uses_cfg(p["guidance"], self.spec.is_lcm)
        self.stages.begin_stage("text_encoder")
        t0 = time.perf_counter()
        hidden, pooled = self._conditioning(p, do_cfg, warnings)
        warnings.extend(self.stages.info.get("notes", []))
        timings.text_encoder = time.perf_counter() - t0
        self.stages.end_stage("text_encoder")

        batch = p["batch_size"]
        model_batch = 2 * batch if do_cfg else batch
        time_ids = cfg.sdxl_time_ids(p["height"], p["width"], model_batch) if self.spec.traits.time_ids else None
        timestep_cond = None
        if self.spec.is_lcm:
            timestep_cond = cfg.lcm_guidance_embedding(p["guidance"], self.spec.denoiser_config["time_cond_proj_dim"],
                                                       model_batch)

        latents = self._initial_latents(request, p, rng) * np.float32(scheduler.init_noise_sigma)
        self.stages.begin_stage("unet")
        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            t0 = time.perf_counter()
            model_in = np.concatenate([latents, latents]) if do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise = self.stages.predict_noise(model_in, float(t), hidden, pooled, time_ids, timestep_cond)
            if do_cfg:
                noise = cfg.combine(noise[:batch], noise[batch:], p["guidance"])
            latents = scheduler.step(noise, t, latents, rng=rng).astype(np.float32)
            timings.steps.append(time.perf_counter() - t0)
            if callback is not None:
                info = StepInfo(step=i + 1, total=total, seconds=timings.steps[-1], latents=latents,
                                preview=self.spec.traits.preview_rgb(latents[0]))
                if callback(info) is False:
                    self.stages.end_stage("unet")
                    raise Cancelled(f"stopped after step {i + 1} of {total}")
        self.stages.end_stage("unet")

        self.stages.begin_stage("vae_decoder")
        t0 = time.perf_counter()
        vae = self.spec.vae_config
        unscaled = latents / np.float32(vae.get("scaling_factor", 0.18215))
        if vae.get("shift_factor") is not None:
            unscaled = unscaled + np.float32(vae["shift_factor"])
        decoded = self.stages.decode(unscaled)
        timings.vae_decode = time.perf_counter() - t0
        self.stages.end_stage("vae_decoder")
        if not np.all(np.isfinite(decoded)):
            raise UserError("the decoded image has NaN or infinite values (try fp32 precision)")
        pixels = np.clip(decoded / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)
        timings.total = time.perf_counter() - start
        self._first_run = False

        images = [Image.fromarray((px * 255).round().astype(np.uint8)) for px in pixels]
        memory = Memory(peak_engine_bytes=self.stages.peak_memory(), peak_process_bytes=peak.peak_bytes(),
                        weight_bytes=self.stages.weight_bytes(), disk_bytes=self.disk_bytes)
        params = {**p, "engine": self.stages.info.get("engine"), "precision": self.stages.info.get("precision"),
                  "quantization": self.stages.info.get("quantization"),
                  "compute_units": self.stages.info.get("compute_units"),
                  **({"t5": self.stages.info["t5"]} if "t5" in self.stages.info else {})}
        return GenerationResult(images=images, seed=p["seed"], timings=timings, memory=memory, engine=self.info,
                                parameters=params, warnings=warnings, pixels=pixels)


def load_pipeline(model: str, engine: str = "auto", precision: str = "auto", quantization: Optional[str] = None,
                  compute_units: str = "ALL", attention: Optional[str] = None, reduce_memory: bool = False,
                  progress=None, t5: bool = True) -> Pipeline:
    """Resolve `model`, choose the engine (with the reason shown to the user) and load its stages once.
    `t5=False` runs an SD3 model without its T5 encoder (~9 GB less; the result says so)."""
    from backend.engines.select import choose_engine
    start = time.perf_counter()
    choice = choose_engine(model, engine, progress=progress, t5=t5)
    stages = choice.load(precision=precision, quantization=quantization, compute_units=compute_units,
                         attention=attention, reduce_memory=reduce_memory)
    return Pipeline(choice.spec, stages, choice.tokenizers, name=choice.name, reason=choice.reason,
                    load_seconds=time.perf_counter() - start, disk=choice.disk_bytes)
