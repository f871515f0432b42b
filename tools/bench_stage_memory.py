"""Peak memory per stage of one MLX generation at real model sizes, with and without reduce-memory.

A random-weight model folder is written once from configs/reference/<model> (fp16 safetensors, a small CLIP
vocabulary; the weights' values do not change what memory a stage takes), then each mode generates in a fresh
process and prints the result's per-stage peaks (Memory.per_stage: MLX's counter and the process's high-water
mark) and the weight bytes.

    python tools/bench_stage_memory.py --model sd-1.5 --size 512 --steps 2 [--folder /tmp/sd15-random]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(model: str, folder: Path) -> Path:
    """configs/reference/<model> with random fp16 weights and a small tokenizer, in the diffusers layout."""
    import backend  # noqa: F401
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from backend.checkpoint import ModelSpec
    from backend.engines.mlx.engine import MLXStages
    from backend.vocab import write_tokenizer_folder
    if (folder / "done").exists():
        return folder
    source = ROOT / "configs" / "reference" / model
    shutil.copytree(source, folder, dirs_exist_ok=True)
    index = json.loads((folder / "model_index.json").read_text())
    for name in index:
        if name.startswith("tokenizer"):
            write_tokenizer_folder(folder / name, "a photo of an astronaut riding a horse".split())
    spec = ModelSpec.from_folder(folder)
    shell = MLXStages.__new__(MLXStages)  # only its module builder: nothing is loaded
    shell.spec, shell._configs = spec, dict(zip(spec.text_encoders, spec.text_encoder_configs))
    for name in [*spec.text_encoders, spec.traits.denoiser, "vae"]:
        module = AutoencoderKL_full(spec) if name == "vae" else shell._build(name)
        params = {k: (0.3 * v).astype(mx.float16) for k, v in tree_flatten(module.parameters())}
        mx.eval(params)
        file = "model.safetensors" if name.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        mx.save_safetensors(str(folder / name / file), params)
        del module, params
    (folder / "done").write_text("")
    return folder


def AutoencoderKL_full(spec):  # noqa: N802 - the VAE with both halves, as a checkpoint holds it
    from backend.engines.mlx.vae import AutoencoderKL, VAEConfig
    return AutoencoderKL(VAEConfig.from_dict(spec.vae_config))


def run(folder: Path, size: int, steps: int, reduce_memory: bool, precision: str) -> dict:
    import backend  # noqa: F401
    from backend import GenerationRequest, load_pipeline
    from backend.measure import ProcessPeak, current_rss_bytes
    peak = ProcessPeak()
    peak.reset()
    pipe = load_pipeline(str(folder), engine="mlx", precision=precision, reduce_memory=reduce_memory)
    after_load = {"rss_bytes": current_rss_bytes(), "peak_process_bytes": peak.peak_bytes()}
    try:
        result = pipe.generate(GenerationRequest(prompt="a photo of an astronaut", steps=steps, width=size,
                                                 height=size, seed=1, guidance=7.0, scheduler="euler"))
        memory = result.measurements()["memory"]
    except Exception as exc:  # noqa: BLE001 - random weights may decode to NaN; the peaks are what counts
        memory = {"error": str(exc)}
    return {"reduce_memory": reduce_memory, "after_load": after_load, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd-1.5")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--worker", choices=["build", "default", "reduce"], default=None)
    a = parser.parse_args()
    folder = a.folder or Path("/tmp") / f"{a.model}-random"
    if a.worker == "build":
        build(a.model, folder)
        return
    if a.worker:
        print(json.dumps(run(folder, a.size, a.steps, a.worker == "reduce", a.precision)))
        return
    base = [sys.executable, __file__, "--model", a.model, "--size", str(a.size), "--steps", str(a.steps),
            "--precision", a.precision, "--folder", str(folder)]
    subprocess.run(base + ["--worker", "build"], check=True)
    gib = 1 << 30
    for mode in ("default", "reduce"):
        out = json.loads(subprocess.run(base + ["--worker", mode], check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1])
        memory = out["memory"]
        print(f"\n{a.model} {a.size}x{a.size}, {mode}: after load RSS {out['after_load']['rss_bytes'] / gib:.2f} GiB")
        if "error" in memory:
            print("  error:", memory["error"])
            continue
        print(f"  whole generation: MLX peak {memory['peak_engine_bytes'] / gib:.2f} GiB, "
              f"process peak {memory['peak_process_bytes'] / gib:.2f} GiB, weights {memory['weight_bytes'] / gib:.2f} GiB")
        for stage, figures in memory.get("per_stage", {}).items():
            print(f"  {stage:14s} MLX peak {figures['peak_engine_bytes'] / gib:6.2f} GiB   "
                  f"process peak {figures['peak_process_bytes'] / gib:6.2f} GiB")


if __name__ == "__main__":
    main()
