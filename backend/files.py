"""Bounded reads of the small files a model folder holds (configs, tokenizers, indexes, manifests).

A model folder may come from anywhere (a download, a path typed in the app), so its small files are read only
when they are regular files under a size limit, as UTF-8, and a missing, oversized, binary or malformed file
is one sentence naming it, never a traceback or an unbounded read. Weights are not read here (safetensors
only, by the engines).
"""
from __future__ import annotations

import json
from pathlib import Path

from backend.types import UserError

CONFIG_BYTES = 1 << 20         # a config.json, model_index.json, scheduler or tokenizer settings: a few kB
TOKENIZER_BYTES = 32 << 20     # vocab.json, merges.txt, tokenizer.json (T5's is 2.4 MB, CLIP's 3.6 MB)


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def read_text(path, limit: int = CONFIG_BYTES) -> str:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{_name(path)} is missing from {path.parent.parent}")
    if not path.is_file():
        raise UserError(f"{_name(path)} is not a regular file")
    size = path.stat().st_size
    if size > limit:
        raise UserError(f"{_name(path)} is {size / 2**20:.1f} MB, more than such a file can be "
                        f"({limit / 2**20:.0f} MB): not read")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{_name(path)} is not a text file") from None
    except OSError as exc:
        raise UserError(f"cannot read {_name(path)}: {exc.strerror or exc}") from None


def read_json(path, limit: int = CONFIG_BYTES):
    path = Path(path)
    try:
        return json.loads(read_text(path, limit))
    except json.JSONDecodeError as exc:
        raise UserError(f"{_name(path)} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
