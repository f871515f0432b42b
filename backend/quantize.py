"""`python -m backend quantize`: a quantized variant of a model folder, for either engine, written once.

Owns the command, the engine detection (a diffusers folder -> MLX; an Apple Core ML resources folder
-> Core ML, whose compression lives in backend/engines/coreml/quantize.py), and the cache rules of
the MLX variants:
- the variant is a folder beside its source (`<model>-mlx-q4`) that the MLX engine loads directly:
  the source's configs and tokenizers, each component's MLX parameters (quantized UNet and text
  encoder linears/convs, fp16 VAE) and the per-layer plan (backend/engines/mlx/quantize.py);
- manifest.json records method, bits, group size, recipe, size on disk, seconds taken, the source's
  path, weight-file sizes/mtimes and SHA-256; a run whose settings and source match the manifest
  writes nothing; the same settings on the same source give byte-identical weight files;
- a run writes into `<out>.tmp-<pid>` and renames it at the end: an interrupted run leaves no output.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from backend.types import UserError

METHODS = ("mlx", "linear", "mixed", "palettize")
MANIFEST = "manifest.json"
FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5")


# ---------------------------------------------------------------------------------------- sources
def detect_engine(folder: Path) -> str:
    """'mlx' for a diffusers folder, 'coreml' for Apple's Core ML resources layout."""
    if (folder / "model_index.json").is_file():
        return "mlx"
    if any(p.suffix in (".mlpackage", ".mlmodelc") for p in folder.iterdir()):
        return "coreml"
    raise UserError(f"{folder} is neither a diffusers model folder (no model_index.json) nor a Core ML "
                    "resources folder (no .mlpackage or .mlmodelc)")


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".safetensors.index.json")


def _walk(folder: Path):
    """Files under `folder` (symlinks followed, as in the Hub cache), hidden folders skipped, sorted."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            yield Path(root) / name


def source_files(folder: Path) -> dict:
    """{relative path: [bytes, mtime_ns]} of the source's weight files: the cache key."""
    out = {}
    for path in _walk(folder):
        if _is_weight_file(path):
            st = path.stat()
            out[str(path.relative_to(folder))] = [st.st_size, st.st_mtime_ns]
    return out


def sha256_of(folder: Path, files) -> str:
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0")
        with open(folder / rel, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _walk(folder))


def copy_configs(source: Path, dest: Path) -> None:
    """Everything but weights and manifests: model_index.json, configs, tokenizers, scheduler."""
    for path in _walk(source):
        if _is_weight_file(path) or path.name == MANIFEST:
            continue
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _drop_component(folder: Path, *components: str) -> None:
    """Leave components out of a copied diffusers folder: their folders gone, [null, null] in model_index.json."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    for name in components:
        shutil.rmtree(folder / name, ignore_errors=True)
        index[name] = [None, None]
    index_file.write_text(json.dumps(index, indent=1))


# -------------------------------------------------------------------------------------- the cache
def read_manifest(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _remove_stale_temporaries(out: Path) -> None:
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def write_atomically(out: Path, build) -> None:
    """Run `build(tmp)` into `<out>.tmp-<pid>`, then put it in place of `out`; on failure remove it."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if out.exists():  # an older variant of ours: move it aside, then drop it
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------- MLX
def _mlx_scheme(method: Optional[str], bits: Optional[int], recipe) -> str:
    from backend.engines.mlx.quantize import SCHEMES
    if method == "mixed" or recipe:
        if bits is not None:
            raise UserError("give either --bits (one width for every layer) or a mixed-bit recipe, not both")
        return "mixed"
    if bits is None:
        raise UserError("give --bits (8, 6, 4, 3 or 2), or --method mixed for the mixed-bit recipe")
    if f"q{bits}" not in SCHEMES:
        raise UserError(f"MLX quantization supports 8, 6, 4, 3 or 2 bits (got {bits})")
    return f"q{bits}"


