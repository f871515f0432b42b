"""Weight compression of Core ML resources folders with coremltools.optimize.coreml.

Three methods, each reading a resources folder of `.mlpackage`s (see resources.py) and writing a new one:

- `palettize`: k-means (or uniform) look-up tables of 8, 6, 4 or 2 bits, per tensor or per grouped channel
  (grouped needs the iOS 18 / macOS 15 opset: the program is re-targeted first);
- `linear_quantize`: symmetric 8-bit integers with a per-channel scale;
- `mixed_bit`: Apple's mixed-bit palettization recipes (mixed_bit_compression_pre_analysis.py's JSON:
  {"recipes": {"recipe_4.50_bit_mixedpalette": {"down_blocks.0.attentions.0.proj_in": 6, ...}}, "baselines":
  ..., "cumulative": ...}), applied to the denoiser as Apple's mixed_bit_compression_apply.py does
  (apple/ml-stable-diffusion @ e12202c): a recipe names torch modules; each Core ML weight of more than 1e5
  elements takes the bits of the torch weight with the nearest hash (first float16 value + element count,
  within 0.01), hashed from the diffusers checkpoint's safetensors; without them, by name. Smaller weights
  stay float16. float32 packages are hashed through float16 (Apple's cast of the torch side).

By default the text encoders and the denoiser are compressed: the UNet's package(s), or every package of
SD3's MMDiT (Apple's one MultiModalDiffusionTransformer, or MobileDiffuser's Conditioning + Stage0..N;
its 8-bit recipe is linear_symmetric int8 per channel, weight-only, which `linear_quantize` writes).

Each run writes `<out>.partial` and renames it at the end, so an interrupted run leaves nothing
half-written; the new folder's manifest.json records method, bits, sizes and seconds, and a second
run with the same settings on the same source returns the existing folder untouched.
Packages not compressed (the VAE by default, as in Apple's exporter) are copied as they are.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from backend.types import UserError
from backend.engines.coreml import resources as res

PALETTE_BITS = (8, 6, 4, 2)
RECIPE_BITS = (1, 2, 4, 6, 8, 16)  # what Apple's pre-analysis emits (16: leave the layer alone)
GRANULARITIES = ("per_tensor", "per_grouped_channel")
DEFAULT_STAGES = ("TextEncoder", "TextEncoder2") + res.UNET_STAGES
DEFAULT_WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller tensors stay float
META_COMPRESSION = "silicon_diffusion.compression"


# ---------------------------------------------------------------- one model

def _ct():
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    return ct, cto


def retarget_ios18(mlmodel):
    """The same program on the iOS 18 / macOS 15 opset (needed for per-grouped-channel palettes)."""
    from coremltools.converters.mil._deployment_compatibility import AvailableTarget
    from coremltools.models.utils import _apply_graph_pass  # keeps the description and metadata

    if mlmodel.get_spec().specificationVersion >= AvailableTarget.iOS18.value:
        return mlmodel
    return _apply_graph_pass(mlmodel, [], spec_version=AvailableTarget.iOS18.value)


def _check_kmeans(mode: str) -> None:
    if mode == "kmeans":
        try:
            import sklearn  # noqa: F401  (coremltools' k-means uses it)
        except ImportError:
            raise UserError("k-means palettization needs scikit-learn (pip install -r requirements-convert.txt); "
                            "or use mode='uniform'.") from None


def palettize_model(mlmodel, bits: int, granularity: str = "per_tensor", group_size: int = 16,
                    mode: str = "kmeans", weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD):
    ct, cto = _ct()
    if granularity == "per_grouped_channel":
        mlmodel = retarget_ios18(mlmodel)
    op_config = cto.OpPalettizerConfig(mode=mode, nbits=bits, granularity=granularity,
                                       group_size=group_size if granularity == "per_grouped_channel" else 32,
                                       weight_threshold=weight_threshold)
    # embedding tables (gather) stay float, as in Apple's exporter
    config = cto.OptimizationConfig(global_config=op_config, op_type_configs={"gather": None})
    return cto.palettize_weights(mlmodel, config)


def linear_quantize_model(mlmodel, bits: int = 8, weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD):
    ct, cto = _ct()
    op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                            weight_threshold=weight_threshold)
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op_config,
                                                                       op_type_configs={"gather": None}))


# ---------------------------------------------------------------- mixed-bit recipes, matched as Apple does

# apple/ml-stable-diffusion @ e12202c1f6405b83918b58a5d097cd61e3e1f702, python_coreml_stable_diffusion/
# mixed_bit_compression_pre_analysis.py and mixed_bit_compression_apply.py
APPLE_SCRIPTS = "apple/ml-stable-diffusion@e12202c1f6405b83918b58a5d097cd61e3e1f702"
PALETTIZE_MIN_SIZE = 100_000  # Apple's PALETTIZE_MIN_SIZE = 1e5: smaller weights stay float16
HASH_TOLERANCE = 0.01  # Apple's apply: assert pdist.min() < 0.01
NAME_MATCH_NOTE = "matched by name: no diffusers weights given"
_EXAMPLES = 3


def tensor_hash(tensor) -> float:
    """Apple's get_tensor_hash, `tensor.ravel()[0] + np.prod(tensor.shape)` of float16 values.

    The element count makes it shape-agnostic: a torch Linear [out, in] hashes like its Core ML 1x1
    convolution [out, in, 1, 1]. Apple asserts float16; a float32 weight (an fp32 export) is hashed through
    float16 here, the same cast Apple applies to the torch side, so both sides agree."""
    a = np.asarray(tensor)
    return float(np.float16(a.flat[0])) + float(np.prod(a.shape))


def diffusers_weight_files(path) -> list:
    """The denoiser's safetensors of a diffusers folder (its unet/ or transformer/, or the folder itself),
    or one .safetensors file. Only safetensors are read."""
    path = Path(path).expanduser()
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise UserError(f"{path} is not a .safetensors file; only safetensors weights are read.")
        return [path]
    for folder in (path / "unet", path / "transformer", path):
        for variant in ("", ".fp16"):
            index = folder / f"diffusion_pytorch_model{variant}.safetensors.index.json"
            if index.is_file():
                return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            single = folder / f"diffusion_pytorch_model{variant}.safetensors"
            if single.is_file():
                return [single]
    raise UserError(f"{path} holds no diffusers UNet weights (unet/diffusion_pytorch_model.safetensors); "
                    "only safetensors are read.")


class DiffusersWeights:
    """The `<module>.weight` tensors (2-D and up: Linear and Conv weights) of a diffusers denoiser, read
    lazily: shapes from the safetensors header, one value each for Apple's hash, and a whole tensor only
    to settle a hash collision."""

    def __init__(self, files, label: str):
        from safetensors import safe_open
        self.files, self.label = [Path(f) for f in files], label
        self.shapes, self.hashes, self._file = {}, {}, {}
        for f in self.files:
            with safe_open(str(f), framework="numpy") as h:
                for key in h.keys():
                    if not key.endswith(".weight"):
                        continue
                    part = h.get_slice(key)
                    shape = tuple(part.get_shape())
                    if len(shape) < 2:
                        continue
                    if part.get_dtype() not in ("F16", "F32", "F64"):
                        raise UserError(f"{f.name}: {key} is {part.get_dtype()}; Apple's hash needs float16 or "
                                        "float32 weights.")
                    layer = key[: -len(".weight")]
                    first = part[tuple(slice(0, 1) for _ in shape)]
                    self.shapes[layer], self._file[layer] = shape, f
                    self.hashes[layer] = float(np.float16(first.flat[0])) + float(np.prod(shape))
        if not self.hashes:
            raise UserError(f"{label} holds no Linear or convolution weights.")
        self.sizes = {layer: int(np.prod(shape)) for layer, shape in self.shapes.items()}

    def tensor(self, layer: str) -> np.ndarray:
        from safetensors import safe_open
        with safe_open(str(self._file[layer]), framework="numpy") as h:
            return h.get_tensor(layer + ".weight").astype(np.float16)

    def fingerprint(self) -> dict:
        return {"path": self.label, "files": {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in self.files}}

    def collisions(self, layers, threshold: int) -> list:
        """Groups of two or more of `layers` (over the threshold) that share one hash."""
        groups = {}
        for layer in layers:
            if layer in self.hashes and self.sizes[layer] > threshold:
                groups.setdefault(self.hashes[layer], []).append(layer)
        return [sorted(g) for g in groups.values() if len(g) > 1]


def find_diffusers_weights(weights=None, found: Optional[res.CoreMLResources] = None) -> Optional[DiffusersWeights]:
    """The diffusers weights to hash: `weights` (a folder, a .safetensors file or a registry name), else the
    folder export.py converted `found` from (its manifest's settings.source); None when there are none."""
    if weights:
        path = Path(str(weights)).expanduser()
        if not path.exists():
            from backend import registry
            path = registry.resolve(str(weights))
        return DiffusersWeights(diffusers_weight_files(path), str(path))
    source = ((found.manifest if found is not None else {}).get("settings") or {}).get("source")
    if source and Path(source).is_dir():
        try:
            return DiffusersWeights(diffusers_weight_files(source), str(source))
        except UserError:
            return None
    return None


def _check_float_program(mlmodel, stage: str) -> None:
    spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        return
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            if any(op.type.startswith("constexpr_") for op in block.operations):
                raise UserError(f"The {stage} weights are already compressed: apply a mixed-bit recipe to the "
                                "float16 package they came from.")


def float_weights(mlmodel) -> dict:
    """Core ML const name -> value, for every float const (get_weights_metadata's keys)."""
    _, cto = _ct()
    meta = cto.get_weights_metadata(mlmodel, weight_threshold=0)
    return {name: m.val for name, m in meta.items()
            if isinstance(m.val, np.ndarray) and m.val.dtype.kind == "f" and m.val.size}


def assign_layers(weights: dict, recipe: dict, diffusers: Optional[DiffusersWeights] = None,
                  weight_threshold: int = PALETTIZE_MIN_SIZE) -> tuple:
    """(Core ML const name -> torch module name, facts) for every float weight of at least `weight_threshold`
    elements (coremltools' get_weights_metadata rule, which Apple's apply uses).

    With diffusers weights, Apple's rule: the nearest hash within HASH_TOLERANCE. The hashes are those of
    every Linear/conv weight of the checkpoint (Apple hashes only the recipe's layers; with a recipe that
    lists every candidate, as Apple's do, it is the same match, and a layer the recipe leaves out cannot
    catch another's weight). Layers that share a hash are told apart by comparing the whole tensors; where
    even that leaves several, the one with the most bits in the recipe is taken and it is reported.
    Without them, by name: Core ML keeps the traced module path with '.' turned to '_' (and maybe a
    wrapper's prefix, like export.py's 'unet_'), so a recipe key matches a weight whose module name ends
    with it."""
    large = [name for name, val in weights.items() if val.size >= weight_threshold]
    facts = {"unmatched": [], "collisions_resolved": 0, "collisions_unresolved": []}
    if diffusers is None:
        found = _matches(large, recipe)
        facts["unmatched"] = [n for n in large if n not in found]
        return found, facts
    groups = {}
    for layer, h in diffusers.hashes.items():
        groups.setdefault(h, []).append(layer)
    keys = np.array(sorted(groups))
    found = {}
    for name in large:
        val = weights[name]
        distance = np.abs(keys - tensor_hash(val))
        nearest = int(distance.argmin())
        if distance[nearest] >= HASH_TOLERANCE:
            facts["unmatched"].append(name)
            continue
        group = groups[keys[nearest]]
        if len(group) > 1:
            flat = val.astype(np.float16).ravel()
            same = [layer for layer in group if diffusers.sizes[layer] == flat.size
                    and np.array_equal(diffusers.tensor(layer).ravel(), flat)]
            if len(same) == 1:
                facts["collisions_resolved"] += 1
                group = same
            else:
                facts["collisions_unresolved"].append(sorted(same or group))
                group = [max(same or group, key=lambda layer: (recipe.get(layer, 16), layer))]
        found[name] = group[0]
    return found, facts


def plan_bits(weights: dict, layer_of: dict, recipe: dict, weight_threshold: int = PALETTIZE_MIN_SIZE) -> tuple:
    """({const name: bits} to palettize, bits/weight over every float weight). A weight is palettized when
    its layer's recipe bits are not 16 and it has more than `weight_threshold` elements (the palettizer's
    own test, `OpPalettizerConfig(weight_threshold=int(1e5))`); the rest keep their stored bits (16)."""
    palette = {name: recipe[layer] for name, layer in layer_of.items()
               if recipe.get(layer, 16) != 16 and weights[name].size > weight_threshold}
    total = sum(v.size for v in weights.values())
    bits = sum(v.size * palette.get(name, v.dtype.itemsize * 8) for name, v in weights.items())
    return palette, (bits / total if total else 16.0)


def _weight_module(const_name: str) -> Optional[str]:
    """'unet_down_blocks_0_attentions_0_proj_in_weight_to_fp16' -> 'unet_down_blocks_0_attentions_0_proj_in'."""
    name = re.sub(r"(_to_fp16|_to_fp32)+$", "", const_name)
    return name[: -len("_weight")] if name.endswith("_weight") else None


def _matches(weight_names, recipe: dict) -> dict:
    """Core ML weight name -> the recipe key naming its module (the longest one that fits)."""
    keys = sorted(recipe, key=len, reverse=True)
    found = {}
    for name in weight_names:
        module = _weight_module(name)
        if module is None:
            continue
        for key in keys:
            flat = key.replace(".", "_")
            if module == flat or module.endswith("_" + flat):
                found[name] = key
                break
    return found


def match_recipe(weight_names, recipe: dict) -> dict:
    """Core ML weight name -> bits, for every weight whose module a recipe entry names (by name)."""
    return {name: recipe[key] for name, key in _matches(weight_names, recipe).items()}


def _small_layers(weights: dict, recipe: dict, diffusers, weight_threshold: int) -> dict:
    """Recipe layer -> elements, for the layers whose weights are under the threshold (they stay float)."""
    if diffusers is not None:
        return {k: diffusers.sizes[k] for k in recipe if diffusers.sizes.get(k, weight_threshold) < weight_threshold}
    small = [name for name, val in weights.items() if val.size < weight_threshold]
    return {layer: int(weights[name].size) for name, layer in _matches(small, recipe).items()}


def mixed_bit_model(mlmodel, recipe: dict, mode: str = "kmeans", require_match: bool = True, *,
                    diffusers: Optional[DiffusersWeights] = None, weight_threshold: int = PALETTIZE_MIN_SIZE,
                    stage: str = "UNet"):
    """Palettize each weight a recipe names to its bits; return (model or None, stats). `require_match=False`:
    a package the recipe does not name (an MMDiT stage without blocks) is left as it is. The stats' "_layers"
    (matched recipe layer -> elements) and "_collisions" are for the caller to sum over packages."""
    _, cto = _ct()
    _check_float_program(mlmodel, stage)
    weights = float_weights(mlmodel)
    layer_of, facts = assign_layers(weights, recipe, diffusers, weight_threshold)
    in_recipe = {name: layer for name, layer in layer_of.items() if layer in recipe}
    large = sum(1 for v in weights.values() if v.size >= weight_threshold)
    if large and not in_recipe and require_match:
        how = f"by tensor hash against {diffusers.label}" if diffusers else "by name"
        raise UserError(f"The mixed-bit recipe names no weight of this {stage} (matched {how}); "
                        "was it made for another model?")
    palette, average = plan_bits(weights, layer_of, recipe, weight_threshold)
    configs = {name: cto.OpPalettizerConfig(mode=mode, nbits=b, weight_threshold=int(weight_threshold))
               for name, b in palette.items()}
    stats = {"matching": "hash" if diffusers else "name", "weight_threshold": int(weight_threshold),
             "weights_over_threshold": large, "weights_matched": len(in_recipe), "weights_palettized": len(configs),
             "weights_unmatched": len(facts["unmatched"]), "unmatched_examples": facts["unmatched"][:_EXAMPLES],
             "weights_not_in_recipe": len(layer_of) - len(in_recipe),
             "recipe_entries_unmatched": len(set(recipe) - set(in_recipe.values())),
             "weight_elements": int(sum(v.size for v in weights.values())), "average_bits": round(average, 3),
             "_layers": {layer: int(weights[name].size) for name, layer in in_recipe.items()},
             "_small": _small_layers(weights, recipe, diffusers, weight_threshold), "_collisions": facts}
    if not configs:
        return None, stats
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs)), stats


