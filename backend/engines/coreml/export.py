"""Diffusers checkpoint -> Apple's Core ML resources layout (what resources.py reads, quantize.py compresses).

`export()` writes one `.mlpackage` per stage, named as apple/ml-stable-diffusion's python tools name
them (`Stable_Diffusion_version_<model>_unet.mlpackage` ...), with Apple's tensor names:

  TextEncoder(2)  input_ids (1, 77) float32 -> last_hidden_state (SDXL: hidden_embeds, the penultimate
                  layer) + pooled_outputs (SDXL's second encoder: the projected text_embeds)
  Unet            sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, C, 1, 77) [+ time_ids (B, n),
                  text_embeds (B, P) for SDXL; + timestep_cond (B, D) for LCM UNets] -> noise_pred
  UnetChunk1/2    the same UNet in two packages; chunk 1's outputs are chunk 2's inputs, by name
  VAEDecoder      z (1, 4, h, w) -> image (1, 3, 8h, 8w) in [-1, 1];  VAEEncoder (optional) x -> latent
                  (the mean and log-variance, 2 x 4 channels)

SD3 / SD3.5 (a `transformer` instead of a `unet`): both CLIP encoders as SDXL's (hidden_embeds = the
penultimate layer, pooled_outputs = the projected text_embeds diffusers' SD3 pipeline uses), the VAE decoder
(16 channels, no post_quant_conv when the config has none), and the MMDiT as export_sd3.py writes it
(MobileDiffuser's split stages, or Apple's one package).

plus vocab.json + merges.txt, configs/ (the checkpoint's small config files: model_index.json,
scheduler/, tokenizer/, each model's config.json) and manifest.json. The folder is written under a
temporary name and renamed at the end, so an interrupted export leaves nothing half-written.

Each stage is converted by conversion.py. Needs torch, diffusers and transformers (requirements-convert.txt);
nothing at generation time imports this module.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from backend import lora
from backend.checkpoint import SETTINGS_FILE
from backend.types import UserError
from backend.engines.coreml import export_sd3, resources as res
from backend.engines.coreml.conversion import DESCRIPTIONS, convert, describe, package_name

EXPORT_ATTENTIONS = ("original", "split_einsum")  # what this exporter writes (Apple's v2 is not ported)

PRECISIONS = ("fp16", "fp32")


def _load_components(folder: Path) -> dict:
    import diffusers
    import torch
    import transformers

    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{folder} is not a diffusers checkpoint folder (no model_index.json).")
    index = json.loads(index_path.read_text())
    parts = {}
    for name in ("text_encoder", "text_encoder_2", "unet", "transformer", "vae"):
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        library = transformers if entry[0] == "transformers" else diffusers
        cls = getattr(library, entry[1])
        kwargs = {"attn_implementation": "sdpa"} if library is transformers else {}
        parts[name] = cls.from_pretrained(str(folder / name), torch_dtype=torch.float32, **kwargs).eval()
    if "unet" not in parts and "transformer" not in parts:
        raise UserError(f"{folder} has no unet (or SD3 transformer); a Core ML export needs one.")
    if "vae" not in parts:
        raise UserError(f"{folder} has no vae; a Core ML export needs it.")
    if "transformer" in parts and not hasattr(parts["transformer"], "transformer_blocks"):
        raise UserError(f"{folder}'s transformer ({type(parts['transformer']).__name__}) is not SD3's MMDiT.")
    if "text_encoder" not in parts and "text_encoder_2" not in parts:
        raise UserError(f"{folder} has no text encoder; a Core ML export needs one.")
    return parts


def _settings(diffusers_dir, attention, chunk_unet, precision, unet_batch_size, latent_size, vae_encoder,
              model_version) -> dict:
    return {"method": "export", "source": str(Path(diffusers_dir).resolve()), "attention": attention,
            "chunk_unet": bool(chunk_unet), "precision": precision, "unet_batch_size": int(unet_batch_size),
            "latent_size": list(latent_size), "vae_encoder": bool(vae_encoder), "model_version": model_version}


def _read_config(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def latent_size_for(diffusers_dir, image_size: int) -> tuple:
    """(h, w) latents for square `image_size`-pixel images: the VAE's scale factor from its config."""
    vae = _read_config(Path(diffusers_dir).expanduser() / "vae" / "config.json")
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    if image_size % scale:
        raise UserError(f"the image size must be a multiple of {scale} (the VAE's scale factor), not {image_size}.")
    return image_size // scale, image_size // scale


