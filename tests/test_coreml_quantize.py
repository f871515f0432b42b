"""Core ML weight compression of resources folders: palettization, 8-bit linear, Apple's mixed-bit recipes.

Each setting runs on a small synthetic resources folder whose bytes are nearly all weights (so the size
ratios are meaningful), and the real paths once on the tiny exports from test_coreml_export.py.
Programs are checked through their specs: the compressed weights must be constexpr_* ops.
"""
import json
from pathlib import Path

import numpy as np
import pytest

try:
    import coremltools as ct
    HAVE_COREMLTOOLS = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_COREMLTOOLS = False

pytestmark = pytest.mark.skipif(not HAVE_COREMLTOOLS, reason="coremltools cannot be imported here")

from backend.types import UserError  # noqa: E402
from backend.engines.coreml import quantize as q, resources as res  # noqa: E402
from tests.test_coreml_export import tiny_export  # noqa: E402

try:
    import sklearn  # noqa: F401
    KMEANS = "kmeans"
except ImportError:
    KMEANS = None

WIDTH = 256
UNET_LAYERS = ("down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1",
               "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.1.resnets.2.conv2")
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "mixed_bit_recipes"


def _package(path: Path, layers, embedding: bool = False, seed: int = 0):
    """A float16 ML program: (optional token embedding) then one linear layer per name, named as traced."""
    from coremltools.converters.mil import Builder as mb
    rng = np.random.default_rng(seed)
    shape = (1, 77) if embedding else (1, WIDTH)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS16)
    def program(x):
        if embedding:
            table = mb.const(val=rng.standard_normal((512, WIDTH)).astype(np.float32), name="embeddings_weight")
            x = mb.gather(x=table, indices=mb.cast(x=x, dtype="int32"), axis=0)
        for name in layers:
            weight = mb.const(val=rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
                              name="unet_" + name.replace(".", "_") + "_weight")
            x = mb.linear(x=x, weight=weight)
        return x

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13,
                       skip_model_load=True)
    model.user_defined_metadata[res.META_ATTENTION] = "original"
    model.save(str(path))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic") / "Resources"
    folder.mkdir()
    name = "Stable_Diffusion_version_synthetic_{}.mlpackage"
    _package(folder / name.format("text_encoder"), ["text_model.encoder.layers.0.mlp.fc1"], embedding=True)
    _package(folder / name.format("unet"), UNET_LAYERS, seed=1)
    _package(folder / name.format("vae_decoder"), ["decoder.conv_in"], seed=2)
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def weight_bytes(package: Path) -> int:
    return res.disk_bytes(package / "Data" / "com.apple.CoreML" / "weights")


def ops(path: Path) -> dict:
    return res.describe_model(path).op_counts


@pytest.mark.parametrize("bits, most, mode", [(8, 0.55, "uniform"), (6, 0.42, "uniform"),
                                              (4, 0.3, KMEANS or "uniform"), (2, 0.17, "uniform")])
def test_palettize_every_bit_width_shrinks_the_weights(synthetic, tmp_path, bits, most, mode):
    out = q.palettize(synthetic, bits, mode=mode, out_dir=tmp_path / f"p{bits}")
    before, after = res.find_resources(synthetic), res.find_resources(out)
    assert set(after.models) == set(before.models) and after.attention == "original"
    unet = after.models["Unet"]
    assert ops(unet)["constexpr_lut_to_dense"] == len(UNET_LAYERS)
    assert weight_bytes(unet) <= most * weight_bytes(before.models["Unet"])
    # the token embedding (a gather) stays float; the text encoder's linear layer is palettized
    assert ops(after.models["TextEncoder"])["constexpr_lut_to_dense"] == 1
    # the VAE is copied as it is, and every model keeps its inputs and outputs
    assert after.disk_bytes["VAEDecoder"] == before.disk_bytes["VAEDecoder"]
    for stage in before.models:
        assert after.io(stage).inputs == before.io(stage).inputs
        assert after.io(stage).outputs == before.io(stage).outputs
    tag = f"palettized-{bits}bit" + ("-uniform" if mode == "uniform" else "")
    assert res.describe_model(unet).metadata[q.META_COMPRESSION] == tag

    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["method"], manifest["bits"], manifest["granularity"]) == ("palettize", bits, "per_tensor")
    assert manifest["source"] == str(synthetic.resolve())
    results = manifest["stage_results"]
    assert results["Unet"]["action"] == "compressed" and results["VAEDecoder"]["action"] == "copied"
    assert results["Unet"]["bytes"] == after.disk_bytes["Unet"] and results["Unet"]["seconds"] >= 0
    assert manifest["bytes"] == after.total_bytes and manifest["bytes_before"] == before.total_bytes


