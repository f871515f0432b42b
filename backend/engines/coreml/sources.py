"""Where a Core ML engine's resources come from, Apple's default settings for them, and `coreml_choice`.

Registry entries name a Hub repository and its variant folders by attention ("original": "original",
"split_einsum_v2": "split_einsum_v2", or "" for a repository whose root holds compiled/ and packages/, as
apple/coreml-stable-diffusion-xl-base). Each variant folder holds Apple's compiled models (`compiled/`,
`.mlmodelc`) and/or the editable packages (`packages/`, `.mlpackage`). The layouts relied on, with their
sources, are recorded in tests/fixtures/coreml_hub_layouts.json.

- `plan_download`: from a repository's file list, the one folder to use and only the files the request
  needs: compiled first (a load then compiles nothing), packages only to quantize or re-export; the text
  encoders, one UNet (the whole one on a Mac, the chunks only when there is no whole one), the VAE decoder
  and the tokenizer files; no safety checker, no VAE encoder, no refiner unless asked for.
- `recommended_settings`: the attention variant to fetch, as Apple's Mac app chooses it (from the asked
  compute units, else the Mac's performance cores); the engine then runs "auto" units as that attention
  is made for (runtime.UNITS_FOR_ATTENTION).
- `coreml_choice`: select.choose_engine's Core ML branch.
"""
from __future__ import annotations

import fnmatch
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from backend import registry
from backend.engines.base import EngineChoice
from backend.engines.coreml import resources as res
from backend.engines.coreml.engine import CoreMLStages, load_coreml_stages
from backend.engines.coreml.spec import coreml_spec, coreml_tokenizers
from backend.types import UserError

TOKENIZER_FILES = ("vocab.json", "merges.txt")
#: the stages a text-to-image run needs, besides the UNet (text encoders are taken when present)
_TEXT_STAGES = ("TextEncoder", "TextEncoder2")


@dataclass
class DownloadPlan:
    folder: str             # the folder inside the repository that will hold the models ("" = root)
    patterns: list          # allow_patterns for snapshot_download
    stages: dict            # stage -> model folder name inside `folder`
    compiled: bool


def _model_dirs(files, folder: str) -> dict:
    """stage -> model folder name, for the models directly inside `folder` of a repository file list."""
    prefix = f"{folder}/" if folder else ""
    found = {}
    for name in files:
        if not name.startswith(prefix):
            continue
        top = name[len(prefix):].split("/", 1)[0]
        stage = res.stage_of(Path(top))
        if stage is not None and "/" in name[len(prefix):]:
            found.setdefault(stage, top)
    return found


def _needed(found: dict, refiner: bool, vae_encoder: bool) -> Optional[list]:
    """The stages to fetch from one folder's models, or None when a needed one is missing."""
    if refiner:
        denoiser = ["UnetRefiner"]
        text = ["TextEncoder2"]
    else:
        denoiser = ["Unet"] if "Unet" in found else ["UnetChunk1", "UnetChunk2"]
        text = [s for s in _TEXT_STAGES if s in found]
        if any(res.is_mmdit_stage(s) for s in found):
            denoiser = [s for s in found if res.is_mmdit_stage(s)]
    wanted = text + denoiser + ["VAEDecoder"] + (["VAEEncoder"] if vae_encoder else [])
    return wanted if text and all(s in found for s in wanted) else None


def plan_download(files, variant: str, packages: bool = False, refiner: bool = False,
                  vae_encoder: bool = False) -> DownloadPlan:
    """What to fetch of a repository (its file list) for one variant folder: see the module docstring."""
    root = variant.strip("/")
    join = (lambda *parts: "/".join(p for p in parts if p))
    listed = set(files)
    kinds = ("packages", "") if packages else ("compiled", "packages", "")
    for kind in kinds:  # "": models directly in the variant folder (MobileDiffuser's coremlsd3_*step/)
        folder = join(root, kind)
        found = _model_dirs(files, folder)
        stages = _needed(found, refiner, vae_encoder)
        if stages is None or (packages and any(not found[s].endswith(".mlpackage") for s in stages)):
            continue
        patterns = [join(folder, found[s], "*") for s in stages]
        # the CLIP tokenizer files live beside the compiled models (also needed with the packages)
        tokenizer_dirs = {folder, join(root, "compiled"), root}
        patterns += sorted(join(d, f) for d in tokenizer_dirs for f in TOKENIZER_FILES
                           if join(d, f) in listed)
        return DownloadPlan(folder=folder, patterns=patterns, stages={s: found[s] for s in stages},
                            compiled=found[stages[0]].endswith(".mlmodelc"))
    what = "packages (.mlpackage)" if packages else "models"
    raise UserError(f"the Core ML repository has no complete set of {what} in {root or 'its root'}/"
                    f"{'packages' if packages else 'compiled or packages'}")


