"""The MLX engine's memory habits: attention that never holds a score matrix above its budget (query chunks, or
the fused kernel at a padded head width), the VAE decoded in bands on any device for large images, the VAE's
precision decided once from `force_upcast`, reduce-memory loading each stage when it runs, peaks per stage.

The attention, band and quantized-matmul tests run on `mx.default_device()`: the CPU here, the GPU on a Mac or a
CUDA machine, where they exercise the GPU code paths (fused attention, query chunks, banded VAE, MLX's quantized
matmul). Where a path is chosen by device, the test selects it explicitly, so it also runs on the CPU.
"""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from backend.engines.mlx import cpu_kernels, layers, vae_bands, weights as W
from backend.engines.mlx.engine import MLXStages
from backend.engines.mlx.layers import AttentionStats, SCORES_BUDGET, chunk_rows, device_attention, scores_bytes
from backend.engines.mlx.vae import AutoencoderKL
from backend.pipeline import load_pipeline
from backend.types import GenerationRequest
from tests.arrays import relative_error
from tests.tiny_models import cast_vae, perturbed_vae

MIB = 1 << 20
PROMPT = "a red circle at the top"


def _qkv(shape_q, shape_kv, d_v=None, dtype=mx.float32, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    d_v = d_v or shape_kv[-1]
    q = mx.random.normal(shape_q, key=keys[0]).astype(dtype)
    k = mx.random.normal(shape_kv, key=keys[1]).astype(dtype)
    v = mx.random.normal((*shape_kv[:-1], d_v), key=keys[2]).astype(dtype)
    return q, k, v


def _reference(q, k, v, scale):
    """softmax(q k^T scale) v in float64 numpy."""
    q64, k64, v64 = (np.array(a.astype(mx.float32)).astype(np.float64) for a in (q, k, v))
    s = np.einsum("bhnd,bhmd->bhnm", q64, k64) * scale
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bhnm,bhmd->bhnd", p / p.sum(axis=-1, keepdims=True), v64)


# -- attention -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape_q, shape_kv", [
    ((2, 3, 200, 40), (2, 3, 200, 40)),     # SD 1.x's 40-wide heads (no fused kernel takes 40)
    ((2, 4, 256, 64), (2, 4, 77, 64)),      # cross-attention, a fused width
    ((1, 1, 300, 512), (1, 1, 300, 512)),   # the VAE's single 512-wide head
])
@pytest.mark.parametrize("eager", [False, True])
def test_attention_within_a_small_budget_is_the_same_attention(shape_q, shape_kv, eager):
    q, k, v = _qkv(shape_q, shape_kv)
    scale = shape_q[-1] ** -0.5
    budget = 64 * 1024  # far below the whole score matrix: many chunks
    assert scores_bytes(*shape_q[:3], shape_kv[2], 4) > budget
    AttentionStats.reset()
    if eager:
        with cpu_kernels.eager_chunks():
            out = device_attention(q, k, v, scale, budget=budget)
            mx.eval(out)
    else:
        out = device_attention(q, k, v, scale, budget=budget)
    whole = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    assert out.shape == whole.shape
    assert relative_error(np.array(out), _reference(q, k, v, scale)) < 1e-5
    assert relative_error(np.array(out), np.array(whole)) < 1e-5
    assert AttentionStats.largest_scores <= budget
    assert set(AttentionStats.calls) <= {"chunked", "fused", "fused_padded"}


def test_attention_within_the_budget_is_one_call():
    q, k, v = _qkv((1, 2, 64, 40), (1, 2, 64, 40))
    AttentionStats.reset()
    out = device_attention(q, k, v, 40 ** -0.5)
    assert AttentionStats.calls == {"mlx": 1} and AttentionStats.largest_scores == 2 * 64 * 64 * 4
    assert relative_error(np.array(out), _reference(q, k, v, 40 ** -0.5)) < 1e-5