def test_per_grouped_channel_palettes_need_and_get_the_ios18_opset(synthetic, tmp_path):
    out = q.palettize(synthetic, 4, "per_grouped_channel", group_size=16, mode="uniform", out_dir=tmp_path / "g")
    unet = res.find_resources(out).models["Unet"]
    spec = ct.utils.load_spec(str(unet))
    assert spec.specificationVersion >= 9 and "CoreML8" in spec.mlProgram.functions["main"].opset
    assert ops(unet)["constexpr_lut_to_dense"] == len(UNET_LAYERS)
    assert weight_bytes(unet) <= 0.3 * weight_bytes(synthetic / unet.name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["group_size"] == 16 and manifest["minimum_os"] == "macOS15"


def test_linear_8bit_is_symmetric_affine_dequantize(synthetic, tmp_path):
    out = q.linear_quantize(synthetic, 8, out_dir=tmp_path / "l8")
    unet = res.find_resources(out).models["Unet"]
    assert ops(unet)["constexpr_affine_dequantize"] == len(UNET_LAYERS)
    assert weight_bytes(unet) <= 0.55 * weight_bytes(synthetic / unet.name)
    spec = ct.utils.load_spec(str(unet))
    for op in spec.mlProgram.functions["main"].block_specializations["CoreML6"].operations:
        if op.type == "constexpr_affine_dequantize":  # symmetric: every zero point is 0
            assert not np.frombuffer(op.attributes["zero_point"].immediateValue.tensor.bytes.values, np.int8).any()
    with pytest.raises(UserError, match="8 bits"):
        q.linear_quantize(synthetic, 4)


def test_running_twice_keeps_the_first_result_and_bad_settings_are_user_errors(synthetic, tmp_path):
    out = q.palettize(synthetic, 4, mode="uniform", out_dir=tmp_path / "once")
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert q.palettize(synthetic, 4, mode="uniform", out_dir=tmp_path / "once") == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="already exists"):
        q.palettize(synthetic, 2, mode="uniform", out_dir=out)
    with pytest.raises(UserError, match="bits"):
        q.palettize(synthetic, 3)
    with pytest.raises(UserError, match="granularity"):
        q.palettize(synthetic, 4, "per_block")


