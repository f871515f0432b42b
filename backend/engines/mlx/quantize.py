"""Quantized MLX models: group-wise affine quantization of linear AND convolution weights.

Owns the quantized layers (`QuantizedLinear`, `QuantizedConv2d`), the schemes ("q8" ... "q2", "mixed"),
the per-layer plan a scheme or recipe makes for a module, the sentence saying what was quantized,
and the saved-variant format (`<component>/mlx_weights.safetensors` + `mlx_quantization.json`).

Each layer's weights are read in fp16 and quantized as its component loads, layer by layer (the engine's
`before_eval`), so a component never stands whole at full precision (`mx.quantize`, affine, one scale and bias per
group of 64 weights of a row, or 32 where a row length needs it). A layer whose row length is not a
multiple of 32 stays fp16 and the sentence says so. Convolution kernels (O, kh, kw, I) are quantized as
(O, kh*kw*I) rows and dequantized when called: the saving is at rest (weight bytes), the compute is
the fp16 convolution. Linears use MLX's fused quantized matmul on a GPU; on the CPU they dequantize
too, because MLX's CPU quantized matmul is 60-90x slower than dequantize + matmul (measured). At CPU inference the
codes are dequantized by a compiled loop (cpu_native.dequantize_rows, on every worker) into fp32 rows for one call,
and the layer runs in the CPU kernels as an fp32 one does (cpu_rowwise.project, Winograd; layers.kernel_linear):
MLX's own dequantize takes as long as the product it feeds there.
Text encoders' linears follow the scheme; the VAE, norms and embeddings stay at full precision.
"""
from __future__ import annotations

import fnmatch
import json
from collections import Counter
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from backend.engines.mlx import cpu_native, cpu_pool, cpu_rowwise, layers
from backend.types import UserError

SCHEMES = {"q8": 8, "q6": 6, "q4": 4, "q3": 3, "q2": 2}
MIXED = "mixed"
BITS = (2, 3, 4, 5, 6, 8)
KEEP = 16                    # "bits" of a layer a recipe keeps at full precision
GROUP_SIZES = (128, 64, 32)  # what mx.quantize supports
DEFAULT_GROUP_SIZE = 64
DEFAULT_RECIPE = Path(__file__).resolve().parents[3] / "configs" / "mixed_bit_recipes" / "mlx-mixed.json"
PLAN_FILE = "mlx_quantization.json"
WEIGHTS_FILE = "mlx_weights.safetensors"
LABELS = {"unet": "UNet", "transformer": "transformer", "text_encoder": "text encoder",
          "text_encoder_2": "text encoder 2", "text_encoder_3": "T5 text encoder", "vae": "VAE"}


# ------------------------------------------------------------------------------------------ layers
def _dequantizes_here(layer) -> bool:
    return (layer.get("biases") is not None and getattr(layer, "mode", "affine") == "affine"
            and cpu_native.dequantize_rows() is not None)


def _in_cpu_kernels(layer, elements: int) -> bool:
    """Whether a call of `layer` over `elements` output elements runs in the CPU kernels: at CPU inference, where
    the call or the layer's weight is large (an AdaLN's one-row product reads 14M weights; a small model's small
    layers keep MLX's ops, whose fixed cost is lower: the embedded model's 20 steps at q4 2.2 s the other way)."""
    weights = layer["scales"].shape[0] * layer["scales"].shape[-1] * layer.group_size
    return layers.cpu_inference(max(elements, weights)) and _dequantizes_here(layer)


