"""LoRA files, engine-independent: read a safetensors LoRA and match its layers to a model's modules.

Reads the two namings in use, as diffusers' `load_lora_weights` does:
- diffusers / PEFT: `unet.<module>.lora_A.weight` + `lora_B.weight` (also `transformer.`, `text_encoder.`,
  `text_encoder_2.`), the older `<module>.lora.down/up.weight`, `lora_linear_layer.down/up`, the attention
  processor names (`attn1.processor.to_q_lora.down.weight`), keys without a component prefix (the UNet);
  PEFT's adapter config from the file's `lora_adapter_metadata` (lora_alpha, r, alpha_pattern, use_rslora);
- kohya / A1111: `lora_unet_…`, `lora_te_…` / `lora_te1_…`, `lora_te2_…` + `.lora_down.weight`,
  `.lora_up.weight`, `.alpha`. Those names flatten dots to underscores, so they are looked up among the
  model's own module names flattened the same way; SDXL's SGM block names (`input_blocks_4_1_…`,
  `middle_block_1_…`, `output_blocks_…`, `in_layers_2`, `emb_layers_1`, `skip_connection`, `op` …) are first
  mapped to diffusers' blocks as diffusers' `_maybe_map_sgm_blocks_to_diffusers` + `_convert_unet_lora_key` do.

Each layer's scale is the user's scale times alpha / rank (kohya's `.alpha`, PEFT's lora_alpha; no alpha:
alpha = rank, i.e. 1, diffusers' convention). Convolution LoRAs (LoCon) keep their kernel: down is a
convolution with the base layer's kernel, up a 1x1.

An engine describes its modules as {component: {module path (diffusers naming): ModuleShape}}; `match` returns
the layers found there and every key it could not place (reported by count and example, never dropped). A
file with no layer of this model, or with layers whose shapes differ from this model's, is a UserError.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from backend.types import UserError

DENOISER = "denoiser"  # the component a prefix-less or `lora_unet_` name belongs to: the model's unet/transformer
_COMPONENT_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_KOHYA_PREFIXES = (("lora_unet_", DENOISER), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"))
# suffix -> role, longest first so `.lora.down.weight` is not read as something shorter
_SUFFIXES = ((".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
             (".lora.down.weight", "down"), (".lora.up.weight", "up"),
             (".lora_down.weight", "down"), (".lora_up.weight", "up"),
             (".lora_A.weight", "down"), (".lora_B.weight", "up"),
             ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processors: to_q_lora.down
             (".alpha", "alpha"))
_PROCESSOR = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
              "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


class ModuleShape(NamedTuple):
    """What a LoRA must fit: a linear layer (kernel (1, 1)) or a convolution."""
    kind: str            # "linear" or "conv"
    in_features: int
    out_features: int
    kernel: tuple = (1, 1)


@dataclass
class LoraLayer:
    down: np.ndarray              # (r, in) or (r, in, kh, kw)
    up: np.ndarray                # (out, r)
    alpha_scale: float            # alpha / rank (1.0 without alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """up @ down (without the scale), shaped as the base weight in torch layout: (out, in[, kh, kw])."""
        down = self.down.reshape(self.rank, -1)
        return (self.up @ down).reshape((self.up.shape[0],) + self.down.shape[1:])


@dataclass
class LoraFile:
    """One file's layers as stored, grouped by layer name (before matching to a model)."""
    path: Path
    sha256: str
    groups: dict                  # stem -> {"down": array, "up": array, "alpha": float, "keys": [its keys]}
    stray: list                   # keys no LoRA suffix explains
    metadata: dict = field(default_factory=dict)   # PEFT adapter config by component ("unet.lora_alpha": ...)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class MatchedLora:
    """A file matched against one model: {(component, module path): LoraLayer} and what did not fit."""
    file: LoraFile
    layers: dict
    unrecognised: list

    def warning(self) -> Optional[str]:
        if not self.unrecognised:
            return None
        shown = ", ".join(self.unrecognised[:3])
        return (f"LoRA {self.file.name}: {len(self.unrecognised)} of its keys are not LoRA layers of this model "
                f"and were not applied (e.g. {shown})")


# ------------------------------------------------------------------------------------------ requests
def parse_spec(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (the CLI's --lora) -> (file, scale); the scale defaults to 1.0."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            path = text  # a ':' that is part of the path
    if not path:
        raise UserError(f"--lora needs a file: FILE[:SCALE] (got '{text}')")
    return path, scale


def normalize(loras) -> list[tuple[Path, float]]:
    """A request's loras ([(path, scale)] or [path] or ["FILE:SCALE"]) -> [(existing safetensors Path, scale)]."""
    out = []
    for entry in loras or []:
        if isinstance(entry, (str, os.PathLike)):
            path, scale = parse_spec(str(entry)) if isinstance(entry, str) else (entry, 1.0)
        else:
            try:
                path, scale = entry
            except (TypeError, ValueError):
                raise UserError(f"a LoRA is (file, scale); got {entry!r}") from None
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise UserError(f"LoRA scale must be a number (got {scale!r} for {path})") from None
        if not math.isfinite(scale):
            raise UserError(f"LoRA scale must be finite (got {scale} for {path})")
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"LoRA file {path} does not exist")
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"LoRA {path.name} is not a .safetensors file: LoRAs are read from safetensors only "
                            "(a pickle file can run arbitrary code)")
        out.append((path.resolve(), scale))
    return out