def quantize_mlx(source: Path, method: Optional[str] = None, bits: Optional[int] = None, recipe=None,
                 group_size: Optional[int] = None, out=None, spec=None, t5: bool = True) -> tuple[Path, dict, bool]:
    """Write (or find up to date) the MLX variant of a diffusers folder; return (folder, manifest, written).
    `spec`: the model as the registry describes it (a distilled transformer file in place of the folder's);
    `t5=False` leaves SD3's T5 encoder out of the variant."""
    from backend.checkpoint import SETTINGS_FILE, ModelSpec
    from backend.engines.mlx import quantize as Q

    source = Path(source).resolve()
    if Q.read_saved_plan(source) is not None:
        raise UserError(f"{source.name} is already a quantized variant; quantize its fp16 source instead")
    spec = spec or ModelSpec.from_folder(source)
    scheme = _mlx_scheme(method, bits, recipe)
    recipe_doc = Q.scheme_recipe(scheme, group_size, recipe)  # validates group size and recipe
    out = Path(out).expanduser().resolve() if out else source.with_name(f"{source.name}-mlx-{scheme}")
    if out == source:
        raise UserError("--out must differ from the source folder")
    files = source_files(source)
    settings = {"format": FORMAT, "engine": "mlx", "method": scheme, "bits": bits, "t5": bool(t5 and spec.has_t5),
                "weight_files": {k: [str(f) for f in v] for k, v in spec.weight_files.items()},
                "group_size": int(recipe_doc.get("group_size", Q.DEFAULT_GROUP_SIZE)),
                "recipe": None if scheme != "mixed" else {
                    "file": str(Path(recipe or Q.DEFAULT_RECIPE).resolve()),
                    "sha256": hashlib.sha256(json.dumps(recipe_doc, sort_keys=True).encode()).hexdigest()},
                "source": str(source), "source_files": files}
    existing = read_manifest(out)
    if existing is not None and existing.get("settings") == settings:
        return out, existing, False
    if out.exists() and (existing is None or existing.get("settings", {}).get("engine") != "mlx"):
        raise UserError(f"{out} already exists and is not an MLX variant written by this command; "
                        "remove it or choose another --out")
    _remove_stale_temporaries(out)

    started = time.perf_counter()
    manifest = {}

    def build(tmp: Path) -> None:
        from backend.engines.mlx.engine import MLXStages
        copy_configs(source, tmp)
        if spec.has_t5 and not t5:  # a variant made without T5 is a checkpoint without T5
            _drop_component(tmp, *spec.traits.t5)
        # the settings it was made with (a registry entry's defaults included) travel with the variant
        (tmp / SETTINGS_FILE).write_text(json.dumps(spec.defaults, indent=1))
        stages = MLXStages(spec, precision="fp16", t5=t5)
        stages.quantized_layers = Q.quantize_stages(stages, scheme, group_size, recipe)
        stages.load_image_encoder()  # the variant keeps the VAE encoder, for image-to-image
        Q.save_stages(stages, tmp, scheme)
        manifest.update(
            settings=settings, engine="mlx", method=scheme, bits=bits, group_size=settings["group_size"],
            recipe=settings["recipe"], layers=stages.quantized_layers, weight_bytes=stages.weight_bytes(),
            bytes_on_disk=folder_bytes(tmp), source_weight_bytes=sum(size for size, _ in files.values()),
            source={"path": str(source), "weights_sha256": sha256_of(source, files), "files": files},
            seconds=round(time.perf_counter() - started, 3))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    write_atomically(out, build)
    return out, manifest, True


# ---------------------------------------------------------------------------------------- Core ML
def quantize_coreml(folder: Path, method: Optional[str], bits: Optional[int], recipe, group_size, out, *,
                    recipe_name: Optional[str] = None, weights=None, weight_threshold: Optional[int] = None) -> Path:
    """Compress a Core ML resources folder. mixed: `recipe` (Apple's recipe JSON), `recipe_name` (needed when
    it holds several), `weights` (the diffusers checkpoint to hash; default: the one it was exported from),
    `weight_threshold` (default Apple's 1e5 elements)."""
    from backend.engines.coreml import quantize as cq
    method = method or "palettize"
    if method == "mlx":
        raise UserError(f"{folder.name} holds Core ML resources; --method mlx needs a diffusers folder")
    if method != "mixed" and (recipe_name or weights):
        raise UserError("--recipe-name and --weights are for --method mixed")
    if method == "palettize":
        if bits is None:
            raise UserError("give --bits for palettization (8, 6, 4 or 2)")
        grouped = group_size is not None
        kw = {} if weight_threshold is None else {"weight_threshold": weight_threshold}
        return cq.palettize(folder, bits, "per_grouped_channel" if grouped else "per_tensor",
                            group_size or 16, out_dir=out, **kw)
    if method == "linear":
        kw = {} if weight_threshold is None else {"weight_threshold": weight_threshold}
        return cq.linear_quantize(folder, bits or 8, out_dir=out, **kw)
    if not recipe:
        raise UserError("--method mixed on Core ML resources needs --recipe (an Apple mixed-bit recipe JSON)")
    if bits is not None:
        raise UserError("give either --bits or a mixed-bit recipe, not both")
    return cq.mixed_bit(folder, recipe, recipe_name=recipe_name, out_dir=out, weights=weights,
                        weight_threshold=cq.PALETTIZE_MIN_SIZE if weight_threshold is None else weight_threshold)


# ------------------------------------------------------------------------------------------- CLI
def _folder(model: str) -> Path:
    folder = Path(model).expanduser()
    if not folder.is_dir():
        from backend import registry
        folder = registry.resolve(model)
    return folder


def quantize(model: str, method: Optional[str] = None, bits: Optional[int] = None, recipe=None,
             group_size: Optional[int] = None, out=None, *, recipe_name: Optional[str] = None, weights=None,
             weight_threshold: Optional[int] = None) -> tuple[Path, dict, bool]:
    """The command's work, callable from Python: (variant folder, its manifest, whether it was written)."""
    if method is not None and method not in METHODS:
        raise UserError(f"unknown method '{method}': choose {', '.join(METHODS)}")
    folder = _folder(model)
    engine = detect_engine(folder)
    if engine == "coreml":
        done = Path(quantize_coreml(folder, method, bits, recipe, group_size, out, recipe_name=recipe_name,
                                    weights=weights, weight_threshold=weight_threshold))
        return done, read_manifest(done) or {}, True
    if recipe_name or weights or weight_threshold is not None:
        raise UserError("--recipe-name, --weights and --weight-threshold are for Core ML resources "
                        "(Apple's mixed-bit recipes); the MLX recipe has one plan")
    if method == "palettize":
        raise UserError(f"{folder.name} is a diffusers folder: palettization is a Core ML method; for MLX use "
                        "--method mlx --bits 8|6|4|3|2 or --method mixed")
    return quantize_mlx(folder, method, bits, recipe, group_size, out)


