"""`python -m backend bench`: per-stage timings and memory at real model sizes, MLX against diffusers.

Models are built from the real configs in configs/reference/ with random weights (the timing and memory
of a network do not depend on its weight values), so the benchmark needs no download. Each measurement
runs in a fresh worker process so that peak memory figures are the stage's own.
Prints a markdown table and writes a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "reference"


def _cfg(model: str, part: str) -> dict:
    return json.loads((CONFIGS / model / part / "config.json").read_text())


#: Timed runs of a text encoder at least: a run takes ~0.15 s, and the median of a few such runs moved by 10%
#: between two runs of the bench on a shared machine (the same CLIP-L read 1.10x and 0.96x of diffusers').
TEXT_ENCODER_REPEATS = 20
#: The text encoder stages: SDXL's second encoder (OpenCLIP bigG, 32 layers of 1280) gets its own row wherever the
#: first is asked for; its run takes ~1 s.
TEXT_PARTS = ("text_encoder", "text_encoder_2")


def _text_ids():
    """The text encoders' input, the same for both engines: a guided batch's two rows as the tokenizer makes them
    (start, words, end, end as padding): a 20-word prompt and an empty negative prompt."""
    import numpy as np
    ids = np.full((2, 77), 49407, np.int64)
    ids[:, 0] = 49406
    ids[0, 1:21] = np.random.default_rng(0).integers(320, 49000, 20)
    return ids


def _conditioning(model: str, part: str) -> tuple:
    """(hidden layer, pooled) the model's pipeline asks of this text encoder: SD 1.5 the last hidden state, SDXL the
    penultimate of both and the second's projected pooled output."""
    from backend import families
    family = families.family_of_index(json.loads((CONFIGS / model / "model_index.json").read_text()))
    return family.clip_layer, family.uses_pooled(TEXT_PARTS.index(part)) and _projected(_cfg(model, part))


def _projected(text_config: dict) -> bool:
    return "CLIPTextModelWithProjection" in (text_config.get("architectures") or [])


def _median_time(fn, repeats: int, warmup: bool = True) -> tuple[float, list]:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# -- workers (run in their own process) ------------------------------------------------------------
def _mlx_worker(model: str, part: str, precision: str, size: int, repeats: int, quantization=None,
                device: str = "auto") -> dict:
    import backend  # noqa: F401
    from backend import allocator, bench_devices
    import mlx.core as mx
    import mlx.nn as nn
    from backend.engines.mlx import cpu_kernels
    from backend.engines.mlx.clip import CLIPTextConfig, CLIPTextModel
    from backend.engines.mlx.unet import UNet2DConditionModel, UNetConfig
    from backend.engines.mlx.vae import AutoencoderKL, VAEConfig
    dtype = bench_devices.mlx_dtype(precision)
    meter = bench_devices.mlx_meter(device)
    latent = size // 8

    def build(module, component=None):
        module.set_dtype(dtype)
        mx.eval(module.parameters())
        if quantization and component:  # as the engine quantizes: the denoiser's and text encoders' layers
            from backend.engines.mlx.quantize import quantize_module, scheme_recipe
            quantize_module(module, component, scheme_recipe(quantization))
        return module

    def text_fn(enc, layer=-1, pooled=False):
        ids = mx.array(_text_ids().astype("int32"))

        def run():
            with cpu_kernels.eager_chunks():  # as engine.encode_text runs it
                mx.eval([a for a in enc.conditioning(ids, layer, pooled) if a is not None])
        return run

    def decode(vae, z):
        with cpu_kernels.eager_chunks():  # as engine.decode runs it
            mx.eval(vae.decode(z))

    def unet_step(unet):
        with cpu_kernels.eager_chunks():  # as engine.predict_noise runs it
            out = unet(x, t, ctx, **extra)
            mx.eval(out)
        return out

    unet_cfg = _cfg(model, "unet")
    ctx_dim = unet_cfg["cross_attention_dim"]
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    x = mx.random.normal((2, latent, latent, 4)).astype(dtype)
    ctx = mx.random.normal((2, 77, ctx_dim)).astype(dtype)
    extra = dict(text_embeds=mx.zeros((2, 1280), dtype=dtype),
                 time_ids=mx.array([[size, size, 0, 0, size, size]] * 2, dtype=dtype)) if sdxl else {}
    t = mx.array([500.0, 500.0])

    def measured(run, repeats, warmup=True):
        """Median time of `run`; the peak from here on: the weights and what the runs hold, not the random init's
        fp32 temporaries (loading a checkpoint makes none)."""
        mx.clear_cache()
        allocator.release()
        meter.reset_peak()
        return _median_time(meter.timed(run), repeats, warmup)

    n_params = None
    if part in TEXT_PARTS:
        enc = build(CLIPTextModel(CLIPTextConfig.from_dict(_cfg(model, part))))
        sec, times = measured(text_fn(enc, *_conditioning(model, part)), max(repeats, TEXT_ENCODER_REPEATS))
    elif part == "unet":
        unet = build(UNet2DConditionModel(UNetConfig.from_dict(unet_cfg)), "unet")
        sec, times = measured(lambda: unet_step(unet), repeats)
    elif part == "vae_decode":
        vae = build(AutoencoderKL(VAEConfig.from_dict(_cfg(model, "vae"))))
        z = mx.random.normal((1, latent, latent, 4)).astype(dtype)
        sec, times = measured(lambda: decode(vae, z), repeats)
    elif part == "pipeline":  # one text encoding, one guided UNet step, one decode: the memory of a generation
        enc = build(CLIPTextModel(CLIPTextConfig.from_dict(_cfg(model, "text_encoder"))), "text_encoder")
        unet = build(UNet2DConditionModel(UNetConfig.from_dict(unet_cfg)), "unet")
        vae = build(AutoencoderKL(VAEConfig.from_dict(_cfg(model, "vae"))))

        def run():
            text_fn(enc)()
            decode(vae, unet_step(unet)[:1])
        sec, times = measured(run, 1, warmup=False)  # its figure: the peak memory of one generation
        n_params = sum(v.size for m in (enc, unet, vae) for _, v in nn.utils.tree_flatten(m.parameters()))
    else:
        raise ValueError(part)
    from backend import blas
    return {"seconds": sec, "times": times, "peak_bytes": meter.peak_bytes(), "params": n_params,
            "blas": blas.describe(), **meter.describe()}


