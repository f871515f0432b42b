"""Time and peak memory of image-to-image and of a LoRA generation against text-to-image, at SD 1.5 size.

    python tools/bench_image_inputs.py [--steps 4] [--size 512] [--work .cache/bench-image-inputs]

Builds (once) SD 1.5 with random weights from configs/reference/sd-1.5 in diffusers' layout, and a rank-16
LoRA on every attention projection of its UNet; then runs, each in a fresh process (so that each peak is its
own), text-to-image, image-to-image at strength 0.75 and text-to-image with the LoRA, fp32 on MLX, guidance
7.5 (batch 2). Prints the CPU and BLAS with the figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from backend.vocab import write_tokenizer_folder
    reference = ROOT / "configs" / "reference" / "sd-1.5"
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    UNet2DConditionModel.from_config(json.loads((reference / "unet" / "config.json").read_text())).save_pretrained(
        tmp / "unet")
    AutoencoderKL.from_config(json.loads((reference / "vae" / "config.json").read_text())).save_pretrained(tmp / "vae")
    CLIPTextModel(CLIPTextConfig(**json.loads((reference / "text_encoder" / "config.json").read_text()))
                  ).save_pretrained(tmp / "text_encoder")
    write_tokenizer_folder(tmp / "tokenizer", "a photo of an astronaut riding horse on mars".split())
    shutil.copytree(reference / "scheduler", tmp / "scheduler")
    shutil.copy(reference / "model_index.json", tmp / "model_index.json")
    tmp.rename(folder)


def build_lora(folder: Path, path: Path, rank: int = 16) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") \
                and ".attn" in name:
            layers[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            layers[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    save_file(layers, str(path))


def run_one(kind: str, folder: str, lora: str, steps: int, size: int) -> dict:
    """One generation in this process: its timings and the process's peak memory."""
    import numpy as np
    from PIL import Image
    from backend import GenerationRequest, load_pipeline
    pipe = load_pipeline(folder, engine="mlx", precision="fp32")
    fields = {}
    if kind == "img2img":
        rng = np.random.default_rng(0)
        fields = {"init_image": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
                  "strength": 0.75}
    elif kind == "lora":
        fields = {"loras": [(lora, 0.8)]}
    result = pipe.generate(GenerationRequest(prompt="a photo of an astronaut riding a horse on mars", steps=steps,
                                             guidance=7.5, width=size, height=size, seed=0, **fields))
    t = result.timings
    return {"run": kind, "steps": len(t.steps), "s_per_step": round(t.denoise / max(len(t.steps), 1), 2),
            "text_encoder_s": round(t.text_encoder, 2), "image_encoder_s": round(getattr(t, "image_encoder", 0.0), 2),
            "vae_decode_s": round(t.vae_decode, 2), "total_s": round(t.total, 2),
            "peak_process_gib": round(result.memory.peak_process_bytes / 2**30, 2),
            "weights_gib": round(result.memory.weight_bytes / 2**30, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-image-inputs"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(a.work)
    folder, lora = work / "sd15-random", work / "lora-r16.safetensors"
    if a.one:
        print(json.dumps(run_one(a.one, str(folder), str(lora), a.steps, a.size)))
        return 0
    import backend  # noqa: F401  (the BLAS it loads is part of the figures)
    from backend import blas
    from backend.bench import cpu_model
    work.mkdir(parents=True, exist_ok=True)
    if not folder.is_dir():
        build_model(folder)
    if not lora.is_file():
        build_lora(folder, lora)
    print(f"{cpu_model()}; {blas.describe()}; SD 1.5 random weights, {a.size}x{a.size}, fp32, MLX, CFG batch 2")
    rows = []
    for kind in ("txt2img", "img2img", "lora"):
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--steps", str(a.steps), "--size", str(a.size),
                              "--work", str(work)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
