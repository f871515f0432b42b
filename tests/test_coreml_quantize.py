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
    with pytest.raises(UserError, match="recipe_a, recipe_b"):
        q.mixed_bit(synthetic, path)
    out = q.mixed_bit(synthetic, path, recipe_name="recipe_b", mode="uniform", out_dir=tmp_path / "mb")
    unet = res.find_resources(out).models["Unet"]
    assert ops(unet)["constexpr_lut_to_dense"] == 2  # the 16-bit and the unnamed layers stay float16
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["stage_results"]["Unet"]
    assert (stats["weights_matched"], stats["weights_palettized"], stats["recipe_entries_unmatched"]) == (3, 2, 1)
    assert manifest["average_bits"] == pytest.approx((2 + 4 + 16 + 16) / 4, abs=0.01)
    assert manifest["stage_results"]["TextEncoder"]["action"] == "copied"

    # a recipe for another model fails before anything is written
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"some.other.layer": 4}))
    with pytest.raises(UserError, match="names no weight"):
        q.mixed_bit(synthetic, wrong, mode="uniform", out_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()


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
    out = q.mixed_bit(found.folder, {"recipes": {"all_4bit": recipe}}, mode="uniform")
    manifest = json.loads((out / "manifest.json").read_text())
    chunks = [manifest["stage_results"][s] for s in ("UnetChunk1", "UnetChunk2")]
    assert sum(c["weights_matched"] for c in chunks) == len(recipe)  # every layer, each in one chunk
    assert all(c["action"] == "compressed" for c in chunks)
    after = res.find_resources(out)
    assert after.attention == "split_einsum" and after.chunked
    assert sum(ops(after.models[s])["constexpr_lut_to_dense"] for s in after.unet_stages) == len(recipe)
    assert after.disk_bytes["UnetChunk1"] < 0.5 * found.disk_bytes["UnetChunk1"]
    # what the engine reads is unchanged: every model's tensors, the tokenizer, the configs
    for stage in found.models:
        assert after.io(stage).inputs == found.io(stage).inputs
        assert after.io(stage).outputs == found.io(stage).outputs
    assert after.vocab.read_text() == found.vocab.read_text() and after.configs is not None