# --------------------------------------------------------------------------------------------- files
_FILES: dict = {}  # (path, mtime, size) -> LoraFile


def read(path) -> LoraFile:
    """Read (once per path + modification time) a safetensors LoRA into layer groups."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _FILES:
        _FILES[key] = _read(path)
    return _FILES[key]


def _read(path: Path) -> LoraFile:
    # MLX reads safetensors (bf16 included) with their metadata: no other reader is a runtime dependency
    import mlx.core as mx
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
        tensors = {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()}
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"LoRA {path.name} is not a readable safetensors file ({exc})") from None
    metadata = metadata or {}
    peft = {}
    if metadata.get("lora_adapter_metadata"):
        try:
            peft = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError:
            peft = {}
    groups, stray = {}, []
    for key, value in tensors.items():
        suffix = next(((s, role) for s, role in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            stray.append(key)
            continue
        stem = key[:-len(suffix[0])]
        if suffix[0].startswith("_lora."):  # attn1.processor.to_q_lora.down.weight: stem ...to_q_lora
            stem += "_lora"
        value = np.asarray(value, dtype=np.float32)
        group = groups.setdefault(stem, {"keys": []})
        group["keys"].append(key)
        group[suffix[1]] = float(value.reshape(-1)[0]) if suffix[1] == "alpha" else value
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return LoraFile(path=path, sha256=h.hexdigest(), groups=groups, stray=sorted(stray), metadata=peft)


def record(path, scale: float) -> dict:
    """What a result's parameters say about one applied LoRA."""
    f = read(path)
    return {"name": f.name, "sha256": f.sha256[:16], "scale": float(scale)}


# ------------------------------------------------------------------------------------------ matching
def _sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """SGM (original SD / SDXL) block names, underscore-flattened, -> diffusers' blocks (as diffusers maps them)."""
    if name.startswith("input_blocks_0_0"):
        return "conv_in" + name[len("input_blocks_0_0"):]
    if name == "out_2" or name.startswith("out_2_"):
        return "conv_out" + name[len("out_2"):]
    m = re.match(r"middle_block_(\d+)_(.+)$", name)
    if m:
        part = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(m.group(1)))
        return name if part is None else f"mid_block_{part}_{m.group(2)}"
    m = re.match(r"(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.*))?$", name)
    if m is None:
        return name
    kind, i, inner, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or ""
    per = layers_per_block + 1
    inner_map = ("resnets", "attentions", "upsamplers")
    if kind == "input_blocks":
        block, layer = (i - 1) // per, (i - 1) % per
        if rest == "op" or rest.startswith("op_"):
            return f"down_blocks_{block}_downsamplers_0_conv{rest[2:]}"
        if inner > 1:
            return name
        return f"down_blocks_{block}_{inner_map[inner]}_{layer}_{rest}".rstrip("_")
    block, layer = i // per, i % per
    if inner == 1 and (rest == "conv" or rest.startswith("conv_")):  # the upsampler of a level without attention
        return f"up_blocks_{block}_upsamplers_0_{rest}"
    if inner > 2:
        return name
    return f"up_blocks_{block}_{inner_map[inner]}_{layer if inner < 2 else 0}_{rest}".rstrip("_")


_SGM_INNER = ((r"_in_layers_2$", "_conv1"), (r"_out_layers_3$", "_conv2"), (r"_emb_layers_1$", "_time_emb_proj"),
              (r"_skip_connection$", "_conv_shortcut"), (r"^time_embed_0$", "time_embedding_linear_1"),
              (r"^time_embed_2$", "time_embedding_linear_2"), (r"^label_emb_0_0$", "add_embedding_linear_1"),
              (r"^label_emb_0_2$", "add_embedding_linear_2"))


