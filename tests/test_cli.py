"""The command line as benchmarks and outside checks drive it: outputs, JSON line, one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from backend.png import read_parameters


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sd1_folder(tiny_pipelines):
    return tiny_pipelines("sd1")[1]


def test_generate_writes_png_and_json(sd1_folder, tmp_path):
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "noise.npy", latents)
    out = tmp_path / "img.png"
    proc = run_cli("generate", "--model", str(sd1_folder), "--prompt", "a red circle", "--steps", "2",
                   "--width", "32", "--height", "32", "--seed", "5", "--latents", str(tmp_path / "noise.npy"),
                   "--backend", "mlx", "--precision", "fp32", "--scheduler", "euler", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["seed"] == 5 and len(report["seconds"]["steps"]) == 2
    assert report["memory"]["weight_bytes"] > 0 and report["memory"]["peak_process_bytes"] > 0
    assert "MLX" in report["engine"]["reason"]
    image = Image.open(out)
    assert image.size == (32, 32)
    params = read_parameters(out)
    assert params["prompt"] == "a red circle" and params["seed"] == 5 and params["scheduler"] == "euler"
    assert "Steps: 2" in image.text["parameters"]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "at least 1"),
    (["--steps", "10000"], "steps must be"),
    (["--width", "33"], "multiple of"),
    (["--scheduler", "nope"], "nope"),
    (["--backend", "coreml"], "Core ML"),
    (["--prompt", " "], "prompt"),
    (["--seed", "-5"], "0 to 2^64 - 1"),
    (["--seed", str(2**64)], "0 to 2^64 - 1"),
    (["--guidance", "nan"], "guidance must be"),
    (["--out", "/"], "is a folder"),
    (["--out", "image.gif"], "must end in .png, .jpg, .jpeg or .webp"),
    (["--width", "4096", "--height", "4096"], "4096x4096 is too large for this model: at most 64x64"),
])
def test_bad_arguments_exit_nonzero_with_one_line(sd1_folder, tmp_path, args, message):
    base = ["generate", "--model", str(sd1_folder), "--prompt", "a cat", "--steps", "1", "--width", "32",
            "--height", "32", "--out", str(tmp_path / "x.png")]
    proc = run_cli(*base, *args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message.lower() in lines[0].lower(), proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_unknown_model_and_pickle_only_model(tmp_path, sd1_folder):
    proc = run_cli("generate", "--model", "no-such-model", "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert proc.returncode == 1 and "unknown model" in proc.stderr
    import shutil
    bad = tmp_path / "pickle-model"
    shutil.copytree(sd1_folder, bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really")
    proc = run_cli("generate", "--model", str(bad), "--prompt", "x", "--backend", "mlx", "--out", str(tmp_path / "b.png"))
    assert proc.returncode == 1 and "safetensors only" in proc.stderr


@pytest.mark.parametrize("name, fmt", [("x.jpg", "JPEG"), ("x.jpeg", "JPEG"), ("x.webp", "WEBP")])
def test_jpeg_and_webp_are_written_as_such_with_their_parameters(sd1_folder, tmp_path, name, fmt):
    from PIL import Image
    from backend.png import read_parameters
    out = tmp_path / name
    proc = run_cli("generate", "--model", str(sd1_folder), "--prompt", "a cat", "--steps", "1", "--seed", "9",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).format == fmt and read_parameters(out)["seed"] == 9


def test_a_huge_request_is_refused_within_a_second_and_allow_large_lifts_the_cap(sd1_folder, tmp_path):
    import time
    from backend import GenerationRequest, load_pipeline
    from backend.types import UserError
    pipe = load_pipeline(str(sd1_folder), engine="mlx", precision="fp32")
    started = time.perf_counter()
    with pytest.raises(UserError, match="at most 64x64"):
        pipe.generate(GenerationRequest(prompt="x", width=4096, height=4096, steps=1))
    assert time.perf_counter() - started < 1.0
    pipe.allow_large = True
    assert pipe.generate(GenerationRequest(prompt="x", width=96, height=64, steps=1)).images[0].size == (96, 64)
