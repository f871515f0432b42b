"""The Core ML engine: Apple's Stable Diffusion resources (resources.py) run as the pipeline's three stages.

What it owns, and nothing more (the loop, tokenizer, schedulers and guidance are backend/pipeline.py's):

- a `ModelSpec` for a resources folder: family from its models (SD3's MMDiT, else TextEncoder2's presence),
  sizes from the denoiser's and VAE decoder's own descriptions, configs from the folder's `configs/` (our
  exports), else from the paired diffusers model when the registry names one and it is cached, else the
  family's defaults (SD3: flow matching with shift 3, VAE scale 1.5305 / shift 0.0609, as Apple's CLI);
- `CoreMLStages`: inputs prepared to each model's described names, shapes and dtypes (text as
  (B, C, 1, 77); the batch split or padded to the batch the model was exported with; a chunked UNet run as
  chunk 1, then chunk 2 fed with chunk 1's outputs by name; SD3's MMDiT as Apple's one package, or as
  MobileDiffuser's Conditioning, then Stage0..N, each stage's `X_out` outputs renamed `X` for the next);
  models loaded per compute unit and cached, or, with `reduce_memory`, loaded just before their stage runs
  and released after it (Apple's --reduce-memory; a split MMDiT's stages one at a time, as MobileDiffuser);
- `coreml_choice`: where the resources come from (a local folder, or a registry entry's Hub repository and
  variant subfolder, downloaded with only that subfolder's files).
Core ML itself is called only through a runtime (runtime.py, or a stand-in with the same contract).
"""
from __future__ import annotations

import gc
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from backend import registry
from backend.checkpoint import SETTINGS_FILE, ModelSpec
from backend.engines.base import EncoderOutput, Stages
from backend.engines.coreml import resources as res
from backend.engines.coreml.runtime import CoreMLRuntime, check_compute_units
from backend.tokenizer import CLIPTokenizer
from backend.types import UserError

DEVICES = {"ALL": "CPU, GPU and Neural Engine", "CPU_AND_NE": "CPU and Neural Engine",
           "CPU_AND_GPU": "CPU and GPU", "CPU_ONLY": "CPU"}
_ENCODERS = (("TextEncoder", "text_encoder", "tokenizer"), ("TextEncoder2", "text_encoder_2", "tokenizer_2"))
_HIDDEN_OUTPUTS = ("hidden_embeds", "last_hidden_state")  # SDXL's penultimate layer / SD's last layer
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)
# SD3's defaults where a folder has no configs: apple/ml-stable-diffusion's CLI for --sd3 (scaleFactor 1.5305,
# shiftFactor 0.0609, timestepShift 3.0) and stable-diffusion-3-medium-diffusers' scheduler_config.json
_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
_SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
# the MMDiT's tensor names (Apple's package; MobileDiffuser's split stages add modulation_inputs and *_out)
_LATENT, _TEXT, _POOLED = "latent_image_embeddings", "token_level_text_embeddings", "pooled_text_embeddings"
_CLIP_TOKENS = 77


# ------------------------------------------------------------------ the model's spec and tokenizers

def _read(folder: Optional[Path], relative: str) -> dict:
    path = folder / relative if folder is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _default_scheduler(sdxl: bool, v_prediction: bool) -> dict:
    if sdxl:
        return dict(_class_name="EulerDiscreteScheduler", **_SD_BETAS, prediction_type="epsilon",
                    timestep_spacing="leading")
    return dict(_class_name="PNDMScheduler", **_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False,
                prediction_type="v_prediction" if v_prediction else "epsilon")


def _only(tensors: dict, preferred=()) -> res.TensorSpec:
    for name in preferred:
        if name in tensors:
            return tensors[name]
    return next(iter(tensors.values()))


def _text_width(resources: res.CoreMLResources, stage: str) -> int:
    hidden = _only(resources.io(stage).outputs, _HIDDEN_OUTPUTS)
    return int(hidden.shape[-1]) if hidden.shape else 0


