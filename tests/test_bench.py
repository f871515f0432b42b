"""backend.bench's own logic: what each text encoder row computes, and the engines taking turns over rounds."""
import numpy as np

from backend import bench


def test_text_rows_ask_what_each_pipeline_conditions_on():
    assert bench._conditioning("sd-1.5", "text_encoder") == (-1, False)   # last hidden state
    assert bench._conditioning("sdxl", "text_encoder") == (-2, False)     # penultimate, no pooled output
    assert bench._conditioning("sdxl", "text_encoder_2") == (-2, True)    # penultimate + projected pooled output
    ids = bench._text_ids()
    assert ids.shape == (2, 77) and (ids[:, 0] == 49406).all()
    # a 20-word prompt and an empty one: each row's first end token where the tokenizer puts it
    assert [int(np.argmax(row == 49407)) for row in ids] == [21, 1]
    assert len(set(ids[0, 1:21])) > 1 and (ids[0, 1:21] < 49406).all()


def test_rounds_alternate_the_engines_and_pool_their_runs():
    calls = []

    def worker(name, rounds):  # one result per spawn: (timed runs, peak)
        results = iter(rounds)

        def spawn():
            calls.append(name)
            times, peak = next(results)
            return {"seconds": float(np.median(times)), "times": times, "peak_bytes": peak}
        return spawn

    out = bench.alternated({"mlx": worker("mlx", [([1.0, 2.0], 10), ([3.0, 4.0], 30)]),
                            "diffusers": worker("diffusers", [([5.0, 5.0], 20), ([9.0, 9.0], 5)])}, rounds=2)
    assert calls == ["mlx", "diffusers", "mlx", "diffusers"]
    assert out["mlx"]["times"] == [1.0, 2.0, 3.0, 4.0] and out["mlx"]["seconds"] == 2.5
    assert out["mlx"]["peak_bytes"] == 30 and out["diffusers"]["peak_bytes"] == 20 and out["mlx"]["rounds"] == 2
    assert out["diffusers"]["seconds"] == 7.0
    single = bench.alternated({"mlx": lambda: {"seconds": 1.0, "times": [1.0], "peak_bytes": 1}}, rounds=1)
    assert single == {"mlx": {"seconds": 1.0, "times": [1.0], "peak_bytes": 1}}
    failed = bench.alternated({"mlx": lambda: {"error": "out of memory"}}, rounds=2)
    assert failed == {"mlx": {"error": "out of memory"}}


def test_rounds_pool_an_unmeasured_peak_as_none():
    runs = iter([{"seconds": 1.0, "times": [1.0], "peak_bytes": None, "device": "mps"},
                 {"seconds": 2.0, "times": [2.0], "peak_bytes": None, "device": "mps"}])
    out = bench.alternated({"diffusers": lambda: next(runs)}, rounds=2)
    assert out["diffusers"]["peak_bytes"] is None and out["diffusers"]["seconds"] == 1.5
    assert bench.cell(out["diffusers"], "peak_bytes", 2**30, " GiB") == "-"
    assert bench.cell(out["diffusers"], "seconds", unit=" s") == "1.50 s"


def _row(model, part, precision, quantization="none", mlx=None, diffusers=None):
    row = {"model": model, "size": 512, "part": part, "precision": precision, "quantization": quantization,
           "mlx": mlx or {}}
    if diffusers is not None:
        row["diffusers"] = diffusers
    return row