def test_query_chunks_keep_the_memory_peak_near_the_budget():
    """MLX's own peak counter: the whole unfused call holds its 64 MiB score matrix (and its softmax), the chunked
    one a few budgets' worth (the VAE's 512-wide head, which no fused kernel takes, on this device)."""
    q, k, v = _qkv((1, 1, 4096, 512), (1, 1, 4096, 512))
    mx.eval(q, k, v)
    full = scores_bytes(1, 1, 4096, 4096, 4)
    assert full == 64 * MIB

    def peak(fn):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        with cpu_kernels.eager_chunks():
            out = fn()
            mx.eval(out)
        return mx.get_peak_memory() - base, out

    whole_peak, whole = peak(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=512 ** -0.5))
    chunked_peak, chunked = peak(lambda: device_attention(q, k, v, 512 ** -0.5, budget=4 * MIB))
    assert whole_peak >= full  # MLX's unfused attention materialises the whole matrix
    assert chunked_peak < full / 2
    assert relative_error(np.array(chunked), np.array(whole)) < 1e-5


def test_a_head_the_fused_kernel_does_not_take_is_padded_to_one_it_does(monkeypatch):
    """The rule of MLX's Metal kernels (fused for head widths 64, 72, 80, 96, 128, 192, 256), simulated on any
    device: a 40-wide head runs padded to 64, a 160-wide one to 192, a 512-wide one in query chunks."""
    real = mx.fast.scaled_dot_product_attention
    seen = []

    def metal_like(q, k, v, *, scale, mask=None, force_fused=False, **kw):
        if force_fused:
            if q.shape[-1] not in layers.FUSED_HEAD_DIMS or q.shape[-1] != v.shape[-1]:
                raise ValueError("[scaled_dot_product_attention] force_fused=True but no fused kernel")
            seen.append(q.shape[-1])
        return real(q, k, v, scale=scale, mask=mask)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", metal_like)
    monkeypatch.setattr(layers, "_FUSED_WIDTH", {})
    for d, padded in ((40, 64), (160, 192), (64, 64)):
        q, k, v = _qkv((2, 2, 128, d), (2, 2, 96, d), seed=d)
        AttentionStats.reset()
        out = device_attention(q, k, v, d ** -0.5, budget=1024)
        assert out.shape == (2, 2, 128, d) and seen[-1] == padded
        assert AttentionStats.calls == {"fused" if d == padded else "fused_padded": 1}
        assert AttentionStats.largest_scores == 0
        assert relative_error(np.array(out), _reference(q, k, v, d ** -0.5)) < 1e-5
    q, k, v = _qkv((1, 1, 128, 512), (1, 1, 128, 512))
    AttentionStats.reset()
    out = device_attention(q, k, v, 512 ** -0.5, budget=16 * 1024)
    assert AttentionStats.calls == {"chunked": 1} and AttentionStats.largest_scores <= 16 * 1024
    assert relative_error(np.array(out), _reference(q, k, v, 512 ** -0.5)) < 1e-5
    calls = len(seen)
    device_attention(*_qkv((2, 2, 128, 40), (2, 2, 96, 40)), 40 ** -0.5, budget=1024)
    assert seen[calls:] == [64]  # the width found is remembered: no failing tries the second time


def test_fused_attention_on_this_device_where_it_applies():
    """On a GPU a 64-wide fp16 head runs in MLX's fused kernel (no scores); on the CPU, which has none, in
    chunks."""
    gpu = mx.default_device() == mx.gpu
    q, k, v = _qkv((2, 4, 512, 64), (2, 4, 512, 64), dtype=mx.float16 if gpu else mx.float32)
    AttentionStats.reset()
    out = device_attention(q, k, v, 0.125, budget=MIB)
    assert set(AttentionStats.calls) == ({"fused"} if gpu else {"chunked"})
    assert AttentionStats.largest_scores <= MIB
    assert relative_error(np.array(out.astype(mx.float32)), _reference(q, k, v, 0.125)) < (1e-2 if gpu else 1e-5)


def _reference_model(path, module_name):
    return json.loads((path / module_name / "config.json").read_text())