@lru_cache(maxsize=1)
def performance_cores() -> Optional[int]:
    """The Mac's performance cores (sysctl hw.perflevel0.physicalcpu), None elsewhere or when unknown."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True,
                             timeout=5)
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def recommended_settings(offered, attention: Optional[str] = None, units: Optional[str] = None,
                         cores: Optional[int] = None) -> tuple:
    """(attention, reason) among the attentions `offered`, as swift-coreml-diffusers chooses on a Mac
    (ModelInfo.defaultAttention, PipelineLoader.variant @ a561fae): asked units decide the attention
    (CPU_ONLY / CPU_AND_GPU: original; CPU_AND_NE: split-einsum, v2 where offered; ALL: split-einsum); with
    units "auto", ORIGINAL (run on CPU_AND_GPU) on a Mac with 8 or more performance cores (or unknown), else
    split-einsum (run on CPU_AND_NE). Apple's README: ORIGINAL for cpuAndGPU on Mac, SPLIT_EINSUM for the
    Neural Engine. A choice the resources do not offer falls back to what they have."""
    offered = list(offered)
    engine = [a for a in res.NEURAL_ENGINE_ATTENTIONS if a in offered]
    if attention:
        if attention in offered:
            return attention, f"{attention} attention as asked"
        if attention in res.NEURAL_ENGINE_ATTENTIONS and engine:
            return engine[0], f"{engine[0]} attention (the Neural Engine variant offered)"
        raise UserError(f"no {attention} Core ML variant here (there is {', '.join(offered)})")
    if units in ("CPU_ONLY", "CPU_AND_GPU"):
        wanted, why = ["original"], f"original attention for {units}"
    elif units == "CPU_AND_NE":
        wanted, why = engine[::-1], "split-einsum attention for the Neural Engine"
    elif units == "ALL":
        wanted, why = engine, "split-einsum attention for ALL"
    elif cores is not None and cores < 8:
        wanted, why = engine, f"split-einsum attention on CPU_AND_NE ({cores} performance cores)"
    else:
        wanted, why = ["original"], "ORIGINAL attention on CPU_AND_GPU, Apple's choice for Macs"
    for choice in wanted:
        if choice in offered:
            return choice, why
    return offered[0], f"{offered[0]} attention (the only variant offered)"


# ---------------------------------------------------------------- local folders and the Hub

def _local_variants(folder: Path) -> list:
    """Apple's variant folders inside a local folder (original/, split_einsum(_v2)/), or [] when it has none."""
    return [a for a in res.ATTENTIONS if (folder / a).is_dir()]


def _local_folder(folder: Path, packages: bool) -> Path:
    """compiled/ first (loads without compiling), packages/ when asked for or alone, else the folder itself."""
    compiled = folder / "compiled"
    if not packages and compiled.is_dir() and any(res.stage_of(p) for p in compiled.iterdir()):
        return compiled
    return folder / "packages" if (folder / "packages").is_dir() else folder


def _repo_files(repo: str) -> list:
    """The repository's file list: the Hub's, or the cached snapshot's when offline."""
    from huggingface_hub import HfApi, snapshot_download
    if not registry.offline():
        try:
            return HfApi().list_repo_files(repo)
        except Exception:
            pass
    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True, allow_patterns=["*.json"]))
    except Exception:
        return []
    return [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]


def _download(repo: str, plan: DownloadPlan, progress) -> Path:
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(repo, allow_patterns=plan.patterns, local_files_only=True)) / plan.folder
        if all((folder / name).is_dir() for name in plan.stages.values()):
            return folder
    except Exception:
        pass
    if registry.offline():
        raise UserError(f"the Core ML resources {repo}/{plan.folder} are not downloaded and offline mode is on")
    if progress:
        progress(f"downloading Core ML resources {repo}/{plan.folder} ({', '.join(plan.stages)})")
    try:
        return Path(snapshot_download(repo, allow_patterns=plan.patterns)) / plan.folder
    except Exception as exc:
        raise UserError(f"cannot download the Core ML resources {repo}/{plan.folder} "
                        f"({type(exc).__name__}: {exc})") from exc