def _vae_config(resources: res.CoreMLResources, configs: Optional[Path], channels: int, defaults: dict) -> dict:
    vae = resources.io("VAEDecoder")
    image = _only(vae.outputs, ("image",)).shape
    scale = int(image[-1]) // int(_only(vae.inputs).shape[-1]) if len(image) == 4 else 8
    vae_config = {**defaults, **_read(configs, "vae/config.json")}
    vae_config["latent_channels"] = channels
    if len(vae_config.get("block_out_channels", [0] * 4)) != int(math.log2(scale)) + 1:
        # ModelSpec counts the VAE's levels for its scale factor; the description is what counts here
        vae_config["block_out_channels"] = [0] * (int(math.log2(scale)) + 1)
    return vae_config


def _finish(spec: ModelSpec, h: int, w: int, paired: Optional[Path], folder: Path) -> ModelSpec:
    spec.defaults = spec._family_defaults()
    if h == w:
        spec.defaults["size"] = int(h) * spec.vae_scale_factor
    for settings in (paired, folder):
        spec.defaults.update({k: v for k, v in _read(settings, SETTINGS_FILE).items() if v is not None})
    return spec


def mmdit_tensors(resources: res.CoreMLResources) -> dict:
    """The MMDiT's described inputs by name, over its stages: latents and text as Stage0 (or the single
    package) takes them, pooled text and timestep as the Conditioning (or the single package) takes them."""
    found = {}
    for stage in resources.denoiser_stages:
        for name, tensor in resources.io(stage).inputs.items():
            found.setdefault(name, tensor)
    for name in (_LATENT, _TEXT, _POOLED, "timestep"):
        if name not in found:
            raise UserError(f"the SD3 MMDiT models in {resources.folder} have no input '{name}'; "
                            "they are not in Apple's or MobileDiffuser's layout")
    return found


def _patch_size(resources: res.CoreMLResources, config: dict, h: int, w: int) -> int:
    """The transformer's patch: from its config, else from Stage0's token count (h/p * w/p), else 2 (every SD3)."""
    if config.get("patch_size"):
        return int(config["patch_size"])
    if resources.split_mmdit:
        tokens = resources.io(resources.denoiser_stages[1]).outputs.get(_LATENT + "_out")
        if tokens is not None and len(tokens.shape) == 3 and tokens.shape[1]:
            return int(round(math.sqrt(h * w / tokens.shape[1])))
    return 2


def _sd3_spec(resources: res.CoreMLResources, paired: Optional[Path]) -> ModelSpec:
    configs = resources.configs or paired
    tensors = mmdit_tensors(resources)
    _, channels, h, w = tensors[_LATENT].shape
    _, joint_dim, _, sequence = tensors[_TEXT].shape
    present = [e for e in _ENCODERS if e[0] in resources.models]
    widths = [_text_width(resources, stage) for stage, _, _ in present]
    transformer = dict(_read(configs, "transformer/config.json"), in_channels=channels, out_channels=channels,
                       sample_size=h, joint_attention_dim=joint_dim,
                       pooled_projection_dim=tensors[_POOLED].shape[1])
    transformer["patch_size"] = _patch_size(resources, transformer, h, w)
    index = _read(configs, "model_index.json")
    spec = ModelSpec(
        folder=resources.folder, family="sd3",
        pipeline_class=index.get("_class_name", "CoreMLStableDiffusion3Pipeline"),
        text_encoders=[name for _, name, _ in present], tokenizers=[tok for _, _, tok in present],
        denoiser_config=transformer, vae_config=_vae_config(resources, configs, channels, _SD3_VAE),
        text_encoder_configs=[_read(configs, f"{name}/config.json") or {"hidden_size": width}
                              for (_, name, _), width in zip(present, widths)],
        scheduler_config=_read(configs, "scheduler/scheduler_config.json") or dict(_SD3_SCHEDULER))
    spec.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt",
                                                       spec.traits.zeros_for_empty_negative))
    if sequence <= _CLIP_TOKENS:
        raise UserError(f"the MMDiT in {resources.folder} takes {sequence} text tokens; SD3 needs 77 CLIP "
                        "tokens followed by T5's (154 in Apple's and MobileDiffuser's exports)")
    return _finish(spec, h, w, paired, resources.folder)