def _traced_attention_calls(monkeypatch, run) -> list:
    """The (q shape, k shape, v shape, itemsize) of every attention call `run()` makes, with the graph built lazily
    (nothing is computed: the weights stay unevaluated random values, the attention a zero placeholder)."""
    calls = []

    def joined_shape(x) -> tuple:  # an input given as parts along the token axis (SD3): the joined shape
        parts = x if isinstance(x, (list, tuple)) else [x]
        return (*parts[0].shape[:2], sum(p.shape[2] for p in parts), parts[0].shape[3])

    def record(q, k, v, scale):
        first = [x[0] if isinstance(x, (list, tuple)) else x for x in (q, k, v)]
        shapes = [joined_shape(x) for x in (q, k, v)]
        calls.append((*shapes, max(a.itemsize for a in first)))
        return mx.zeros((*shapes[0][:3], shapes[2][-1]), dtype=first[0].dtype)

    monkeypatch.setattr(layers, "attention", record)
    from backend.engines.mlx import mmdit
    monkeypatch.setattr(mmdit, "attention", record)
    run()
    return calls


def _calls_of_reference_models(monkeypatch, size: int) -> dict:
    from pathlib import Path
    from backend.engines.mlx.unet import UNet2DConditionModel, UNetConfig
    root = Path(__file__).resolve().parent.parent / "configs" / "reference"
    latent = size // 8
    out = {}
    for model, dtype in (("sdxl", mx.float16), ("sd-1.5", mx.float16)):
        cfg = UNetConfig.from_dict(_reference_model(root / model, "unet"))
        unet = UNet2DConditionModel(cfg)
        unet.set_dtype(dtype)
        x = mx.zeros((2, latent, latent, 4), dtype=dtype)
        ctx = mx.zeros((2, 77, cfg.cross_attention_dim), dtype=dtype)
        extra = dict(text_embeds=mx.zeros((2, 1280), dtype=dtype), time_ids=mx.zeros((2, 6), dtype=dtype)) \
            if model == "sdxl" else {}
        out[f"{model} UNet"] = _traced_attention_calls(
            monkeypatch, lambda: unet(x, mx.array([500.0, 500.0]), ctx, **extra))
        vae = AutoencoderKL(_reference_model(root / model, "vae"), with_encoder=False)
        vae.set_dtype(mx.float32)  # SDXL's VAE: fp32 (force_upcast); the largest scores either way
        z = mx.zeros((1, latent, latent, 4), dtype=mx.float32)
        out[f"{model} VAE"] = _traced_attention_calls(monkeypatch, lambda: vae.decoder.graph(z))
    from backend.engines.mlx.mmdit import SD3Config, SD3Transformer2DModel
    cfg = SD3Config.from_dict(_reference_model(root / "sd3-medium", "transformer"))
    transformer = SD3Transformer2DModel(cfg)
    transformer.set_dtype(mx.float16)
    x = mx.zeros((2, latent, latent, 16), dtype=mx.float16)
    out["sd3 transformer"] = _traced_attention_calls(monkeypatch, lambda: transformer(
        x, mx.array([500.0, 500.0]), mx.zeros((2, 333, cfg.joint_attention_dim), dtype=mx.float16),
        mx.zeros((2, cfg.pooled_projection_dim), dtype=mx.float16)))
    return out


