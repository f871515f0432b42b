"""Weight compression of Core ML resources folders with coremltools.optimize.coreml.

Three methods, each reading a resources folder of `.mlpackage`s (see resources.py) and writing a new one:

- `palettize`: k-means (or uniform) look-up tables of 8, 6, 4 or 2 bits, per tensor or per grouped channel
  (grouped needs the iOS 18 / macOS 15 opset: the program is re-targeted first);
- `linear_quantize`: symmetric 8-bit integers with a per-channel scale;
- `mixed_bit`: Apple's mixed-bit palettization recipes (mixed_bit_compression_pre_analysis.py's JSON:
  {"recipes": {"recipe_4.50_bit_mixedpalette": {"down_blocks.0.attentions.0.proj_in": 6, ...}}}),
  applied to the UNet; a recipe names torch modules, matched here to the Core ML weights by name.

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
    """Core ML weight name -> bits, for every weight whose module a recipe entry names.

    Core ML keeps the traced module path with '.' turned to '_' (and maybe a wrapper's prefix, like
    export.py's 'unet_'), so a recipe key matches a weight whose module name ends with it.
    (Apple's apply script matches by weight values instead, which needs the torch checkpoint.)
    """
    return {name: recipe[key] for name, key in _matches(weight_names, recipe).items()}


def mixed_bit_model(mlmodel, recipe: dict, mode: str = "kmeans", require_match: bool = True):
    """Palettize each weight a recipe names to its bits; return (model, stats). `require_match=False`: a
    package the recipe does not name (an MMDiT stage without blocks) is left as it is."""
    ct, cto = _ct()
    weights = cto.get_weights_metadata(mlmodel, weight_threshold=0)
    keys = _matches(weights, recipe)
    if not keys and require_match:
        raise UserError("The mixed-bit recipe names no weight of this UNet; was it made for another model?")
    bits = {name: recipe[key] for name, key in keys.items()}
    configs = {name: cto.OpPalettizerConfig(mode=mode, nbits=b, weight_threshold=0)
               for name, b in bits.items() if b != 16}
    total = sum(w.val.size for w in weights.values())
    bits_sum = sum(w.val.size * bits.get(name, 16) for name, w in weights.items())
    stats = {"weights_matched": len(keys), "weights_palettized": len(configs),
             "recipe_entries_unmatched": len(set(recipe) - set(keys.values())),
             "average_bits": round(bits_sum / total, 3)}
    if not configs:
        return None, stats
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs)), stats


def load_recipe(recipe_json, recipe_name: Optional[str] = None) -> tuple:
    """(name, {module: bits}) from Apple's pre-analysis JSON (pick `recipe_name`) or a plain {module: bits}."""
    if isinstance(recipe_json, dict):
        data, default_name = recipe_json, "recipe"
    else:
        path = Path(recipe_json).expanduser()
        if not path.is_file():
            raise UserError(f"The mixed-bit recipe {path} does not exist.")
        data, default_name = json.loads(path.read_text()), path.stem
    if "recipes" in data:
        recipes = data["recipes"]
        if recipe_name is None and len(recipes) == 1:
            recipe_name = next(iter(recipes))
        if recipe_name not in recipes:
            raise UserError(f"Choose a recipe: {', '.join(recipes)}" if recipe_name is None else
                            f"No recipe {recipe_name!r} in the file; it has: {', '.join(recipes)}.")
        recipe = recipes[recipe_name]
    else:
        recipe, recipe_name = data, recipe_name or default_name
    bad = {k: v for k, v in recipe.items() if v not in RECIPE_BITS}
    if bad or not recipe:
        raise UserError(f"Recipe {recipe_name!r} must map layer names to bits in {RECIPE_BITS}; "
                        f"bad entries: {dict(list(bad.items())[:3])}.")
    return recipe_name, recipe


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
    report = {}
    try:
        _compress_entries(found, tmp, stages, tag, compress, report)
        if check is not None:
            check(report)
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
              out_dir=None) -> Path:
    """Apply one of Apple's mixed-bit palettization recipes to the denoiser's package(s) (UNet or MMDiT)."""
    name, recipe = load_recipe(recipe_json, recipe_name)
    _check_kmeans(mode)
    recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    settings = {"method": "mixed_bit", "recipe": name, "recipe_sha256": recipe_hash, "mode": mode,
                "bits": None, "minimum_os": "macOS13"}
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)

    def check(report: dict) -> None:  # an MMDiT's packages are checked together: some stages hold no block
        if not any(r.get("weights_matched") for r in report.values()):
            raise UserError("The mixed-bit recipe names no weight of this MMDiT; was it made for another model?")

    return _compress_folder(resources_dir, out_dir, f"mixedbit-{slug}", settings, "denoiser",
                            lambda stage, m: mixed_bit_model(m, recipe, mode, not res.is_mmdit_stage(stage)),
                            check)