# ---------------------------------------------------------------- recipe files

def _recipe_file(recipe_json) -> tuple:
    """(the JSON, a name for a bare recipe) from a path or an already-read dict."""
    if isinstance(recipe_json, dict):
        return recipe_json, "recipe"
    path = Path(recipe_json).expanduser()
    if not path.is_file():
        raise UserError(f"The mixed-bit recipe {path} does not exist.")
    try:
        return json.loads(path.read_text()), path.stem
    except json.JSONDecodeError as exc:
        raise UserError(f"The mixed-bit recipe {path} is not JSON: {exc}") from None


def _recipes(data: dict, default_name: str) -> dict:
    return data["recipes"] if "recipes" in data else {default_name: data}


def recipe_sizes(data: dict) -> dict:
    """Layer -> elements, where Apple's pre-analysis recorded them (cumulative/<bits>/metadata/sizes)."""
    for entry in (data.get("cumulative") or {}).values():
        sizes = isinstance(entry, dict) and (entry.get("metadata") or {}).get("sizes")
        if sizes:
            return {k: int(v) for k, v in sizes.items()}
    return {}


def expected_bits(recipe: dict, sizes: Optional[dict] = None, name: str = "") -> tuple:
    """(bits/weight, what it is over): the size-weighted average over the layers the recipe names, as the
    number in Apple's recipe names (build_recipe's stats['nbits']); without sizes, the number in the name."""
    sized = [k for k in recipe if sizes and k in sizes]
    if sized:
        total = sum(sizes[k] for k in sized)
        how = "its layers" if len(sized) == len(recipe) else f"{len(sized)} of its {len(recipe)} layers"
        return round(sum(recipe[k] * sizes[k] for k in sized) / total, 2), how + ", size-weighted"
    number = re.search(r"(\d+(?:\.\d+)?)_bits?(?:_|$)", name)
    if number:
        return float(number.group(1)), "the recipe's name"
    return round(sum(recipe.values()) / len(recipe), 2), "its layers, unweighted (no sizes known)"


