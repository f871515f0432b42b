"""The Core ML engine: a resources folder (resources.py) run as the pipeline's three stages.

What it owns, and nothing more (the loop, tokenizer, schedulers and guidance are backend/pipeline.py's; what
the folder says about its model is spec.py's; where the folder comes from is sources.py's):

- `CoreMLStages`: inputs prepared to each model's described names, shapes and dtypes (text as
  (B, C, 1, 77); the batch split or padded to the batch the model was exported with; a chunked UNet run as
  chunk 1, then chunk 2 fed with chunk 1's outputs by name; SD3's MMDiT as Apple's one package, or as
  MobileDiffuser's Conditioning, then Stage0..N, each stage's `X_out` outputs renamed `X` for the next);
  models loaded per compute unit and cached, or, with `reduce_memory`, loaded just before their stage runs
  and released after it (Apple's --reduce-memory; a split MMDiT's stages one at a time, as MobileDiffuser);
- `load_coreml_stages` and `quantized_resources`: the stages of a folder, or of its compressed variant.
Core ML itself is called only through a runtime (runtime.py, or a stand-in with the same contract).
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from backend.checkpoint import ModelSpec
from backend.engines.base import EncoderOutput, Stages
from backend.engines.coreml import resources as res
from backend.engines.coreml.runtime import UNITS_FOR_ATTENTION, CoreMLRuntime, check_compute_units
from backend.engines.coreml.spec import (CLIP_TOKENS, HIDDEN_OUTPUTS, MMDIT_LATENT, MMDIT_POOLED, MMDIT_TEXT,
                                         TEXT_ENCODERS, mmdit_tensors, named_or_first, quantization_label)
from backend.types import UserError

DEVICES = {"ALL": "CPU, GPU and Neural Engine", "CPU_AND_NE": "CPU and Neural Engine",
           "CPU_AND_GPU": "CPU and GPU", "CPU_ONLY": "CPU"}


class CoreMLStages(Stages):
    """The Core ML models of one resources folder behind the Stages interface."""

    def __init__(self, resources: res.CoreMLResources, spec: ModelSpec, runtime=None, compute_units: str = "auto",
                 reduce_memory: bool = False, fetch_model=None):
        self.resources = resources
        self.spec = spec
        self.runtime = runtime or CoreMLRuntime
        self.reduce_memory = reduce_memory
        self.fetch_model = fetch_model   # stage -> model path fetched on demand (a registry entry's VAEEncoder), or None
        self.text_stages = [stage for stage, _, _ in TEXT_ENCODERS if stage in resources.models]
        self.models_of = {"text_encoder": self.text_stages, "unet": resources.denoiser_stages,
                          "vae_decoder": ["VAEDecoder"], "vae_encoder": []}  # the encoder: on first use
        self.io = {stage: resources.io(stage) for stages in self.models_of.values() for stage in stages}
        # with reduce_memory, a split MMDiT's stages are loaded one at a time and released right after they
        # run (MobileDiffuser unloads each stage after its prediction); other stages load per pipeline stage
        self._streamed = set(resources.denoiser_stages) if reduce_memory and resources.split_mmdit else set()
        self._loaded: dict = {}          # (model stage, compute units) -> loaded model
        self._active: set = set()        # pipeline stages between begin_stage and end_stage
        self._resident_peak = 0
        self.load_seconds: dict = {}     # model stage -> seconds its last load took
        self.info = {"engine": "coreml", "runtime": getattr(self.runtime, "name", type(self.runtime).__name__),
                     "attention": resources.attention, "chunked_unet": resources.chunked,
                     "precision": resources.manifest.get("precision")
                     or resources.manifest.get("source_manifest", {}).get("precision", "fp16"),
                     "quantization": quantization_label(resources), "reduce_memory": reduce_memory,
                     "format": "mlmodelc" if resources.compiled else "mlpackage", "resources": str(resources.folder)}
        if resources.is_sd3:
            self._sd3_info()
        self.set_compute_units(compute_units)

    def _sd3_info(self) -> None:
        tensors = mmdit_tensors(self.resources)
        self.info.update(t5_tokens=int(tensors[MMDIT_TEXT].shape[-1]) - CLIP_TOKENS,
                         mmdit="split" if self.resources.split_mmdit else "single",
                         denoiser_stages=len(self.resources.denoiser_stages), t5="absent")
        t5 = [p for p in self.resources.folder.iterdir() if p.stem == "TextEncoderT5"]
        self.info["notes"] = [
            f"{t5[0].name} is not run by the Core ML engine: its T5 tokens are zeros" if t5 else
            "these Core ML resources have no T5 text encoder: its tokens are zeros"]

    def set_compute_units(self, units: str) -> None:
        """Run the next generations on `units` ("auto": the units this attention is made for, as Apple's
        apps choose them); models loaded for other units stay cached for switching back."""
        asked = check_compute_units(units)
        self.compute_units = UNITS_FOR_ATTENTION.get(self.resources.attention, "ALL") if asked == "auto" else asked
        self.stage_units = {stage: self._units_for(stage) for stage in self.io}
        moved = {stage: u for stage, u in self.stage_units.items() if u != self.compute_units}
        self.info.update(compute_units=self.compute_units, device=DEVICES[self.compute_units],
                         compute_units_asked=asked, stage_units=moved)
        if not self.reduce_memory:
            for stage in self.io:
                self._model(stage)

    def _units_for(self, stage: str) -> str:
        """SDXL's VAE runs on CPU_AND_GPU whatever else is asked: it is float32 and the Neural Engine computes in
        float16 (Apple's Swift pipeline does the same, StableDiffusionXL+Resources.swift; torch2coreml converts
        SDXL's VAEEncoder for CPU_AND_GPU)."""
        if stage in ("VAEDecoder", "VAEEncoder") and self.resources.is_sdxl and self.compute_units in ("ALL", "CPU_AND_NE"):
            return "CPU_AND_GPU"
        return self.compute_units

    # -- loading and releasing ------------------------------------------------------------------------
    def _model(self, stage: str):
        key = (stage, self.stage_units[stage])
        if key not in self._loaded:
            t0 = time.perf_counter()
            self._loaded[key] = self.runtime.load(self.resources.models[stage], key[1])
            self.load_seconds[stage] = time.perf_counter() - t0
            self._resident_peak = max(self._resident_peak, self.resident_bytes())
        return self._loaded[key]

    def loaded_stages(self) -> list:
        return sorted({stage for stage, _ in self._loaded})

    def resident_bytes(self) -> int:
        """Bytes on disk of the models loaded now (what their weights take in memory, give or take)."""
        return sum(self.resources.disk_bytes[stage] for stage, _ in self._loaded)

    def _release(self, stages) -> None:
        released = [k for k in self._loaded if k[0] in set(stages)]
        for key in released:
            del self._loaded[key]
        if released:
            gc.collect()

    def begin_stage(self, name: str) -> None:
        if self.reduce_memory:
            for other in [n for n in self.models_of if n != name]:  # left loaded by a run that failed midway
                self.end_stage(other)
            for stage in self.models_of.get(name, []):
                if stage not in self._streamed:
                    self._model(stage)
        self._active.add(name)

    def end_stage(self, name: str) -> None:
        self._active.discard(name)
        if self.reduce_memory:
            self._release(self.models_of.get(name, []))

    @contextmanager
    def _running(self, name: str):
        """A stage called outside begin_stage/end_stage still loads and releases in reduce-memory mode."""
        outside = name not in self._active
        if outside:
            self.begin_stage(name)
        try:
            yield
        finally:
            if outside:
                self.end_stage(name)

    # -- input preparation ----------------------------------------------------------------------------
    def _predict(self, stage: str, available: dict) -> dict:
        """Run one model on the arrays it describes, each cast to its described dtype and checked for shape."""
        inputs = {}
        for name, tensor in self.io[stage].inputs.items():
            if name not in available:
                raise UserError(f"{self.resources.models[stage].name} needs an input '{name}' this pipeline "
                                f"does not provide ({', '.join(available)})")
            array = np.asarray(available[name])
            if tensor.shape and array.shape != tensor.shape and array.size == int(np.prod(tensor.shape)):
                array = array.reshape(tensor.shape)  # e.g. SDXL's time_ids, packaged (12,) or (2, 6)
            if tensor.shape and tuple(array.shape) != tuple(tensor.shape):
                raise UserError(f"{stage} input '{name}' must have shape {tensor.shape}, not {array.shape}")
            inputs[name] = np.ascontiguousarray(array.astype(tensor.dtype, copy=False))
        try:
            return self._model(stage).predict(inputs)
        finally:
            if stage in self._streamed:
                self._release([stage])

    def _batched(self, run, stage: str, arrays: dict) -> dict:
        """Call `run` on slices of the model's exported batch size; a short slice is padded, its padding dropped."""
        size = int(next(iter(self.io[stage].inputs.values())).shape[0])
        total = len(next(iter(arrays.values())))
        pieces = []
        for start in range(0, total, size):
            part = {name: a[start:start + size] for name, a in arrays.items()}
            n = len(next(iter(part.values())))
            if n < size:
                part = {name: np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)]) for name, a in part.items()}
            pieces.append({name: out[:n] for name, out in run(part).items()})
        return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}

    # -- the three stages -----------------------------------------------------------------------------
    def encode_text(self, index: int, input_ids: np.ndarray) -> EncoderOutput:
        stage = self.text_stages[index]
        with self._running("text_encoder"):
            out = self._batched(lambda part: self._predict(stage, part), stage, {"input_ids": input_ids})
        hidden = out[next(n for n in (*HIDDEN_OUTPUTS, *out) if n in out and out[n].ndim == 3)]
        # the family says whose pooled output conditions: none (SD), the last encoder's (SDXL), all (SD3)
        pooling = self.spec.traits.pooled
        wanted = pooling == "concat" or (pooling == "last" and index == len(self.text_stages) - 1)
        pooled = out.get("pooled_outputs") if wanted else None
        if wanted and pooled is None:
            raise UserError(f"{self.resources.models[stage].name} has no 'pooled_outputs' output, which "
                            f"{self.spec.family} conditions on")
        return EncoderOutput(hidden=hidden.astype(np.float32),
                             pooled=None if pooled is None else pooled.astype(np.float32))

    def _check_size(self, latents: np.ndarray) -> None:
        described = (mmdit_tensors(self.resources)[MMDIT_LATENT] if self.resources.is_sd3
                     else self.io[self.resources.denoiser_stages[0]].inputs["sample"]).shape
        if tuple(latents.shape[1:]) != tuple(described[1:]):
            scale = self.spec.vae_scale_factor
            raise UserError(f"these Core ML resources were exported for {described[3] * scale}x{described[2] * scale} "
                            f"images; {latents.shape[3] * scale}x{latents.shape[2] * scale} needs resources exported "
                            "at that size (python -m backend export-coreml), or the MLX engine")

    def _run_unet(self, inputs: dict) -> dict:
        first, *rest = self.resources.unet_stages
        out = self._predict(first, inputs)
        for stage in rest:  # chunk 2 takes chunk 1's outputs by name, plus the text it still needs
            out = self._predict(stage, {**inputs, **out})
        return out

    def _run_mmdit(self, inputs: dict) -> dict:
        """Apple's one package, or MobileDiffuser's chain: Conditioning, then Stage0..N, each stage fed the
        inputs it declares from the arrays so far, where a stage's `X_out` becomes `X` for the next."""
        stages = self.resources.denoiser_stages
        named = dict(inputs)
        for i, stage in enumerate(stages):
            out = self._predict(stage, named)
            if i == len(stages) - 1:
                return out
            named.update({(n[:-4] if n.endswith("_out") else n): v for n, v in out.items()})

    def _predict_mmdit(self, latents, timestep, hidden, pooled) -> np.ndarray:
        if pooled is None:
            raise UserError("SD3's MMDiT needs the pooled text embeddings of both CLIP encoders")
        batch = latents.shape[0]
        arrays = {MMDIT_LATENT: latents, "timestep": np.full((batch,), timestep, dtype=np.float32),
                  MMDIT_TEXT: np.asarray(hidden).transpose(0, 2, 1)[:, :, None, :],
                  MMDIT_POOLED: np.asarray(pooled)[:, :, None, None]}
        with self._running("unet"):
            out = self._batched(self._run_mmdit, self.resources.denoiser_stages[0], arrays)
        # Apple's package answers denoiser_output, MobileDiffuser's last stage noise_pred (Swift takes the first)
        return named_or_first(out, ("denoiser_output", "noise_pred")).astype(np.float32)

    def predict_noise(self, latents, timestep, hidden, text_embeds=None, time_ids=None, timestep_cond=None):
        self._check_size(latents)
        if self.resources.is_sd3:
            return self._predict_mmdit(latents, timestep, hidden, text_embeds)
        batch = latents.shape[0]
        arrays = {"sample": latents, "timestep": np.full((batch,), timestep, dtype=np.float32),
                  "encoder_hidden_states": np.asarray(hidden).transpose(0, 2, 1)[:, :, None, :]}
        for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids), ("timestep_cond", timestep_cond)):
            if value is not None:
                arrays[name] = np.asarray(value)
        stage = self.resources.unet_stages[0]
        with self._running("unet"):
            out = self._batched(self._run_unet, stage, {n: a for n, a in arrays.items() if n in self.io[stage].inputs})
        return named_or_first(out, ("noise_pred",)).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        name = next(iter(self.io["VAEDecoder"].inputs))
        with self._running("vae_decoder"):
            out = self._batched(lambda part: self._predict("VAEDecoder", part), "VAEDecoder", {name: latents})
        image = out["image"] if "image" in out else next(iter(out.values()))
        return image.astype(np.float32).transpose(0, 2, 3, 1)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """Apple's VAEEncoder: x (B, 3, H, W) in [-1, 1] -> the posterior's mean (the first half of its `latent`
        output, quant_conv(encoder(x)) as torch2coreml converts it). Fetched on first use where the resources'
        source has one (a registry entry); otherwise one sentence says image-to-image needs it."""
        stage = "VAEEncoder"
        if stage not in self.resources.models:
            path = self.fetch_model(stage) if self.fetch_model else None
            if path is None:
                raise UserError(f"these Core ML resources ({self.resources.folder}) have no VAEEncoder, which "
                                "image-to-image needs: export them with --vae-encoder, or use the MLX engine")
            self.resources.models[stage] = Path(path)
            self.resources.disk_bytes[stage] = res.disk_bytes(path)
        if stage not in self.io:
            self.io[stage] = self.resources.io(stage)
            self.stage_units[stage] = self._units_for(stage)
            self.models_of["vae_encoder"] = [stage]
        name = next(iter(self.io[stage].inputs))
        with self._running("vae_encoder"):
            out = self._batched(lambda part: self._predict(stage, part), stage, {name: np.asarray(pixels)})
        moments = (out["latent"] if "latent" in out else next(iter(out.values()))).astype(np.float32)
        return moments[:, : moments.shape[1] // 2]

    def set_loras(self, loras) -> list:
        if loras:
            raise UserError("Core ML weights are fixed when the resources are made: bake a LoRA in with "
                            "`python -m backend export-coreml --lora FILE:SCALE`, or use the MLX engine")
        return []

    # -- measurements ---------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """The most model bytes resident at once since the last reset (one stage's worth with reduce_memory)."""
        return self._resident_peak

    def reset_peak_memory(self) -> None:
        self._resident_peak = self.resident_bytes()


def load_coreml_stages(resources: res.CoreMLResources, spec: ModelSpec, precision: str = "fp16",
                       quantization: Optional[str] = None, compute_units: str = "auto",
                       attention: Optional[str] = None, reduce_memory: bool = False, runtime=None,
                       fetch_model=None) -> CoreMLStages:
    """Precision is fixed when Core ML resources are made. A quantization ("q8", "q6", "q4", "q2", "mixed")
    is made on demand from the resources' .mlpackage files and cached beside them (backend/quantize.py)."""
    if quantization:
        resources = res.find_resources(quantized_resources(resources, quantization))
    same = {attention} | (set(res.NEURAL_ENGINE_ATTENTIONS) if attention in res.NEURAL_ENGINE_ATTENTIONS else set())
    if attention and resources.attention not in same | {"unknown"}:
        raise UserError(f"the Core ML resources in {resources.folder} use {resources.attention} attention, "
                        f"not {attention}; export them with --attention {attention}")
    return CoreMLStages(resources, spec, runtime=runtime, compute_units=compute_units, reduce_memory=reduce_memory,
                        fetch_model=fetch_model)


def quantized_resources(resources: res.CoreMLResources, quantization: str) -> Path:
    """The folder of a compressed variant of `resources`, made once: q8 is 8-bit linear (int8) weights,
    q6/q4/q2 k-means palettization, mixed Apple's mixed-bit recipe form (the project's example recipe)."""
    from backend.quantize import quantize_coreml
    if resources.compiled:
        raise UserError("compiled Core ML resources (.mlmodelc) cannot be compressed: choose Apple's palettized "
                        "repository, or the .mlpackage resources (`packages/`) of this model")
    recipes = Path(__file__).resolve().parents[3] / "configs" / "mixed_bit_recipes"
    if quantization == "q8":
        return Path(quantize_coreml(resources.folder, "linear", 8, None, None, None))
    if quantization in ("q6", "q4", "q2"):
        return Path(quantize_coreml(resources.folder, "palettize", int(quantization[1]), None, None, None))
    if quantization == "mixed":
        if resources.is_sd3:
            raise UserError("there is no mixed-bit recipe for SD3's MMDiT yet: choose q8, q6, q4 or q2")
        recipe = recipes / ("sdxl-base-rule-based-example.json" if resources.is_sdxl
                            else "sd15-rule-based-example.json")
        return Path(quantize_coreml(resources.folder, "mixed", None, str(recipe), None, None))
    raise UserError(f"unknown Core ML quantization '{quantization}': choose q8, q6, q4, q2 or mixed")
