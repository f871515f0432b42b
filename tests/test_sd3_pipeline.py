"""SD3 / SD3.5 end to end: the CLI on the MLX engine against diffusers' StableDiffusion3Pipeline on tiny
random-weight models, from the same latents, with the model's own scheduler: image PSNR >= 45 dB."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend import GenerationRequest
from backend.measure import psnr
from backend.pipeline import load_pipeline
from tests.tiny_models import SD3_JOINT_DIM

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle at the top"


def diffusers_image(pipe, latents, steps, guidance, width, height, negative="", sequence_length=256, sigmas=None):
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, width=width, height=height, output_type="np",
                  latents=torch.from_numpy(latents), max_sequence_length=sequence_length,
                  negative_prompt=negative or None)
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    return pipe(PROMPT, **kwargs).images[0]


def cli_image(folder, latents_file, out, *args):
    command = [sys.executable, "-m", "backend", "generate", "--model", str(folder), "--prompt", PROMPT,
               "--latents", str(latents_file), "--backend", "mlx", "--precision", "fp32", "--out", str(out),
               "--json", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255.0, report


def noise(width, height, seed=3):
    return np.random.default_rng(seed).standard_normal((1, 16, height // 2, width // 2)).astype(np.float32)


CASES = [  # family, steps, guidance, width, height
    ("sd3", 2, 5.0, 32, 32),
    ("sd3", 4, 1.0, 32, 48),
    ("sd3", 6, 7.0, 48, 32),
    ("sd3-t5", 4, 5.0, 32, 32),
    ("sd3-t5", 2, 1.0, 48, 32),
    ("sd35", 4, 4.5, 32, 48),
    ("sd35", 2, 1.0, 32, 32),
    ("sd35", 6, 3.0, 48, 48),
]


@pytest.mark.parametrize("family,steps,guidance,width,height", CASES)
def test_cli_matches_diffusers(tiny_pipelines, tmp_path, family, steps, guidance, width, height):
    pipe, folder = tiny_pipelines(family)
    latents = noise(width, height)
    np.save(tmp_path / "latents.npy", latents)
    ref = diffusers_image(pipe, latents, steps, guidance, width, height)
    mine, report = cli_image(folder, tmp_path / "latents.npy", tmp_path / "out.png", "--steps", steps,
                             "--guidance", guidance, "--width", width, "--height", height)
    assert mine.shape == ref.shape == (height, width, 3)
    assert report["parameters"]["scheduler"] == "flow_euler"
    # the PNG holds 8-bit pixels: compare at that rounding
    assert psnr(mine, np.round(ref * 255) / 255) >= 45.0


def test_negative_prompt_and_sequence_length(tiny_pipelines):
    """A negative prompt, and a T5 length other than 256 (MobileDiffuser-style 77) change the image as in diffusers."""
    pipe, folder = tiny_pipelines("sd3-t5")
    latents = noise(32, 32)
    mlx = load_pipeline(str(folder), engine="mlx", precision="fp32")
    for negative, length in (("blue square", 256), ("", 77)):
        ref = diffusers_image(pipe, latents, 3, 6.0, 32, 32, negative=negative, sequence_length=length)
        mine = mlx.generate(GenerationRequest(prompt=PROMPT, negative_prompt=negative, steps=3, guidance=6.0,
                                              width=32, height=32, latents=latents, max_sequence_length=length))
        assert psnr(mine.pixels[0], ref) >= 45.0


def test_zeros_stand_in_for_t5_and_change_the_image(tiny_pipelines):
    """Without T5 (skipped on request) the 256 zero tokens still condition the transformer, as in diffusers."""
    pipe, folder = tiny_pipelines("sd3-t5")
    latents = noise(32, 32)
    skipped = load_pipeline(str(folder), engine="mlx", precision="fp32", t5=False)
    assert skipped.info["t5"] == "skipped"
    result = skipped.generate(GenerationRequest(prompt=PROMPT, steps=2, guidance=1.0, latents=latents))
    assert any("T5 text encoder skipped" in w for w in result.warnings)
    text_encoder_3, pipe.text_encoder_3 = pipe.text_encoder_3, None
    try:
        ref = diffusers_image(pipe, latents, 2, 1.0, 32, 32)
    finally:
        pipe.text_encoder_3 = text_encoder_3
    assert psnr(result.pixels[0], ref) >= 45.0
    fewer = skipped.generate(GenerationRequest(prompt=PROMPT, steps=2, guidance=1.0, latents=latents,
                                               max_sequence_length=16))
    assert psnr(fewer.pixels[0], result.pixels[0]) < 60.0  # the zeros pass through the context projection's bias


def test_fixed_few_step_schedules(tiny_pipelines):
    """flow_2step / flow_4step use their sigma lists as given: diffusers with shift 1 and those sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe, folder = tiny_pipelines("sd3")
    original = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    latents = noise(32, 32)
    mlx = load_pipeline(str(folder), engine="mlx", precision="fp32")
    try:
        for name, sigmas in (("flow_2step", [1.0, 0.75]), ("flow_4step", [1.0, 0.9, 0.75, 0.5])):
            ref = diffusers_image(pipe, latents, len(sigmas), 1.0, 32, 32, sigmas=sigmas)
            mine = mlx.generate(GenerationRequest(prompt=PROMPT, scheduler=name, guidance=1.0, latents=latents))
            assert mine.parameters["steps"] == len(sigmas)
            assert psnr(mine.pixels[0], ref) >= 45.0
    finally:
        pipe.scheduler = original


