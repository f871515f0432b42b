"""Apple's Core ML Stable Diffusion layout on disk: which file is which stage, and what each model takes.

A resources folder (what apple/ml-stable-diffusion writes, what the apple/coreml-stable-diffusion-*
Hub repos publish, what `export.py` and `quantize.py` write) holds one Core ML model per stage,
either as an editable `.mlpackage` or a compiled `.mlmodelc`, named in one of two styles:

- compiled / Swift style:  `TextEncoder.mlmodelc`, `Unet.mlmodelc`, `UnetChunk1.mlmodelc`, ...
- python style:            `Stable_Diffusion_version_<model>_text_encoder.mlpackage`, `..._unet_chunk1...`

SD3's MMDiT comes in two layouts: Apple's / Argmax's single `MultiModalDiffusionTransformer`
(python style `..._mmdit`), or MobileDiffuser's split `MultiModalDiffusionTransformerConditioning` +
`MultiModalDiffusionTransformerStage0` ... `StageN` (python style `..._mmdit_conditioning`,
`..._mmdit_stage0` ...), run in that order.

plus the CLIP tokenizer's `vocab.json` and `merges.txt`. Nothing here imports torch, and nothing
here runs a model: `describe_model` reads input/output names, shapes and dtypes from the model's
own description (the spec of a package; `metadata.json` or `model.mil` of a compiled model).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from backend.types import UserError

#: Stage name (Apple's compiled file stem) -> suffix in the python-style package name.
STAGE_SUFFIXES = {
    "TextEncoder": "text_encoder",
    "TextEncoder2": "text_encoder_2",
    "Unet": "unet",
    "UnetChunk1": "unet_chunk1",
    "UnetChunk2": "unet_chunk2",
    "UnetRefiner": "refiner",           # SDXL's refiner UNet, bundled beside the base (--refiner-version)
    "VAEDecoder": "vae_decoder",
    "VAEEncoder": "vae_encoder",
    "SafetyChecker": "safety_checker",
}
UNET_STAGES = ("Unet", "UnetChunk1", "UnetChunk2")
REFINER = "UnetRefiner"
REFINER_STAGES = ("TextEncoder2", REFINER, "VAEDecoder")  # what Apple's Swift pipeline runs for the refiner
MMDIT = "MultiModalDiffusionTransformer"                 # Apple's single SD3 package
MMDIT_CONDITIONING = MMDIT + "Conditioning"             # MobileDiffuser's split layout: timestep + pooled text
MMDIT_STAGE = MMDIT + "Stage"                           # ... then Stage0, Stage1, ... (numbered)
_MMDIT_SUFFIXES = {MMDIT: "mmdit", MMDIT_CONDITIONING: "mmdit_conditioning"}
_STAGE_NUMBER = re.compile(r"(?:^" + MMDIT_STAGE + r"|_mmdit_stage)(\d+)$")
MODEL_EXTENSIONS = (".mlpackage", ".mlmodelc")
#: attention implementations: ORIGINAL (GPU), SPLIT_EINSUM and SPLIT_EINSUM_V2 (Neural Engine; Apple's palettized
#: repositories publish v2, their variant folder is split_einsum_v2/)
ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
NEURAL_ENGINE_ATTENTIONS = ("split_einsum", "split_einsum_v2")
#: user-defined metadata keys export.py writes into every model it converts
META_ATTENTION = "silicon_diffusion.attention"
META_STAGE = "silicon_diffusion.stage"
META_PRECISION = "silicon_diffusion.precision"
META_SOURCE = "silicon_diffusion.source"

META_MMDIT_BLOCKS = "silicon_diffusion.mmdit_blocks"   # "first:last" transformer blocks of an MMDiT stage

# ArrayFeatureType.ArrayDataType values of the Core ML spec
_SPEC_DTYPES = {65552: "float16", 65568: "float32", 65600: "float64", 131104: "int32", 131080: "int8"}
_MIL_DTYPES = {"fp16": "float16", "fp32": "float32", "fp64": "float64", "int32": "int32", "int8": "int8"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    dtype: str  # numpy dtype name: float16, float32, int32 ...


@dataclass
class ModelIO:
    """What one Core ML model takes and gives, read from its description (never assumed)."""
    path: Path
    inputs: dict            # name -> TensorSpec, in the model's order
    outputs: dict           # name -> TensorSpec (shape () when a compiled model does not tell)
    metadata: dict = field(default_factory=dict)   # user-defined metadata (str -> str)
    op_counts: Counter = field(default_factory=Counter)  # MIL op type (snake_case) -> count
    compiled: bool = False


@dataclass
class CoreMLResources:
    """One resources folder: the model path of every stage present, and what the engine needs to know."""
    folder: Path
    models: dict            # stage -> Path (see STAGE_SUFFIXES)
    attention: str          # "original", "split_einsum" or "unknown"
    compiled: bool          # True: .mlmodelc, False: .mlpackage
    disk_bytes: dict        # stage -> bytes on disk
    vocab: Optional[Path] = None
    merges: Optional[Path] = None
    configs: Optional[Path] = None      # diffusers configs (model_index.json, scheduler/ ...) if present
    manifest: dict = field(default_factory=dict)  # manifest.json written by export/quantize, if any
    refiner: bool = False   # the SDXL refiner's models of the folder (TextEncoder2, UnetRefiner, VAEDecoder)

    @property
    def is_sdxl(self) -> bool:
        return "TextEncoder2" in self.models and not self.is_sd3

    @property
    def is_sd3(self) -> bool:
        return any(is_mmdit_stage(stage) for stage in self.models)

    @property
    def split_mmdit(self) -> bool:
        """MobileDiffuser's layout: Conditioning + Stage0..N instead of one MultiModalDiffusionTransformer."""
        return MMDIT_CONDITIONING in self.models

    @property
    def chunked(self) -> bool:
        return "UnetChunk1" in self.models

    @property
    def denoiser_stages(self) -> list:
        """The denoiser's models in the order they run: ["Unet"], ["UnetChunk1", "UnetChunk2"],
        [MultiModalDiffusionTransformer], or [...Conditioning, ...Stage0, ...Stage1, ...]."""
        if self.refiner:
            return [REFINER]
        if self.split_mmdit:
            return [MMDIT_CONDITIONING] + sorted((s for s in self.models if s.startswith(MMDIT_STAGE)),
                                                 key=lambda s: int(s[len(MMDIT_STAGE):]))
        if MMDIT in self.models:
            return [MMDIT]
        return ["UnetChunk1", "UnetChunk2"] if self.chunked else ["Unet"]

    @property
    def unet_stages(self) -> list:
        """The denoiser's models in running order (the UNet's, or SD3's MMDiT's): see denoiser_stages."""
        return self.denoiser_stages

    @property
    def total_bytes(self) -> int:
        return sum(self.disk_bytes.values())

    def io(self, stage: str) -> ModelIO:
        if stage not in self.models:
            raise UserError(f"The Core ML resources in {self.folder} have no {stage} model.")
        return describe_model(self.models[stage])