def test_mixed_bit_applies_apples_recipe_format_by_layer_name(synthetic, tmp_path):
    recipes = {"model_version": "synthetic", "baselines": {"original": 80.0},
               "recipes": {"recipe_a": {layer: 8 for layer in UNET_LAYERS},
                           "recipe_b": {UNET_LAYERS[0]: 2, UNET_LAYERS[1]: 4, UNET_LAYERS[2]: 16,
                                        "up_blocks.9.not_here": 4}}}
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps(recipes))
    with pytest.raises(UserError, match="choose a recipe with --recipe-name: recipe_a .*, recipe_b"):
        q.mixed_bit(synthetic, path)
    # the synthetic weights (256 x 256) are under Apple's 1e5-element threshold: lowered here
    out = q.mixed_bit(synthetic, path, recipe_name="recipe_b", mode="uniform", out_dir=tmp_path / "mb",
                      weight_threshold=1000)
    unet = res.find_resources(out).models["Unet"]
    assert ops(unet)["constexpr_lut_to_dense"] == 2  # the 16-bit and the unnamed layers stay float16
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["stage_results"]["Unet"]
    assert (stats["weights_matched"], stats["weights_palettized"], stats["recipe_entries_unmatched"]) == (3, 2, 1)
    assert manifest["average_bits"] == pytest.approx((2 + 4 + 16 + 16) / 4, abs=0.01)
    assert manifest["stage_results"]["TextEncoder"]["action"] == "copied"
    # no diffusers weights beside these resources: matched by name, and it says so
    assert manifest["matching"] == "name" and manifest["matching_note"] == q.NAME_MATCH_NOTE
    assert manifest["expected_bits"] == pytest.approx((2 + 4 + 16) / 3, abs=0.01)  # sizes of the matched weights
    assert manifest["recipe_entries_unmatched_examples"] == ["up_blocks.9.not_here"]

    # a recipe for another model fails before anything is written
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"some.other.layer": 4}))
    with pytest.raises(UserError, match="names no weight"):
        q.mixed_bit(synthetic, wrong, mode="uniform", out_dir=tmp_path / "never", weight_threshold=1000)
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()


def test_apples_threshold_keeps_small_weights_float(synthetic, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({layer: 4 for layer in UNET_LAYERS}))
    assert q.PALETTIZE_MIN_SIZE == 100_000 and WIDTH * WIDTH < q.PALETTIZE_MIN_SIZE
    out = q.mixed_bit(synthetic, path, mode="uniform", out_dir=tmp_path / "default")  # Apple's 1e5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weight_threshold"] == 100_000 and manifest["stage_results"]["Unet"]["action"] == "copied"
    assert manifest["weights_palettized"] == 0 and manifest["recipe_entries_under_threshold"] == len(UNET_LAYERS)
    # exactly at the threshold: get_weights_metadata keeps it (>=), the palettizer does not (>), as in Apple's
    out = q.mixed_bit(synthetic, path, mode="uniform", out_dir=tmp_path / "edge", weight_threshold=WIDTH * WIDTH)
    stats = json.loads((out / "manifest.json").read_text())["stage_results"]["Unet"]
    assert (stats["weights_matched"], stats["weights_palettized"]) == (len(UNET_LAYERS), 0)


def _package_with(path: Path, weights: dict) -> None:
    """A float16 ML program of linear layers with the given weights, const names as traced."""
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, WIDTH))], opset_version=ct.target.iOS16)
    def program(x):
        for name, value in weights.items():
            x = mb.linear(x=x, weight=mb.const(val=value.astype(np.float32),
                                               name="unet_" + name.replace(".", "_") + "_weight"))
        return x
    ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13,
               skip_model_load=True).save(str(path))


def _lut_bits(package: Path) -> list:
    """The bits of each palettized weight of a package (its look-up table's length)."""
    spec = ct.utils.load_spec(str(package))
    return sorted(int(np.log2(op.attributes["lut"].type.tensorType.dimensions[-1].constant.size))
                  for block in spec.mlProgram.functions["main"].block_specializations.values()
                  for op in block.operations if op.type == "constexpr_lut_to_dense")