def test_sd3_refuses_what_it_cannot_do(tiny_pipelines):
    from backend.types import UserError
    _, folder = tiny_pipelines("sd3")
    mlx = load_pipeline(str(folder), engine="mlx", precision="fp32")
    with pytest.raises(UserError, match="does not fit this model"):
        mlx.generate(GenerationRequest(prompt=PROMPT, scheduler="dpmpp_2m"))
    with pytest.raises(UserError, match="has 4 steps"):
        mlx.generate(GenerationRequest(prompt=PROMPT, scheduler="flow_4step", steps=6))
    with pytest.raises(UserError, match="out of range"):
        mlx.generate(GenerationRequest(prompt=PROMPT, width=256))  # 32 cells of 2x2 latents x 2 px
    with pytest.raises(UserError, match="multiple of 4"):
        mlx.generate(GenerationRequest(prompt=PROMPT, width=34))


def test_spec_reads_the_sd3_layout(tiny_pipelines):
    from backend.checkpoint import ModelSpec
    _, folder = tiny_pipelines("sd3-t5")
    spec = ModelSpec.from_folder(folder)
    assert spec.family == "sd3" and spec.is_transformer and spec.has_t5
    assert spec.text_encoders == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert spec.latent_channels == 16 and spec.denoiser_config["joint_attention_dim"] == SD3_JOINT_DIM
    assert spec.default("scheduler") == "flow_euler" and spec.native_size == 32
    _, plain = tiny_pipelines("sd3")
    assert not ModelSpec.from_folder(plain).has_t5


def test_quantized_variants_run_and_stay_close(tiny_pipelines, tmp_path):
    """MLX q8 / q4 / mixed variants of an SD3 model: written by the quantize command, loaded, compared."""
    from backend.quantize import quantize
    _, folder = tiny_pipelines("sd3-t5")
    latents = noise(32, 32)
    request = GenerationRequest(prompt=PROMPT, steps=3, guidance=5.0, latents=latents)
    reference = load_pipeline(str(folder), engine="mlx", precision="fp32").generate(request)
    scores = {}
    for method, bits in (("mlx", 8), ("mlx", 4), ("mixed", None)):
        out, manifest, _ = quantize(str(folder), method, bits, out=tmp_path / f"{method}{bits}")
        assert "transformer:" in manifest["layers"] and "T5 text encoder:" in manifest["layers"]
        result = load_pipeline(str(out), engine="mlx", precision="fp32").generate(request)
        scores[f"{method}{bits or ''}"] = psnr(result.pixels[0], reference.pixels[0])
    assert scores["mlx8"] >= 30.0 and scores["mlx8"] > scores["mlx4"], scores
    assert scores["mixed"] >= 15.0, scores