def _check_recipe(name: str, recipe) -> None:
    bad = {k: v for k, v in recipe.items() if v not in RECIPE_BITS} if isinstance(recipe, dict) else {"": recipe}
    if bad or not recipe:
        raise UserError(f"Recipe {name!r} must map layer names to bits in {RECIPE_BITS}; "
                        f"bad entries: {dict(list(bad.items())[:3])}.")


def _choices(recipes: dict, sizes: dict) -> str:
    return ", ".join(f"{n} ({expected_bits(r, sizes, n)[0]:.2f} bits)" for n, r in recipes.items())


def load_recipe(recipe_json, recipe_name: Optional[str] = None) -> tuple:
    """(name, {module: bits}) from Apple's pre-analysis JSON (pick `recipe_name`; one recipe is picked
    without it) or a plain {module: bits}."""
    data, default_name = _recipe_file(recipe_json)
    recipes = _recipes(data, default_name)
    if not recipes:
        raise UserError("The mixed-bit recipe file holds no recipe.")
    if recipe_name is None and len(recipes) == 1:
        recipe_name = next(iter(recipes))
    if recipe_name not in recipes:
        choices = _choices(recipes, recipe_sizes(data))
        raise UserError(f"choose a recipe with --recipe-name: {choices}" if recipe_name is None else
                        f"no recipe {recipe_name!r} in the file; it has: {choices}")
    _check_recipe(recipe_name, recipes[recipe_name])
    return recipe_name, recipes[recipe_name]


