"""The SD3 rows of `python -m backend bench`: one transformer step at SD3 Medium size, three engines.

The SD3 Medium transformer (configs/reference/sd3-medium, the real config) with random weights, batch 2 by
default (a guided step: the conditional and unconditional halves in one call; `--sd3-batch 1` is a step without
guidance, MobileDiffuser's setting), 77 CLIP + 77 T5-slot tokens (the context Apple's and MobileDiffuser's Core ML packages and DiffusionKit use), timed
in a fresh worker process per engine so each peak memory is its own:

- mlx: this project's MLX transformer (backend/engines/mlx/mmdit.py), as the engine runs it;
- diffusers: diffusers' SD3Transformer2DModel on torch;
- diffusionkit: DiffusionKit's MLX MMDiT, the MLX peer. Its package pins an old MLX and needs argmaxtools
  and beartype, so its `mlx/mmdit.py` and `mlx/config.py` are loaded from an installed or unpacked
  wheel (`pip download --no-deps diffusionkit`, path in DIFFUSIONKIT_SRC or the installed package)
  with those two imports shimmed to the standard library, and the `memory_efficient_threshold` argument
  its attention call passes (gone from today's MLX) dropped; nothing of it ships with this project.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "reference" / "sd3-medium" / "transformer" / "config.json"
TOKENS = 154
ENGINES = ("mlx", "diffusers", "diffusionkit")


def _config() -> dict:
    return json.loads(CONFIG.read_text())


def _timed(fn, repeats: int):
    from backend.bench import _median_time
    return _median_time(fn, repeats)


def mlx_worker(size: int, precision: str, quantization, repeats: int, batch: int, device: str = "auto") -> dict:
    import backend  # noqa: F401  (OpenBLAS before MLX)
    import mlx.core as mx
    from backend import allocator, bench_devices
    from backend.engines.mlx import cpu_kernels
    from backend.engines.mlx.mmdit import SD3Config, SD3Transformer2DModel
    from backend.engines.mlx.quantize import quantize_module, scheme_recipe
    from backend.engines.mlx.weights import module_bytes
    dtype = bench_devices.mlx_dtype(precision)
    meter = bench_devices.mlx_meter(device)
    model = SD3Transformer2DModel(SD3Config.from_dict(_config()))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    if quantization:
        quantize_module(model, "transformer", scheme_recipe(quantization))
    mx.clear_cache()
    allocator.release()
    latent = size // 8
    x = mx.random.normal((batch, latent, latent, 16)).astype(dtype)
    context = mx.random.normal((batch, TOKENS, 4096)).astype(dtype)
    pooled = mx.random.normal((batch, 2048)).astype(dtype)
    t = mx.array([750.0] * batch)
    meter.reset_peak()

    def step():
        with cpu_kernels.eager_chunks():
            mx.eval(model(x, t, context, pooled))
    sec, times = _timed(meter.timed(step), repeats)
    return {"seconds": sec, "times": times, "peak_bytes": meter.peak_bytes(), "weight_bytes": module_bytes(model),
            **meter.describe()}


def diffusers_worker(size: int, precision: str, quantization, repeats: int, batch: int, device: str = "auto") -> dict:
    import torch
    from diffusers import SD3Transformer2DModel
    from backend import bench_devices
    dtype = bench_devices.torch_dtype(precision)
    meter = bench_devices.torch_meter(device)
    on = dict(device=meter.device, dtype=dtype)
    torch.set_grad_enabled(False)
    with torch.device(meter.device):  # random init where it runs
        model = SD3Transformer2DModel.from_config(_config()).to(**on).eval()
    latent = size // 8
    x = torch.randn(batch, 16, latent, latent, **on)
    context = torch.randn(batch, TOKENS, 4096, **on)
    pooled = torch.randn(batch, 2048, **on)
    t = torch.tensor([750.0] * batch, device=meter.device)
    meter.reset_peak()
    sec, times = _timed(meter.timed(lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=context,
                                                  pooled_projections=pooled)), repeats)
    return {"seconds": sec, "times": times, "peak_bytes": meter.peak_bytes(), **meter.describe()}


def _diffusionkit_modules():
    """DiffusionKit's mlx/config.py and mlx/mmdit.py, imported without its package __init__."""
    src = os.environ.get("DIFFUSIONKIT_SRC")
    if src:
        folder = Path(src) / "diffusionkit" / "mlx"
    else:
        spec = importlib.util.find_spec("diffusionkit")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("DiffusionKit not found: pip download --no-deps diffusionkit, unpack the wheel "
                               "and set DIFFUSIONKIT_SRC to it")
        folder = Path(list(spec.submodule_search_locations)[0]) / "mlx"
    import logging
    import typing
    sys.modules.setdefault("beartype", types.ModuleType("beartype"))
    sys.modules.setdefault("beartype.typing", typing)
    tools = sys.modules.setdefault("argmaxtools", types.ModuleType("argmaxtools"))
    utils = types.ModuleType("argmaxtools.utils")
    utils.get_logger = logging.getLogger
    tools.utils = utils
    sys.modules.setdefault("argmaxtools.utils", utils)
    import mlx.core as mx
    fused = mx.fast.scaled_dot_product_attention
    if not getattr(fused, "drops_old_arguments", False):  # its call passes an argument MLX 0.2x removed
        def sdpa(*args, memory_efficient_threshold=None, **kwargs):
            return fused(*args, **kwargs)
        sdpa.drops_old_arguments = True
        mx.fast.scaled_dot_product_attention = sdpa
    package = types.ModuleType("dk_mlx")
    package.__path__ = [str(folder)]
    sys.modules["dk_mlx"] = package
    loaded = {}
    for name in ("config", "mmdit"):
        spec = importlib.util.spec_from_file_location(f"dk_mlx.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"dk_mlx.{name}"] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded["config"], loaded["mmdit"]


def diffusionkit_worker(size: int, precision: str, quantization, repeats: int, batch: int,
                        device: str = "auto") -> dict:
    import backend  # noqa: F401  (the same BLAS for both MLX engines)
    import mlx.core as mx
    from backend import allocator, bench_devices
    meter = bench_devices.mlx_meter(device)
    config, mmdit = _diffusionkit_modules()
    dtype = bench_devices.mlx_dtype(precision)
    cfg = config.MMDiTConfig(depth_multimodal=24, num_heads=24, dtype=dtype, float16_dtype=dtype)
    model = mmdit.MMDiT(cfg)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    latent = size // 8
    x = mx.random.normal((batch, latent, latent, 16)).astype(dtype)
    context = mx.random.normal((batch, TOKENS, 1, 4096)).astype(dtype)
    t = mx.array([750.0], dtype=dtype)  # its blocks look their cached modulation up by this one value
    model.cache_modulation_params(mx.random.normal((batch, 2048)).astype(dtype), t)  # done once per generation
    mx.clear_cache()
    allocator.release()
    meter.reset_peak()
    sec, times = _timed(meter.timed(lambda: mx.eval(model(x, context, t))), repeats)
    return {"seconds": sec, "times": times, "peak_bytes": meter.peak_bytes(), **meter.describe()}


WORKERS = {"mlx": mlx_worker, "diffusers": diffusers_worker, "diffusionkit": diffusionkit_worker}


def spawn(engine: str, size: int, precision: str, quantization, repeats: int, threads=None, batch: int = 2,
          device: str = "auto") -> dict:
    from backend.bench import run_worker
    return run_worker("backend.bench_sd3", [engine, size, precision, quantization or "none", repeats, batch, device],
                      threads)


def rows(sizes, precisions, quantizations, repeats: int, engines=ENGINES, threads=None, batch: int = 2,
         rounds: int = 1, device: str = "auto"):
    """Yield one result row per size x precision x quantization, every engine measured side by side (taking
    turns over `rounds` spawns each: bench.alternated)."""
    from backend.bench import alternated
    for size in sizes:
        for precision in precisions:
            for quantization in quantizations:
                row = {"model": "sd3-medium", "size": size, "precision": precision, "part": "transformer",
                       "quantization": quantization or "none", "tokens": TOKENS, "batch": batch}
                spawners = {engine: (lambda e=engine: spawn(e, size, precision, quantization, repeats, threads,
                                                              batch, device))
                            for engine in engines if not quantization or engine == "mlx"}  # peers: unquantized only
                yield {**row, **alternated(spawners, rounds)}


def row_md(row: dict) -> str:
    from backend.bench import cell, label
    m, d, k = row.get("mlx", {}), row.get("diffusers", {}), row.get("diffusionkit", {})
    ratio = lambda other: f"{m['seconds'] / other['seconds']:.2f}x" \
        if "seconds" in m and other and "seconds" in other else "-"  # noqa: E731
    gib = lambda r: cell(r, "peak_bytes", 2**30, " GiB", 50)  # noqa: E731
    return (f"| sd3-medium {row['size']}px | transformer step, batch {row.get('batch', 1)} | {label(row)} "
            f"| {cell(m, 'seconds', unit=' s', width=50)} | {cell(d, 'seconds', unit=' s', width=50)} | {ratio(d)} "
            f"| {cell(k, 'seconds', unit=' s', width=50)} | {ratio(k)} | {gib(m)} | {gib(d)} | {gib(k)} |")


HEADER = ("| model | stage | precision | MLX | diffusers | MLX/diffusers | DiffusionKit | MLX/DiffusionKit "
          "| MLX peak memory | diffusers peak memory | DiffusionKit peak memory |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


if __name__ == "__main__":
    engine, size, precision, quantization, repeats, batch, device = sys.argv[1:8]
    result = WORKERS[engine](int(size), precision, None if quantization == "none" else quantization, int(repeats),
                             int(batch), device)
    print(json.dumps(result))