def test_hash_collisions_are_told_apart_by_value_or_reported(tmp_path):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal((WIDTH, WIDTH)).astype(np.float16) for _ in range(3))
    b.flat[0] = a.flat[0]  # a and b: same hash, other values; d: the same tensor as c
    layers = {"blocks.a": a, "blocks.b": b, "blocks.c": c, "blocks.d": c.copy()}
    folder = tmp_path / "Resources"
    folder.mkdir()
    # an unconverted layout: Core ML names that match no recipe key, so only the hash can match them
    _package_with(folder / "Stable_Diffusion_version_x_unet.mlpackage",
                  {f"layer{i}": w for i, w in enumerate(layers.values())})
    _package(folder / "Stable_Diffusion_version_x_text_encoder.mlpackage", ["fc1"], embedding=True)
    _package(folder / "Stable_Diffusion_version_x_vae_decoder.mlpackage", ["conv_in"])
    weights = tmp_path / "unet.safetensors"
    save_file({k + ".weight": v for k, v in layers.items()}, str(weights))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"recipes": {"r": {"blocks.a": 2, "blocks.b": 4, "blocks.c": 6, "blocks.d": 8}}}))
    out = q.mixed_bit(folder, recipe, mode="uniform", out_dir=tmp_path / "o", weights=weights, weight_threshold=1000)
    manifest = json.loads((out / "manifest.json").read_text())
    # coremltools keeps one const for c and d (identical values): 3 Core ML weights
    assert manifest["matching"] == "hash" and manifest["weights_matched"] == 3
    c_ = manifest["hash_collisions"]
    assert c_["groups"] == 2 and ["blocks.a", "blocks.b"] in c_["examples"]
    assert c_["resolved_by_values"] == 2 and c_["unresolved"] == 1  # c = d: it takes the larger bits
    assert c_["unresolved_examples"][0] == ["blocks.c", "blocks.d"]
    assert _lut_bits(out / "Stable_Diffusion_version_x_unet.mlpackage") == [2, 4, 8]
    lines = q.mixed_bit_summary(manifest)
    assert any(line.startswith("hash collisions: 2 group(s)") for line in lines)
    # an already compressed package is refused, in one sentence
    with pytest.raises(UserError, match="already compressed"):
        q.mixed_bit(out, recipe, mode="uniform", weights=weights, weight_threshold=1000)


def test_tensor_hash_is_apples_and_float32_goes_through_float16():
    w = np.random.default_rng(0).standard_normal((8, 4, 1, 1)).astype(np.float32)
    assert q.tensor_hash(w) == float(w.astype(np.float16).ravel()[0]) + 32
    assert q.tensor_hash(w) == q.tensor_hash(w.astype(np.float16).reshape(8, 4))  # Linear vs its 1x1 conv


def _apple_file(tmp_path) -> Path:
    """Apple's pre-analysis layout: recipes named by their bits, per-layer sizes, baselines."""
    sizes = {"down_blocks.0.attentions.0.proj_in": 300_000, "down_blocks.0.resnets.0.conv1": 100_000,
             "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 600_000}
    recipes = {"recipe_4.50_bit_mixedpalette": dict(zip(sizes, (4, 8, 4))),
               "recipe_6.00_bit_mixedpalette": dict(zip(sizes, (6, 6, 6)))}
    data = {"single_layer": {}, "cumulative": {"4": {"metadata": {"sizes": sizes}}}, "model_version": "x/y",
            "baselines": {"original": 82.2, "linear_8bit": 66.025, "recipe_4.50_bit_mixedpalette": 75.8,
                          "recipe_6.00_bit_mixedpalette": 79.9}, "recipes": recipes}
    path = tmp_path / "x-y_palettization_recipe.json"
    path.write_text(json.dumps(data))
    return path


def test_recipes_are_listed_with_their_bits_and_psnr(tmp_path, capsys):
    from backend.__main__ import main
    path = _apple_file(tmp_path)
    assert main(["quantize", "--recipe", str(path), "--list-recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # (4*300k + 8*100k + 4*600k) / 1M = 4.4: size-weighted over the recipe's layers, as Apple's names are
    assert lines[0].startswith("recipe_4.50_bit_mixedpalette: 4.40 bits/weight over its layers, size-weighted")
    assert lines[0].endswith("baseline PSNR 75.8") and lines[1].startswith("recipe_6.00_bit_mixedpalette: 6.00")
    assert lines[2] == "baselines: original 82.2, linear_8bit 66.025"
    rows, info = q.list_recipes(path)
    assert [r["name"] for r in rows] == ["recipe_4.50_bit_mixedpalette", "recipe_6.00_bit_mixedpalette"]
    # without sizes in the file, the bits in the name
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"recipes": {"recipe_3.41_bit_mixedpalette": {"a.b": 4}}}))
    assert q.list_recipes(bare)[0][0]["expected_bits"] == 3.41


