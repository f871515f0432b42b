"""Where LoRA files are found for the app and the HTTP API: the LoRA folder and the Hugging Face cache.

- the LoRA folder: `$SILICON_DIFFUSION_LORA_DIR`, else `~/.silicon-diffusion/loras/` (and one level of
  subfolders), every `.safetensors` file;
- the Hub cache: the top-level `.safetensors` files of cached repositories that are not diffusers models
  (no `model_index.json`), which is how LoRA repositories are published.
Reading and applying a LoRA is backend/lora.py's.
"""
from __future__ import annotations

import os
from pathlib import Path

from backend import lora, registry
from backend.types import UserError

MAX_FILES = 200


def lora_folder() -> Path:
    home = Path(os.environ.get("SILICON_DIFFUSION_HOME", Path.home() / ".silicon-diffusion"))
    return Path(os.environ.get("SILICON_DIFFUSION_LORA_DIR") or home / "loras").expanduser()


def _hub_loras() -> list:
    found = []
    for repo in registry.cached_repos():
        revision = next(iter(repo.revisions), None)
        if revision is None:
            continue
        top = sorted(f.file_name for f in revision.files if f.file_path.parent == revision.snapshot_path)
        if "model_index.json" not in top:
            found += [revision.snapshot_path / name for name in top if name.endswith(".safetensors")]
    return found


def find_lora_files() -> list:
    """LoRA files in the LoRA folder (and its subfolders, one level) and the Hub cache, at most MAX_FILES."""
    folder = lora_folder()
    local = []
    if folder.is_dir():
        local = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*/*.safetensors")))
    return (local + _hub_loras())[:MAX_FILES]


def resolve(name: str) -> str:
    """A LoRA given by path, or by the file name of one find_lora_files finds."""
    if Path(name).expanduser().is_file():
        return name
    matches = [f for f in find_lora_files() if f.name == name]
    if not matches:
        raise UserError(f"LoRA {name} was not found (give a path, or put it in {lora_folder()})")
    return str(matches[0])


def parse_lora_list(text) -> list:
    """"a.safetensors:0.8, b.safetensors" (the CLI's FILE[:SCALE], comma- or line-separated) -> [(path, scale)]."""
    entries = [part.strip() for part in str(text or "").replace("\n", ",").split(",") if part.strip()]
    chosen = []
    for entry in entries:
        name, scale = lora.parse_spec(entry)
        chosen.append((resolve(name), scale))
    return [(str(path), scale) for path, scale in lora.normalize(chosen)]


def file_sha256(path) -> str:
    """The hash results record for a LoRA file (backend.lora.read's)."""
    return lora.read(path).sha256