def export(diffusers_dir, out_dir, attention: str = "original", chunk_unet: bool = False, precision: str = "fp16",
           *, unet_batch_size: int = 2, latent_size: Optional[tuple] = None, vae_encoder: bool = False,
           model_version: Optional[str] = None, mmdit_stages: Optional[int] = None, mmdit_layout: str = "split",
           t5_tokens: int = 77, loras=()) -> res.CoreMLResources:
    """Convert a diffusers checkpoint folder into a Core ML resources folder `out_dir`; return what it holds.

    unet_batch_size: 2 for classifier-free guidance (Apple's default), 1 for guidance-free models (also the
    batch of SD3's MMDiT). latent_size: (h, w) of the latents; default the denoiser's sample_size.
    SD3 only: mmdit_stages, the number of MMDiT stage packages (default: as few as keep each stage's weights
    under export_sd3.MAX_STAGE_BYTES); mmdit_layout "single" writes Apple's one MultiModalDiffusionTransformer instead;
    t5_tokens, the T5 tokens after CLIP's 77 the MMDiT takes. loras: [(safetensors file, scale)] fused into
    the weights before conversion (Core ML weights are fixed), recorded in the settings and manifest. Running again with the same settings returns
    the existing folder; a different folder already at `out_dir` is a UserError.
    """
    source, out = Path(diffusers_dir).expanduser(), Path(out_dir).expanduser()
    if attention not in EXPORT_ATTENTIONS:
        raise UserError(f"attention must be one of {', '.join(EXPORT_ATTENTIONS)}, not {attention!r}.")
    if precision not in PRECISIONS:
        raise UserError(f"precision must be fp16 or fp32, not {precision!r}.")
    if unet_batch_size not in (1, 2):
        raise UserError("unet_batch_size must be 1 or 2.")
    sd3 = (source / "transformer" / "config.json").is_file() and not (source / "unet").is_dir()
    denoiser_config = _read_config(source / ("transformer" if sd3 else "unet") / "config.json")
    sample_size = denoiser_config.get("sample_size", 64)
    if latent_size is None:
        latent_size = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
    model_version = model_version or source.resolve().name
    settings = _settings(source, attention, chunk_unet, precision, unet_batch_size, latent_size, vae_encoder,
                         model_version)
    loras = lora.normalize(loras)
    if loras:
        settings["loras"] = [lora.record(path, scale) for path, scale in loras]
    if sd3:
        export_sd3.check_sd3_settings(attention, chunk_unet, mmdit_layout, mmdit_stages, t5_tokens,
                                      denoiser_config, latent_size)
        settings.update(mmdit_layout=mmdit_layout, mmdit_stages=mmdit_stages, t5_tokens=int(t5_tokens))
    elif mmdit_stages is not None or mmdit_layout != "split":
        raise UserError("--stages and --mmdit-layout are for SD3 models (an MMDiT transformer); this one has a UNet.")
    if out.exists():
        manifest = out / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == settings:
            return res.find_resources(out)
        raise UserError(f"{out} already exists (from other settings); remove it or choose another folder.")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        exporter = _Exporter(source, tmp, settings)
        for warning in fuse_loras(exporter.parts, loras):
            print(f"warning: {warning}", file=sys.stderr)
        exporter.text_encoders()
        if exporter.sd3:
            export_sd3.export_mmdit(exporter)
        else:
            exporter.unet(chunk_unet)
        exporter.vae(vae_encoder)
        _copy_small_files(source, tmp)
        exporter.write_manifest()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return res.find_resources(out)