def _torch_worker(model: str, part: str, precision: str, size: int, repeats: int, quantization=None,
                  device: str = "auto") -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from backend import bench_devices
    if quantization:
        raise ValueError("the diffusers rows are unquantized")
    dtype = bench_devices.torch_dtype(precision)
    meter = bench_devices.torch_meter(device)
    on = dict(device=meter.device, dtype=dtype)
    latent = size // 8
    unet_cfg = _cfg(model, "unet")
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    torch.set_grad_enabled(False)
    x = torch.randn(2, 4, latent, latent, **on)
    ctx = torch.randn(2, 77, unet_cfg["cross_attention_dim"], **on)
    extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280, **on),
                                   "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, **on)}} \
        if sdxl else {}
    t = torch.tensor([500.0, 500.0], device=meter.device)
    ids = torch.from_numpy(_text_ids()).to(meter.device)

    def placed(build):
        with torch.device(meter.device):  # random init where it runs: on a GPU, no CPU init and copy
            return build().to(**on).eval()

    def text_model(part="text_encoder"):
        from transformers import CLIPTextModelWithProjection
        cfg = _cfg(model, part)
        cls = CLIPTextModelWithProjection if _projected(cfg) else CLIPTextModel
        return placed(lambda: cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})))

    def measured(run, repeats, warmup=True):
        """As the MLX worker's: the peak from here on, after the models are built."""
        import gc
        gc.collect()
        meter.reset_peak()
        return _median_time(meter.timed(run), repeats, warmup)

    if part in TEXT_PARTS:
        enc, (layer, _) = text_model(part), _conditioning(model, part)
        # as diffusers' pipelines call it: SDXL asks for every hidden state to take the penultimate
        sec, times = measured(lambda: enc(ids, output_hidden_states=layer != -1), max(repeats, TEXT_ENCODER_REPEATS))
    elif part == "unet":
        unet = placed(lambda: UNet2DConditionModel.from_config(unet_cfg))
        sec, times = measured(lambda: unet(x, t, ctx, **extra), repeats)
    elif part == "vae_decode":
        vae = placed(lambda: AutoencoderKL.from_config(_cfg(model, "vae")))
        z = torch.randn(1, 4, latent, latent, **on)
        sec, times = measured(lambda: vae.decode(z), repeats)
    elif part == "pipeline":
        enc = text_model()
        unet = placed(lambda: UNet2DConditionModel.from_config(unet_cfg))
        vae = placed(lambda: AutoencoderKL.from_config(_cfg(model, "vae")))

        def run():
            enc(ids)
            out = unet(x, t, ctx, **extra).sample
            vae.decode(out[:1])
        sec, times = measured(run, 1, warmup=False)  # its figure: the peak memory of one generation
    else:
        raise ValueError(part)
    return {"seconds": sec, "times": times, "peak_bytes": meter.peak_bytes(), **meter.describe()}