def is_mmdit_stage(stage: str) -> bool:
    return stage.startswith(MMDIT)


def known_stage(stage: str) -> bool:
    """A stage name this module knows (the fixed ones, and any numbered MMDiT stage)."""
    return stage in STAGE_SUFFIXES or stage in _MMDIT_SUFFIXES or bool(re.fullmatch(MMDIT_STAGE + r"\d+", stage))


def python_suffix(stage: str) -> str:
    """The suffix of a stage's python-style package name ("unet_chunk1", "mmdit_stage0" ...)."""
    if stage.startswith(MMDIT_STAGE):
        return f"mmdit_stage{int(stage[len(MMDIT_STAGE):])}"
    return {**STAGE_SUFFIXES, **_MMDIT_SUFFIXES}[stage]


def stage_of(path: Path) -> Optional[str]:
    """The stage a model file belongs to, from its name in either naming style (None: not a stage)."""
    path = Path(path)
    if path.suffix not in MODEL_EXTENSIONS:
        return None
    stem = path.stem
    if stem in STAGE_SUFFIXES or stem in _MMDIT_SUFFIXES:
        return stem
    numbered = _STAGE_NUMBER.search(stem)
    if numbered:
        return f"{MMDIT_STAGE}{int(numbered.group(1))}"
    for stage, suffix in sorted(_MMDIT_SUFFIXES.items(), key=lambda kv: -len(kv[1])):
        if stem.endswith("_" + suffix):
            return stage
    # python style: the longest suffix wins ("..._unet_chunk1" is not "..._unet")
    for stage, suffix in sorted(STAGE_SUFFIXES.items(), key=lambda kv: -len(kv[1])):
        if stem.endswith("_" + suffix):
            return stage
    return None