def test_targets_are_the_issues():
    gib = 2**30
    gpu = {"device": "gpu", "memory": "MLX allocator peak"}
    cuda = {"device": "cuda", "memory": "torch.cuda.max_memory_allocated"}
    rows = [
        _row("sd-1.5", "unet", "fp16", mlx={"seconds": 0.05, **gpu}, diffusers={"seconds": 0.04, **cuda}),
        _row("sd-1.5", "unet", "fp16", "q8", mlx={"seconds": 0.045, **gpu}),
        _row("sd-1.5", "unet", "fp16", "q4", mlx={"seconds": 0.06, **gpu}),
        _row("sd-1.5", "pipeline", "fp16", mlx={"seconds": 1, "peak_bytes": 3 * gib, **gpu},
             diffusers={"seconds": 1, "peak_bytes": 4 * gib}),
        _row("sd-1.5", "pipeline", "fp16", "q4", mlx={"seconds": 1, "peak_bytes": 1.9 * gib, **gpu}),
        _row("sd-1.5", "unet", "fp32", mlx={"seconds": 9.0}, diffusers={"seconds": 10.0}),
        # on the CPU a quantized step has no speed target (its layers dequantize first)
        _row("sd-1.5", "unet", "fp32", "q4", mlx={"seconds": 30.0, "device": "cpu", "memory": "process peak RSS"}),
        _row("sd-1.5", "vae_decode", "fp32", mlx={"error": "out of memory"}, diffusers={"seconds": 1.0}),
    ]
    t = bench._targets(rows)
    assert t["sd-1.5_512_unet_fp16_time_ratio"] == {"value": 1.25, "target": "<= 1.0", "met": False}
    assert t["sd-1.5_512_unet_fp16_q8_vs_unquantized_time_ratio"]["met"] is True
    assert t["sd-1.5_512_unet_fp16_q4_vs_unquantized_time_ratio"] == {"value": 1.2, "target": "<= 1.0", "met": False}
    assert t["sd-1.5_512_pipeline_fp16_peak_memory_ratio"] == {"value": 0.75, "target": "<= 0.8", "met": True}
    assert t["sd-1.5_512_pipeline_fp16_q4_peak_memory_ratio"] == {"value": 0.475, "target": "<= 0.5", "met": True}
    assert t["sd-1.5_512_unet_fp32_time_ratio"]["met"] is True
    assert set(t) == {"sd-1.5_512_unet_fp16_time_ratio", "sd-1.5_512_unet_fp16_q8_vs_unquantized_time_ratio",
                      "sd-1.5_512_unet_fp16_q4_vs_unquantized_time_ratio", "sd-1.5_512_pipeline_fp16_peak_memory_ratio",
                      "sd-1.5_512_pipeline_fp16_q4_peak_memory_ratio", "sd-1.5_512_unet_fp32_time_ratio"}
    assert bench.where(rows) == {"mlx": ["gpu, memory: MLX allocator peak", "cpu, memory: process peak RSS"],
                                 "diffusers": ["cuda, memory: torch.cuda.max_memory_allocated"]}
    assert bench.label(rows[2]) == "fp16 + q4" and bench.label(rows[0]) == "fp16"


def test_the_bench_command_takes_quantizations_and_a_device():
    import argparse
    parser = argparse.ArgumentParser()
    bench.add_command(parser.add_subparsers())
    a = parser.parse_args(["bench", "--quantizations", "none", "q4", "--device", "cpu"])
    assert a.quantizations == ["none", "q4"] and a.device == "cpu"
    old = parser.parse_args(["bench", "--sd3-quantizations", "q8"])  # the name earlier notes quote
    assert old.quantizations == ["q8"] and old.device == "auto"


def test_generation_rows_compare_every_mlx_mode_with_diffusers_default_pipeline():
    gib = 2**30
    gpu = {"device": "gpu", "memory": "MLX allocator peak"}

    def gen(mode, q="none", **engines):
        return {**_row("sd-1.5", "generation", "fp16", q, **engines), "mode": mode}
    rows = [gen("default", mlx={"seconds": 2.0, "peak_bytes": 3.5 * gib, **gpu},
                diffusers={"seconds": 2.5, "peak_bytes": 4 * gib}),
            gen("reduce-memory", mlx={"seconds": 2.4, "peak_bytes": 2.4 * gib, **gpu}),
            gen("default", "q4", mlx={"seconds": 1.8, "peak_bytes": 1.6 * gib, **gpu})]
    t = bench._targets(rows)
    assert t == {
        "sd-1.5_512_generation_fp16_peak_memory_ratio": {"value": 0.875, "target": "<= 0.8", "met": False},
        "sd-1.5_512_generation_fp16_time_ratio": {"value": 0.8, "target": "<= 1.0", "met": True},
        "sd-1.5_512_generation_fp16_reduce_memory_peak_memory_ratio": {"value": 0.6, "target": "<= 0.8", "met": True},
        "sd-1.5_512_generation_fp16_q4_peak_memory_ratio": {"value": 0.4, "target": "<= 0.5", "met": True},
        "sd-1.5_512_generation_fp16_q4_vs_unquantized_time_ratio": {"value": 0.9, "target": "<= 1.0", "met": True}}