def list_recipes(recipe_json, resources_dir=None, weights=None,
                 weight_threshold: int = PALETTIZE_MIN_SIZE) -> tuple:
    """([{name, layers, expected_bits, bits_over, baseline_psnr[, all_weights_bits]}], {file facts}).

    expected_bits: over the layers the recipe names, size-weighted (sizes from the diffusers weights, else
    the file's pre-analysis sizes, else the recipe's name). With a Core ML folder, all_weights_bits: over
    every float weight of its denoiser, matched as `mixed_bit` would, the unlisted ones at their 16 bits."""
    data, default_name = _recipe_file(recipe_json)
    recipes = _recipes(data, default_name)
    for name, recipe in recipes.items():
        _check_recipe(name, recipe)
    found = res.find_resources(resources_dir, require_tokenizer=False) if resources_dir else None
    diffusers = find_diffusers_weights(weights, found) if (weights or found is not None) else None
    sizes = diffusers.sizes if diffusers else recipe_sizes(data)
    baselines = data.get("baselines") or {}
    rows = []
    for name, recipe in recipes.items():
        bits, how = expected_bits(recipe, sizes, name)
        rows.append({"name": name, "layers": len(recipe), "expected_bits": bits, "bits_over": how,
                     "baseline_psnr": baselines.get(name)})
    info = {"model_version": data.get("model_version"), "baselines": {k: v for k, v in baselines.items()
                                                                      if k not in recipes},
            "sizes_from": "diffusers weights" if diffusers else ("the file" if sizes else None)}
    if found is not None:
        if found.compiled:
            raise UserError(f"{found.folder} holds compiled .mlmodelc models, whose weights cannot be read; "
                            "use the .mlpackage variant.")
        ct, _ = _ct()
        packages = [float_weights(ct.models.MLModel(str(found.models[s]), skip_model_load=True))
                    for s in found.denoiser_stages]
        info.update(matching="hash" if diffusers else "name", weights=diffusers.label if diffusers else None)
        for row in rows:
            recipe, bits, total, matched = recipes[row["name"]], 0.0, 0, {}
            for w in packages:
                layer_of, _ = assign_layers(w, recipe, diffusers, weight_threshold)
                matched.update({layer: int(w[name].size) for name, layer in layer_of.items()})
                elements = sum(v.size for v in w.values())
                bits += plan_bits(w, layer_of, recipe, weight_threshold)[1] * elements
                total += elements
            row["all_weights_bits"] = round(bits / total, 2) if total else None
            if not sizes and matched:  # sized by the Core ML weights the names matched
                row["expected_bits"], row["bits_over"] = expected_bits(recipe, matched, row["name"])
    return rows, info