def disk_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _models_in(folder: Path) -> dict:
    found: dict = {}
    for entry in sorted(folder.iterdir()):
        stage = stage_of(entry)
        if stage is None or not entry.is_dir():
            continue
        if stage in found:
            raise UserError(f"{folder} holds two {stage} models ({found[stage].name} and {entry.name}); "
                            "keep one.")
        found[stage] = entry
    return found


_MAX_FOLDERS = 64  # a resources folder has a few subfolders; more means it is not one (e.g. "/")


class _TooManyFolders(Exception):
    pass


def _subfolders(folder: Path, depth: int, budget: Optional[list] = None):
    """Folders below `folder` (at most `depth` levels, at most _MAX_FOLDERS in all), never inside a model."""
    budget = [_MAX_FOLDERS] if budget is None else budget
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.suffix not in MODEL_EXTENSIONS:
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooManyFolders
            yield entry
            if depth > 1:
                yield from _subfolders(entry, depth - 1, budget)


def _locate(folder: Path) -> Path:
    """The folder itself, or the one folder below it that holds the models (Resources/, packages/ ...)."""
    if _models_in(folder):
        return folder
    try:
        candidates = [p for p in _subfolders(folder, 3) if _models_in(p)]
    except _TooManyFolders:
        raise UserError(f"No Core ML resources were found in {folder}: it holds too many folders to be a "
                        "resources folder; give the folder that holds the models (or its original/, compiled/ ...)")
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(str(p.relative_to(folder)) for p in candidates)
        raise UserError(f"{folder} holds several Core ML variants ({names}); choose one of those folders.")
    raise UserError(f"No Core ML model (.mlpackage or .mlmodelc) was found in {folder}.")


def _attention_from_name(folder: Path) -> Optional[str]:
    for part in reversed(folder.resolve().parts[-3:]):
        low = part.lower().replace("-", "_")
        if "split_einsum_v2" in low:
            return "split_einsum_v2"
        if "split_einsum" in low or "spliteinsum" in low:
            return "split_einsum"
        if re.search(r"(^|_)original($|_)", low):
            return "original"
    return None


def _detect_attention(folder: Path, unet_io: ModelIO, manifest: dict) -> str:
    """Metadata first (what export.py wrote), then the folder's name, then the program's ops."""
    if unet_io.metadata.get(META_ATTENTION) in ATTENTIONS:
        return unet_io.metadata[META_ATTENTION]
    if manifest.get("attention") in ATTENTIONS:
        return manifest["attention"]
    named = _attention_from_name(folder)
    if named:
        return named
    if unet_io.op_counts:
        # split-einsum attention keeps one einsum per head; the original one lowers to matmuls
        return "split_einsum" if unet_io.op_counts.get("einsum") else "original"
    return "unknown"


def _find_file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / "tokenizer" / name, folder / "configs" / "tokenizer" / name):
        if candidate.is_file():
            return candidate
    return None