def coreml_spec(resources: res.CoreMLResources, paired: Optional[Path] = None) -> ModelSpec:
    """What the pipeline needs to know about a resources folder; the models' descriptions win over configs."""
    if resources.is_sd3:
        return _sd3_spec(resources, paired)
    configs = resources.configs or paired
    unet = resources.io(resources.unet_stages[0]).inputs
    vae = resources.io("VAEDecoder")
    _, channels, h, w = unet["sample"].shape
    image = _only(vae.outputs, ("image",)).shape
    scale = int(image[-1]) // int(_only(vae.inputs).shape[-1]) if len(image) == 4 else 8
    sdxl = resources.is_sdxl
    present = [e for e in _ENCODERS if e[0] in resources.models]
    widths = [_text_width(resources, stage) for stage, _, _ in present]

    unet_config = dict(_read(configs, "unet/config.json"), in_channels=channels, out_channels=channels, sample_size=h,
                       cross_attention_dim=unet["encoder_hidden_states"].shape[1])
    unet_config.pop("time_cond_proj_dim", None)
    if "timestep_cond" in unet:
        unet_config["time_cond_proj_dim"] = unet["timestep_cond"].shape[1]
    if "time_ids" in unet:
        unet_config["addition_embed_type"] = "text_time"
    vae_config = _vae_config(resources, configs, channels, {"scaling_factor": 0.13025 if sdxl else 0.18215})
    # SD 2.x at 768 (OpenCLIP ViT-H text, 96x96 latents) predicts v; the 512 "base" models predict noise
    v_prediction = not sdxl and widths[0] == 1024 and h * scale == 768
    scheduler = _read(configs, "scheduler/scheduler_config.json") or _default_scheduler(sdxl, v_prediction)
    index = _read(configs, "model_index.json")
    spec = ModelSpec(
        folder=resources.folder, family="sdxl" if sdxl else "sd",
        pipeline_class=index.get("_class_name", "CoreMLStableDiffusionPipeline"),
        text_encoders=[name for _, name, _ in present], tokenizers=[tok for _, _, tok in present],
        denoiser_config=unet_config, vae_config=vae_config,
        text_encoder_configs=[_read(configs, f"{name}/config.json") or {"hidden_size": width}
                              for (_, name, _), width in zip(present, widths)],
        scheduler_config=scheduler,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)))
    return _finish(spec, h, w, paired, resources.folder)


def _tokenizer_files(resources: res.CoreMLResources) -> tuple:
    """vocab.json + merges.txt: in the folder, else beside it (Apple's repos keep them in compiled/ only)."""
    if resources.vocab and resources.merges:
        return resources.vocab, resources.merges
    for sibling in sorted(resources.folder.parent.glob("*")):
        if (sibling / "vocab.json").is_file() and (sibling / "merges.txt").is_file():
            return sibling / "vocab.json", sibling / "merges.txt"
    return None, None


def coreml_tokenizers(resources: res.CoreMLResources, spec: ModelSpec, paired: Optional[Path] = None) -> list:
    """One CLIP tokenizer per text encoder: the checkpoint's own folder when known, else vocab.json + merges.txt."""
    tokenizers = []
    for name, config in zip(spec.tokenizers, spec.text_encoder_configs):
        folder = next((base / name for base in (resources.configs, paired)
                       if base is not None and (base / name).is_dir()), None)
        if folder is not None:
            tokenizers.append(CLIPTokenizer.from_folder(folder))
            continue
        vocab, merges = _tokenizer_files(resources)
        if vocab is None:
            raise UserError(f"{resources.folder} has no vocab.json + merges.txt for the CLIP tokenizer; "
                            "copy them from the model's tokenizer folder")
        # OpenCLIP encoders (SD 2.x's ViT-H, SDXL's bigG: 1024+ wide) were trained with "!" as padding
        pad = "!" if config.get("hidden_size", 0) >= 1024 or name == "tokenizer_2" else None
        tokenizers.append(CLIPTokenizer.from_files(vocab, merges, pad_token=pad))
    return tokenizers


def _quantization(resources: res.CoreMLResources) -> str:
    manifest = resources.manifest
    method = manifest.get("method")
    if method and method != "export":
        bits = manifest.get("average_bits") or manifest.get("bits")
        return f"{method} {bits}-bit" if bits else method
    ops = resources.io(resources.denoiser_stages[-1]).op_counts
    if ops.get("constexpr_lut_to_dense"):
        return "palettized"
    return "linear int8" if ops.get("constexpr_affine_dequantize") else "none"


# ------------------------------------------------------------------ the stages