def _cpu_rows(layer) -> np.ndarray:
    """A quantized layer's (O, K) fp32 weight rows, dequantized by the compiled loop on every worker."""
    dequantize = cpu_native.dequantize_rows()
    scales, biases = (layer[name].astype(mx.float32) for name in ("scales", "biases"))
    mx.eval(layer["weight"], scales, biases)
    packed, s, b = np.asarray(layer["weight"]).view(np.uint8), np.asarray(scales), np.asarray(biases)
    out = cpu_pool.empty((packed.shape[0], s.shape[1] * layer.group_size))

    def work(share):
        for r0, r1 in share:
            dequantize(packed, s, b, layer.bits, layer.group_size, out, r0, r1)

    cpu_pool.run(work, cpu_pool.row_shares(out.shape[0], -(-out.shape[0] // cpu_pool.workers())), out.size)
    return out


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (same parameters); on the CPU it dequantizes and runs a plain product (at inference in the
    CPU kernels, from the compiled loop's fp32 rows)."""

    def dequantizes_here(self) -> bool:
        """Whether `cpu_rows` can run (affine codes, the compiled loop built)."""
        return _dequantizes_here(self)

    def cpu_rows(self) -> np.ndarray:
        """The (N, K) weight as fp32 numpy rows, dequantized now for one call (layers.weight_rows)."""
        return _cpu_rows(self)

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.gpu:
            return super().__call__(x)
        shape = x.shape[:-1] + (self.weight.shape[0],)
        if _in_cpu_kernels(self, x.size // x.shape[-1] * shape[-1]):
            return cpu_rowwise.project(x, self.cpu_rows(), self.get("bias"), shape, x.dtype)
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits)
        w = w.astype(x.dtype)
        if "bias" in self:
            return mx.addmm(self["bias"].astype(x.dtype), x, w.T)
        return x @ w.T


class QuantizedConv2d(nn.Module):
    """A Conv2d whose kernel is stored as mx.quantize'd (O, kh*kw*I/groups) rows + scales/biases."""

    def __init__(self, weight: mx.array, bias: Optional[mx.array], stride=(1, 1), padding=(0, 0),
                 dilation=1, groups: int = 1, group_size: int = DEFAULT_GROUP_SIZE, bits: int = 4):
        super().__init__()
        self.kernel_shape = tuple(weight.shape)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.group_size, self.bits = group_size, bits
        self.weight, self.scales, self.biases = mx.quantize(weight.reshape(weight.shape[0], -1), group_size, bits)
        if bias is not None:
            self.bias = bias
        self.freeze()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group_size: int, bits: int) -> "QuantizedConv2d":
        return cls(conv.weight, conv.get("bias"), conv.stride, conv.padding, conv.dilation, conv.groups,
                   group_size, bits)

    def _extra_repr(self) -> str:
        return f"kernel={self.kernel_shape}, stride={self.stride}, group_size={self.group_size}, bits={self.bits}"

    folds_addends = True  # __call__ takes image_bias and residual, as layers.Conv2d (layers.convolve)

    def __call__(self, x: mx.array, image_bias: Optional[mx.array] = None, residual: Optional[mx.array] = None):
        """conv(x) [+ bias] [+ image_bias (B, C_out) per image] [+ residual]. At CPU inference the kernel comes from
        the compiled loop (cpu_rows), and where the Winograd path applies the addends are added as its tiles are put
        in place; elsewhere MLX dequantizes it and runs its convolution."""
        if _in_cpu_kernels(self, x.size // x.shape[-1] * self.kernel_shape[0]):
            kernel = _cpu_rows(self).reshape(self.kernel_shape)
            if layers.winograd_applies(self, x, self.kernel_shape, self["scales"].dtype):
                return layers.winograd_convolve(x, kernel, self.get("bias"), image_bias, residual)
            w = mx.array(kernel)
        else:
            w = mx.dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        y = mx.conv2d(x, w.reshape(self.kernel_shape).astype(x.dtype), self.stride, self.padding,
                      self.dilation, self.groups)
        y = y + self["bias"].astype(y.dtype) if "bias" in self else y
        return layers.with_addends(y, image_bias, residual)


def _kind(module) -> Optional[str]:
    if isinstance(module, (nn.QuantizedLinear, QuantizedConv2d)):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return None


def _row_length(module, kind: str) -> int:
    shape = module.weight.shape
    return shape[-1] if kind == "linear" else shape[1] * shape[2] * shape[3]


def _quantized(module, kind: str, bits: int, group_size: int):
    # Quantize the fp16-rounded kernel, so a variant is the same whatever precision it was loaded at
    # (a saved fp16-made variant and a live fp32 one give identical images); scales keep the compute dtype.
    dtype = module.weight.dtype
    module.weight = module.weight.astype(mx.float16)
    if kind == "linear":
        layer = QuantizedLinear.from_linear(module, group_size, bits)
    else:
        layer = QuantizedConv2d.from_conv(module, group_size, bits)
    layer.scales, layer.biases = layer.scales.astype(dtype), layer.biases.astype(dtype)
    return layer


# ------------------------------------------------------------------------------------- recipes
def _rules_from_apple(recipe: dict) -> dict:
    """Apple's mixed-bit format ({module: bits}, maybe under "recipes") applies to the UNet by name."""
    if "recipes" in recipe:
        if len(recipe["recipes"]) != 1:
            raise UserError(f"the recipe file holds {len(recipe['recipes'])} recipes; keep one")
        recipe = next(iter(recipe["recipes"].values()))
    return {"unet": [{"match": [name], "bits": bits} for name, bits in recipe.items()]}


def load_recipe(path=None) -> dict:
    """A recipe: {"group_size": G, "<component>": [{"match": [globs], "kind": ..., "bits": N}, ...]}.

    The first rule whose glob matches a layer's path (and kind, if given) decides; bits 16 keeps the
    layer at full precision, and so does no match. `text_encoder` rules also cover `text_encoder_2`
    unless it has its own. Apple's {module: bits} recipes are read too (UNet only).
    """
    path = Path(path or DEFAULT_RECIPE).expanduser()
    try:
        recipe = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"the recipe {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"the recipe {path} is not valid JSON ({exc})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"the recipe {path} must be a JSON object")
    if "recipes" in recipe or (recipe and all(isinstance(v, int) for v in recipe.values())):
        recipe = _rules_from_apple(recipe)
    for component, rules in recipe.items():
        if component not in LABELS:
            continue
        for rule in rules:
            if rule.get("bits") not in BITS + (KEEP,) or not rule.get("match"):
                raise UserError(f"recipe {path.name}, {component}: each rule needs 'match' globs and 'bits' in "
                                f"{BITS + (KEEP,)} (got {rule})")
    return recipe


def uniform_recipe(bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    everything = [{"match": ["*"], "bits": bits}]
    return {"group_size": group_size, "unet": everything, "transformer": everything, "text_encoder": everything}


def scheme_recipe(quantization: str, group_size: Optional[int] = None, recipe_path=None) -> dict:
    """The recipe of a scheme name ("q4", "mixed"), or of a recipe file."""
    if quantization in SCHEMES:
        recipe = uniform_recipe(SCHEMES[quantization])
    elif quantization == MIXED or str(quantization).endswith(".json"):
        recipe = load_recipe(recipe_path or (None if quantization == MIXED else quantization))
    else:
        raise UserError(f"unknown quantization '{quantization}': choose q8, q6, q4, q3, q2 or mixed")
    if group_size is not None:
        if group_size not in GROUP_SIZES:
            raise UserError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))} (got {group_size})")
        recipe = dict(recipe, group_size=group_size)
    return recipe


def _rule_bits(rules: list, path: str, kind: str) -> int:
    for rule in rules:
        globs = [rule["match"]] if isinstance(rule["match"], str) else rule["match"]
        if rule.get("kind", kind) == kind and any(fnmatch.fnmatchcase(path, g) for g in globs):
            return int(rule["bits"])
    return KEEP


# ---------------------------------------------------------------------------------------- plans
def plan(module: nn.Module, rules: list, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """{"layers": {path: [kind, bits, group]}, "kept": [paths], "unfit": {path: row length}}."""
    layers, kept, unfit = {}, [], {}
    sizes = [g for g in GROUP_SIZES if g <= group_size]
    for path, leaf in tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module):
        kind = _kind(leaf)
        if kind is None:
            continue
        bits = _rule_bits(rules, path, kind)
        if bits == KEEP:
            kept.append(path)
            continue
        row = _row_length(leaf, kind)
        group = next((g for g in sizes if row % g == 0), None)
        if group is None:
            unfit[path] = row
        else:
            layers[path] = [kind, bits, group]
    return {"layers": layers, "kept": kept, "unfit": unfit}


def apply_plan(module: nn.Module, layers: dict) -> nn.Module:
    """Replace every planned layer with its quantized form (same mechanism as nn.quantize)."""
    def swap(path, leaf):
        if path not in layers:
            return leaf
        kind, bits, group = layers[path]
        return _quantized(leaf, kind, bits, group)
    module.update_modules(tree_map_with_path(swap, module.leaf_modules(), is_leaf=nn.Module.is_module))
    return module


def _names(paths, limit: int = 3) -> str:
    paths = sorted(paths)
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def describe(component: str, p: dict) -> str:
    """One clause: which layers of a component are quantized, at how many bits, which are not and why."""
    by_bits = Counter((bits, kind) for kind, bits, _ in p["layers"].values())
    groups = Counter(group for _, _, group in p["layers"].values())
    parts = []
    for bits in sorted({b for b, _ in by_bits}):
        kinds = [f"{by_bits[(bits, k)]} {k}" for k in ("linear", "conv") if by_bits[(bits, k)]]
        parts.append(f"{bits}-bit on {' + '.join(kinds)} layers")
    text = f"{LABELS.get(component, component)}: " + ("; ".join(parts) if parts else "not quantized")
    if groups:
        text += " (group size " + ", ".join(f"{g} on {n}" for g, n in sorted(groups.items(), reverse=True)) + ")"
    if p["kept"]:
        text += f"; kept fp16 by the recipe: {_names(p['kept'])}"
    if p["unfit"]:
        rows = sorted(set(p["unfit"].values()))
        text += (f"; kept fp16 because their rows of {', '.join(map(str, rows))} weights are not a multiple "
                 f"of 32: {_names(p['unfit'])}")
    return text


def plan_component(module: nn.Module, component: str, recipe: dict) -> dict:
    """`recipe`'s plan for one component (its layers' shapes decide: the weights need not be loaded)."""
    rules = recipe.get(component, recipe.get("text_encoder", []) if component.startswith("text_encoder") else [])
    return plan(module, rules, int(recipe.get("group_size", DEFAULT_GROUP_SIZE)))


def quantize_module(module: nn.Module, component: str, recipe: dict) -> dict:
    p = plan_component(module, component, recipe)
    apply_plan(module, p["layers"])
    mx.eval(module.parameters())
    return p


def _components(stages):
    return stages.components()


def quantize_stages(stages, quantization: str, group_size: Optional[int] = None, recipe_path=None) -> str:
    """Quantize an MLXStages' loaded modules in place; return the sentence shown with results.

    On a saved variant (already quantized when loaded) it only checks the name and returns its sentence.
    """
    saved = read_saved_plan(stages.spec.folder)
    if saved is not None:
        if quantization != saved["method"]:
            raise UserError(f"{stages.spec.folder.name} is already quantized ({saved['method']}); "
                            "load it without another quantization")
        return saved["sentence"]
    recipe = scheme_recipe(quantization, group_size, recipe_path)
    plans = {name: quantize_module(module, name, recipe) for name, module in _components(stages)}
    stages.quantization_plans = plans
    return sentence(quantization, plans)


def sentence(quantization: str, plans: dict) -> str:
    clauses = [describe(name, p) for name, p in plans.items() if p["layers"] or p["unfit"]]
    untouched = [LABELS.get(n, n) for n, p in plans.items() if not p["layers"] and not p["unfit"]]
    tail = (", ".join(untouched) + ", " if untouched else "") + "norms and embeddings stay fp16"
    return f"{quantization}: " + ". ".join(clauses + [tail[0].upper() + tail[1:]]) + "."


# ---------------------------------------------------------------------------------- saved variants
def save_component(module: nn.Module, folder: Path, component: str) -> None:
    (folder / component).mkdir(parents=True, exist_ok=True)
    params = dict(sorted(tree_flatten(module.parameters())))
    mx.save_safetensors(str(folder / component / WEIGHTS_FILE), params, metadata={"format": "mlx"})


def save_stages(stages, folder: Path, quantization: str) -> None:
    """Write every component's (quantized) MLX parameters and the plan the loader rebuilds them from."""
    plans = getattr(stages, "quantization_plans", {})
    for name, module in _components(stages):
        save_component(module, Path(folder), name)
    doc = {"method": quantization, "sentence": stages.quantized_layers,
           "layers": {name: p["layers"] for name, p in plans.items()}}
    (Path(folder) / PLAN_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True))


def read_saved_plan(folder) -> Optional[dict]:
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): quantize the model again") from None


def saved_method(folder) -> Optional[str]:
    saved = read_saved_plan(folder)
    return None if saved is None else saved["method"]


def load_saved_component(folder, component: str, module: nn.Module, dtype, keep=None) -> Optional[nn.Module]:
    """Load a saved variant's component into `module` (None when `folder` is not a saved variant); `keep(name)`:
    which of the saved weights belong to `module` (all by default)."""
    saved = read_saved_plan(folder)
    if saved is None:
        return None
    path = Path(folder) / component / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{component}/{WEIGHTS_FILE} is missing from the quantized folder {Path(folder).name}")
    apply_plan(module, saved["layers"].get(component, {}))
    try:
        module.load_weights([(k, v) for k, v in mx.load(str(path)).items() if keep is None or keep(k)], strict=True)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{component}: the quantized weights do not fit the model ({exc})") from None
    module.set_dtype(dtype)
    mx.eval(module.parameters())
    return module