def entry_plan(entry, attention: Optional[str] = None, units: Optional[str] = None, packages: bool = False,
               files=None, refiner: bool = False, vae_encoder: bool = False) -> tuple:
    """(plan, chosen attention, reason) for a registry entry's Core ML resources."""
    variants = entry.coreml.get("variants") or {"original": ""}
    chosen, reason = recommended_settings(variants, attention, units, performance_cores())
    files = _repo_files(entry.coreml["repo"]) if files is None else files
    if not files:
        why = "offline mode is on" if registry.offline() else "the Hub cannot be reached"
        raise UserError(f"the Core ML resources {entry.coreml['repo']} are not downloaded and {why}")
    plan = plan_download(files, variants[chosen], packages=packages,
                         refiner=refiner or entry.coreml.get("denoiser") == res.REFINER, vae_encoder=vae_encoder)
    return plan, chosen, reason


def planned_download_bytes(entry) -> Optional[int]:
    """Bytes the entry's default plan would download, from the Hub's file sizes (None when unknown)."""
    from huggingface_hub import HfApi
    try:
        info = HfApi().model_info(entry.coreml["repo"], files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings}
        plan = entry_plan(entry, files=list(sizes))[0]
    except Exception:
        return None
    return sum(n for name, n in sizes.items() if any(fnmatch.fnmatch(name, p) for p in plan.patterns))


@dataclass
class Located:
    folder: Path            # the folder holding the models
    entry: object           # the registry entry, or None for a local folder
    offered: list           # the attention variants there are
    attention: str          # the one chosen ("" when a local folder has no variant folders)
    reason: str


def locate(model: str, attention: Optional[str] = None, units: Optional[str] = None, packages: bool = False,
           progress=None, refiner: bool = False) -> Located:
    """The resources folder of a local folder or a registry name, for the asked attention / compute units."""
    units = None if units == "auto" else units
    local = Path(model).expanduser()
    if local.is_dir():
        variants = _local_variants(local)
        if not variants:
            return Located(_local_folder(local, packages), None, [], "", "local resources")
        chosen, reason = recommended_settings(variants, attention, units, performance_cores())
        return Located(_local_folder(local / chosen, packages), None, variants, chosen, reason)
    entry = registry.get_entry(model)
    if entry is None or not entry.coreml:
        raise UserError(f"model '{model}' has no Core ML resources; export them with "
                        "`python -m backend export-coreml` or choose the MLX engine")
    plan, chosen, reason = entry_plan(entry, attention, units, packages, refiner=refiner)
    folder = _download(entry.coreml["repo"], plan, progress)
    return Located(folder, entry, list(entry.coreml.get("variants") or {"original": ""}), chosen, reason)


def coreml_choice(model: str, reason: str, progress=None, refiner: bool = False):
    """select.choose_engine's Core ML branch: resolve the resources, read their spec, load on demand.
    `refiner`: the SDXL refiner bundled in the resources (a registry entry whose denoiser is UnetRefiner, or
    any folder of Apple's --refiner-version layout given as a refiner)."""
    first = locate(model, progress=progress, refiner=refiner)
    refiner = refiner or (first.entry is not None and first.entry.coreml.get("denoiser") == res.REFINER)
    resources = res.find_resources(first.folder, require_tokenizer=False, refiner=refiner)
    paired = _paired_folder(first.entry)
    spec = coreml_spec(resources, paired)
    if first.entry is not None:  # e.g. a distilled model's schedule and guidance, which its packages cannot say
        spec.defaults.update(first.entry.defaults)
    tokenizers = coreml_tokenizers(resources, spec, paired)

    def load(attention: Optional[str] = None, quantization: Optional[str] = None, compute_units: str = "auto",
             **options) -> CoreMLStages:
        chosen, packages = resources, bool(quantization) and resources.compiled
        wanted = recommended_settings(first.offered, attention, None if compute_units == "auto" else compute_units,
                                      performance_cores())[0] if first.offered else first.attention
        if wanted != first.attention or packages:  # another variant's folder, or the packages to quantize
            chosen = res.find_resources(locate(model, wanted or None, None, packages, progress, refiner).folder,
                                        require_tokenizer=False, refiner=refiner)
        def fetch_model(stage: str) -> Optional[Path]:
            """A model the first download left out (the VAE encoder, for image-to-image), from the same variant."""
            if first.entry is None or stage != "VAEEncoder":
                return None
            plan, _, _ = entry_plan(first.entry, chosen.attention if chosen.attention in first.offered else None,
                                    None, packages=not chosen.compiled, vae_encoder=True, refiner=refiner)
            return _download(first.entry.coreml["repo"], plan, progress) / plan.stages[stage]

        return load_coreml_stages(chosen, spec, attention=attention, quantization=quantization,
                                  compute_units=compute_units, fetch_model=fetch_model, **options)

    return EngineChoice(name=model, kind="coreml", reason=f"{reason}; {first.reason}",
                        spec=spec, tokenizers=tokenizers, disk_bytes=resources.total_bytes, load=load)


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