def test_listing_with_the_model_gives_bits_over_all_its_weights(synthetic, tmp_path, capsys):
    from backend.__main__ import main
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"recipes": {"half": {UNET_LAYERS[0]: 2, UNET_LAYERS[1]: 2},
                                            "none": {UNET_LAYERS[0]: 16}}}))
    assert main(["quantize", "--model", str(synthetic), "--recipe", str(path), "--list-recipes",
                 "--weight-threshold", "1000"]) == 0
    out = capsys.readouterr().out.splitlines()
    # two of the four equal-sized weights at 2 bits, two at 16 (and a few tiny float consts)
    assert out[0].startswith("half: 2.00 bits/weight over its layers, size-weighted (2 layers); 9.0")
    assert "16.00 over all the model's weights" in out[1] and out[-1] == f"({q.NAME_MATCH_NOTE})"


def test_cli_without_a_recipe_name_lists_them_in_one_line(synthetic, tmp_path, capsys):
    from backend.__main__ import main
    path = _apple_file(tmp_path)
    args = ["quantize", "--model", str(synthetic), "--method", "mixed", "--recipe", str(path),
            "--out", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err == ("error: choose a recipe with --recipe-name: recipe_4.50_bit_mixedpalette "
                                            "(4.40 bits), recipe_6.00_bit_mixedpalette (6.00 bits)\n")
    assert main(args + ["--recipe-name", "recipe_9_bit"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no recipe 'recipe_9_bit' in the file; it has: recipe_4.50_bit_mixedpalette")
    assert not (tmp_path / "o").exists()


def test_example_recipes_are_apples_format_and_name_real_layers():
    import torch
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):  # SD 1.5's UNet is diffusers' default configuration with 768-wide text
        names = {n for n, _ in UNet2DConditionModel(cross_attention_dim=768).named_modules()}
    # Apple's format has "recipes"; other engines' recipe files may share the folder
    files = [p for p in sorted(RECIPES.glob("*.json")) if "recipes" in json.loads(p.read_text())]
    assert len(files) >= 2
    for path in files:
        name, recipe = q.load_recipe(path)
        assert name in json.loads(path.read_text())["recipes"] and recipe
        if path.name.startswith("sd15"):
            assert set(recipe) <= names


def test_compiled_models_cannot_be_recompressed(tmp_path):
    from tests.test_coreml_export import _apple_compiled_sd
    _apple_compiled_sd(tmp_path / "compiled")
    with pytest.raises(UserError, match="mlmodelc"):
        q.palettize(tmp_path / "compiled", 4, mode="uniform")


# ------------------------------------------------------------ the real exports

def test_mixed_bit_recipe_of_torch_names_covers_both_unet_chunks(tmp_path_factory, tiny_pipelines):
    pipe, _, found = tiny_export(tmp_path_factory, tiny_pipelines, "sdxl", attention="split_einsum", chunk_unet=True)
    recipe = {name: 4 for name, module in pipe.unet.named_modules()
              if getattr(module, "weight", None) is not None and module.weight.ndim >= 2}
    smallest = min(pipe.unet.get_submodule(name).weight.numel() for name in recipe)
    out = q.mixed_bit(found.folder, {"recipes": {"all_4bit": recipe}}, mode="uniform", weight_threshold=smallest - 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["matching"] == "hash"  # against the diffusers folder the export's manifest names
    chunks = [manifest["stage_results"][s] for s in ("UnetChunk1", "UnetChunk2")]
    assert sum(c["weights_matched"] for c in chunks) == len(recipe)  # every layer, each in one chunk
    assert all(c["action"] == "compressed" for c in chunks)
    assert manifest["recipe_entries_unmatched"] == 0 and manifest["weights_unmatched"] == 0
    after = res.find_resources(out)
    assert after.attention == "split_einsum" and after.chunked
    assert sum(ops(after.models[s])["constexpr_lut_to_dense"] for s in after.unet_stages) == len(recipe)
    assert after.disk_bytes["UnetChunk1"] < 0.5 * found.disk_bytes["UnetChunk1"]
    # what the engine reads is unchanged: every model's tensors, the tokenizer, the configs
    for stage in found.models:
        assert after.io(stage).inputs == found.io(stage).inputs
        assert after.io(stage).outputs == found.io(stage).outputs
    assert after.vocab.read_text() == found.vocab.read_text() and after.configs is not None


def test_hash_matching_on_a_tiny_unet_gives_the_recipes_bits(tmp_path_factory, tiny_pipelines, tmp_path, capsys):
    """Apple's rule on a real export: each Core ML weight gets the bits of the diffusers layer with its hash."""
    from backend.__main__ import main
    pipe, diffusers_dir, found = tiny_export(tmp_path_factory, tiny_pipelines, "sd1", attention="original")
    layers = sorted(name for name, module in pipe.unet.named_modules()
                    if getattr(module, "weight", None) is not None and module.weight.ndim >= 2)
    recipe = {layer: (2, 4, 6, 8, 16)[i % 5] for i, layer in enumerate(layers)}
    threshold = 4096  # the tiny UNet's weights are far under Apple's 1e5 elements
    path = tmp_path / "tiny_palettization_recipe.json"
    path.write_text(json.dumps({"recipes": {"recipe_x": recipe, "recipe_8": {k: 8 for k in layers}}}))

    weights = q.find_diffusers_weights(None, found)  # the export's source, from its manifest
    assert weights is not None and Path(weights.label) == Path(diffusers_dir).resolve()
    unet = ct.models.MLModel(str(found.models["Unet"]), skip_model_load=True)
    values = q.float_weights(unet)
    by_hash, facts = q.assign_layers(values, recipe, weights, threshold)
    by_name = q._matches([n for n, v in values.items() if v.size >= threshold], recipe)
    assert by_hash == by_name and not facts["unmatched"]  # the two rules agree on every large weight
    assert len(by_hash) == sum(1 for layer in layers if weights.sizes[layer] >= threshold)  # metadata: >=
    palette, _ = q.plan_bits(values, by_hash, recipe, threshold)
    assert palette == {n: recipe[layer] for n, layer in by_hash.items()  # the palettizer: >
                       if recipe[layer] != 16 and values[n].size > threshold}

    args = ["quantize", "--model", str(found.folder), "--method", "mixed", "--recipe", str(path),
            "--recipe-name", "recipe_x", "--weights", str(diffusers_dir), "--weight-threshold", str(threshold),
            "--out", str(tmp_path / "mb")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"matched by tensor hash against {diffusers_dir}" in printed and "(before: " in printed
    assert "bits/weight: recipe " in printed and "achieved" in printed
    manifest = json.loads((tmp_path / "mb" / "manifest.json").read_text())
    assert _lut_bits(tmp_path / "mb" / found.models["Unet"].name) == sorted(palette.values())
    large = {layer: weights.sizes[layer] for layer in layers if weights.sizes[layer] >= threshold}
    assert manifest["expected_bits"] == pytest.approx(
        sum(recipe[k] * weights.sizes[k] for k in layers) / sum(weights.sizes[k] for k in layers), abs=0.01)
    assert manifest["recipe_entries_under_threshold"] == len(layers) - len(large)
    assert manifest["bytes"] < manifest["bytes_before"] and 2 < manifest["achieved_bits"] < 16