def format_recipe_list(rows: list, info: dict) -> list:
    """The lines `quantize --list-recipes` prints."""
    lines = []
    for r in rows:
        line = f"{r['name']}: {r['expected_bits']:.2f} bits/weight over {r['bits_over']} ({r['layers']} layers)"
        if r.get("all_weights_bits") is not None:
            line += f"; {r['all_weights_bits']:.2f} over all the model's weights"
        if r.get("baseline_psnr") is not None:
            line += f"; baseline PSNR {r['baseline_psnr']}"
        lines.append(line)
    if info.get("baselines"):
        lines.append("baselines: " + ", ".join(f"{k} {v}" for k, v in info["baselines"].items()))
    if info.get("matching") == "name":
        lines.append(f"({NAME_MATCH_NOTE})")
    return lines


# ---------------------------------------------------------------- a resources folder

def _fingerprint(found: res.CoreMLResources) -> dict:
    return {stage: found.disk_bytes[stage] for stage in sorted(found.models)}


def _stages(found: res.CoreMLResources, stages) -> tuple:
    """The stages to compress: as given, or "denoiser" (the UNet's or MMDiT's packages), or by default the
    text encoders and the denoiser."""
    if stages is None:
        return tuple(s for s in DEFAULT_STAGES if not res.is_mmdit_stage(s)) + tuple(found.denoiser_stages)
    if stages == "denoiser":
        return tuple(found.denoiser_stages)
    stages = tuple(stages)
    unknown = [s for s in stages if not res.known_stage(s)]
    if unknown:
        raise UserError(f"Unknown stage(s) {', '.join(unknown)}; stages are {', '.join(res.STAGE_SUFFIXES)}, "
                        f"{res.MMDIT}, {res.MMDIT_CONDITIONING} and {res.MMDIT_STAGE}<N>.")
    return stages


