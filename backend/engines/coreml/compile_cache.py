"""Compiled Core ML models, made once per package: `.mlpackage` -> `.mlmodelc`, cached by the package's hash.

Core ML compiles an `.mlpackage` every time `MLModel(path)` loads it (minutes for an SD UNet). Here a
package is compiled once, into `<home>/coreml-compiled/<sha256 of the package's files>/<name>.mlmodelc`,
and every later load (another process, another compute unit, reduce-memory's load per stage) reuses it.
The hash covers every file's relative path and bytes; it is remembered per file signature (size and
modification time of each file) in `hashes.json`, so an unchanged package is not read again. A compile is
written to a hidden `.<name>.mlmodelc` folder and renamed when it is complete, so an interrupted one is never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

_LOCK = threading.Lock()


def cache_root() -> Path:
    home = Path(os.environ.get("SILICON_DIFFUSION_HOME", Path.home() / ".silicon-diffusion"))
    return home / "coreml-compiled"


def _files(package: Path) -> list:
    return sorted(p for p in package.rglob("*") if p.is_file())


def _signature(package: Path) -> str:
    return json.dumps([[str(p.relative_to(package)), p.stat().st_size, p.stat().st_mtime_ns]
                       for p in _files(package)])


def package_hash(package: Path, root: Path) -> str:
    """sha256 of the package's files (paths and contents), remembered per file signature in root/hashes.json."""
    package = Path(package).resolve()
    index_file = root / "hashes.json"
    signature = _signature(package)
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    known = index.get(str(package))
    if known and known.get("signature") == signature:
        return known["sha256"]
    digest = hashlib.sha256()
    for path in _files(package):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()
    index[str(package)] = {"signature": signature, "sha256": value}
    root.mkdir(parents=True, exist_ok=True)
    tmp = index_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(index_file)
    return value


def compiled_model(package, compile_fn: Callable[[str, str], str], root: Path | None = None) -> Path:
    """The cached `.mlmodelc` of `package`, compiled with `compile_fn(package, destination)` only if absent
    (coremltools.models.utils.compile_model on a Mac)."""
    package = Path(package)
    root = Path(root) if root is not None else cache_root()
    with _LOCK:
        target = root / package_hash(package, root) / (package.stem + ".mlmodelc")
        if target.is_dir():
            return target
        # coremltools wants a destination ending in .mlmodelc; the dot prefix marks it unfinished
        partial = target.with_name("." + target.name)
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        produced = Path(compile_fn(str(package), str(partial)))
        if produced != partial:  # a compiler that chose its own destination
            shutil.move(str(produced), str(partial))
        partial.rename(target)
        return target
