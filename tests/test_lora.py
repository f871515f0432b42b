"""LoRA against diffusers' `load_lora_weights` on the tiny SD1 and SDXL models: both namings (diffusers/PEFT with
its adapter metadata, kohya with alpha != rank, SGM block names for SDXL), text encoders and conv layers, scales
1.0 and 0.5, two LoRAs at once, the CLI; scale changes without reload, quantized bases, the unrecognised-key
report, wrong-family and non-safetensors refusals, and the Core ML export's fused weights."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from backend import GenerationRequest
from backend.measure import psnr
from backend.pipeline import load_pipeline
from backend.types import UserError
from tests.lora_files import write_kohya, write_peft

PROMPT = "a red circle at the top"
SIZE = 32


@pytest.fixture(scope="module")
def setup(tiny_pipelines, tmp_path_factory):
    """{family: (fresh diffusers pipeline, folder, {"peft": file, "kohya": file})} (the shared pipelines stay
    LoRA-free)."""
    import diffusers
    cache = {}

    def get(family):
        if family not in cache:
            _, folder = tiny_pipelines(family)
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            tmp = tmp_path_factory.mktemp(f"lora-{family}")
            files = {"peft": tmp / "peft.safetensors", "kohya": tmp / "kohya.safetensors"}
            write_peft(files["peft"], pipe, rank=4, seed=1, alpha=8)
            write_kohya(files["kohya"], pipe, rank=4, seed=2, alpha=2.0, sgm=family == "sdxl")
            pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
                json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
            cache[family] = (pipe, folder, files)
        return cache[family]
    return get


def noise():
    return np.random.default_rng(7).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)


def reference(pipe, files, loras):
    """diffusers with these (name, scale) adapters active (none: LoRA layers disabled)."""
    loaded = set(pipe.get_list_adapters().get("unet", []))
    for name, _ in loras:
        if name not in loaded:
            pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if loras:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
    elif loaded:
        pipe.disable_lora()
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=6.0, height=SIZE, width=SIZE, output_type="np",
                latents=torch.from_numpy(noise())).images[0]


def request(files, loras, **kw):
    return GenerationRequest(prompt=PROMPT, steps=3, guidance=6.0, scheduler="euler", width=SIZE, height=SIZE,
                             seed=7, latents=noise(), loras=[(files[n], s) for n, s in loras], **kw)


CASES = {"peft-1.0": [("peft", 1.0)], "kohya-1.0": [("kohya", 1.0)], "kohya-0.5": [("kohya", 0.5)],
         "peft-1.0+kohya-0.5": [("peft", 1.0), ("kohya", 0.5)]}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loras_match_diffusers(setup, family):
    pipe, folder, files = setup(family)
    mine = load_pipeline(str(folder), engine="mlx", precision="fp32")
    base = reference(pipe, files, [])
    for case, loras in CASES.items():
        ref = reference(pipe, files, loras)
        result = mine.generate(request(files, loras))
        score = psnr(result.pixels[0], ref)
        print(f"{family} {case}: {score:.1f} dB (LoRA changes the image to {psnr(ref, base):.1f} dB)")
        assert psnr(ref, base) < 35.0, "the LoRA must change the image"
        assert score >= 45.0, (family, case, score)
        assert not result.warnings
        assert [r["scale"] for r in result.parameters["loras"]] == [s for _, s in loras]
        assert [r["name"] for r in result.parameters["loras"]] == [files[n].name for n, _ in loras]
    # back to no LoRA: the base weights were never touched
    assert psnr(mine.generate(request(files, [])).pixels[0], base) >= 45.0


def test_cli_two_loras_match_diffusers(setup, tmp_path):
    pipe, folder, files = setup("sd1")
    ref = reference(pipe, files, [("peft", 1.0), ("kohya", 0.5)])
    np.save(tmp_path / "noise.npy", noise())
    out = tmp_path / "lora.png"
    proc = subprocess.run([sys.executable, "-m", "backend", "generate", "--model", str(folder), "--prompt", PROMPT,
                           "--steps", "3", "--guidance", "6", "--scheduler", "euler", "--width", str(SIZE),
                           "--height", str(SIZE), "--seed", "7", "--latents", str(tmp_path / "noise.npy"),
                           "--backend", "mlx", "--precision", "fp32", "--lora", f"{files['peft']}:1.0",
                           "--lora", f"{files['kohya']}:0.5", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["name"], r["scale"]) for r in report["parameters"]["loras"]] == \
        [("peft.safetensors", 1.0), ("kohya.safetensors", 0.5)]
    score = psnr(np.asarray(Image.open(out), np.float32) / 255.0, ref)
    print(f"CLI sd1 peft:1.0 + kohya:0.5: {score:.1f} dB")
    assert score >= 45.0


def test_scale_change_without_reload(setup):
    from backend.engines.mlx.lora import LoraWrapped
    _, folder, files = setup("sd1")
    pipe = load_pipeline(str(folder), engine="mlx", precision="fp32")
    to_q = pipe.stages.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    weight = to_q.weight
    pipe.generate(request(files, [("kohya", 1.0)]))
    wrapped = pipe.stages.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(wrapped, LoraWrapped) and wrapped.base is to_q
    half = pipe.generate(request(files, [("kohya", 0.5)]))
    again = pipe.stages.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert again is wrapped and again.base.weight is weight  # only the scale numbers changed
    fresh = load_pipeline(str(folder), engine="mlx", precision="fp32").generate(request(files, [("kohya", 0.5)]))
    assert np.abs(half.pixels[0] - fresh.pixels[0]).max() < 1e-5
    pipe.generate(request(files, []))
    assert pipe.stages.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q is to_q


def test_quantized_base_with_lora(setup):
    import mlx.nn as nn
    _, folder, files = setup("sd1")
    pipe = load_pipeline(str(folder), engine="mlx", precision="fp32", quantization="q8")
    plain = pipe.generate(request(files, []))
    with_lora = pipe.generate(request(files, [("peft", 1.0), ("kohya", 0.5)]))
    wrapped = pipe.stages.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(wrapped.base, nn.QuantizedLinear)  # the base stays quantized
    assert np.all(np.isfinite(with_lora.pixels)) and psnr(with_lora.pixels[0], plain.pixels[0]) < 35.0
    # q8 + LoRA is close to fp32 + LoRA
    full = load_pipeline(str(folder), engine="mlx", precision="fp32").generate(
        request(files, [("peft", 1.0), ("kohya", 0.5)]))
    assert psnr(with_lora.pixels[0], full.pixels[0]) > 25.0


def test_unrecognised_keys_are_reported(setup, tiny_pipelines, tmp_path):
    _, folder, _ = setup("sd1")
    pipe = tiny_pipelines("sd1")[0]  # LoRA-free module names
    extra = {"lora_unet_no_such_block_to_q.lora_down.weight": np.zeros((4, 8), np.float32),
             "lora_unet_no_such_block_to_q.lora_up.weight": np.zeros((8, 4), np.float32),
             "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": np.zeros((1, 32), np.float32),
             "some_other_tensor": np.zeros(3, np.float32)}
    path = tmp_path / "odd.safetensors"
    write_kohya(path, pipe, rank=4, seed=3, alpha=4.0, extra=extra)
    result = load_pipeline(str(folder), engine="mlx", precision="fp32").generate(
        request({"odd": path}, [("odd", 1.0)]))
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert "odd.safetensors" in warning and "4 of its keys" in warning
    shown = warning.split("(e.g. ")[1].rstrip(")").split(", ")
    assert len(shown) == 3 and set(shown) <= set(extra)


def test_wrong_family_and_bad_files(setup, tmp_path):
    _, _, sd1_files = setup("sd1")
    _, xl_folder, _ = setup("sdxl")
    xl = load_pipeline(str(xl_folder), engine="mlx", precision="fp32")
    with pytest.raises(UserError, match="another model family"):
        xl.generate(request(sd1_files, [("kohya", 1.0)]))
    (tmp_path / "lora.ckpt").write_bytes(b"pickle")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    for path, message in ((tmp_path / "lora.ckpt", "safetensors only"), (tmp_path / "missing.safetensors",
                                                                        "does not exist"),
                          (tmp_path / "broken.safetensors", "not a readable safetensors")):
        with pytest.raises(UserError, match=message):
            xl.generate(request({"x": path}, [("x", 1.0)]))
    # and after a refusal the model still runs without LoRA
    assert xl.generate(request({}, [])).pixels is not None


@pytest.mark.parametrize("args, message", [
    (["--lora", "missing.safetensors"], "does not exist"),
    (["--lora", "weights.bin:0.5"], "safetensors only"),
    (["--lora", "sdxl-lora"], "another model family"),
])
def test_cli_lora_errors_one_line(setup, tmp_path, args, message):
    _, folder, _ = setup("sd1")
    _, _, xl_files = setup("sdxl")
    (tmp_path / "weights.bin").write_bytes(b"x")
    args = [str(xl_files["kohya"]) if a == "sdxl-lora" else str(tmp_path / a) if a.startswith(("missing", "weights"))
            else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "backend", "generate", "--model", str(folder), "--prompt", "x",
                           "--steps", "1", "--width", "32", "--height", "32", "--backend", "mlx",
                           "--out", str(tmp_path / "x.png"), *args], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_coreml_export_fuses_as_diffusers(setup, family):
    """export-coreml --lora fuses into the torch modules it converts: the same weights as diffusers' fuse_lora."""
    import diffusers
    from backend.engines.coreml.export import _load_components, fuse_loras
    _, folder, files = setup(family)
    parts = _load_components(folder)
    before = {n: p.detach().clone() for n, p in parts["unet"].named_parameters()}
    assert fuse_loras(parts, [(files["kohya"], 0.5), (files["peft"], 1.0)]) == []
    ref = diffusers.DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    ref.load_lora_weights(str(files["kohya"]), adapter_name="kohya")
    ref.load_lora_weights(str(files["peft"]), adapter_name="peft")
    ref.set_adapters(["kohya", "peft"], adapter_weights=[0.5, 1.0])
    ref.fuse_lora(adapter_names=["kohya", "peft"])
    ref.unload_lora_weights()
    for component in [c for c in ("text_encoder", "text_encoder_2", "unet") if c in parts]:
        mine, theirs = parts[component].state_dict(), getattr(ref, component).state_dict()
        for name, value in mine.items():
            torch.testing.assert_close(value, theirs[name], atol=1e-5, rtol=1e-5, msg=f"{component}.{name}")
    changed = [n for n, p in parts["unet"].named_parameters() if not torch.equal(p, before[n])]
    assert any("conv1" in n for n in changed) and any("to_q" in n for n in changed)


def test_export_coreml_lora_argument_errors_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "backend", "export-coreml", "--model", "x", "--out",
                           str(tmp_path / "out"), "--lora", str(tmp_path / "missing.safetensors:0.7")],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "does not exist" in lines[0], proc.stderr
