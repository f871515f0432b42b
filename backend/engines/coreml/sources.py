"""Where a Core ML engine's resources come from, and the engine choice made of them (`coreml_choice`).

A local folder (Apple's variant folders original/ and split_einsum/, packages/ and compiled/, resolved to
one), or a registry entry's Hub repository and variant subfolder, downloaded with only that subfolder's
files; the entry's diffusers model, when already cached, is paired for its configs. The spec is read by
spec.py, the stages are engine.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from backend import registry
from backend.engines.coreml import resources as res
from backend.engines.coreml.engine import CoreMLStages, load_coreml_stages
from backend.engines.coreml.spec import coreml_spec, coreml_tokenizers
from backend.types import UserError


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
    if entry is not None:  # e.g. a distilled model's schedule and guidance, which its packages cannot say
        spec.defaults.update(entry.defaults)
    tokenizers = coreml_tokenizers(resources, spec, paired)

    def load(attention: Optional[str] = None, **options) -> CoreMLStages:
        chosen = resources
        if attention and attention != resources.attention:
            chosen = res.find_resources(resources_folder(model, attention, progress)[0], require_tokenizer=False)
        return load_coreml_stages(chosen, spec, attention=attention, **options)

    return EngineChoice(name=model, kind="coreml", reason=f"{reason}; {resources.attention} attention",
                        spec=spec, tokenizers=tokenizers, disk_bytes=resources.total_bytes, load=load)