class _Exporter:
    """Converts the stages of one loaded checkpoint into packages under `folder`, timing each."""

    def __init__(self, source: Path, folder: Path, settings: dict):
        import torch
        self.started = time.perf_counter()
        self.folder, self.settings = folder, settings
        self.parts = _load_components(source)
        self.sd3 = "transformer" in self.parts and "unet" not in self.parts
        self.sdxl = not self.sd3 and ("text_encoder_2" in self.parts
                                      or self.parts["unet"].config.addition_embed_type == "text_time")
        self.fp16 = settings["precision"] == "fp16"
        self.io_dtype = np.float16 if self.fp16 else np.float32
        self.seconds: dict = {}
        self.vae_fp16 = self.fp16
        encoder = self.parts.get("text_encoder") or self.parts["text_encoder_2"]
        self.text_length = encoder.config.max_position_embeddings  # 77 for every CLIP text encoder
        torch.manual_seed(0)

    def save(self, stage: str, mlmodel, t0: float, metadata: Optional[dict] = None) -> None:
        info = dict(self.settings, source=Path(self.settings["source"]).name)
        describe(mlmodel, stage, info, DESCRIPTIONS)
        mlmodel.user_defined_metadata.update(metadata or {})
        mlmodel.save(str(self.folder / package_name(self.settings["model_version"], stage)))
        self.seconds[stage] = time.perf_counter() - t0

    def text_encoders(self) -> None:
        import torch
        from backend.engines.coreml import torch_modules as tm
        penultimate = self.sdxl or self.sd3  # SDXL and SD3 condition on the penultimate layer
        hidden_name = "hidden_embeds" if penultimate else "last_hidden_state"
        for name, stage in (("text_encoder", "TextEncoder"), ("text_encoder_2", "TextEncoder2")):
            if name not in self.parts:
                continue
            t0, encoder = time.perf_counter(), self.parts[name]
            module = tm.TextEncoderIO(encoder, hidden_layer=-2 if penultimate else None)
            ids = torch.randint(encoder.config.vocab_size, (1, self.text_length), dtype=torch.int32).float()
            self.save(stage, convert(module, {"input_ids": ids}, {"input_ids": np.float32},
                                     {hidden_name: np.float32, "pooled_outputs": np.float32}, self.fp16), t0)

    def _unet_example(self):
        """Example inputs in Apple's order, and the names of the inputs beyond the first three."""
        import torch
        unet, vae = self.parts["unet"], self.parts["vae"]
        b, (h, w) = self.settings["unet_batch_size"], self.settings["latent_size"]
        example = {
            "sample": torch.randn(b, unet.config.in_channels, h, w),
            "timestep": torch.full((b,), 999.0),
            "encoder_hidden_states": torch.randn(b, unet.config.cross_attention_dim, 1, self.text_length),
        }
        if unet.config.addition_embed_type == "text_time":
            text_dim = self.parts["text_encoder_2"].config.projection_dim if "text_encoder_2" in self.parts else 1280
            n_ids = (unet.config.projection_class_embeddings_input_dim - text_dim) // unet.config.addition_time_embed_dim
            size = [h * _vae_scale(vae), w * _vae_scale(vae)]
            example["time_ids"] = torch.tensor([(size + [0, 0] + size)[:n_ids]] * b, dtype=torch.float32)
            example["text_embeds"] = torch.randn(b, text_dim)
        if unet.config.time_cond_proj_dim:
            example["timestep_cond"] = torch.randn(b, unet.config.time_cond_proj_dim)
        return example, list(example)[3:]

    def unet(self, chunk: bool) -> None:
        from backend.engines.coreml import torch_modules as tm
        unet = self.parts["unet"]
        if self.settings["attention"] == "split_einsum":
            unet.set_attn_processor(tm.SplitEinsumAttnProcessor())
        example, extra = self._unet_example()
        dtypes = {name: self.io_dtype for name in example}
        t0 = time.perf_counter()
        if not chunk:
            self.save("Unet", convert(tm.UnetIO(unet, extra), example, dtypes, {"noise_pred": np.float32},
                                      self.fp16), t0)
            return
        try:
            tm.check_chunkable(unet)
        except ValueError as e:
            raise UserError(f"chunk_unet: {e}.") from None
        split = tm.balanced_split(unet)
        first, second = tm.UnetChunk1(unet, split, extra), tm.UnetChunk2(unet, split)
        handover = ["chunk_sample", "chunk_temb"] + [f"chunk_skip_{i}" for i in range(tm.skip_count(unet, split))]
        carried = _check_halves(tm.UnetIO(unet, extra), first, second, example, len(handover))
        self.save("UnetChunk1", convert(first, example, dtypes, {n: self.io_dtype for n in handover}, self.fp16), t0)

        t0 = time.perf_counter()
        second_example = {"chunk_sample": carried[0], "chunk_temb": carried[1]}
        if second.uses_text:
            second_example["encoder_hidden_states"] = example["encoder_hidden_states"]
        second_example.update(zip(handover[2:], carried[2:]))
        self.save("UnetChunk2", convert(second, second_example, {n: self.io_dtype for n in second_example},
                                        {"noise_pred": np.float32}, self.fp16), t0)

    def vae(self, with_encoder: bool) -> None:
        import torch
        from backend.engines.coreml import torch_modules as tm
        vae = self.parts["vae"]
        # SDXL's original VAE overflows in float16 (Apple's exporter keeps it float32 too)
        self.vae_fp16 = self.fp16 and not (self.sdxl and vae.config.get("force_upcast", False))
        dtype = np.float16 if self.vae_fp16 else np.float32
        (h, w), scale = self.settings["latent_size"], _vae_scale(vae)
        t0 = time.perf_counter()
        z = torch.randn(1, vae.config.latent_channels, h, w)
        self.save("VAEDecoder", convert(tm.VaeDecoderIO(vae), {"z": z}, {"z": dtype}, {"image": np.float32},
                                        self.vae_fp16), t0)
        if with_encoder:
            t0 = time.perf_counter()
            x = torch.rand(1, vae.config.in_channels, h * scale, w * scale) * 2 - 1
            self.save("VAEEncoder", convert(tm.VaeEncoderIO(vae), {"x": x}, {"x": dtype}, {"latent": np.float32},
                                            self.vae_fp16), t0)

    def write_manifest(self) -> None:
        stages = {}
        for entry in sorted(self.folder.iterdir()):
            stage = res.stage_of(entry)
            if stage:
                stages[stage] = {"file": entry.name, "bytes": res.disk_bytes(entry),
                                 "seconds": round(self.seconds[stage], 3)}
        manifest = {"settings": self.settings, "method": "export", "attention": self.settings["attention"],
                    "precision": self.settings["precision"], "vae_precision": "fp16" if self.vae_fp16 else "fp32",
                    "sdxl": self.sdxl, "stages": stages, "bytes": sum(s["bytes"] for s in stages.values()),
                    "seconds": round(time.perf_counter() - self.started, 3)}
        if self.sd3:
            manifest.update(sd3=True, mmdit_layout=self.settings["mmdit_layout"],
                            t5_tokens=self.settings["t5_tokens"])
            if self.settings["mmdit_layout"] == "split":
                manifest["mmdit_blocks"] = [list(b) for b in self.mmdit_blocks]
        (self.folder / "manifest.json").write_text(json.dumps(manifest, indent=2))




