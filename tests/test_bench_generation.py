"""The bench's generation rows on a tiny model: the folder diffusers writes from configs alone, and one whole
generation per engine from it (the workers the bench spawns, run here in-process on the default devices)."""
import json
import shutil

import pytest
from safetensors import safe_open

from backend import bench, bench_generation


@pytest.fixture
def tiny_reference(tmp_path, monkeypatch, tiny_pipelines):
    """A configs/reference-like folder (model_index.json and each component's config, no weights) of the tiny SD 1.x
    model, and the bench's model cache in tmp_path."""
    _, source = tiny_pipelines("sd1")
    reference = tmp_path / "reference" / "tiny"
    reference.mkdir(parents=True)
    shutil.copy(source / "model_index.json", reference)
    for part in ("unet", "vae", "text_encoder"):
        (reference / part).mkdir()
        shutil.copy(source / part / "config.json", reference / part)
    shutil.copytree(source / "scheduler", reference / "scheduler")
    monkeypatch.setattr(bench_generation, "CONFIGS", tmp_path / "reference")
    monkeypatch.setenv("SILICON_DIFFUSION_BENCH_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(bench_generation, "STEPS", 2)
    return reference


def test_the_folder_is_written_once_in_fp16_from_configs_alone(tiny_reference):
    folder = bench_generation.build_folder("tiny", bench_generation.cache_folder("tiny"), "auto")
    assert (folder / "done").exists() and (folder / "tokenizer" / "vocab.json").exists()
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "np") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"float16"}
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == json.loads((tiny_reference / "unet" / "config.json").read_text())[
        "block_out_channels"]
    stamp = (folder / "done").stat().st_mtime_ns
    assert bench_generation.build_folder("tiny", folder, "auto") == folder
    assert (folder / "done").stat().st_mtime_ns == stamp  # written once


def test_each_engine_generates_from_it_and_reports_time_and_memory(tiny_reference):
    bench_generation.build_folder("tiny", bench_generation.cache_folder("tiny"), "auto")
    rows = [bench_generation.mlx_worker("tiny", "fp32", None, False, "auto"),
            bench_generation.mlx_worker("tiny", "fp32", None, True, "auto"),
            bench_generation.mlx_worker("tiny", "fp32", "q8", False, "auto"),
            bench_generation.diffusers_worker("tiny", "fp32", None, False, "auto")]
    for r in rows:
        assert r["load_seconds"] >= 0 and r["first_seconds"] > 0 and r["seconds"] > 0 and r["times"] == [r["seconds"]]
        assert r["peak_bytes"] is None or r["peak_bytes"] > 0
    mlx, reduced = rows[0], rows[1]
    assert set(mlx["per_stage"]) == {"text_encoder", "denoise", "vae_decode"}
    assert mlx["peak_bytes"] >= mlx["load_peak_bytes"] > 0
    assert set(reduced["per_stage"]) == {"text_encoder", "denoise", "vae_decode"}
    row = {"model": "tiny", "size": 64, "part": "generation", "precision": "fp32", "quantization": "none",
           "mode": "default", "steps": 2, "mlx": mlx, "diffusers": rows[3]}
    assert bench_generation.row_md(row).startswith("| tiny 64px | 2 steps, default | fp32 | ")
    assert "generation" in "".join(bench._targets([row]))
    line = bench_generation.stage_line(row)
    assert line.startswith("MLX peaks, tiny default fp32 + none: load ") and "denoise" in line and "vae_decode" in line
