"""Model names -> local folders: the registry in configs/models.json, user folders, and the Hub cache.

Hub downloads go through huggingface_hub with `allow_patterns`, so only what the engines read comes
down: configs, tokenizers and safetensors weights (the fp16 variant when the repository has one).
`HF_HUB_OFFLINE=1` is honoured: then only what is already cached is used.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

from backend.measure import disk_bytes
from backend.types import UserError

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_FILE = ROOT / "configs" / "models.json"
USER_MODELS_FILE: Optional[Path] = None  # set to a file to override $SILICON_DIFFUSION_HOME/models.json (tests)
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
    native: dict = field(default_factory=dict)  # family, steps, guidance, scheduler, size before it is downloaded
    download_gb: Optional[float] = None  # about what a download fetches (fp16 weights; SD3 without T5)

    @property
    def local_folder(self) -> Optional[Path]:
        if not self.path:
            return None
        p = Path(self.path)
        return p if p.is_absolute() else ROOT / p


def user_models_file() -> Path:
    """Where the models a user added are remembered: $SILICON_DIFFUSION_HOME/models.json."""
    if USER_MODELS_FILE is not None:
        return Path(USER_MODELS_FILE)
    return Path(os.environ.get("SILICON_DIFFUSION_HOME", Path.home() / ".silicon-diffusion")) / "models.json"


def _entry(m: dict) -> ModelEntry:
    known = {f.name for f in fields(ModelEntry)}
    return ModelEntry(**{k: v for k, v in m.items() if k in known})


def builtin_models() -> list[ModelEntry]:
    return [_entry(m) for m in json.loads(REGISTRY_FILE.read_text())["models"]]


def _user_records() -> list[dict]:
    """The user file's entries as written (an unreadable or malformed file holds none)."""
    try:
        data = json.loads(user_models_file().read_text())
    except (OSError, ValueError):
        return []
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def list_models() -> list[ModelEntry]:
    """The registry, then the user's entries: never one that would shadow a built-in name, and a folder entry
    only with an absolute path (an entry written by hand that breaks these rules is left out)."""
    entries = builtin_models()
    names = {e.name for e in entries}
    for m in _user_records():
        name, path = m.get("name"), m.get("path")
        if not isinstance(name, str) or not name or name in names or not isinstance(m.get("title", ""), str):
            continue
        if path is not None and (not isinstance(path, str) or not Path(path).is_absolute()):
            continue
        if path is None and not isinstance(m.get("hub"), str):
            continue
        try:
            entries.append(_entry({"title": name, **m}))
        except TypeError:
            continue
        names.add(name)
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


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_COMPONENT_ENTRIES = 200  # a model component folder holds a few files; more is not a model's folder


def not_a_model_folder(folder: Path) -> str:
    """The sentence for a folder without model_index.json ("/", a home folder, any other folder)."""
    p = Path(folder)
    home = Path.home().resolve()
    kind = ("the filesystem root" if p == Path(p.anchor) else "a home folder" if p in (home, *home.parents)
            else "not a model folder")
    return (f"{p} is {kind}{', not a model folder' if kind != 'not a model folder' else ''}: it has no "
            "model_index.json. Give the folder of one diffusers model (model_index.json, unet/ or transformer/, "
            "vae/, text encoders and tokenizers); folders are not searched")


def _weights_in(component: Path) -> None:
    """A component folder holds safetensors weights (a bounded listing of that folder, nothing deeper)."""
    names = []
    if component.is_dir():
        for entry in component.iterdir():
            names.append(entry.name)
            if len(names) > _COMPONENT_ENTRIES:
                raise UserError(f"{component.name}/ holds more than {_COMPONENT_ENTRIES} entries: not a model "
                                "component folder")
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    if pickles:
        raise UserError(f"{component.name}/ only has pickle weights ({pickles[0]}); Silicon Diffusion loads "
                        "safetensors only, since unpickling a checkpoint can run arbitrary code")
    raise UserError(f"{component.parent.name}/{component.name}/ has no weights (.safetensors): "
                    "the model folder is incomplete")


def check_model_folder(folder: Path):
    """The ModelSpec of a folder that holds a whole model: its configs, complete tokenizers and safetensors
    weights for every component, each checked by name in that folder alone (a few reads, never a search);
    else one sentence naming what is missing."""
    from backend.checkpoint import ModelSpec
    from backend.tokenizer import CLIPTokenizer, T5Tokenizer
    p = Path(folder)
    if not p.is_dir():
        raise UserError(f"{p} is not a folder")
    if not (p / "model_index.json").is_file():
        raise UserError(not_a_model_folder(p))
    spec = ModelSpec.from_folder(p)
    for _, tokenizer in spec.traits.encoders:
        CLIPTokenizer.from_folder(p / tokenizer)
    if spec.has_t5:
        T5Tokenizer.from_folder(p / spec.traits.t5[1])
    for component in (*spec.text_encoders, spec.traits.denoiser, "vae"):
        _weights_in(p / component)
    return spec