def list_recipes(recipe, model: Optional[str] = None, weights=None, weight_threshold: Optional[int] = None):
    """`--list-recipes`: ([rows], info) for each recipe of an Apple recipe file (see coreml quantize.list_recipes)."""
    from backend.engines.coreml import quantize as cq
    if not recipe:
        raise UserError("--list-recipes needs --recipe (an Apple mixed-bit recipe JSON)")
    folder = None
    if model:
        folder = _folder(model)
        if detect_engine(folder) != "coreml":
            raise UserError(f"{folder.name} is a diffusers folder: give the Core ML resources as --model and the "
                            "diffusers folder as --weights")
    return cq.list_recipes(recipe, folder, weights,
                           cq.PALETTIZE_MIN_SIZE if weight_threshold is None else weight_threshold)


def cmd_quantize(a) -> int:
    if a.list_recipes:
        from backend.engines.coreml.quantize import format_recipe_list
        rows, info = list_recipes(a.recipe, a.model, a.weights, a.weight_threshold)
        if a.json:
            print(json.dumps({"recipes": rows, **info}))
        else:
            print("\n".join(format_recipe_list(rows, info)))
        return 0
    if not a.model:
        raise UserError("give --model (a diffusers folder or Core ML resources), or --list-recipes")
    folder, manifest, written = quantize(a.model, a.method, a.bits, a.recipe, a.group_size, a.out,
                                         recipe_name=a.recipe_name, weights=a.weights,
                                         weight_threshold=a.weight_threshold)
    if a.json:
        print(json.dumps({"out": str(folder), "written": written, **manifest}))
        return 0
    mib = manifest.get("bytes_on_disk", manifest.get("bytes", 0)) / 2**20
    if not written:
        print(f"{folder}: up to date ({manifest.get('method')}, {mib:.1f} MiB); nothing written")
    else:
        before = manifest.get("bytes_before")
        was = f" (before: {before / 2**20:.1f} MiB)" if before else ""
        print(f"{folder}: {manifest.get('method')}, {mib:.1f} MiB on disk{was}, {manifest.get('seconds', 0):.1f}s")
    if manifest.get("method") == "mixed_bit":
        from backend.engines.coreml.quantize import mixed_bit_summary
        print("\n".join(mixed_bit_summary(manifest)))
    if manifest.get("layers"):
        print(manifest["layers"])
    return 0


def add_command(sub) -> None:
    q = sub.add_parser("quantize", help="write a quantized variant of a model (MLX or Core ML), once")
    q.add_argument("--model", help="a diffusers folder (-> MLX variant) or an Apple Core ML resources folder "
                                   "(required unless --list-recipes)")
    q.add_argument("--method", choices=METHODS,
                   help="mlx/linear: group-wise bits (MLX), or linear int8 (Core ML); mixed: a mixed-bit recipe; "
                        "palettize: Core ML look-up tables. Default: mlx for diffusers, palettize for Core ML")
    q.add_argument("--bits", type=int, help="MLX: 8, 6, 4, 3, 2; Core ML palettize: 8, 6, 4, 2")
    q.add_argument("--recipe", help="mixed-bit recipe JSON (MLX default: configs/mixed_bit_recipes/mlx-mixed.json; "
                                    "Core ML: Apple's pre-analysis JSON, e.g. "
                                    "stabilityai-stable-diffusion-xl-base-1.0_palettization_recipe.json)")
    q.add_argument("--recipe-name", help="Core ML: which recipe of the file, e.g. recipe_4.50_bit_mixedpalette "
                                         "(needed when it holds several)")
    q.add_argument("--list-recipes", action="store_true",
                   help="list the file's recipes: expected bits/weight, baseline PSNR (and with --model, bits over "
                        "all the model's weights); writes nothing")
    q.add_argument("--weights", help="Core ML mixed: the diffusers checkpoint (folder, .safetensors or registry "
                                     "name) whose UNet weights match the recipe's layers by tensor hash, as Apple's "
                                     "tool does (default: the folder the resources were exported from)")
    q.add_argument("--weight-threshold", type=int,
                   help="Core ML: weights with this many elements or fewer stay float (mixed default: Apple's 100000)")
    q.add_argument("--group-size", type=int, help="MLX: 128, 64 (default) or 32; Core ML: palettes per group")
    q.add_argument("--out", help="output folder (default: beside the source, e.g. <model>-mlx-q4)")
    q.add_argument("--json", action="store_true", help="print the manifest as one JSON line")
    q.set_defaults(func=cmd_quantize)
