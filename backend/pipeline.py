"""The engine-independent generation loop: tokenize, encode, schedule, guide, decode, measure, cancel.

An engine only provides the three stages (backend/engines/base.py); everything else here exists once. A
second-stage model (the SDXL refiner, `load_pipeline(refiner=...)`) runs the end of the same schedule with its
own text stage and scheduler, and decodes.
"""
from __future__ import annotations

import secrets
import time
from typing import Callable, Optional

import numpy as np
from PIL import Image

from backend import allocator, budget, guidance as cfg, interrupt, preview
from backend.checkpoint import ModelSpec, resolve_dims
from backend.engines.base import Stages
from backend.images import ImageInputs, InitLatents, latent_mask, masked_image
from backend.measure import StagePeaks, disk_bytes
from backend.families import T5_SEQUENCE_LENGTH
from backend.schedulers import make_scheduler
from backend.schedulers.flow import FIXED_SIGMAS
from backend.seeds import BatchNoise
from backend.text_rows import EncodedRows
from backend.types import (Cancelled, GenerationRequest, GenerationResult, Memory, StepCallback, StepInfo,
                           Timings, UserError, finite_number, whole_number)

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
        self.refiner: Optional[Pipeline] = None  # a second stage that finishes the schedule (load_pipeline)
        self.allow_large = False  # sizes beyond twice the native one (checkpoint.size_limit)
        self._first_run = True
        self.text_rows = EncodedRows()  # encoder outputs per token row, for reuse (backend/text_rows.py)

    @property
    def info(self) -> dict:
        return {**self.stages.info, "model": self.name, "family": self.spec.family, "reason": self.reason}

    # -- request handling -------------------------------------------------------------------------
    def _settings(self, r: GenerationRequest, inputs: Optional[ImageInputs] = None) -> dict:
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise UserError("enter a prompt: it is empty")
        refines = self.spec.traits.refines
        if refines is not None:
            raise UserError(f"{self.name} is a refiner (a second stage): generate with an {refines} model and "
                            "give this one as its refiner")
        scheduler_name = r.scheduler or self.spec.default("scheduler")
        fixed = FIXED_SIGMAS.get(scheduler_name)
        steps = (len(fixed) - 1 if fixed else self.spec.default("steps")) if r.steps is None else r.steps
        steps = whole_number(steps, "steps", 1, MAX_STEPS)
        guidance = finite_number(self.spec.default("guidance") if r.guidance is None else r.guidance, "guidance",
                                 0.0, 50.0)
        asked = [None if v is None else whole_number(v, name, 1, 2**31) for v, name in ((r.width, "width"),
                                                                                       (r.height, "height"))]
        width, height = resolve_dims(self.spec, *(inputs.size(*asked, self.spec.size_step) if inputs else asked),
                                     allow_large=self.allow_large)
        if r.seed is not None and r.seed != -1:
            whole_number(r.seed, "seed", 0, 2**64 - 1)
        seed = secrets.randbelow(2**32) if r.seed is None or r.seed == -1 else int(r.seed)
        whole_number(r.batch_size, "batch size", 1, 8)
        half = self.stages.info.get("precision") in ("fp16", "bf16")
        budget.check_memory(self.spec, width, height, int(r.batch_size), cfg.uses_cfg(guidance, self.spec.is_lcm),
                            2 if half else 4)
        settings = dict(prompt=r.prompt, negative_prompt=r.negative_prompt or "", steps=int(steps), guidance=guidance,
                        scheduler=scheduler_name, width=width, height=height,
                        seed=seed, model=self.name, batch_size=r.batch_size)
        if self.refiner is not None:
            start = self.refiner.spec.default("refiner_start") if r.refiner_start is None else r.refiner_start
            if not 0.0 < float(start) < 1.0:
                raise UserError(f"refiner start is the fraction of the steps the base runs: between 0 and 1, "
                                f"both excluded (got {start})")
            settings.update(refiner=self.refiner.name, refiner_start=float(start))
        elif r.refiner_start is not None:
            raise UserError("refiner start needs a refiner: none is loaded")
        if self.spec.traits.t5 is not None:
            settings["max_sequence_length"] = self._sequence_length(r.max_sequence_length)
        elif r.max_sequence_length is not None:
            raise UserError("max sequence length is an option of SD3 models (their T5 tokens); this model has none")
        if self.spec.inpainting and (inputs is None or inputs.mask is None):
            raise UserError(f"{self.name} is an inpainting model (its UNet takes a mask and a masked image): give it "
                            "an init image and a mask")
        if inputs is not None:
            if self.refiner is not None:
                raise UserError("an init image cannot be combined with a refiner: run the refiner without the init "
                                "image, or the init image without the refiner")
            settings.update(inputs.parameters())
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
        # what else decides an encoder's output: the LoRAs, and Core ML's compute units (the Neural Engine's fp16)
        context = repr((p.get("loras"), self.stages.info.get("compute_units")))
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
            out = self.text_rows.encode(index, np.stack(ids).astype(np.int32), context, self.stages.encode_text)
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
        if self.spec.force_zeros_for_empty_prompt and not p["negative_prompt"]:
            # the unconditional half is zeros (diffusers' SDXL): nothing to encode for it
            hidden, pooled = self._encode(prompts, p, warnings)
            return tuple(None if a is None else np.concatenate([np.zeros_like(a), a]) for a in (hidden, pooled))
        return self._encode([p["negative_prompt"]] * batch + prompts, p, warnings)

    # -- the loop -----------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, callback: Optional[StepCallback] = None,
                 noise_rng=None, should_stop: Optional[Callable[[], bool]] = None) -> GenerationResult:
        """Run one request; `callback(StepInfo)` after every step may return False to stop (Cancelled).
        `should_stop()` is also asked inside long stages (between UNet blocks, VAE bands: backend/interrupt.py).
        With a refiner, the base runs the schedule up to `refiner_start` and the refiner the rest, then decodes."""
        with interrupt.watching(should_stop):
            return self._generate(request, callback, noise_rng)

    def _generate(self, request: GenerationRequest, callback: Optional[StepCallback], noise_rng) -> GenerationResult:
        inputs = ImageInputs.from_request(request)  # None: text to image
        p = self._settings(request, inputs)
        warnings: list[str] = list(self.stages.set_loras(request.loras))  # [] takes earlier LoRAs off
        ignored = self.spec.words_it_ignores(p["prompt"])
        if ignored:
            warnings.append(f"this model knows only its own words: {', '.join(ignored)} mean nothing to it "
                            f"(try '{self.spec.defaults.get('example_prompt', ' '.join(self.spec.vocabulary[:6]))}')")
        if request.loras:
            from backend import lora
            p["loras"] = [lora.record(path, scale) for path, scale in lora.normalize(request.loras)]
        previewer = None if callback is None else preview.make_previewer(  # before the clock: it may download
            self.spec, self.stages, request.preview, request.preview_every, warnings)
        # one generator per batch item (seed + i), so each image reproduces alone: backend/seeds.py
        rng = noise_rng or BatchNoise(p["seed"], p["batch_size"])
        timings = Timings(load=self.load_seconds if self._first_run else 0.0)
        peaks = StagePeaks(self.stages)  # per stage and overall (Memory.per_stage)
        peaks.reset()
        start = time.perf_counter()

        do_cfg = cfg.uses_cfg(p["guidance"], self.spec.is_lcm)
        runs = self._runs(p)
        total = sum(len(timesteps) for _, _, timesteps in runs)

        def on_step(seconds: float, latents: np.ndarray, x0=None) -> None:
            timings.steps.append(seconds)
            step = len(timings.steps)
            if callback is None:
                return
            # the preview shows the step's predicted final latents (x0), not the noisy ones: backend/preview.py
            shown, spent = previewer.render(step, total, x0 or (lambda: latents)) if previewer else (None, 0.0)
            if callback(StepInfo(step=step, total=total, seconds=seconds, latents=latents, preview=shown,
                                 preview_seconds=spent)) is False:
                raise Cancelled(f"stopped after step {step} of {total}")

        with peaks.stage(None if inputs is None else "image_encoder"):
            latents, image = self._starting_latents(request, p, rng, runs[0], inputs, timings)
        encoded_before = sum(model.text_rows.encoded for model, _, _ in runs)
        for model, scheduler, timesteps in runs:
            with peaks.stage("text_encoder"):
                conditioning, seconds = model._text_stage(p, do_cfg, warnings)
            timings.text_encoder += seconds
            if model is self.refiner:
                timings.refiner_text_encoder = seconds
            with peaks.stage("denoise"):
                latents = model._denoise(latents, scheduler, timesteps, conditioning, p, do_cfg, rng, on_step, image)
        timings.text_reused = sum(model.text_rows.encoded for model, _, _ in runs) == encoded_before
        with peaks.stage("vae_decode"):
            pixels, timings.vae_decode = runs[-1][0]._decode(latents)  # the last stage's VAE, as diffusers
        timings.total = time.perf_counter() - start
        allocator.release()  # the activations' memory, kept for reuse while generating (backend/allocator.py)
        self._first_run = False

        images = [Image.fromarray((px * 255).round().astype(np.uint8)) for px in pixels]
        models = [model for model, _, _ in runs]
        engine_peak, process_peak = peaks.totals()
        memory = Memory(peak_engine_bytes=engine_peak, peak_process_bytes=process_peak,
                        weight_bytes=peaks.weight_bytes + sum(m.stages.weight_bytes() for m in models if m is not self),
                        disk_bytes=sum(m.disk_bytes for m in models), per_stage=peaks.per_stage)
        params = {**p, "engine": self.stages.info.get("engine"), "precision": self.stages.info.get("precision"),
                  "quantization": self.stages.info.get("quantization"),
                  "compute_units": self.stages.info.get("compute_units"),
                  **({"t5": self.stages.info["t5"]} if "t5" in self.stages.info else {})}
        seeds = rng.seeds if isinstance(rng, BatchNoise) else [p["seed"]] * len(images)  # a caller's rng: its own
        return GenerationResult(images=images, seed=p["seed"], seeds=seeds, timings=timings, memory=memory,
                                engine=self.info,
                                parameters=params, warnings=list(dict.fromkeys(warnings)), pixels=pixels)

    def _runs(self, p: dict) -> list[tuple]:
        """(model, its scheduler, the timesteps it runs) per stage: this model alone, or this model up to
        `refiner_start` and the refiner from there (diffusers' denoising_end, then denoising_start)."""
        scheduler = self._scheduler(p)
        if self.refiner is None:  # image to image begins where its strength says
            begin = scheduler.strength_start(p["strength"]) if "strength" in p else 0
            return [(self, scheduler, scheduler.timesteps[begin:])]
        second = self.refiner._scheduler(p)
        begin = second.denoising_start(p["refiner_start"])
        return [(self, scheduler, scheduler.timesteps[:scheduler.denoising_end(p["refiner_start"])]),
                (self.refiner, second, second.timesteps[begin:])]

    def _scheduler(self, p: dict):
        """This model's scheduler `p` names, from its own scheduler config, set to `p`'s step count."""
        scheduler = make_scheduler(p["scheduler"], self.spec.scheduler_config)
        scheduler.set_timesteps(p["steps"], image_seq_len=self.spec.patch_count(p["width"], p["height"]))
        return scheduler

    def _starting_latents(self, request: GenerationRequest, p: dict, rng, first_run: tuple,
                          inputs: Optional[ImageInputs], timings: Timings):
        """(the latents the first stage starts from, the init image at latent level or None): the noise times
        the scheduler's initial sigma, or the encoded init image noised to the first timestep that runs."""
        noise = self._initial_latents(request, p, rng)
        _, scheduler, timesteps = first_run
        if inputs is None:
            return noise * np.float32(scheduler.init_noise_sigma), None
        image, timings.image_encoder = self._image_latents(inputs, p, noise)
        return image.start(scheduler, timesteps[0]), image

    def _image_latents(self, inputs: ImageInputs, p: dict, noise: np.ndarray):
        """(InitLatents, seconds): the init image (and for an inpainting UNet the masked image) through the VAE
        encoder, the mask at latent size, everything repeated for the batch."""
        width, height, batch, f = p["width"], p["height"], p["batch_size"], self.spec.vae_scale_factor
        pixels = inputs.pixels(width, height)
        mask = None if inputs.mask is None else inputs.mask_pixels(width, height)
        pure_noise = mask is not None and inputs.strength == 1.0  # the inpainting pipeline starts from noise
        self.stages.begin_stage("vae_encoder")
        t0 = time.perf_counter()
        try:
            latents = None if self.spec.inpainting and pure_noise else self._encode_pixels(pixels)
            masked = self._encode_pixels(masked_image(pixels, mask)) if self.spec.inpainting else None
        finally:
            self.stages.end_stage("vae_encoder")
        seconds = time.perf_counter() - t0
        small = None if mask is None else latent_mask(mask, height // f, width // f)
        repeat = lambda a: None if a is None else np.repeat(a, batch, axis=0)  # noqa: E731
        return InitLatents(latents=repeat(latents), noise=noise, mask=repeat(small), masked=repeat(masked),
                           pure_noise=pure_noise), seconds

    def _encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """The VAE posterior's mean (deterministic), shifted and scaled by the VAE config as diffusers does."""
        vae = self.spec.vae_config
        mean = self.stages.encode_image(pixels).astype(np.float32)
        if vae.get("shift_factor") is not None:
            mean = mean - np.float32(vae["shift_factor"])
        return (mean * np.float32(vae.get("scaling_factor", 0.18215))).astype(np.float32)

    def _text_stage(self, p: dict, do_cfg: bool, warnings: list) -> tuple[tuple, float]:
        """(hidden, pooled, time ids, LCM guidance embedding) this model's denoiser takes, and the text stage's
        seconds."""
        self.stages.begin_stage("text_encoder")
        t0 = time.perf_counter()
        hidden, pooled = self._conditioning(p, do_cfg, warnings)
        warnings.extend(self.stages.info.get("notes", []))
        seconds = time.perf_counter() - t0
        self.stages.end_stage("text_encoder")
        batch = p["batch_size"]
        time_ids = cfg.time_ids(self.spec.traits.time_ids, p["height"], p["width"], batch, do_cfg)
        timestep_cond = None
        if self.spec.is_lcm:
            timestep_cond = cfg.lcm_guidance_embedding(p["guidance"], self.spec.denoiser_config["time_cond_proj_dim"],
                                                       2 * batch if do_cfg else batch)
        return (hidden, pooled, time_ids, timestep_cond), seconds

    def _denoise(self, latents: np.ndarray, scheduler, timesteps, conditioning: tuple, p: dict, do_cfg: bool,
                 rng, on_step, image: Optional[InitLatents] = None) -> np.ndarray:
        """Step `latents` through `timesteps` (the stretch of `scheduler`'s this model runs); `on_step(seconds,
        latents, x0)` after each step (x0: the scheduler's predicted_original, for previews) may raise Cancelled.
        Inpainting (`image`): an inpainting UNet also takes the mask and the masked image; a plain one gets the known
        region put back after every step."""
        hidden, pooled, time_ids, timestep_cond = conditioning
        batch = p["batch_size"]
        self.stages.begin_stage("unet")
        try:
            for i, t in enumerate(timesteps):
                t0 = time.perf_counter()
                model_in = np.concatenate([latents, latents]) if do_cfg else latents
                model_in = scheduler.scale_model_input(model_in, t)
                if image is not None:
                    model_in = image.denoiser_input(model_in)
                noise = self.stages.predict_noise(model_in, float(t), hidden, pooled, time_ids, timestep_cond)
                if do_cfg:
                    noise = cfg.combine(noise[:batch], noise[batch:], p["guidance"])
                latents = scheduler.step(noise, t, latents, rng=rng).astype(np.float32)
                if image is not None:
                    latents = image.after_step(latents, scheduler, timesteps[i + 1] if i + 1 < len(timesteps) else None)
                on_step(time.perf_counter() - t0, latents, scheduler.predicted_original)
        finally:
            self.stages.end_stage("unet")
        return latents

    def _decode(self, latents: np.ndarray) -> tuple[np.ndarray, float]:
        """(pixels (B, H, W, 3) in [0, 1], seconds) from this model's VAE."""
        self.stages.begin_stage("vae_decoder")
        t0 = time.perf_counter()
        vae = self.spec.vae_config
        unscaled = latents / np.float32(vae.get("scaling_factor", 0.18215))
        if vae.get("shift_factor") is not None:
            unscaled = unscaled + np.float32(vae["shift_factor"])
        decoded = self.stages.decode(unscaled)
        seconds = time.perf_counter() - t0
        self.stages.end_stage("vae_decoder")
        if not np.all(np.isfinite(decoded)):
            raise UserError("the decoded image has NaN or infinite values (try fp32 precision)")
        return np.clip(decoded / 2.0 + 0.5, 0.0, 1.0).astype(np.float32), seconds


def load_pipeline(model: str, engine: str = "auto", precision: str = "auto", quantization: Optional[str] = None,
                  compute_units: str = "auto", attention: Optional[str] = None, reduce_memory: bool = False,
                  progress=None, t5: bool = True, refiner: Optional[str] = None) -> Pipeline:
    """Resolve `model`, choose the engine (with the reason shown to the user) and load its stages once.
    `t5=False` runs an SD3 model without its T5 encoder (~9 GB less; the result says so). `refiner`: a second
    stage (an SDXL refiner) that finishes the model's schedule, loaded with the same options (`Pipeline.refiner`)."""
    from backend.engines.coreml.resources import ATTENTIONS
    from backend.engines.coreml.runtime import check_compute_units
    from backend.engines.select import choose_engine
    check_compute_units(compute_units)  # asked of every engine, so that a typo is refused, not ignored by MLX
    if attention is not None and attention not in ATTENTIONS:
        raise UserError(f"unknown attention '{attention}': choose one of {', '.join(ATTENTIONS)}")
    start = time.perf_counter()
    choices = [choose_engine(model, engine, progress=progress, t5=t5)]
    if refiner:
        choices.append(choose_engine(refiner, engine, progress=progress, refiner=True))
        _check_refiner(choices[0], choices[1])
    options = dict(precision=precision, quantization=quantization, compute_units=compute_units,
                   attention=attention, reduce_memory=reduce_memory)
    pipes = [Pipeline(c.spec, c.load(**options), c.tokenizers, name=c.name, reason=c.reason, load_seconds=0.0,
                      disk=c.disk_bytes) for c in choices]
    pipe = pipes[0]
    pipe.refiner = pipes[1] if refiner else None
    allocator.release()  # the file copies and fp32 originals freed while loading (quantized, cast) go back now
    pipe.load_seconds = time.perf_counter() - start
    return pipe


def _check_refiner(base, second) -> None:
    """A refiner must be a second stage of the base model's family (its `refines`)."""
    refines = second.spec.traits.refines
    if refines is None:
        raise UserError(f"{second.name} is not a refiner (it is a {second.spec.family} model); "
                        "give an SDXL refiner such as sdxl-refiner")
    if refines != base.spec.family:
        raise UserError(f"{second.name} refines {refines} models, and {base.name} is a {base.spec.family} model")