def _kohya_candidates(rest: str, component: str, layers_per_block: Optional[int]) -> list[str]:
    """Flattened (underscore) names a kohya layer name may have among the model's flattened module names."""
    names = [rest]
    if component == DENOISER and layers_per_block is not None:
        mapped = _sgm_to_diffusers(rest, layers_per_block)
        for pattern, repl in _SGM_INNER:
            mapped = re.sub(pattern, repl, mapped)
        names.append(mapped)
    return names


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _module_lookup(modules: dict) -> dict:
    """{component: ({name: name}, {flattened name: name})}, text encoders also reachable with/without `text_model.`."""
    out = {}
    for component, table in modules.items():
        exact, flat = {}, {}
        for name in table:
            aliases = [name]
            if component.startswith("text_encoder"):
                aliases += [name.removeprefix("text_model.")] if name.startswith("text_model.") \
                    else [f"text_model.{name}"]
            for alias in aliases:
                exact.setdefault(alias, name)
                flat.setdefault(_flat(alias), name)
        out[component] = (exact, flat)
    return out


def _resolve(stem: str, lookup: dict, denoiser: str, layers_per_block) -> Optional[tuple[str, str]]:
    """(component, module path) of a layer-group stem in this model, or None."""
    for prefix, component in _KOHYA_PREFIXES:
        if stem.startswith(prefix):
            component = denoiser if component == DENOISER else component
            if component not in lookup:
                return None
            flat = lookup[component][1]
            for candidate in _kohya_candidates(stem[len(prefix):], DENOISER if component == denoiser else component,
                                               layers_per_block):
                if candidate in flat:
                    return component, flat[candidate]
            return None
    name = stem.removeprefix("base_model.model.")
    component = denoiser
    first = name.split(".", 1)[0]
    if first in _COMPONENT_PREFIXES and "." in name:
        component, name = first, name.split(".", 1)[1]
    if component not in lookup:
        return None
    m = re.search(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora$", name)
    if m:
        table = _PROCESSOR["text" if component.startswith("text_encoder") else "unet"]
        name = name[:m.start()] + "." + table[m.group(1)]
    name = name.replace(".processor.", ".")
    exact = lookup[component][0]
    return (component, exact[name]) if name in exact else None


def _peft_alpha(metadata: dict, component: str, path: str, rank: int) -> Optional[float]:
    """alpha / rank from a PEFT adapter config stored with the file (per component), or None."""
    keys = {k.split(".", 1)[1]: v for k, v in metadata.items() if k.startswith(component + ".")}
    if "lora_alpha" not in keys:
        return None
    alpha = float(keys["lora_alpha"])
    for pattern, value in (keys.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if keys.get("use_rslora") else rank)


def _fits(layer: LoraLayer, shape: ModuleShape) -> bool:
    down, up = layer.down, layer.up
    kernel = tuple(down.shape[2:]) if down.ndim == 4 else (1, 1)
    if down.shape[1] != shape.in_features or up.shape[0] != shape.out_features or up.shape[1] != down.shape[0]:
        return False
    return kernel == tuple(shape.kernel)


def match(lora: LoraFile, modules: dict, denoiser: str, layers_per_block: Optional[int] = None,
          lookup: Optional[dict] = None) -> MatchedLora:
    """Place `lora`'s layers among `modules` ({component: {path: ModuleShape}}); `denoiser` names the component
    `lora_unet_` and prefix-less names belong to ("unet" or "transformer"). `layers_per_block` (a UNet's)
    enables SGM block names. Raises UserError when nothing fits, or when layers fit by name and not by shape."""
    lookup = lookup or _module_lookup(modules)
    layers, unrecognised, misfits = {}, list(lora.stray), []
    for stem, group in sorted(lora.groups.items()):
        keys = group["keys"]
        if "down" not in group or "up" not in group:
            unrecognised.extend(keys)
            continue
        where = _resolve(stem, lookup, denoiser, layers_per_block)
        if where is None:
            unrecognised.extend(keys)
            continue
        down, up = group["down"], group["up"]
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            unrecognised.extend(keys)
            continue
        up = up.reshape(up.shape[0], up.shape[1])
        shape = modules[where[0]][where[1]]
        if down.ndim == 4 and down.shape[2:] == (1, 1) and shape.kernel == (1, 1):
            down = down.reshape(down.shape[0], down.shape[1])
        rank = int(down.shape[0])
        if "alpha" in group:
            alpha_scale = group["alpha"] / rank
        else:
            alpha_scale = _peft_alpha(lora.metadata, where[0], where[1], rank) if lora.metadata else None
            alpha_scale = 1.0 if alpha_scale is None else alpha_scale
        layer = LoraLayer(down=down, up=up, alpha_scale=float(alpha_scale))
        if not _fits(layer, shape):
            misfits.append(f"{where[0]}.{where[1]}")
            continue
        layers[where] = layer
    total = len(lora.groups) + len(lora.stray)
    if misfits:
        raise UserError(f"LoRA {lora.name} is for another model family: {len(misfits)} of its layers have other "
                        f"shapes than this model's (e.g. {', '.join(misfits[:2])})")
    if not layers:
        raise UserError(f"LoRA {lora.name} is for another model family: none of its {total} layers exist in this "
                        "model")
    return MatchedLora(file=lora, layers=layers, unrecognised=sorted(unrecognised))