class CoreMLStages(Stages):
    """The Core ML models of one resources folder behind the Stages interface."""

    def __init__(self, resources: res.CoreMLResources, spec: ModelSpec, runtime=None, compute_units: str = "ALL",
                 reduce_memory: bool = False):
        self.resources = resources
        self.spec = spec
        self.runtime = runtime or CoreMLRuntime
        self.reduce_memory = reduce_memory
        self.text_stages = [stage for stage, _, _ in _ENCODERS if stage in resources.models]
        self.models_of = {"text_encoder": self.text_stages, "unet": resources.denoiser_stages,
                          "vae_decoder": ["VAEDecoder"]}
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
                     "quantization": _quantization(resources), "reduce_memory": reduce_memory,
                     "format": "mlmodelc" if resources.compiled else "mlpackage", "resources": str(resources.folder)}
        if resources.is_sd3:
            self._sd3_info()
        self.set_compute_units(compute_units)

    def _sd3_info(self) -> None:
        tensors = mmdit_tensors(self.resources)
        self.info.update(t5_tokens=int(tensors[_TEXT].shape[-1]) - _CLIP_TOKENS,
                         mmdit="split" if self.resources.split_mmdit else "single",
                         denoiser_stages=len(self.resources.denoiser_stages), t5="absent")
        t5 = [p for p in self.resources.folder.iterdir() if p.stem == "TextEncoderT5"]
        self.info["notes"] = [
            f"{t5[0].name} is not run by the Core ML engine: its T5 tokens are zeros" if t5 else
            "these Core ML resources have no T5 text encoder: its tokens are zeros"]

    def set_compute_units(self, units: str) -> None:
        """Run the next generations on `units`; models loaded for other units stay cached for switching back."""
        self.compute_units = check_compute_units(units)
        self.info.update(compute_units=units, device=DEVICES[units])
        if not self.reduce_memory:
            for stage in self.io:
                self._model(stage)

    # -- loading and releasing ------------------------------------------------------------------------
    def _model(self, stage: str):
        key = (stage, self.compute_units)
        if key not in self._loaded:
            t0 = time.perf_counter()
            self._loaded[key] = self.runtime.load(self.resources.models[stage], self.compute_units)
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
        hidden = out[next(n for n in (*_HIDDEN_OUTPUTS, *out) if n in out and out[n].ndim == 3)]
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
        described = (mmdit_tensors(self.resources)[_LATENT] if self.resources.is_sd3
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
        arrays = {_LATENT: latents, "timestep": np.full((batch,), timestep, dtype=np.float32),
                  _TEXT: np.asarray(hidden).transpose(0, 2, 1)[:, :, None, :],
                  _POOLED: np.asarray(pooled)[:, :, None, None]}
        with self._running("unet"):
            out = self._batched(self._run_mmdit, self.resources.denoiser_stages[0], arrays)
        # Apple's package answers denoiser_output, MobileDiffuser's last stage noise_pred (Swift takes the first)
        name = next(n for n in ("denoiser_output", "noise_pred", *out) if n in out)
        return out[name].astype(np.float32)

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
        return _only(out, ("noise_pred",)).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        name = next(iter(self.io["VAEDecoder"].inputs))
        with self._running("vae_decoder"):
            out = self._batched(lambda part: self._predict("VAEDecoder", part), "VAEDecoder", {name: latents})
        image = out["image"] if "image" in out else next(iter(out.values()))
        return image.astype(np.float32).transpose(0, 2, 3, 1)

    # -- measurements ---------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """The most model bytes resident at once since the last reset (one stage's worth with reduce_memory)."""
        return self._resident_peak

    def reset_peak_memory(self) -> None:
        self._resident_peak = self.resident_bytes()


def load_coreml_stages(resources: res.CoreMLResources, spec: ModelSpec, precision: str = "fp16",
                       quantization: Optional[str] = None, compute_units: str = "ALL",
                       attention: Optional[str] = None, reduce_memory: bool = False, runtime=None) -> CoreMLStages:
    """Precision is fixed when Core ML resources are made. A quantization ("q8", "q6", "q4", "q2", "mixed")
    is made on demand from the resources' .mlpackage files and cached beside them (backend/quantize.py)."""
    if quantization:
        resources = res.find_resources(quantized_resources(resources, quantization))
    if attention and resources.attention not in (attention, "unknown"):
        raise UserError(f"the Core ML resources in {resources.folder} use {resources.attention} attention, "
                        f"not {attention}; export them with --attention {attention}")
    return CoreMLStages(resources, spec, runtime=runtime, compute_units=compute_units, reduce_memory=reduce_memory)


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


# ------------------------------------------------------------------ where the resources come from

def _local_variant(folder: Path, attention: Optional[str]) -> Path:
    """A folder holding Apple's variant folders (original/, split_einsum/; packages/, compiled/) -> one of them."""
    named = {a: folder / a for a in res.ATTENTIONS if (folder / a).is_dir()}
    if named:
        chosen = attention or ("split_einsum" if "split_einsum" in named else "original")
        if chosen not in named:
            raise UserError(f"{folder} has no {chosen} Core ML variant (it has {', '.join(named)})")
        folder = named[chosen]
    compiled = folder / "compiled"
    if (folder / "packages").is_dir() and compiled.is_dir() and any(res.stage_of(p) for p in compiled.iterdir()):
        folder = compiled  # loads without compiling first
    return folder


def _download_variant(repo: str, subfolder: str, progress) -> Path:
    """A registry variant's folder: from the Hub cache, else downloaded (only that subfolder + tokenizer files)."""
    from huggingface_hub import snapshot_download
    root = subfolder.rsplit("/", 1)[0] + "/" if "/" in subfolder else ""
    patterns = [f"{subfolder}/*", f"{root}*/vocab.json", f"{root}*/merges.txt"]
    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True)) / subfolder
        if folder.is_dir() and any(res.stage_of(p) for p in folder.iterdir()):
            return folder
    except Exception:
        pass
    if registry.offline():
        raise UserError(f"the Core ML resources {repo}/{subfolder} are not downloaded and offline mode is on")
    if progress:
        progress(f"downloading Core ML resources {repo}/{subfolder}")
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns)) / subfolder
    except Exception as exc:
        raise UserError(f"cannot download the Core ML resources {repo}/{subfolder} "
                        f"({type(exc).__name__}: {exc})") from exc