def _cache_repo(cache, repo_id: str, files: dict) -> None:
    """Put files into a Hugging Face cache as a downloaded snapshot of `repo_id` (no network)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    for relative, source in files.items():
        target = snapshot / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(source).read_bytes())
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(snapshot.name)


def test_registry_entry_with_a_distilled_transformer_file(tiny_pipelines, tmp_path, monkeypatch):
    """A registry entry that puts a raw safetensors transformer (diffusers names) into its Hub model's folder,
    with its own defaults (fixed 2-step schedule, guidance 1, no T5): both found in the Hub cache, offline."""
    import huggingface_hub.constants as hub_constants
    from safetensors.torch import save_file
    from backend import registry
    from tests.tiny_models import _sd3_transformer
    pipe, folder = tiny_pipelines("sd3-t5")
    cache = tmp_path / "hub"
    _cache_repo(cache, "test/sd3-base", {p.relative_to(folder): p for p in folder.rglob("*") if p.is_file()})
    torch.manual_seed(11)
    distilled = _sd3_transformer(sd35=False)
    for p in distilled.parameters():
        p.data.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in distilled.state_dict().items()}, str(tmp_path / "distilled.safetensors"))
    _cache_repo(cache, "test/distilled", {"checkpoints/sd3-2step.safetensors": tmp_path / "distilled.safetensors"})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    users = tmp_path / "models.json"
    users.write_text(json.dumps([{
        "name": "tiny-2step", "title": "tiny distilled", "hub": "test/sd3-base", "t5": False,
        "transformer_file": {"repo": "test/distilled", "file": "checkpoints/sd3-2step.safetensors"},
        "defaults": {"steps": 2, "guidance": 1.0, "scheduler": "flow_2step", "max_sequence_length": 77}}]))
    monkeypatch.setattr(registry, "USER_MODELS_FILE", users)

    latents = noise(32, 32)
    result = load_pipeline("tiny-2step", engine="mlx", precision="fp32").generate(
        GenerationRequest(prompt=PROMPT, latents=latents))
    p = result.parameters
    assert (p["steps"], p["guidance"], p["scheduler"], p["max_sequence_length"], p["t5"]) == \
        (2, 1.0, "flow_2step", 77, "skipped")

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    def reference(transformer):
        parts = {**pipe.components, "transformer": transformer, "text_encoder_3": None, "tokenizer_3": None,
                 "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0)}  # the fixed sigmas, unshifted
        return diffusers_image(StableDiffusion3Pipeline(**parts), latents, 2, 1.0, 32, 32, sequence_length=77,
                               sigmas=[1.0, 0.75])
    assert psnr(result.pixels[0], reference(distilled)) >= 45.0
    assert psnr(result.pixels[0], reference(pipe.transformer)) < 40.0  # the distilled weights made it


def test_a_variant_made_without_t5_runs_without_it(tiny_pipelines, tmp_path):
    """A quantized variant written without T5 (as for the distilled entries) loads with T5's tokens as zeros."""
    from backend.quantize import quantize_mlx
    _, folder = tiny_pipelines("sd3-t5")
    out, manifest, _ = quantize_mlx(folder, "mlx", 8, out=tmp_path / "q8-no-t5", t5=False)
    assert manifest["settings"]["t5"] is False and "T5" not in manifest["layers"]
    pipe = load_pipeline(str(out), engine="mlx", precision="fp32")
    result = pipe.generate(GenerationRequest(prompt=PROMPT, steps=2, guidance=1.0, latents=noise(32, 32)))
    assert pipe.info["t5"] == "absent" and result.parameters["t5"] == "absent"
    assert any("has no T5 text encoder" in w for w in result.warnings)