def test_no_attention_call_holds_more_than_256_mib_of_scores_at_1024_sdxl(monkeypatch):
    """Every attention call of SDXL's UNet (CFG batch of 2, fp16), its VAE decoder (fp32) and SD3's transformer at
    1024x1024, and SD 1.5's at that size, planned as if no fused kernel applied (the CPU; a GPU's unsupported
    widths): each call's scores stay within the 256 MiB budget, though whole matrices reach 1 GiB."""
    assert SCORES_BUDGET == 256 * MIB
    calls = _calls_of_reference_models(monkeypatch, 1024)
    assert len(calls["sdxl UNet"]) == 2 * (2 * 2 + 2 * 10 + 10 + 3 * 2 + 3 * 10)  # self + cross, per block
    assert calls["sdxl VAE"] == [((1, 1, 16384, 512), (1, 1, 16384, 512), (1, 1, 16384, 512), 4)]
    largest_whole = 0
    for name, model_calls in calls.items():
        for q, k, v, itemsize in model_calls:
            b, h, n_q, _ = q
            n_kv = k[2]
            largest_whole = max(largest_whole, scores_bytes(b, h, n_q, n_kv, itemsize))
            rows = chunk_rows(b, h, n_q, n_kv, itemsize)
            assert scores_bytes(b, h, rows, n_kv, itemsize) <= SCORES_BUDGET, (name, q, k)
            assert 4 * cpu_kernels.attention_chunk_scores(b * h, n_q, n_kv) <= SCORES_BUDGET, (name, q, k)
    assert largest_whole >= 1024 * MIB  # the VAE's whole matrix at 1024x1024 in fp32: 1 GiB, now 4 chunks


# -- the VAE in bands on any device ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae():
    return perturbed_vae()


@pytest.fixture
def device_bands(monkeypatch):
    """The bands as a GPU runs them (MLX's convolution and activations, no compiled CPU kernels), on this device,
    with small bands and a small size threshold so that a small image crosses it."""
    monkeypatch.setattr(vae_bands, "_fast_cpu", lambda: False)
    monkeypatch.setattr(vae_bands, "DEVICE_BAND_BYTES", 4096)
    monkeypatch.setattr(vae_bands, "DEVICE_BAND_PIXELS", 16 * 16)
    banded = []
    real = vae_bands._decode

    def counting(decoder, z):
        banded.append(z.shape)
        return real(decoder, z)
    monkeypatch.setattr(vae_bands, "_decode", counting)
    return banded


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_large_images_decode_in_bands_on_any_device(vae, device_bands, dtype):
    model = vae if dtype == mx.float32 else cast_vae(vae, dtype)
    z = mx.random.normal((1, 12, 10, 4), key=mx.random.key(1)).astype(dtype)  # 24x20 = 480 pixels out: banded
    out = model.decode(z)
    assert device_bands == [(1, 12, 10, 4)]
    graph = model.decoder.graph(model.post_quant_conv(z))
    tolerance = 1e-5 if dtype == mx.float32 else 2e-2
    assert relative_error(np.array(out.astype(mx.float32)), np.array(graph.astype(mx.float32))) < tolerance


def test_small_images_decode_in_one_graph_off_the_cpu_path(vae, device_bands):
    z = mx.random.normal((1, 6, 6, 4), key=mx.random.key(2))  # 12x12 = 144 pixels out: under the threshold
    out = vae.decode(z)
    assert device_bands == []
    assert relative_error(np.array(out), np.array(vae.decoder.graph(vae.post_quant_conv(z)))) < 1e-6


def test_large_images_encode_in_bands_on_any_device(vae, device_bands):
    x = mx.random.uniform(-1, 1, (1, 24, 20, 3), key=mx.random.key(3))
    assert vae_bands.applies(vae.encoder, x)
    banded = vae.encoder(x)
    assert relative_error(np.array(banded), np.array(vae.encoder.graph(x))) < 1e-5


def test_quantized_linear_on_this_device_is_the_dequantized_product():
    """MLX's quantized matmul (what a GPU runs) and the dequantize-then-matmul the CPU runs give one result."""
    from backend.engines.mlx.quantize import QuantizedLinear
    linear = nn.Linear(128, 96)
    layer = QuantizedLinear.from_linear(linear, 64, 4)
    x = mx.random.normal((3, 128), key=mx.random.key(4))
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4)
    expected = np.array(x @ w.T + layer.bias)
    fused = nn.QuantizedLinear.__call__(layer, x)  # the GPU path, on this device
    assert relative_error(np.array(fused), expected) < 1e-5
    assert relative_error(np.array(layer(x)), expected) < 1e-5


