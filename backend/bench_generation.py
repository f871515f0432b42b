"""The bench's `generation` rows: one whole text-to-image generation per engine, as a user runs it.

A random-weight model in the diffusers layout is written once, by diffusers, from configs/reference/<model> (fp16
safetensors; a small CLIP vocabulary, since token values change neither time nor memory) into
.cache/bench-models/<model>. Each engine then loads that folder in a fresh worker process and generates twice at
the model's size, with guidance 7.5 and the Euler scheduler on both sides:

- mlx: backend.load_pipeline, the engine as the app runs it (a second MLX row with reduce-memory, and rows with
  quantized weights when asked);
- diffusers: DiffusionPipeline.from_pretrained on torch's device (bench_devices).

A row reports the load time, the first image (cold: kernels compiled, caches empty), the second image (the time
compared), the peak memory from the start of loading to the end (bench_devices' figure: the process's high-water
mark on the CPU, the engine's allocator peak on a GPU) and, for MLX, its per-stage peaks.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "reference"
PROMPT = "a photo of an astronaut riding a horse on mars"
MODELS = ("sd-1.5", "sdxl")  # the models whose whole pipeline configs/reference holds
GUIDANCE = 7.5
STEPS = int(os.environ.get("SILICON_DIFFUSION_BENCH_STEPS", "4"))  # a short run: the steps do not drown the rest


def cache_folder(model: str) -> Path:
    return Path(os.environ.get("SILICON_DIFFUSION_BENCH_MODELS", ROOT / ".cache" / "bench-models")) / model


def _size(model: str) -> int:
    """The model's native image size, as diffusers' pipelines take it: the UNet's sample size times the VAE's
    scale factor, 2 ** (its blocks - 1)."""
    read = lambda part: json.loads((CONFIGS / model / part / "config.json").read_text())  # noqa: E731
    return read("unet")["sample_size"] * 2 ** (len(read("vae")["block_out_channels"]) - 1)


def build_folder(model: str, folder: Path, device: str = "auto") -> Path:
    """CONFIGS/<model> with random fp16 weights, written by diffusers (once: a `done` file marks it)."""
    if (folder / "done").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from backend import bench_devices
    from backend.vocab import write_tokenizer_folder
    source = CONFIGS / model
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(source / "model_index.json", folder / "model_index.json")
    shutil.copytree(source / "scheduler", folder / "scheduler")
    index = json.loads((source / "model_index.json").read_text())
    torch.manual_seed(0)
    with torch.device(bench_devices.torch_device(device)):  # random init where torch runs: fast on a GPU
        for name, entry in index.items():
            if not isinstance(entry, list) or name == "scheduler" or entry[1] is None:  # no safety checker
                continue
            cls = entry[1]
            if name.startswith("tokenizer"):  # SDXL's second tokenizer pads with "!", as the real one
                write_tokenizer_folder(folder / name, PROMPT.split(), **({"pad_token": "!"} if name[-1] == "2" else {}))
                continue
            cfg = json.loads((source / name / "config.json").read_text())
            if name.startswith("text_encoder"):
                kind = CLIPTextModelWithProjection if cls == "CLIPTextModelWithProjection" else CLIPTextModel
                module = kind(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
            else:
                module = (UNet2DConditionModel if name == "unet" else AutoencoderKL).from_config(cfg)
            module.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
            del module
    (folder / "done").write_text("")
    return folder


def _request(model: str):
    from backend.types import GenerationRequest
    size = _size(model)
    return GenerationRequest(prompt=PROMPT, steps=STEPS, guidance=GUIDANCE, scheduler="euler", width=size,
                             height=size, seed=1)


def _memory_field(device) -> str:
    """The engine's Memory figure that matches bench_devices' meter there: the process's high-water mark on the
    CPU, MLX's own counter on a GPU."""
    return "peak_process_bytes" if device == "cpu" else "peak_engine_bytes"


def mlx_worker(model: str, precision: str, quantization, reduce_memory: bool, device: str) -> dict:
    import backend  # noqa: F401  (the BLAS before MLX)
    from backend import bench_devices, load_pipeline
    meter = bench_devices.mlx_meter(device)
    meter.reset_peak()
    start = time.perf_counter()
    pipe = load_pipeline(str(cache_folder(model)), engine="mlx", precision=precision, quantization=quantization,
                         reduce_memory=reduce_memory)
    load = time.perf_counter() - start
    peaks = [meter.peak_bytes()]  # loading's; the engine resets the counters at each stage of a generation
    times, result = [], None
    for _ in range(2):
        start = time.perf_counter()
        result = pipe.generate(_request(model))
        meter.sync()
        times.append(time.perf_counter() - start)
        # the generation's peak over all its stages, from the same counter the meter reads
        peaks.append(getattr(result.memory, _memory_field(meter.device)))
    return {"load_seconds": load, "first_seconds": times[0], "seconds": times[1], "times": times[1:],
            "peak_bytes": max(peaks), "load_peak_bytes": peaks[0], "per_stage": result.memory.per_stage,
            **meter.describe()}