def run_worker(module: str, args: list, threads: int | None = None) -> dict:
    """`python -m <module> <args>` in a fresh process (so that each peak memory is its own): the JSON of its last
    output line, or {"error": its last error line}. `threads`: the same thread count for OpenBLAS and oneMKL (MLX)
    and OpenMP/MKL (torch)."""
    env = dict(os.environ)
    if threads:
        env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spawn(engine: str, model: str, part: str, precision: str, size: int, repeats: int,
           threads: int | None = None, quantization=None, device: str = "auto") -> dict:
    return run_worker("backend.bench", ["--worker", engine, "--model", model, "--part", part, "--precision",
                                        precision, "--size", size, "--repeats", repeats, "--quantization",
                                        quantization or "none", "--device", device], threads)


def alternated(spawners: dict, rounds: int) -> dict:
    """Each engine's worker spawned `rounds` times, the engines taking turns (MLX, diffusers, MLX, ...), and each
    engine's timed runs pooled: a slow minute of a shared machine then falls on both engines, not on whichever
    happened to run in it. The figure is the median of all of an engine's runs, the peak the highest."""
    results = {name: [] for name in spawners}
    for _ in range(max(1, rounds)):
        for name, spawn in spawners.items():
            results[name].append(spawn())
    return {name: _pooled(runs) for name, runs in results.items()}


def _pooled(runs: list) -> dict:
    failed = next((r for r in runs if "error" in r), None)
    if failed or len(runs) == 1:
        return failed or runs[0]
    times = [t for r in runs for t in r["times"]]
    peaks = [r["peak_bytes"] for r in runs if r.get("peak_bytes") is not None]
    return {**runs[0], "seconds": statistics.median(times), "times": times, "rounds": len(runs),
            "peak_bytes": max(peaks) if peaks else None}


HEADER = ("| model | stage | precision | MLX | diffusers | MLX/diffusers | MLX peak memory | diffusers peak memory |\n"
          "|---|---|---|---|---|---|---|---|")
#: The stages a weight quantization changes (MLX only: its denoiser and text encoders are quantized, its VAE not).
QUANTIZED_PARTS = ("unet", "pipeline")


def cpu_model() -> str:
    """The CPU's model name and vector extensions, printed with every figure (speed ratios depend on them)."""
    import platform
    from backend import blas
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or platform.machine()
    flags = blas.cpu_flags()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({vector})"


#: `--max-isa avx2`: the switches that hold each library's kernels to AVX2 on an AVX-512 CPU, for both engines'
#: workers (oneMKL, numpy and its OpenBLAS for MLX's side; ATen, oneDNN and torch's oneMKL for diffusers'). MLX's
#: own elementwise code is compiled as it is either way; the CPU's clock and caches stay this CPU's.
AVX2_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
            "OPENBLAS_CORETYPE": "Haswell"}


