"""Model names -> local folders: the registry in configs/models.json, user folders, and the Hub cache.

Hub downloads go through huggingface_hub with `allow_patterns`, so only what the engines read comes
down: configs, tokenizers and safetensors weights (the fp16 variant when the repository has one).
`HF_HUB_OFFLINE=1` is honoured: then only what is already cached is used.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from backend.measure import disk_bytes
from backend.types import UserError

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_FILE = ROOT / "configs" / "models.json"
USER_MODELS_FILE = Path(os.environ.get("SILICON_DIFFUSION_HOME", Path.home() / ".silicon-diffusion")) / "models.json"
DEFAULT_MODEL = "tiny-shapes"

_CONFIG_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*.json", "tokenizer*/*.txt",
                    "silicon_diffusion.json"]
_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")


@dataclass
class ModelEntry:
    name: str
    title: str
    path: Optional[str] = None       # a local folder
    hub: Optional[str] = None        # a diffusers repository on the Hub
    coreml: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # steps, guidance, scheduler, size: over the model folder's own
    gated: bool = False              # the Hub repository needs an accepted licence and a login
    transformer_file: dict = field(default_factory=dict)  # {"repo", "file"}: a distilled transformer for `hub`
    t5: bool = True                  # False: an SD3 model that runs without T5 (what it was distilled with)
    refines: Optional[str] = None    # a second stage (the SDXL refiner): the registry model it finishes

    @property
    def local_folder(self) -> Optional[Path]:
        if not self.path:
            return None
        p = Path(self.path)
        return p if p.is_absolute() else ROOT / p


def list_models() -> list[ModelEntry]:
    entries = [ModelEntry(**{k: v for k, v in m.items() if not k.startswith("_")})
               for m in json.loads(REGISTRY_FILE.read_text())["models"]]
    if USER_MODELS_FILE.exists():
        entries += [ModelEntry(**m) for m in json.loads(USER_MODELS_FILE.read_text())]
    return entries


def coreml_availability(entry: ModelEntry) -> str:
    """How the entry runs on Core ML: from published resources (which repository and variants), or after an
    export (every family this app runs converts with `export-coreml`; SD3's T5 encoder stays MLX-only)."""
    if entry.coreml:
        variants = ", ".join(v.replace("_", "-") for v in entry.coreml.get("variants") or {"original": ""})
        return f"published: {entry.coreml['repo']} ({variants})"
    return "export first (python -m backend export-coreml)"


def get_entry(name: str) -> Optional[ModelEntry]:
    return next((m for m in list_models() if m.name == name), None)


def transformer_override(entry: Optional[ModelEntry], progress: Optional[Callable[[str], None]] = None,
                         local_only: bool = False) -> Optional[Path]:
    """The distilled transformer file a registry entry puts in place of its Hub model's (downloaded once)."""
    if entry is None or not entry.transformer_file:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError
    repo, name = entry.transformer_file["repo"], entry.transformer_file["file"]
    try:
        return Path(hf_hub_download(repo, name, local_files_only=True))
    except Exception:
        if offline() or local_only:
            raise UserError(f"{repo}/{name} is not downloaded and offline mode is on") from None
    if progress:
        progress(f"downloading the distilled transformer {repo}/{name}")
    try:
        return Path(hf_hub_download(repo, name))
    except GatedRepoError as exc:
        raise UserError(_gated_sentence(repo)) from exc
    except Exception as exc:
        raise UserError(f"cannot download {repo}/{name} ({type(exc).__name__})") from exc


def load_spec(model: str, progress: Optional[Callable[[str], None]] = None, t5: bool = True,
              local_only: bool = False):
    """(ModelSpec, whether T5 runs) for a registry name, folder or Hub id, with the registry entry's say:
    its default settings, its distilled transformer file, and whether it runs without T5. `local_only`:
    what is on disk already, never a download (a missing distilled file is then left out)."""
    from backend.checkpoint import ModelSpec
    entry = get_entry(model)
    t5 = t5 and (entry is None or entry.t5)
    try:
        distilled = transformer_override(entry, progress, local_only)
    except UserError:
        if not local_only:
            raise
        distilled = None
    skip = (() if t5 else ("text_encoder_3",)) + (("transformer",) if distilled else ())
    spec = ModelSpec.from_folder(resolve(model, progress, skip=skip, local_only=local_only))
    spec.defaults.update(entry.defaults if entry is not None else {})
    if distilled is not None:
        spec.weight_files["transformer"] = [distilled]
    return spec, t5


def add_local_model(folder: str, name: Optional[str] = None) -> ModelEntry:
    """Remember a user's model folder so the app lists it."""
    from backend.checkpoint import ModelSpec
    p = Path(folder).expanduser().resolve()
    ModelSpec.from_folder(p)  # refuse what cannot load
    entry = ModelEntry(name=name or p.name, title=f"{name or p.name} (local folder)", path=str(p))
    users = json.loads(USER_MODELS_FILE.read_text()) if USER_MODELS_FILE.exists() else []
    users = [u for u in users if u["name"] != entry.name] + [entry.__dict__]
    USER_MODELS_FILE.parent.mkdir(parents=True, exist_ok=True)
    USER_MODELS_FILE.write_text(json.dumps(users, indent=1))
    return entry


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _weight_patterns(files: list[str], skip: tuple = ()) -> list[str]:
    """Choose one set of safetensors per component: the fp16 variant when present."""
    chosen = []
    for comp in (c for c in _COMPONENTS if c not in skip):
        mine = [f for f in files if f.startswith(comp + "/") and ".safetensors" in f]
        fp16 = [f for f in mine if ".fp16." in f]
        chosen += fp16 or [f for f in mine if ".fp16." not in f]
    return chosen


def download(repo_id: str, progress: Optional[Callable[[str], None]] = None, local_only: bool = False,
             skip: tuple = ()) -> Path:
    """The local folder of a diffusers repository, downloading only what the engines read (less `skip`:
    component folders not wanted, e.g. SD3's T5 encoder when it is skipped)."""
    from huggingface_hub import snapshot_download, HfApi
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError
    if local_only or offline():
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_CONFIG_PATTERNS + ["*.safetensors", "*.json"],
                                          local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
            raise UserError(f"{repo_id} is not downloaded and the Hub cannot be reached (offline mode): "
                            "download it first from the Models tab or with network access") from exc
    try:
        files = HfApi().list_repo_files(repo_id)
    except GatedRepoError as exc:
        raise UserError(_gated_sentence(repo_id)) from exc
    except Exception as exc:
        try:
            return download(repo_id, progress, local_only=True)
        except UserError:
            raise UserError(f"the Hugging Face Hub cannot be reached to download {repo_id} ({type(exc).__name__}); "
                            "cached models and the embedded model still work") from exc
    weights = _weight_patterns(files, skip)
    if not weights:
        pickles = [f for f in files if f.endswith((".bin", ".ckpt"))]
        raise UserError(f"{repo_id} has no safetensors weights" + (
            f" (only pickle files such as {pickles[0]}, which Silicon Diffusion refuses to load because "
            "unpickling can run arbitrary code)" if pickles else ""))
    if progress:
        progress(f"downloading {len(weights)} weight files of {repo_id}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_CONFIG_PATTERNS + weights))
    except GatedRepoError as exc:
        raise UserError(_gated_sentence(repo_id)) from exc


def _gated_sentence(repo_id: str) -> str:
    return (f"{repo_id} is gated: accept its licence on huggingface.co/{repo_id} while logged in, then log in "
            "here with `hf auth login` (or set HF_TOKEN) and try again")


def resolve(model: str, progress: Optional[Callable[[str], None]] = None, skip: tuple = (),
            local_only: bool = False) -> Path:
    """A registry name, a local folder or a Hub id -> the local diffusers folder (`skip`: see download;
    `local_only`: only from the cache)."""
    if not model or not str(model).strip():
        raise UserError("no model given")
    p = Path(model).expanduser()
    if p.is_dir():
        return p.resolve()
    entry = get_entry(model)
    if entry is not None:
        if entry.local_folder is not None:
            if not entry.local_folder.is_dir():
                raise UserError(f"model {entry.name}: folder {entry.local_folder} is missing")
            return entry.local_folder
        return download(entry.hub, progress, local_only=local_only, skip=skip)
    if "/" in model and not model.startswith((".", "/")) and model.count("/") == 1:
        return download(model, progress, local_only=local_only, skip=skip)
    names = ", ".join(m.name for m in list_models())
    raise UserError(f"unknown model '{model}': give a folder, a Hub id (owner/name) or one of: {names}")


def cached_repos() -> list:
    """The model repositories in the Hugging Face cache as configured now (huggingface_hub's scan_cache_dir
    binds the cache folder when it is imported, so it is passed explicitly); [] without a readable cache."""
    try:
        from huggingface_hub import constants, scan_cache_dir
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except Exception:
        return []
    return sorted((r for r in repos if r.repo_type == "model"), key=lambda r: r.repo_id)


def cached_models() -> list[dict]:
    """Models in the Hugging Face cache, with their size on disk."""
    return [{"repo": r.repo_id, "bytes": r.size_on_disk, "path": str(r.repo_path)} for r in cached_repos()]


def delete_cached(repo_id: str) -> int:
    """Delete a repository from the Hub cache; returns the bytes freed."""
    for item in cached_models():
        if item["repo"] == repo_id:
            shutil.rmtree(item["path"])
            return item["bytes"]
    raise UserError(f"{repo_id} is not in the cache")


def folder_bytes(folder: Path) -> int:
    return disk_bytes(folder)
