"""`python -m backend quantize`: round trip, cache and idempotence, atomic writes, bad input."""
import hashlib
import json
import os

import numpy as np
import pytest

import backend.quantize as QC
from backend.__main__ import main
from backend.engines.mlx import quantize as Q
from backend.pipeline import load_pipeline
from backend.types import GenerationRequest, UserError


@pytest.fixture(scope="module")
def sd1(tiny_pipelines):
    return tiny_pipelines("sd1")[1]


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _generate(model, quantization=None):
    # fp16: the precision variants are made at, so the saved and live images can be compared bit for bit
    pipe = load_pipeline(str(model), engine="mlx", precision="fp16", quantization=quantization)
    noise = np.random.default_rng(5).standard_normal((1, 4, 16, 16)).astype(np.float32)
    return pipe, pipe.generate(GenerationRequest(prompt="a blue square", steps=2, seed=2, latents=noise))


def test_round_trip_loads_the_variant_as_quantized_live(sd1, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--model", str(sd1), "--method", "mlx", "--bits", "4", "--out", str(out)]) == 0
    assert "q4" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "q4" and manifest["bits"] == 4 and manifest["group_size"] == 64
    assert manifest["bytes_on_disk"] > 0 and manifest["seconds"] >= 0
    assert manifest["source"]["path"] == str(sd1.resolve()) and len(manifest["source"]["weights_sha256"]) == 64
    assert (out / "unet" / Q.WEIGHTS_FILE).is_file() and not (out / "unet" / "diffusion_pytorch_model.safetensors").exists()

    saved_pipe, saved = _generate(out)
    live_pipe, live = _generate(sd1, "q4")
    assert saved.engine["quantization"] == "q4"
    assert saved.engine["quantized_layers"] == live.engine["quantized_layers"]
    assert saved.memory.weight_bytes == live.memory.weight_bytes
    np.testing.assert_array_equal(saved.pixels, live.pixels)
    assert saved.memory.disk_bytes < 0.6 * live.memory.disk_bytes


def test_second_run_writes_nothing_and_a_rebuild_is_byte_identical(sd1, tmp_path, capsys):
    out = tmp_path / "q8"
    args = ["quantize", "--model", str(sd1), "--bits", "8", "--group-size", "32", "--out", str(out)]
    assert main(args) == 0
    first = _files(out)
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert _files(out) == first
    import shutil
    shutil.rmtree(out)
    assert main(args) == 0
    again = _files(out)
    del first["manifest.json"], again["manifest.json"]  # it records the seconds taken
    assert again == first


def test_changed_source_is_quantized_again(sd1, tmp_path):
    import shutil
    source = tmp_path / "model"
    shutil.copytree(sd1, source)
    out = tmp_path / "variant"
    _, _, written = QC.quantize(str(source), "mlx", 4, out=str(out))
    assert written
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _, _, written = QC.quantize(str(source), "mlx", 4, out=str(out))
    assert written
    _, _, written = QC.quantize(str(source), "mlx", 4, out=str(out))
    assert not written


def test_default_folder_is_beside_the_source_and_mixed_uses_the_recipe(sd1, tmp_path):
    import shutil
    source = tmp_path / "model"
    shutil.copytree(sd1, source)
    folder, manifest, _ = QC.quantize(str(source), "mixed")
    assert folder == tmp_path / "model-mlx-mixed"
    assert manifest["recipe"]["file"].endswith("mlx-mixed.json") and manifest["bits"] is None
    pipe, result = _generate(folder)
    assert result.engine["quantization"] == "mixed"


def test_an_interrupted_run_leaves_nothing(sd1, tmp_path, monkeypatch):
    out = tmp_path / "broken"
    calls, original = [], Q.save_component

    def fail_after_first(module, folder, component):
        if calls:
            raise KeyboardInterrupt
        calls.append(component)
        original(module, folder, component)
    monkeypatch.setattr(Q, "save_component", fail_after_first)
    with pytest.raises(KeyboardInterrupt):
        QC.quantize(str(sd1), "mlx", 4, out=str(out))
    assert calls  # the first component was written before the interruption
    assert not out.exists()
    assert not list(tmp_path.glob("broken*"))


@pytest.mark.parametrize("args,message", [
    (["--bits", "5"], "supports 8, 6, 4, 3 or 2 bits"),
    ([], "give --bits"),
    (["--method", "palettize", "--bits", "4"], "palettization is a Core ML method"),
    (["--bits", "4", "--group-size", "48"], "group size"),
    (["--bits", "4", "--recipe", "missing.json"], "either --bits"),
    (["--method", "mixed", "--recipe", "/nonexistent/recipe.json"], "does not exist"),
    (["--method", "mixed", "--recipe-name", "recipe_4.50_bit_mixedpalette"], "are for Core ML resources"),
    (["--list-recipes"], "--list-recipes needs --recipe"),
])
def test_bad_input_exits_non_zero_with_a_sentence(sd1, tmp_path, capsys, args, message):
    rc = main(["quantize", "--model", str(sd1), "--out", str(tmp_path / "o"), *args])
    assert rc == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_other_folders_are_refused(sd1, tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path / "nowhere"), "--bits", "4"]) == 1
    assert "error:" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an MLX variant"):
        QC.quantize(str(sd1), "mlx", 4, out=str(taken))
    assert (taken / "notes.txt").read_text() == "mine"
    variant, _, _ = QC.quantize(str(sd1), "mlx", 2, out=str(tmp_path / "q2"))
    with pytest.raises(UserError, match="already a quantized variant"):
        QC.quantize(str(variant), "mlx", 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="neither a diffusers"):
        QC.quantize(str(empty), "mlx", 4)


def test_a_core_ml_folder_goes_to_core_ml(tmp_path):
    resources = tmp_path / "coreml"
    (resources / "Stable_Diffusion_version_x_unet.mlpackage").mkdir(parents=True)
    assert QC.detect_engine(resources) == "coreml"
    with pytest.raises(UserError, match="--method mlx needs a diffusers folder"):
        QC.quantize(str(resources), "mlx", 4)
    with pytest.raises(UserError, match="needs --recipe"):
        QC.quantize(str(resources), "mixed")