def _torch_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def run_bench(models, precisions, parts, repeats: int, with_torch: bool, out: Path, threads=None,
              sd3_sizes=(512, 1024), quantizations=(None,), sd3_batch: int = 2, sd3_engines=None,
              rounds: int = 1, device: str = "auto") -> dict:
    from backend import blas, bench_generation, bench_sd3
    rows = []
    for model in models:
        if model == "sd3-medium":  # its own table: a transformer step against diffusers and DiffusionKit
            engines = [e for e in (sd3_engines or bench_sd3.ENGINES) if with_torch or e != "diffusers"]
            print("\n" + bench_sd3.HEADER, flush=True)
            for row in bench_sd3.rows(sd3_sizes, precisions, quantizations, repeats, engines, threads, sd3_batch,
                                      rounds, device):
                rows.append(row)
                print(bench_sd3.row_md(row), flush=True)
            continue
        size = 1024 if model == "sdxl" else 512
        model_parts = [p for p in parts if p != "generation"]
        if model_parts and not any(r["model"] != "sd3-medium" and r["part"] != "generation" for r in rows):
            print("\n" + HEADER, flush=True)
        if "text_encoder" in parts and (CONFIGS / model / "text_encoder_2").is_dir():
            model_parts.insert(model_parts.index("text_encoder") + 1, "text_encoder_2")
        for precision in precisions:
            for part in model_parts:
                for quantization in (quantizations if part in QUANTIZED_PARTS else (None,)):
                    def spawner(engine, q=quantization, part=part, precision=precision):
                        return lambda: _spawn(engine, model, part, precision, size, repeats, threads, q, device)
                    spawners = {"mlx": spawner("mlx")}
                    if with_torch and not quantization:  # diffusers: unquantized rows only
                        spawners["diffusers"] = spawner("torch")
                    row = {"model": model, "size": size, "precision": precision, "part": part,
                           "quantization": quantization or "none", **alternated(spawners, rounds)}
                    rows.append(row)
                    print(_row_md(row), flush=True)
    if "generation" in parts and any(m in bench_generation.MODELS for m in models):
        print("\n" + bench_generation.HEADER, flush=True)
        generated = []
        for row in bench_generation.rows(models, precisions, quantizations, with_torch, device, threads, rounds):
            generated.append(row)
            print(bench_generation.row_md(row), flush=True)
        rows += generated
        print("\n" + "\n".join(filter(None, map(bench_generation.stage_line, generated))), flush=True)
    report = {"blas": blas.describe(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "max_isa": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "native"),
              "threads": threads or "default", "rounds": rounds, "device": device, "rows": rows,
              "where": where(rows), "targets": _targets(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


def cell(r: dict, key: str, scale=1.0, unit="", width=40) -> str:
    """A table cell: r[key] scaled, "error: ..." for a failed worker, "-" for none or an unmeasured figure."""
    if not r:
        return "-"
    if "error" in r:
        return "error: " + r["error"][:width]
    return "-" if r.get(key) is None else f"{r[key] / scale:.2f}{unit}"


def label(row: dict) -> str:
    """The precision column: "fp16", or "fp16 + q4" for a quantized MLX row."""
    q = row.get("quantization", "none")
    return row["precision"] + ("" if q == "none" else f" + {q}")


def _row_md(row: dict) -> str:
    m, d = row["mlx"], row.get("diffusers")
    ratio = (f"{m['seconds'] / d['seconds']:.2f}x" if d and "seconds" in d and "seconds" in m else "-")
    return (f"| {row['model']} {row['size']}px | {row['part']} | {label(row)} | {cell(m, 'seconds', unit=' s')} "
            f"| {cell(d, 'seconds', unit=' s')} | {ratio} | {cell(m, 'peak_bytes', 2**30, ' GiB')} "
            f"| {cell(d, 'peak_bytes', 2**30, ' GiB')} |")


def where(rows) -> dict:
    """Each engine's devices and memory figures over the run's rows: {"mlx": ["gpu: MLX allocator peak ..."]}."""
    seen: dict = {}
    for row in rows:
        for engine in ("mlx", "diffusers", "diffusionkit"):
            r = row.get(engine) or {}
            if "device" in r:
                entry = f"{r['device']}, memory: {r['memory']}"
                seen.setdefault(engine, [])
                if entry not in seen[engine]:
                    seen[engine].append(entry)
    return seen


def _ratio_target(value: float, limit: float) -> dict:
    return {"value": round(value, 3), "target": f"<= {limit}", "met": value <= limit}


def _targets(rows) -> dict:
    """Issue 17's targets where a run measured them:
    - every MLX/diffusers time ratio <= 1.0 (unquantized rows in MLX's default mode; the issue sets it for the CPU);
    - a generation's peak memory (the pipeline and generation rows; an accelerator's or the CPU's figure alike) at
      most 0.8x diffusers' at fp16, and at most 0.5x diffusers' fp16 with 4-bit weights (quantized and
      reduce-memory rows against diffusers' default pipeline);
    - on a GPU, a quantized step or generation no slower than MLX's own unquantized one at the same precision."""
    out = {}
    plain = {(r["model"], r["size"], r["part"], r["precision"]): r for r in rows
             if r.get("quantization", "none") == "none" and r.get("mode", "default") == "default"}
    for row in rows:
        m = row.get("mlx") or {}
        if "seconds" not in m:
            continue
        q, mode = row.get("quantization", "none"), row.get("mode", "default")
        base = plain.get((row["model"], row["size"], row["part"], row["precision"])) or {}
        d = base.get("diffusers") or {}
        name = (f"{row['model']}_{row['size']}_{row['part']}_{row['precision']}"
                + ("" if mode == "default" else "_" + mode.replace("-", "_")) + ("" if q == "none" else f"_{q}"))
        if row["part"] in ("pipeline", "generation") and row["precision"] == "fp16" and q in ("none", "q4") \
                and m.get("peak_bytes") and d.get("peak_bytes"):
            out[f"{name}_peak_memory_ratio"] = _ratio_target(m["peak_bytes"] / d["peak_bytes"],
                                                             0.8 if q == "none" else 0.5)
        if row["part"] == "pipeline":  # its one run is there for its memory
            continue
        if q == "none" and mode == "default" and "seconds" in d:
            out[f"{name}_time_ratio"] = _ratio_target(m["seconds"] / d["seconds"], 1.0)
        elif q != "none" and m.get("device") not in (None, "cpu") and "seconds" in (base.get("mlx") or {}):
            out[f"{name}_vs_unquantized_time_ratio"] = _ratio_target(m["seconds"] / base["mlx"]["seconds"], 1.0)
    return out


def cmd_bench(a) -> int:
    with_torch = not a.no_torch and _torch_available()
    from backend import blas
    if a.max_isa == "avx2":  # the workers inherit it; this process's oneMKL has already picked its kernels
        os.environ.update(AVX2_ENV)
        print("Kernels held to AVX2 in both engines' workers: "
              + " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}" for k, v in AVX2_ENV.items()))
    print(f"CPU: {cpu_model()}; BLAS: {blas.describe()}")
    report = run_bench(a.models, a.precisions, a.parts, a.repeats, with_torch, Path(a.out), a.threads,
                       a.sd3_sizes, [None if q == "none" else q for q in a.quantizations], a.sd3_batch,
                       a.sd3_engines, a.rounds, a.device)
    print(f"\nCPUs: {report['cpu_count']}; JSON: {a.out}")
    for engine, entries in report["where"].items():
        print(f"{engine} ran on: {'; '.join(entries)}")
    for name, t in report["targets"].items():
        print(f"target {name}: {t}")
    return 0


def add_command(sub) -> None:
    from backend import bench_devices
    b = sub.add_parser("bench", help="per-stage timings at real SD 1.5 / SDXL / SD3 sizes, MLX vs diffusers")
    b.add_argument("--models", nargs="+", default=["sd-1.5"], choices=["sd-1.5", "sdxl", "sd3-medium"])
    b.add_argument("--sd3-sizes", nargs="+", type=int, default=[512, 1024], help="image sizes of the SD3 rows")
    b.add_argument("--quantizations", "--sd3-quantizations", dest="quantizations", nargs="+", default=["none"],
                   choices=["none", "q8", "q6", "q4"],
                   help="MLX weight quantizations of the denoiser step and pipeline rows (the other engines run "
                        "unquantized rows only)")
    b.add_argument("--device", choices=bench_devices.CHOICES, default="auto",
                   help="auto: each engine on its accelerator where it has one (MLX's GPU on a Mac or with "
                        "mlx[cuda]; torch's CUDA or MPS), memory then read from each engine's allocator; cpu: both "
                        "on the CPU")
    b.add_argument("--sd3-batch", type=int, default=2,
                   help="batch of the SD3 rows: 2 is a guided step (the default), 1 a step without guidance")
    b.add_argument("--max-isa", choices=["native", "avx2"], default="native",
                   help="avx2: hold oneMKL, numpy, ATen and oneDNN to AVX2 kernels in both engines (an AVX2 CPU's "
                        "code paths on an AVX-512 one)")
    b.add_argument("--sd3-engines", nargs="+", choices=["mlx", "diffusers", "diffusionkit"],
                   help="engines of the SD3 rows (default: all three; DiffusionKit's 1024 px step takes minutes)")
    b.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=bench_devices.PRECISIONS)
    b.add_argument("--parts", nargs="+", default=["text_encoder", "unet", "vae_decode", "pipeline"],
                   choices=["text_encoder", "unet", "vae_decode", "pipeline", "generation"],
                   help="generation: a whole generation per engine from a random-weight model folder written once "
                        "(SD 1.5, SDXL; backend/bench_generation.py), MLX also with reduce-memory")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--rounds", type=int, default=1,
                   help="spawn each engine's worker this many times, the engines taking turns, and pool their runs "
                        "(a shared machine's slow minutes then fall on both engines)")
    b.add_argument("--no-torch", action="store_true", help="skip the diffusers comparison")
    b.add_argument("--threads", type=int, help="threads for both engines (default: the libraries' own choice)")
    b.add_argument("--out", default="bench-results/bench.json")
    b.set_defaults(func=cmd_bench)


def _worker_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=["mlx", "torch"])
    p.add_argument("--model", required=True)
    p.add_argument("--part", required=True)
    p.add_argument("--precision", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quantization", default="none")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    fn = _mlx_worker if a.worker == "mlx" else _torch_worker
    quantization = None if a.quantization == "none" else a.quantization
    print(json.dumps(fn(a.model, a.part, a.precision, a.size, a.repeats, quantization, a.device)))


if __name__ == "__main__":
    _worker_main()