def _paired_folder(entry) -> Optional[Path]:
    """The registry entry's diffusers model, if it is already in the Hub cache (for its configs)."""
    if entry is None or not entry.hub:
        return None
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(entry.hub, local_files_only=True, allow_patterns=[
            "model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*"]))
    except Exception:
        return None
    return folder if (folder / "scheduler" / "scheduler_config.json").is_file() else None


def resources_folder(model: str, attention: Optional[str] = None, progress=None) -> tuple:
    """(folder holding the models, registry entry or None) for a local folder or a registry name."""
    local = Path(model).expanduser()
    if local.is_dir():
        return _local_variant(local, attention), None
    entry = registry.get_entry(model)
    if entry is None or not entry.coreml:
        raise UserError(f"model '{model}' has no Core ML resources; export them with "
                        "`python -m backend export-coreml` or choose the MLX engine")
    variants = entry.coreml.get("variants") or {"original": ""}
    chosen = attention or ("split_einsum" if "split_einsum" in variants else next(iter(variants)))
    if chosen not in variants:
        raise UserError(f"{model} has no {chosen} Core ML variant (it has {', '.join(variants)})")
    return _download_variant(entry.coreml["repo"], variants[chosen], progress), entry


def coreml_choice(model: str, reason: str, progress=None):
    """select.choose_engine's Core ML branch: resolve the resources, read their spec, load on demand."""
    from backend.engines.select import EngineChoice
    folder, entry = resources_folder(model, None, progress)
    resources = res.find_resources(folder, require_tokenizer=False)
    paired = _paired_folder(entry)
    spec = coreml_spec(resources, paired)
    tokenizers = coreml_tokenizers(resources, spec, paired)

    def load(attention: Optional[str] = None, **options) -> CoreMLStages:
        chosen = resources
        if attention and attention != resources.attention:
            chosen = res.find_resources(resources_folder(model, attention, progress)[0], require_tokenizer=False)
        return load_coreml_stages(chosen, spec, attention=attention, **options)

    return EngineChoice(name=model, kind="coreml", reason=f"{reason}; {resources.attention} attention",
                        spec=spec, tokenizers=tokenizers, disk_bytes=resources.total_bytes, load=load)