# -- the VAE's precision: decided once ---------------------------------------------------------------------------
@pytest.fixture
def decode_calls(monkeypatch):
    calls = []
    real = AutoencoderKL.decode

    def counting(self, z):
        calls.append(z.dtype)
        return real(self, z)
    monkeypatch.setattr(AutoencoderKL, "decode", counting)
    return calls


def _noise(family):
    return np.random.default_rng(5).standard_normal((1, 4, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("family, expected", [("sdxl", mx.float32), ("sd1", mx.float16)])
def test_the_vae_decodes_once_in_the_precision_force_upcast_decides(tiny_pipelines, decode_calls, family, expected):
    """SDXL's VAE (force_upcast) loads and decodes in fp32 under an fp16 pipeline, once; SD 1.x's in fp16."""
    _, folder = tiny_pipelines(family)
    pipe = load_pipeline(str(folder), engine="mlx", precision="fp16")
    assert pipe.stages.vae_dtype == expected
    assert {v.dtype for _, v in tree_flatten(pipe.stages.vae.parameters())} == {expected}
    assert {v.dtype for _, v in tree_flatten(pipe.stages.denoiser.parameters())} == {mx.float16}
    result = pipe.generate(GenerationRequest(prompt=PROMPT, steps=2, seed=1, latents=_noise(family)))
    assert decode_calls == [expected]
    assert np.isfinite(result.pixels).all()
    assert ("vae_precision" in result.engine) == (expected == mx.float32)


def test_a_vae_without_force_upcast_decodes_in_the_pipeline_precision(tiny_pipelines, decode_calls, tmp_path):
    import shutil
    _, folder = tiny_pipelines("sdxl")
    copy = tmp_path / "sdxl-no-upcast"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "vae" / "config.json").read_text())
    (copy / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    pipe = load_pipeline(str(copy), engine="mlx", precision="fp16")
    pipe.generate(GenerationRequest(prompt=PROMPT, steps=1, seed=1, latents=_noise("sdxl")))
    assert decode_calls == [mx.float16]


# -- reduce-memory ----------------------------------------------------------------------------------------------
def _generate_watching(pipe, **kw):
    """A generation, with the components resident at each denoising step."""
    during_steps = []

    def on_step(info):
        during_steps.append([name for name, _ in pipe.stages.resident()])
    kw.setdefault("latents", None if "init_image" in kw else _noise("x"))
    kw.setdefault("prompt", PROMPT)
    result = pipe.generate(GenerationRequest(steps=2, seed=3, **kw), on_step)
    return result, during_steps


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_reduce_memory_loads_each_stage_when_it_runs_and_releases_it(tiny_pipelines, monkeypatch, family):
    _, folder = tiny_pipelines(family)
    loads = []
    real = MLXStages._load
    monkeypatch.setattr(MLXStages, "_load", lambda self, name: loads.append(name) or real(self, name))

    full = load_pipeline(str(folder), engine="mlx", precision="fp32")
    encoders = list(full.stages.encoder_names)
    assert loads == [*encoders, "unet", "vae"]
    loads.clear()
    full_result, full_steps = _generate_watching(full)
    assert loads == [] and full_steps[0] == [*encoders, "unet", "vae"]  # the default keeps everything loaded

    lean = load_pipeline(str(folder), engine="mlx", precision="fp32", reduce_memory=True)
    assert loads == [] and lean.stages.resident() == []
    result, steps = _generate_watching(lean)
    assert loads == [*encoders, "unet", "vae"]
    assert steps == [["unet"], ["unet"]]  # the text encoders are gone before the first step
    assert lean.stages.resident() == []
    assert result.engine["reduce_memory"] and not full_result.engine["reduce_memory"]
    np.testing.assert_array_equal(result.pixels, full_result.pixels)
    assert result.memory.weight_bytes == full_result.memory.weight_bytes  # each stage's bytes, counted once
    loads.clear()
    _generate_watching(lean)
    assert loads == ["unet", "vae"]  # the same prompt: its encoding is kept (backend/text_rows.py), no encoder loads
    loads.clear()
    _generate_watching(lean, negative_prompt="blue")
    assert loads == [*encoders, "unet", "vae"]  # a new negative prompt: the encoders load again


def test_reduce_memory_image_to_image_loads_the_encoder_half_alone(tiny_pipelines, monkeypatch):
    from PIL import Image
    _, folder = tiny_pipelines("sd1")
    init = Image.fromarray((np.random.default_rng(0).uniform(0, 255, (32, 32, 3))).astype(np.uint8))
    request = dict(init_image=init, strength=0.6)
    full = load_pipeline(str(folder), engine="mlx", precision="fp32")
    expected, _ = _generate_watching(full, **request)
    lean = load_pipeline(str(folder), engine="mlx", precision="fp32", reduce_memory=True)
    loads = []
    real = MLXStages._load
    monkeypatch.setattr(MLXStages, "_load", lambda self, name: loads.append(name) or real(self, name))
    result, steps = _generate_watching(lean, **request)
    assert loads == ["vae_encoder", "text_encoder", "unet", "vae"] and steps[0] == ["unet"]
    assert lean.stages.resident() == []
    np.testing.assert_array_equal(result.pixels, expected.pixels)
    assert set(result.memory.per_stage) == {"image_encoder", "text_encoder", "denoise", "vae_decode"}


def test_reduce_memory_applies_quantization_and_loras_as_each_stage_loads(tiny_pipelines, tmp_path):
    from tests.lora_files import write_peft
    pipe, folder = tiny_pipelines("sdxl")
    lora = tmp_path / "lora.safetensors"
    write_peft(lora, pipe, rank=4, seed=1, alpha=8)
    for quantization in (None, "q8"):
        full = load_pipeline(str(folder), engine="mlx", precision="fp32", quantization=quantization)
        lean = load_pipeline(str(folder), engine="mlx", precision="fp32", quantization=quantization,
                             reduce_memory=True)
        assert lean.stages.info["quantized_layers"] == full.stages.info["quantized_layers"]
        for loras in ([(lora, 0.8)], [(lora, 0.5)], []):
            expected, _ = _generate_watching(full, loras=loras)
            result, steps = _generate_watching(lean, loras=loras)
            assert steps[0] == ["unet"] and lean.stages.resident() == []
            np.testing.assert_array_equal(result.pixels, expected.pixels)
            assert result.warnings == expected.warnings


# -- peak memory per stage, weights read without a second copy -----------------------------------------------------
def test_results_report_the_peak_memory_of_each_stage(tiny_pipelines):
    _, folder = tiny_pipelines("sd1")
    pipe = load_pipeline(str(folder), engine="mlx", precision="fp32")
    result, _ = _generate_watching(pipe)
    memory = result.measurements()["memory"]
    per_stage = memory["per_stage"]
    assert list(per_stage) == ["text_encoder", "denoise", "vae_decode"]
    for figures in per_stage.values():
        assert set(figures) == {"peak_engine_bytes", "peak_process_bytes"}
        assert all(isinstance(v, int) and v > 0 for v in figures.values())
    assert memory["peak_engine_bytes"] >= max(f["peak_engine_bytes"] for f in per_stage.values())
    assert memory["peak_process_bytes"] >= max(f["peak_process_bytes"] for f in per_stage.values())
    json.dumps(result.measurements())


def test_weights_cast_at_load_do_not_keep_the_file_copy(tmp_path):
    """fp32 files into an fp16 module: the file's tensors are freed as they are cast (W.drained)."""
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(32)])  # 32 MiB in fp32
    mx.eval(model.parameters())
    path = tmp_path / "w.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
    del model
    fresh = nn.Sequential(*[nn.Linear(512, 512) for _ in range(32)])
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    W.load_into(fresh, W.drained(W.read_safetensors([path])), mx.float16)
    loaded = W.module_bytes(fresh)
    assert loaded < 17 * MIB
    assert mx.get_peak_memory() - base < 2.5 * loaded  # keeping the fp32 copies: 3x
