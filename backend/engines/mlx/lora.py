"""LoRA on the MLX modules without touching the base weights: targeted layers are wrapped, not rewritten.

`LoraWrapped(base)` computes base(x) + up(scales * down(x)), where the LoRAs of every applied file are
concatenated along the rank axis and `scales` holds each rank's user scale * alpha / rank. So:
- a scale change only rewrites `scales` (no base weight is copied or re-quantized);
- removing the LoRAs puts the base modules back (`Applied.remove`);
- a quantized base (QuantizedLinear, QuantizedConv2d) stays quantized; the LoRA runs in the compute dtype.
Convolution LoRAs (LoCon) run `down` as a convolution with the base layer's kernel, stride and padding and
`up` as a 1x1 (a matmul over channels), as PEFT does.

The MLX modules carry diffusers' / transformers' names (weights.py), so a LoRA's diffusers module path is the
MLX module path.
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from backend import lora as L
from backend.engines.mlx.quantize import QuantizedConv2d


def module_shape(module) -> Optional[L.ModuleShape]:
    """The LoRA-relevant shape of an MLX leaf layer, or None for layers LoRA does not target."""
    if isinstance(module, nn.QuantizedLinear):
        return L.ModuleShape("linear", int(module.scales.shape[-1] * module.group_size), int(module.weight.shape[0]))
    if isinstance(module, QuantizedConv2d):
        o, kh, kw, i = module.kernel_shape
        return L.ModuleShape("conv", int(i), int(o), (int(kh), int(kw)))
    if isinstance(module, nn.Linear):
        o, i = module.weight.shape
        return L.ModuleShape("linear", int(i), int(o))
    if isinstance(module, nn.Conv2d):
        o, kh, kw, i = module.weight.shape
        return L.ModuleShape("conv", int(i), int(o), (int(kh), int(kw)))
    return None


def module_table(components) -> dict:
    """{component: {module path: ModuleShape}} of (name, module) pairs (MLXStages.components())."""
    table = {}
    for name, module in components:
        leaves = tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module)
        table[name] = {path: shape for path, leaf in leaves if (shape := module_shape(leaf)) is not None}
    return table


class LoraWrapped(nn.Module):
    """base(x) + (scales * down(x)) @ up.T, with down (R, in) or (R, kh, kw, in) and up (out, R)."""

    def __init__(self, base, down: mx.array, up: mx.array, scales: mx.array):
        super().__init__()
        self.base = base
        self.lora_down, self.lora_up, self.lora_scales = down, up, scales

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        down = self.lora_down.astype(x.dtype)
        if down.ndim == 4:
            base = self.base
            h = mx.conv2d(x, down, base.stride, base.padding, base.dilation)
        else:
            h = x @ down.T
        h = h * self.lora_scales.astype(h.dtype)
        return y + (h @ self.lora_up.astype(h.dtype).T).astype(y.dtype)


def _parent(root: nn.Module, path: str):
    parts = path.split(".")
    node = root
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, parts[-1]


def _get(node, key):
    return node[int(key)] if isinstance(node, list) else node[key]


def _set(node, key, value) -> None:
    if isinstance(node, list):
        node[int(key)] = value
    else:
        setattr(node, key, value)


def _to_mlx_down(layer: L.LoraLayer) -> np.ndarray:
    down = layer.down
    return down.transpose(0, 2, 3, 1) if down.ndim == 4 else down  # torch (r, in, kh, kw) -> MLX (r, kh, kw, in)


class Applied:
    """The LoRAs wrapped into one MLXStages' modules: [(component, path)] and each layer's rank slices."""

    def __init__(self, modules: dict, matched: list, dtype):
        """`modules`: {component: root module}; `matched`: [MatchedLora] in the order of the request."""
        self.modules, self.matched, self.files = modules, list(matched), [m.file.path for m in matched]
        by_layer: dict = {}
        for index, m in enumerate(matched):
            for where, layer in m.layers.items():
                by_layer.setdefault(where, []).append((index, layer))
        self.layers = by_layer
        self.wrapped = []
        for (component, path), entries in by_layer.items():
            if component not in modules:  # not loaded now (reduce-memory): wrapped when it is
                continue
            parent, key = _parent(modules[component], path)
            base = _get(parent, key)
            down = np.concatenate([_to_mlx_down(layer) for _, layer in entries])
            up = np.concatenate([layer.up for _, layer in entries], axis=1)
            wrapper = LoraWrapped(base, mx.array(down).astype(dtype), mx.array(up).astype(dtype),
                                  mx.zeros((down.shape[0],), dtype=dtype))
            _set(parent, key, wrapper)
            self.wrapped.append((parent, key, wrapper, entries))
        self.dtype = dtype

    def set_scales(self, scales: list) -> None:
        """Each file's user scale (the order of the request): only the per-rank scale vectors change."""
        for _, _, wrapper, entries in self.wrapped:
            vector = np.concatenate([np.full(layer.rank, scales[i] * layer.alpha_scale, np.float32)
                                     for i, layer in entries])
            wrapper.lora_scales = mx.array(vector).astype(self.dtype)
        mx.eval([w.parameters() for _, _, w, _ in self.wrapped])

    def remove(self) -> None:
        for parent, key, wrapper, _ in self.wrapped:
            _set(parent, key, wrapper.base)
        self.wrapped = []


def set_loras(stages, loras) -> list[str]:
    """MLXStages.set_loras: apply [(file, scale)] to the text encoders and the denoiser; return the warnings.

    Files are read and matched once (per path and modification time); the same files again only change the
    scales, other files unwrap the previous ones first, an empty list removes them all."""
    requested = L.normalize(loras)
    state = stages.__dict__.setdefault("_lora_state", {"applied": None, "table": None, "lookup": None,
                                                       "matched": {}})
    applied = state["applied"]
    if not requested:
        if applied is not None:
            applied.remove()
            state["applied"] = None
        return []
    if state["table"] is None:  # before anything is wrapped: the model's own layers (their shapes)
        targets = [(name, module) for name, module in stages.architecture() if name != "vae"]
        state["table"] = module_table(targets)
        state["lookup"] = L._module_lookup(state["table"])
    spec = stages.spec
    denoiser = spec.traits.denoiser
    per_block = spec.denoiser_config.get("layers_per_block", 2) if not spec.is_transformer else None
    matched = []
    for path, _ in requested:
        file = L.read(path)
        key = (str(file.path), file.sha256)
        if key not in state["matched"]:
            state["matched"][key] = L.match(file, state["table"], denoiser,
                                            per_block if isinstance(per_block, int) else None, state["lookup"])
        matched.append(state["matched"][key])
    files = [m.file.path for m in matched]
    if applied is None or applied.files != files or any(
            a is not b for a, b in zip(applied.matched, matched)):
        if applied is not None:
            applied.remove()
        modules = dict(stages.resident())  # reduce-memory: the loaded stages; each later load is wrapped then
        applied = Applied(modules, matched, stages.dtype)
        state["applied"] = applied
    applied.set_scales([scale for _, scale in requested])
    return [w for m in matched if (w := m.warning())]