def fuse_loras(parts: dict, loras: list) -> list:
    """W += scale * alpha/rank * up @ down in the loaded torch modules (text encoders and denoiser), per LoRA
    in order; returns the unrecognised-key warnings (printed by the CLI)."""
    import torch
    if not loras:
        return []
    denoiser = "transformer" if "transformer" in parts else "unet"
    table = {}
    for component, module in parts.items():
        if component == "vae":
            continue
        table[component] = {name: lora.ModuleShape("conv" if isinstance(m, torch.nn.Conv2d) else "linear",
                                                   int(m.weight.shape[1]), int(m.weight.shape[0]),
                                                   tuple(m.weight.shape[2:]) if m.weight.ndim == 4 else (1, 1))
                            for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    per_block = parts["unet"].config.layers_per_block if denoiser == "unet" else None
    warnings = []
    for path, scale in loras:
        matched = lora.match(lora.read(path), table, denoiser, per_block if isinstance(per_block, int) else None)
        with torch.no_grad():
            for (component, name), layer in matched.layers.items():
                weight = parts[component].get_submodule(name).weight
                delta = torch.from_numpy(layer.delta()).reshape(weight.shape).to(weight.dtype)
                weight += (scale * layer.alpha_scale) * delta
        if matched.warning():
            warnings.append(matched.warning())
    return warnings


def _vae_scale(vae) -> int:
    """Latent -> image size factor (8 for every real SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _check_halves(whole, first, second, example: dict, handed_over: int):
    """Run both halves once in torch: together they must give the whole UNet's output."""
    import torch
    with torch.no_grad():
        carried = first(*example.values())
        text = (example["encoder_hidden_states"],) if second.uses_text else ()
        joined = second(carried[0], carried[1], *text, *carried[2:])
        reference = whole(*example.values())
    if len(carried) != handed_over or not torch.allclose(joined, reference, atol=1e-4, rtol=1e-3):
        raise RuntimeError("the two UNet chunks do not reproduce the whole UNet")
    return carried


def _write_tokenizer_files(tokenizer: Path, dest: Path) -> None:
    """vocab.json + merges.txt as Apple's BPE tokenizer reads them; from tokenizer.json when only that exists."""
    if (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
        shutil.copy2(tokenizer / "vocab.json", dest / "vocab.json")
        shutil.copy2(tokenizer / "merges.txt", dest / "merges.txt")
        return
    if not (tokenizer / "tokenizer.json").is_file():
        raise UserError(f"{tokenizer} has neither vocab.json + merges.txt nor tokenizer.json.")
    model = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{tokenizer}/tokenizer.json is not a BPE tokenizer; Core ML pipelines need CLIP's.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (dest / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _copy_small_files(source: Path, dest: Path) -> None:
    """vocab.json + merges.txt at the top (Apple's layout) and the diffusers configs under configs/."""
    tokenizer = source / "tokenizer" if (source / "tokenizer").is_dir() else source / "tokenizer_2"
    _write_tokenizer_files(tokenizer, dest)
    if (source / SETTINGS_FILE).is_file():  # the model's own defaults (steps, guidance, scheduler ...)
        shutil.copy2(source / SETTINGS_FILE, dest / SETTINGS_FILE)
    configs = dest / "configs"
    configs.mkdir()
    shutil.copy2(source / "model_index.json", configs / "model_index.json")
    for sub in sorted(p for p in source.iterdir() if p.is_dir()):
        for f in sub.iterdir():
            if f.is_file() and f.suffix in (".json", ".txt") and f.stat().st_size < 16 << 20:
                (configs / sub.name).mkdir(exist_ok=True)
                shutil.copy2(f, configs / sub.name / f.name)