def _compress_folder(resources_dir, out_dir, tag: str, settings: dict, stages, compress: Callable,
                     check: Optional[Callable] = None) -> Path:
    """Run `compress(stage, mlmodel) -> (mlmodel or None, stats)` over the chosen packages of a folder."""
    ct, _ = _ct()
    found = res.find_resources(resources_dir, require_tokenizer=False)
    if found.compiled:
        raise UserError(f"{found.folder} holds compiled .mlmodelc models, which cannot be re-compressed; "
                        "use the .mlpackage variant.")
    stages = _stages(found, stages)
    out = Path(out_dir).expanduser() if out_dir else found.folder.with_name(f"{found.folder.name}-{tag}")
    settings = dict(settings, stages=sorted(s for s in stages if s in found.models),
                    source=str(found.folder.resolve()), source_fingerprint=_fingerprint(found))
    if out.exists():
        manifest = out / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("settings") == settings:
            return out
        raise UserError(f"{out} already exists (from other settings); remove it or choose another folder.")

    started = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report, extra = {}, None
    try:
        _compress_entries(found, tmp, stages, tag, compress, report)
        if check is not None:
            extra = check(report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = dict(settings, settings=settings, attention=found.attention, source_manifest=found.manifest,
                    stage_results=report, bytes_before=found.total_bytes,
                    bytes=sum(r["bytes"] for r in report.values()),
                    seconds=round(time.perf_counter() - started, 3))
    averaged = [r for r in report.values() if "average_bits" in r]
    if averaged:
        manifest["average_bits"] = round(sum(r["average_bits"] * r["bytes_before"] for r in averaged)
                                         / sum(r["bytes_before"] for r in averaged), 3)
    manifest.update(extra or {})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tmp.rename(out)
    return out


def _compress_entries(found, tmp: Path, stages, tag: str, compress: Callable, report: dict) -> None:
    ct, _ = _ct()
    for entry in sorted(found.folder.iterdir()):
        stage = res.stage_of(entry)
        if entry.name == "manifest.json":
            continue
        if stage is None or stage not in stages:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
            if stage:
                report[stage] = {"file": entry.name, "action": "copied", "bytes": res.disk_bytes(entry)}
            continue
        t0 = time.perf_counter()
        model, stats = compress(stage, ct.models.MLModel(str(entry), skip_model_load=True))
        if model is None:
            shutil.copytree(entry, tmp / entry.name)
            action = "copied"
        else:
            model.user_defined_metadata[META_COMPRESSION] = tag
            model.save(str(tmp / entry.name))
            action = "compressed"
        report[stage] = dict(stats, file=entry.name, action=action, bytes_before=res.disk_bytes(entry),
                             bytes=res.disk_bytes(tmp / entry.name), seconds=round(time.perf_counter() - t0, 3))
        if "weight_elements" in stats:  # bits/weight achieved: the weights file over the weights' elements
            report[stage]["weights_file_bytes"] = weights_file_bytes(tmp / entry.name)


def weights_file_bytes(package: Path) -> int:
    """Bytes of an ML program package's weights file (where every weight but the tiniest lives)."""
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    return res.disk_bytes(weights) if weights.exists() else 0


def palettize(resources_dir, bits: int = 4, granularity: str = "per_tensor", group_size: int = 16, *,
              mode: str = "kmeans", out_dir=None, stages=None,
              weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> Path:
    """Palettize every chosen package; per_grouped_channel re-targets to iOS 18 / macOS 15."""
    if bits not in PALETTE_BITS:
        raise UserError(f"Palettization bits must be one of {PALETTE_BITS}, not {bits}.")
    if granularity not in GRANULARITIES:
        raise UserError(f"granularity must be per_tensor or per_grouped_channel, not {granularity!r}.")
    if mode not in ("kmeans", "uniform"):
        raise UserError(f"mode must be kmeans or uniform, not {mode!r}.")
    _check_kmeans(mode)
    grouped = granularity == "per_grouped_channel"
    tag = f"palettized-{bits}bit" + (f"-g{group_size}" if grouped else "") + ("-uniform" if mode == "uniform" else "")
    settings = {"method": "palettize", "bits": bits, "granularity": granularity,
                "group_size": group_size if grouped else None, "mode": mode, "weight_threshold": weight_threshold,
                "minimum_os": "macOS15" if grouped else "macOS13"}
    return _compress_folder(resources_dir, out_dir, tag, settings, stages, lambda stage, m: (palettize_model(
        m, bits, granularity, group_size, mode, weight_threshold), {}))


def linear_quantize(resources_dir, bits: int = 8, *, out_dir=None, stages=None,
                    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> Path:
    """Symmetric per-channel int8 weights for every chosen package."""
    if bits != 8:
        raise UserError("Linear quantization supports 8 bits (use palettize for fewer).")
    settings = {"method": "linear_quantize", "bits": 8, "mode": "linear_symmetric",
                "weight_threshold": weight_threshold, "minimum_os": "macOS13"}
    return _compress_folder(resources_dir, out_dir, "linear-8bit", settings, stages,
                            lambda stage, m: (linear_quantize_model(m, 8, weight_threshold), {}))


def mixed_bit(resources_dir, recipe_json, *, recipe_name: Optional[str] = None, mode: str = "kmeans",
              out_dir=None, weights=None, weight_threshold: int = PALETTIZE_MIN_SIZE) -> Path:
    """Apply one of Apple's mixed-bit palettization recipes to the denoiser's package(s) (UNet or MMDiT).

    Matched as Apple's mixed_bit_compression_apply.py does (see `assign_layers`): by tensor hash against the
    diffusers weights (`weights`: a folder, a .safetensors file or a registry name; by default the folder
    export.py converted these resources from), else by name, which the manifest says. Weights of
    `weight_threshold` (Apple's 1e5) elements or fewer stay float16. The manifest records the recipe's
    expected bits/weight, the bits planned over every weight, and those achieved on disk."""
    data, _ = _recipe_file(recipe_json)
    name, recipe = load_recipe(recipe_json, recipe_name)
    _check_kmeans(mode)
    found = res.find_resources(resources_dir, require_tokenizer=False)
    diffusers = None if found.compiled else find_diffusers_weights(weights, found)
    recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    settings = {"method": "mixed_bit", "recipe": name, "recipe_sha256": recipe_hash, "mode": mode,
                "bits": None, "minimum_os": "macOS13", "weight_threshold": int(weight_threshold),
                "matching": "hash" if diffusers else "name",
                "weights": diffusers.fingerprint() if diffusers else None}
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    matched, small, collisions = {}, {}, {"resolved": 0, "unresolved": []}

    def compress(stage, mlmodel):
        model, stats = mixed_bit_model(mlmodel, recipe, mode, not res.is_mmdit_stage(stage), diffusers=diffusers,
                                       weight_threshold=weight_threshold, stage=stage)
        matched.update(stats.pop("_layers"))
        small.update(stats.pop("_small"))
        facts = stats.pop("_collisions")
        collisions["resolved"] += facts["collisions_resolved"]
        collisions["unresolved"] += facts["collisions_unresolved"]
        return model, stats

    def check(report: dict) -> dict:
        done = [r for r in report.values() if "weight_elements" in r]
        large = sum(r["weights_over_threshold"] for r in done)
        if large and not any(r["weights_matched"] for r in done):  # an MMDiT's packages are checked together
            raise UserError("The mixed-bit recipe names no weight of this MMDiT; was it made for another model?")
        sizes = diffusers.sizes if diffusers else (recipe_sizes(data) or {**small, **matched})
        bits, over = expected_bits(recipe, sizes, name)
        elements = sum(r["weight_elements"] for r in done)
        groups = diffusers.collisions(recipe, weight_threshold) if diffusers else []
        unmatched = sorted(set(recipe) - set(matched) - set(small))
        summary = {
            "recipe": name, "matching": settings["matching"],
            "matching_note": (f"matched by tensor hash against {diffusers.label}" if diffusers else NAME_MATCH_NOTE),
            "apple_scripts": APPLE_SCRIPTS, "weight_threshold": int(weight_threshold),
            "expected_bits": bits, "expected_bits_over": over,
            "average_bits": round(sum(r["average_bits"] * r["weight_elements"] for r in done) / elements, 3)
            if elements else None,
            "achieved_bits": round(8 * sum(r["weights_file_bytes"] for r in done) / elements, 3) if elements else None,
            "weights_matched": sum(r["weights_matched"] for r in done),
            "weights_palettized": sum(r["weights_palettized"] for r in done),
            "weights_unmatched": sum(r["weights_unmatched"] for r in done),
            "recipe_entries_unmatched": len(unmatched), "recipe_entries_unmatched_examples": unmatched[:_EXAMPLES],
            "recipe_entries_under_threshold": len(set(small) - set(matched)),
            "hash_collisions": {"groups": len(groups), "examples": groups[:_EXAMPLES],
                                "resolved_by_values": collisions["resolved"],
                                "unresolved": len(collisions["unresolved"]),
                                "unresolved_examples": collisions["unresolved"][:_EXAMPLES]},
        }
        return summary

    return _compress_folder(resources_dir, out_dir, f"mixedbit-{slug}", settings, "denoiser", compress, check)


def mixed_bit_summary(manifest: dict) -> list:
    """The lines the quantize command prints after a mixed-bit run: matching, collisions, sizes, bits."""
    lines = [manifest.get("matching_note", "")]
    c = manifest.get("hash_collisions") or {}
    if c.get("groups"):
        lines.append(f"hash collisions: {c['groups']} group(s) of recipe layers share a hash (e.g. "
                     f"{' = '.join(c['examples'][0])}); {c['resolved_by_values']} weight(s) told apart by their "
                     f"values, {c['unresolved']} not (given the larger bits)")
    if manifest.get("weights_unmatched"):
        lines.append(f"{manifest['weights_unmatched']} weight(s) over the threshold matched no layer and stay float16")
    if manifest.get("recipe_entries_under_threshold"):
        lines.append(f"{manifest['recipe_entries_under_threshold']} recipe layer(s) have fewer than "
                     f"{manifest.get('weight_threshold')} elements and stay float16")
    if manifest.get("recipe_entries_unmatched"):
        lines.append(f"{manifest['recipe_entries_unmatched']} recipe layer(s) not found in the model (e.g. "
                     f"{', '.join(manifest['recipe_entries_unmatched_examples'])})")
    expected = manifest.get("expected_bits")
    lines.append(f"bits/weight: recipe {expected:.2f} (over {manifest.get('expected_bits_over')}); "
                 f"planned {manifest.get('average_bits') or 0:.2f} over every weight; "
                 f"achieved {manifest.get('achieved_bits') or 0:.2f} (weights files)")
    return [line for line in lines if line]