def add_local_model(folder: str, name: Optional[str] = None) -> ModelEntry:
    """Remember a user's model folder so the app lists it. Only a folder that holds a model is remembered (see
    check_model_folder: "/", a home folder or any other folder is one quick sentence, never a search), given
    by its full path, under a name that is not a built-in one; the file is written only after every check."""
    text = (folder or "").strip()
    if not text:
        raise UserError("give the full path of a model folder")
    p = Path(text).expanduser()
    if not p.is_absolute():
        raise UserError(f"give the folder's full path: {text} is relative")
    try:
        p = p.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UserError(f"{text} does not exist") from None
    check_model_folder(p)
    name = (name or "").strip() or p.name
    if not MODEL_NAME.fullmatch(name):
        raise UserError(f"'{name}' cannot name a model: use up to 64 letters, digits, '.', '_' or '-' "
                        "(no '/', so that it is never taken for a path or a Hub id); give a name")
    if name in {m.name for m in builtin_models()}:
        raise UserError(f"'{name}' is a built-in model's name: give this folder another name")
    entry = ModelEntry(name=name, title=f"{name} (local folder)", path=str(p))
    users = [u for u in _user_records() if u.get("name") != entry.name]
    users.append({"name": entry.name, "title": entry.title, "path": entry.path})
    target = user_models_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(users, indent=1))
    tmp.replace(target)
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
        if not (p / "model_index.json").is_file():
            raise UserError(not_a_model_folder(p.resolve()))
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


def model_folder_bytes(folder: Path) -> int:
    """Bytes of a model folder: its files and its component folders' files (symlinks followed, as in the Hub
    cache), one level deep and bounded, so that a folder entry never makes a walk of a whole disk."""
    total, seen = 0, 0
    p = Path(folder)
    if not (p / "model_index.json").is_file():
        return 0
    for entry in p.iterdir():
        seen += 1
        for item in (entry.iterdir() if entry.is_dir() else [entry]):
            seen += 1
            if seen > 20 * _COMPONENT_ENTRIES:
                return total
            try:
                if item.is_file():
                    total += item.stat().st_size
            except OSError:
                pass
    return total


def hub_token_found() -> bool:
    """Whether huggingface_hub finds a login (HF_TOKEN or `hf auth login`'s token file); no network."""
    try:
        from huggingface_hub import get_token
        return bool(get_token())
    except Exception:
        return False


def _has_weights(repo) -> bool:
    """A cached repository holds weights, not only the configs a settings look-up may have fetched."""
    return any(f.file_name.endswith(".safetensors") for rev in repo.revisions for f in rev.files)


def _has_file(repo, name: str) -> bool:
    return any(str(f.file_path.relative_to(rev.snapshot_path)) == name for rev in repo.revisions for f in rev.files)


@dataclass
class ModelStatus:
    state: str                       # embedded, local folder, missing, downloaded, not downloaded, needs Hub login
    detail: str = ""                 # one sentence more (what to do)
    download_gb: Optional[float] = None   # what a download fetches, about (registry)
    disk_bytes: int = 0              # on disk now
    coreml: str = ""                 # published (repository, variants, downloaded or not) or needs export

    @property
    def downloaded(self) -> bool:
        return self.state in ("embedded", "local folder", "downloaded")


def model_status(entry: ModelEntry, repos: Optional[dict] = None, token: Optional[bool] = None) -> ModelStatus:
    """An entry's state for the Models tab, from the Hub cache as scanned once (`repos`: repo id -> cached repo
    info, from cached_repos()) and whether a Hub login is found; reads nothing from the network."""
    repos = {r.repo_id: r for r in cached_repos()} if repos is None else repos
    coreml = coreml_availability(entry)
    if entry.coreml:
        coreml += " · downloaded" if entry.coreml.get("repo") in repos else ""
    else:
        coreml = "needs export for Core ML (export-coreml)"
    if entry.local_folder is not None:
        inside = not Path(entry.path).is_absolute()
        if not entry.local_folder.is_dir():
            return ModelStatus("missing", f"{entry.local_folder} is not there", coreml=coreml)
        return ModelStatus("embedded" if inside else "local folder", "ships with the app" if inside else str(
            entry.local_folder), disk_bytes=model_folder_bytes(entry.local_folder), coreml=coreml)
    repo = repos.get(entry.hub)
    extra = entry.transformer_file or {}
    distilled = repos.get(extra.get("repo")) if extra else None
    if repo is not None and _has_weights(repo) and (not extra or (distilled is not None and
                                                                  _has_file(distilled, extra["file"]))):
        disk = repo.size_on_disk + (distilled.size_on_disk if distilled is not None else 0)
        return ModelStatus("downloaded", "in the Hugging Face cache", entry.download_gb, disk, coreml)
    if entry.gated and not (hub_token_found() if token is None else token):
        return ModelStatus("needs Hub login", _gated_sentence(entry.hub), entry.download_gb, coreml=coreml)
    detail = (f"gated: accept its licence on huggingface.co/{entry.hub} before downloading" if entry.gated
              else "download it here (or the first generation downloads it)")
    return ModelStatus("not downloaded", detail, entry.download_gb, coreml=coreml)


def native_defaults(entry: Optional[ModelEntry]) -> Optional[dict]:
    """An entry's settings before it is downloaded: its `native` (family, steps, guidance, scheduler, size)
    under its `defaults`; None when the registry does not record them all."""
    if entry is None:
        return None
    d = {**entry.native, **entry.defaults}
    if not all(k in d for k in ("family", "steps", "guidance", "scheduler", "size")):
        return None
    return d


def download_files(repo_id: str, patterns: list, progress: Optional[Callable[[str], None]] = None) -> Path:
    """The local snapshot of a small repository's top-level files (`patterns`, e.g. a tiny VAE's config.json and
    safetensors), downloaded once; from the cache only in offline mode. UserError when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        if offline():
            raise UserError(f"{repo_id} is not downloaded and the Hub cannot be reached (offline mode)") from exc
    if progress:
        progress(f"downloading {repo_id}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # no network, unknown repository, ...
        raise UserError(f"cannot download {repo_id} ({type(exc).__name__})") from exc