def diffusers_worker(model: str, precision: str, quantization, reduce_memory: bool, device: str) -> dict:
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler
    from backend import bench_devices
    meter = bench_devices.torch_meter(device)
    dtype = bench_devices.torch_dtype(precision)
    meter.reset_peak()
    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(str(cache_folder(model)), dtype=dtype).to(meter.device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    meter.sync()
    load = time.perf_counter() - start
    size = _size(model)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=size, height=size,
                 output_type="np", generator=torch.Generator(meter.device).manual_seed(1))
        meter.sync()
        times.append(time.perf_counter() - start)
    return {"load_seconds": load, "first_seconds": times[0], "seconds": times[1], "times": times[1:],
            "peak_bytes": meter.peak_bytes(), **meter.describe()}


WORKERS = {"mlx": mlx_worker, "diffusers": diffusers_worker}


def spawn(engine: str, model: str, precision: str, quantization=None, reduce_memory: bool = False,
          device: str = "auto", threads=None) -> dict:
    from backend.bench import run_worker
    return run_worker("backend.bench_generation",
                      [engine, model, precision, quantization or "none", int(reduce_memory), device], threads)


def rows(models, precisions, quantizations, with_torch: bool, device: str = "auto", threads=None, rounds: int = 1):
    """One row per model x precision x MLX mode (default, reduce-memory, each quantization), MLX beside diffusers'
    default pipeline; the folder is written first (by a worker, so that this process never imports torch)."""
    from backend.bench import alternated, run_worker
    for model in models:
        if model not in MODELS:
            continue
        built = run_worker("backend.bench_generation", ["build", model, device])
        if "error" in built:
            yield {"model": model, "size": _size(model), "part": "generation", "precision": "-",
                   "quantization": "none", "mode": "default",
                   "mlx": {"error": "could not write the model folder: " + built["error"]}}
            continue
        for precision in precisions:
            modes = [("default", None, False), ("reduce-memory", None, True)]
            modes += [("default", q, False) for q in quantizations if q]
            for mode, quantization, reduce_memory in modes:
                spawners = {"mlx": lambda q=quantization, r=reduce_memory: spawn("mlx", model, precision, q, r,
                                                                                  device, threads)}
                if with_torch and mode == "default" and not quantization:
                    spawners["diffusers"] = lambda: spawn("diffusers", model, precision, device=device,
                                                          threads=threads)
                yield {"model": model, "size": _size(model), "part": "generation", "precision": precision,
                       "quantization": quantization or "none", "mode": mode, "steps": STEPS,
                       **alternated(spawners, rounds)}


HEADER = ("| model | generation | precision | MLX load | MLX first image | MLX image | diffusers load "
          "| diffusers first image | diffusers image | MLX/diffusers (image) | MLX peak memory "
          "| diffusers peak memory |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def row_md(row: dict) -> str:
    from backend.bench import cell, label
    m, d = row.get("mlx", {}), row.get("diffusers", {})
    s = lambda r, key: cell(r, key, unit=" s", width=60)  # noqa: E731
    ratio = f"{m['seconds'] / d['seconds']:.2f}x" if "seconds" in m and d and "seconds" in d else "-"
    return (f"| {row['model']} {row['size']}px | {row.get('steps', STEPS)} steps, {row['mode']} | {label(row)} "
            f"| {s(m, 'load_seconds')} | {s(m, 'first_seconds')} | {s(m, 'seconds')} | {s(d, 'load_seconds')} "
            f"| {s(d, 'first_seconds')} | {s(d, 'seconds')} | {ratio} | {cell(m, 'peak_bytes', 2**30, ' GiB')} "
            f"| {cell(d, 'peak_bytes', 2**30, ' GiB')} |")


def stage_line(row: dict) -> str:
    """MLX's per-stage peaks of a generation row, in words: where its memory goes (which stage sets the peak)."""
    m = row.get("mlx") or {}
    stages = m.get("per_stage") or {}
    key = _memory_field(m.get("device"))
    parts = ", ".join(f"{name} {v[key] / 2**30:.2f}" for name, v in stages.items())
    load = f"load {m['load_peak_bytes'] / 2**30:.2f}, " if m.get("load_peak_bytes") is not None else ""
    return (f"MLX peaks, {row['model']} {row.get('mode', 'default')} {row['precision']} + "
            f"{row.get('quantization', 'none')}: {load}{parts} GiB" if parts else "")


if __name__ == "__main__":
    if sys.argv[1] == "build":
        print(json.dumps({"folder": str(build_folder(sys.argv[2], cache_folder(sys.argv[2]), sys.argv[3]))}))
    else:
        engine, model, precision, quantization, reduce_memory, device = sys.argv[1:7]
        print(json.dumps(WORKERS[engine](model, precision, None if quantization == "none" else quantization,
                                         reduce_memory == "1", device)))