def find_resources(folder, require_tokenizer: bool = True, refiner: bool = False) -> CoreMLResources:
    """Read a resources folder; a missing stage or tokenizer file is a UserError that names it. `refiner`:
    the folder's SDXL refiner (Apple's --refiner-version bundle: UnetRefiner beside the base's models)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"The Core ML resources folder {root} does not exist.")
    base = _locate(root)
    models = _models_in(base)
    if refiner:
        if REFINER not in models and "Unet" in models and "TextEncoder" not in models:
            models[REFINER] = models.pop("Unet")  # a refiner converted on its own: its UNet is plain Unet
        missing = [s for s in REFINER_STAGES if s not in models]
        if missing:
            raise UserError(f"{base} has no SDXL refiner: {', '.join(missing)} missing (Apple's layout bundles "
                            f"{REFINER}.mlmodelc beside TextEncoder2 and VAEDecoder)")
        models = {s: models[s] for s in REFINER_STAGES}
    else:
        models.pop(REFINER, None)  # the base's run does not load the refiner bundled beside it

    kinds = {p.suffix for p in models.values()}
    if len(kinds) > 1:
        raise UserError(f"{base} mixes .mlpackage and .mlmodelc models; keep one kind.")
    if "TextEncoder" not in models and "TextEncoder2" not in models:
        raise UserError(f"{base} has no text encoder model (TextEncoder.mlmodelc / *_text_encoder.mlpackage).")
    if any(is_mmdit_stage(s) for s in models):
        _check_mmdit(base, models)
    elif not refiner:
        _check_unet(base, models)
    if "VAEDecoder" not in models:
        raise UserError(f"{base} has no VAE decoder model (VAEDecoder.mlmodelc / *_vae_decoder.mlpackage).")

    vocab, merges = _find_file(base, "vocab.json"), _find_file(base, "merges.txt")
    if require_tokenizer and (vocab is None or merges is None):
        missing = " and ".join(n for n, p in (("vocab.json", vocab), ("merges.txt", merges)) if p is None)
        raise UserError(f"{base} has no {missing}: copy them from the model's tokenizer folder.")

    manifest = {}
    if (base / "manifest.json").is_file():
        manifest = json.loads((base / "manifest.json").read_text())
    configs = base / "configs" if (base / "configs" / "model_index.json").is_file() else None
    found = CoreMLResources(
        folder=base, models=models, attention="unknown", compiled=kinds == {".mlmodelc"},
        disk_bytes={stage: disk_bytes(p) for stage, p in models.items()},
        vocab=vocab, merges=merges, configs=configs, manifest=manifest, refiner=refiner)
    # the model that holds attention: the UNet's first, the MMDiT's last stage
    denoiser = found.denoiser_stages[-1 if found.is_sd3 else 0]
    found.attention = _detect_attention(base, describe_model(models[denoiser]), manifest)
    return found


def _check_unet(base: Path, models: dict) -> None:
    has_chunks = [s in models for s in ("UnetChunk1", "UnetChunk2")]
    if any(has_chunks) and not all(has_chunks):
        missing = "UnetChunk2" if has_chunks[0] else "UnetChunk1"
        raise UserError(f"{base} has only one half of a chunked UNet: {missing} is missing.")
    if "Unet" not in models and not all(has_chunks):
        raise UserError(f"{base} has no UNet model (Unet, or UnetChunk1 + UnetChunk2; for SD3 "
                        f"{MMDIT}, or {MMDIT_CONDITIONING} + {MMDIT_STAGE}0...N).")
    if "Unet" in models and all(has_chunks):
        del models["Unet"]  # Apple's tools keep both; the pipelines prefer the chunks, so do we


def _check_mmdit(base: Path, models: dict) -> None:
    """SD3: both CLIP encoders, and one whole MMDiT or a complete split (Conditioning + Stage0..N)."""
    stray = [s for s in UNET_STAGES if s in models]
    if stray:
        raise UserError(f"{base} holds both a UNet ({', '.join(stray)}) and SD3 MMDiT models; keep one model.")
    for encoder in ("TextEncoder", "TextEncoder2"):
        if encoder not in models:
            raise UserError(f"{base} has SD3 MMDiT models but no {encoder}: SD3 needs both CLIP text encoders.")
    numbers = sorted(int(s[len(MMDIT_STAGE):]) for s in models if s.startswith(MMDIT_STAGE))
    if not numbers and MMDIT_CONDITIONING in models:
        raise UserError(f"{base} has {MMDIT_CONDITIONING} but no {MMDIT_STAGE}0...N models.")
    if numbers:
        if MMDIT_CONDITIONING not in models:
            raise UserError(f"{base} has {MMDIT_STAGE}<N> models but no {MMDIT_CONDITIONING}.")
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
        if missing:
            raise UserError(f"{base} has an incomplete split MMDiT: "
                            f"{', '.join(f'{MMDIT_STAGE}{n}' for n in missing)} missing.")
        models.pop(MMDIT, None)  # MobileDiffuser's loader prefers the split stages, so do we
    elif MMDIT not in models:
        raise UserError(f"{base} has no SD3 MMDiT model ({MMDIT}, or {MMDIT_CONDITIONING} + {MMDIT_STAGE}0...N).")


# ---------------------------------------------------------------- model descriptions

def _snake(op_type: str) -> str:
    """'Ios16.constexprLutToDense' (compiled histograms) -> 'constexpr_lut_to_dense' (MIL op type)."""
    name = op_type.split(".")[-1]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _count_ops(block, counts: Counter) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, counts)


def _spec_tensor(feature) -> TensorSpec:
    array = feature.type.multiArrayType
    return TensorSpec(feature.name, tuple(int(d) for d in array.shape), _SPEC_DTYPES.get(array.dataType, "unknown"))


def _describe_package(path: Path) -> ModelIO:
    from coremltools.models.utils import load_spec  # reads the protobuf, compiles nothing

    spec = load_spec(str(path))
    counts: Counter = Counter()
    if spec.WhichOneof("Type") == "mlProgram":
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                _count_ops(block, counts)
    return ModelIO(
        path=path,
        inputs={f.name: _spec_tensor(f) for f in spec.description.input},
        outputs={f.name: _spec_tensor(f) for f in spec.description.output},
        metadata=dict(spec.description.metadata.userDefined), op_counts=counts, compiled=False)


def _shape(text: str) -> tuple:
    return tuple(int(d) for d in re.findall(r"-?\d+", text))


def _describe_metadata_json(path: Path) -> ModelIO:
    entries = json.loads((path / "metadata.json").read_text())
    meta = entries[0] if isinstance(entries, list) else entries

    def tensors(schema):
        return {t["name"]: TensorSpec(t["name"], _shape(str(t.get("shape", "[]"))),
                                      str(t.get("dataType", "unknown")).lower())
                for t in schema}

    counts = Counter()
    for op_type, n in meta.get("mlProgramOperationTypeHistogram", {}).items():
        counts[_snake(op_type)] += int(n)
    return ModelIO(path=path, inputs=tensors(meta.get("inputSchema", [])),
                   outputs=tensors(meta.get("outputSchema", [])),
                   metadata=dict(meta.get("userDefinedMetadata", {})), op_counts=counts, compiled=True)


_MIL_TENSOR = r"tensor<(\w+),\s*\[([^\]]*)\]>"


def _describe_model_mil(path: Path) -> ModelIO:
    """Fallback for a compiled model without metadata.json: parse model.mil's main signature."""
    text = (path / "model.mil").read_text()
    main = re.search(r"func main<\w+>\((.*?)\)\s*\{", text, re.S)
    returns = re.search(r"\}\s*->\s*\(([^)]*)\);\s*\}\s*$", text)
    if not main or not returns:
        raise UserError(f"{path} has neither metadata.json nor a readable model.mil.")
    inputs = {}
    for dtype, dims, name in re.findall(_MIL_TENSOR + r"\s+(\w+)", main.group(1)):
        inputs[name] = TensorSpec(name, _shape(dims), _MIL_DTYPES.get(dtype, dtype))
    outputs = {}
    for name in (n.strip() for n in returns.group(1).split(",")):
        typed = re.search(_MIL_TENSOR + r"\s+" + re.escape(name) + r"\s*=", text)
        outputs[name] = (TensorSpec(name, _shape(typed.group(2)), _MIL_DTYPES.get(typed.group(1), typed.group(1)))
                         if typed else TensorSpec(name, (), "unknown"))
    counts = Counter(re.findall(r"=\s*([a-z][a-z0-9_]*)\(", text[main.end():]))
    return ModelIO(path=path, inputs=inputs, outputs=outputs, op_counts=counts, compiled=True)


@lru_cache(maxsize=64)
def _describe_cached(path: str, mtime: float) -> ModelIO:
    p = Path(path)
    if p.suffix == ".mlpackage":
        return _describe_package(p)
    if (p / "metadata.json").is_file():
        return _describe_metadata_json(p)
    return _describe_model_mil(p)


def describe_model(path) -> ModelIO:
    """Input/output names, shapes and dtypes (+ user metadata and op counts) of one Core ML model."""
    p = Path(path)
    if p.suffix not in MODEL_EXTENSIONS or not p.exists():
        raise UserError(f"{p} is not a Core ML model (.mlpackage or .mlmodelc).")
    return _describe_cached(str(p.resolve()), p.stat().st_mtime)
