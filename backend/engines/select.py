"""Chooses the engine for a model: Core ML where it can run, MLX otherwise, always with the reason."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from backend import registry
from backend.engines import machine
from backend.engines.base import EngineChoice
from backend.measure import disk_bytes
from backend.types import UserError

ENGINES = ("auto", "coreml", "mlx")


def _mlx_device() -> str:
    import mlx.core as mx
    return "GPU" if mx.default_device() == mx.gpu else "CPU"


def _mlx_choice(model: str, reason: str, progress, t5: bool = True) -> EngineChoice:
    from backend.engines.mlx.engine import load_mlx_stages
    from backend.tokenizer import CLIPTokenizer, T5Tokenizer
    spec, t5 = registry.load_spec(model, progress, t5)
    folder = spec.folder
    tokenizers = [CLIPTokenizer.from_folder(folder / t) for _, t in spec.traits.encoders]
    if spec.has_t5 and t5:
        tokenizers.append(T5Tokenizer.from_folder(folder / spec.traits.t5[1]))
    return EngineChoice(name=model, kind="mlx", reason=reason, spec=spec, tokenizers=tokenizers,
                        disk_bytes=disk_bytes(folder) + sum(disk_bytes(f) for files in spec.weight_files.values()
                                                            for f in files),
                        load=lambda **opts: load_mlx_stages(spec, t5=t5, **opts))


def _coreml_choice(model: str, reason: str, progress, refiner: bool = False) -> EngineChoice:
    from backend.engines.coreml.sources import coreml_choice
    return coreml_choice(model, reason, progress, refiner=refiner)


ATTENTION_FOLDERS = ("original", "split_einsum", "split_einsum_v2")


def _first_entries(folder: Path, limit: int = 200) -> list:
    """At most `limit` entries of a folder (a model folder holds a handful; "/" or a home folder many more)."""
    entries = []
    for entry in folder.iterdir():
        entries.append(entry)
        if len(entries) >= limit:
            break
    return entries


def coreml_resources_for(model: str) -> Optional[str]:
    """The Core ML resources a model offers: a local Apple-layout folder or a registry entry's repository."""
    p = Path(model).expanduser()
    if p.is_dir():
        # the models themselves, or Apple's variant folders (original/compiled/, split_einsum_v2/packages/ ...):
        # only those places are looked at, so a folder like "/" is never walked
        if (p / "model_index.json").exists():
            return None
        places = [p] + [p / a / k for a in ("", *ATTENTION_FOLDERS) for k in ("", "compiled", "packages")]
        found = any(c.suffix in (".mlpackage", ".mlmodelc") for place in places if place.is_dir()
                    for c in _first_entries(place))
        return str(p) if found else None
    entry = registry.get_entry(model)
    return entry.coreml.get("repo") if entry is not None and entry.coreml else None


def choose_engine(model: str, engine: str = "auto", progress=None, t5: bool = True,
                  refiner: bool = False) -> EngineChoice:
    """`t5=False`: SD3 models run without their T5 encoder (not downloaded, not loaded; zeros in its place).
    `refiner`: the model is wanted as a second stage (Core ML: the resources' UnetRefiner)."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}': choose one of {', '.join(ENGINES)}")
    blocked = machine.coreml_unavailable_reason()
    resources = coreml_resources_for(model)
    if engine == "coreml":
        if blocked:
            raise UserError(f"Core ML was asked for, but {blocked}; choose the MLX engine (or auto)")
        if not resources:
            raise UserError(f"model '{model}' has no Core ML resources; export them with "
                            "`python -m backend export-coreml` or choose the MLX engine")
        return _coreml_choice(model, "Core ML was asked for", progress, refiner)
    if engine == "mlx":
        return _mlx_choice(model, f"MLX was asked for; running MLX on the {_mlx_device()}", progress, t5)
    why = blocked or "this model has no Core ML resources"
    if blocked and resources and Path(model).expanduser().is_dir():
        raise UserError(f"{model} holds only Core ML resources, and {blocked}; give its diffusers folder for MLX")
    if blocked is None and resources:
        try:
            return _coreml_choice(model, "Core ML resources are available and this Mac can run them", progress,
                                  refiner)
        except UserError as exc:  # not cached and not downloadable now, or unreadable: MLX still runs
            why = f"Core ML resources could not be used ({exc})"
    return _mlx_choice(model, f"{why}; running MLX on the {_mlx_device()}", progress, t5)
