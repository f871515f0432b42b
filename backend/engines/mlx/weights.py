"""Checkpoint weights -> MLX modules: the one weight-name map of the diffusers/transformers family.

The MLX modules mirror diffusers' and transformers' attribute names, so a checkpoint name is
already a module path; this file only handles what differs:
- convolution kernels: PyTorch (O, I, kH, kW) -> MLX (O, kH, kW, I);
- 1x1 convolutions stored where the module is a Linear (old VAE attention, SD 2 proj_in): squeezed;
- Linear stored where the module is a 1x1 conv (SD 1.x proj_in/proj_out): expanded;
- the deprecated VAE attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0;
- buffers that are not parameters (transformers' position_ids) are dropped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten  # noqa: F401  (re-exported)

from backend import files

_RENAMES = (
    (".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0."),
)
_DROP_SUFFIXES = ("position_ids",)


class WeightError(ValueError):
    """The checkpoint's weights don't fit the model its config describes."""


def rename(name: str) -> str:
    for old, new in _RENAMES:
        if old in name:
            name = name.replace(old, new)
    return name


def _fit(name: str, value: mx.array, target_shape: tuple) -> mx.array:
    if value.ndim == 4 and len(target_shape) == 4:
        # Checked before the plain match: a 3-channel 3x3 kernel (O, 3, 3, 3) fits either way.
        moved = value.transpose(0, 2, 3, 1)
        if tuple(moved.shape) == tuple(target_shape):
            return moved
    if tuple(value.shape) == tuple(target_shape):
        return value
    if value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
        return value.reshape(value.shape[0], value.shape[1])
    if value.ndim == 2 and len(target_shape) == 4 and tuple(target_shape[1:3]) == (1, 1):
        return value.reshape(value.shape[0], 1, 1, value.shape[1])
    raise WeightError(f"weight {name}: checkpoint shape {tuple(value.shape)} does not fit model shape {tuple(target_shape)}")


def to_module_weights(module: nn.Module, weights: Mapping[str, mx.array] | Iterable, dtype=None) -> list:
    """Map checkpoint (name, array) pairs onto `module`'s parameters; all must match, both ways."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    params = dict(tree_flatten(module.parameters()))
    out, seen = [], set()
    for name, value in items:
        if name.endswith(_DROP_SUFFIXES):
            continue
        key = rename(name)
        if key not in params:
            raise WeightError(f"checkpoint weight {name} has no place in the model (is the config right?)")
        if not isinstance(value, mx.array):
            value = mx.array(value)
        value = _fit(name, value, params[key].shape)
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        out.append((key, value))
        seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise WeightError(f"{len(missing)} model weights are missing from the checkpoint: {shown}")
    return out


def load_into(module: nn.Module, weights, dtype=None, before_eval=None) -> nn.Module:
    """Load checkpoint weights into `module` (cast once to `dtype`) and evaluate them. `before_eval(module)` changes
    the module while its weights are still unevaluated: on-the-fly quantization then reads, casts and quantizes
    each layer in turn, and the component never stands whole at full precision."""
    module.load_weights(to_module_weights(module, weights, dtype), strict=True)
    if before_eval is not None:
        before_eval(module)
        for _, layer in tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module):
            mx.eval(layer.parameters())  # one layer at a time: one evaluation of them all held more at once
    mx.eval(module.parameters())
    return module


def safetensors_files(component_dir: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component folder, following a sharded index if present.

    Prefers `*.{variant}.safetensors` when `variant` (e.g. "fp16") exists. A folder that only has
    pickle files is refused: loading them would run arbitrary code.
    """
    component_dir = Path(component_dir)
    names = [p.name for p in component_dir.iterdir()] if component_dir.is_dir() else []
    for want_variant in ([variant] if variant else []) + [None]:
        for name in sorted(names):
            is_index = name.endswith(".safetensors.index.json")
            stem_parts = name.split(".")
            has_variant = want_variant is not None and f".{want_variant}." in f".{name}"
            plain = len(stem_parts) == (4 if is_index else 2)
            if is_index and (has_variant or (want_variant is None and plain)):
                index = files.read_json(component_dir / name, files.TOKENIZER_BYTES)
                return [component_dir / f for f in sorted(set(index["weight_map"].values()))]
        for name in sorted(names):
            if not name.endswith(".safetensors"):
                continue
            parts = name.split(".")
            if want_variant is not None and len(parts) == 3 and parts[1] == want_variant and "-of-" not in name:
                return [component_dir / name]
            if want_variant is None and len(parts) == 2 and "-of-" not in name:
                return [component_dir / name]
    pickles = [n for n in names if n.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    if pickles:
        raise WeightError(
            f"{component_dir.name}/ only has pickle weights ({pickles[0]}); Silicon Diffusion loads "
            "safetensors only, since unpickling a checkpoint can run arbitrary code. "
            "Convert it with diffusers (save_pretrained(..., safe_serialization=True)).")
    raise WeightError(f"no weights found in {component_dir}")


def read_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Read weight files (MLX maps them lazily; nothing is copied until cast and evaluated)."""
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as exc:  # corrupted or truncated file
            raise WeightError(f"cannot read {f.parent.name}/{f.name}: {exc}") from exc
    return weights


def drained(weights: dict):
    """`weights`' (name, array) pairs, each taken out of the dict as it is read: once load_into has cast and
    evaluated a tensor nothing holds the file's copy any more (fp32 files into an fp16 model: the load peaks at
    ~1.7x the loaded bytes instead of 3x)."""
    while weights:
        yield weights.popitem()


def module_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))
