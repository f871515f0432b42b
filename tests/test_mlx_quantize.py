"""MLX quantization on the tiny sd1 model: image quality vs fp16, weight bytes, layers, recipes."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from backend.engines.mlx import cpu_kernels, cpu_native, layers
from backend.engines.mlx import quantize as Q
from backend.engines.mlx.weights import module_bytes
from backend.measure import psnr
from backend.pipeline import load_pipeline
from backend.types import GenerationRequest, UserError


@pytest.fixture(scope="module")
def sd1(tiny_pipelines):
    return tiny_pipelines("sd1")[1]


@pytest.fixture(scope="module")
def generated(sd1):
    """fp16, q8 and q4 pipelines of the same model, each run on the same seed and noise."""
    noise = np.random.default_rng(7).standard_normal((1, 4, 16, 16)).astype(np.float32)
    out = {}
    for q in (None, "q8", "q4"):
        pipe = load_pipeline(str(sd1), engine="mlx", precision="fp16", quantization=q)
        out[q] = (pipe, pipe.generate(GenerationRequest(prompt="a red circle", steps=3, seed=3, latents=noise)))
    return out


def _unet_and_text_bytes(pipe) -> int:
    return module_bytes(pipe.stages.denoiser) + sum(module_bytes(m) for m in pipe.stages.text_encoders)


def test_8bit_image_is_close_to_fp16_and_4bit_is_further(generated):
    fp16 = generated[None][1].pixels
    q8 = psnr(fp16, generated["q8"][1].pixels)
    q4 = psnr(fp16, generated["q4"][1].pixels)
    assert q8 >= 30.0
    assert q4 < q8


def test_4bit_shrinks_unet_and_text_encoder_weights_3x(generated):
    fp16, q8, q4 = (_unet_and_text_bytes(generated[q][0]) for q in (None, "q8", "q4"))
    assert fp16 / q4 >= 3.0
    assert q4 < q8 < fp16
    assert generated["q4"][1].memory.weight_bytes < generated[None][1].memory.weight_bytes


def test_results_say_which_layers_are_quantized(generated):
    info = generated["q4"][1].engine
    assert info["quantization"] == "q4"
    text = info["quantized_layers"]
    assert "UNet: 4-bit on" in text and "conv layers" in text
    assert "text encoder: 4-bit on" in text
    assert "rows of 37 weights" in text and "mlp.fc2" in text  # the tiny CLIP's 37-wide MLP does not fit
    assert "VAE" in text and "stay fp16" in text


def test_unet_convolutions_and_linears_are_quantized(generated):
    unet = generated["q4"][0].stages.denoiser
    kinds = {type(m).__name__ for _, m in unet.named_modules()}
    assert {"QuantizedConv2d", "QuantizedLinear"} <= kinds
    assert "Conv2d" in kinds  # conv_in: rows of 4*3*3 = 36 weights do not fit a group of 32
    assert type(unet.conv_out).__name__ == "QuantizedConv2d"
    assert not any(isinstance(m, Q.QuantizedConv2d) for _, m in generated["q4"][0].stages.vae.named_modules())


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_quantized_conv_matches_conv(stride, padding):
    mx.random.seed(0)
    conv = nn.Conv2d(32, 16, 3, stride=stride, padding=padding)
    x = mx.random.normal((2, 9, 9, 32))
    q = Q.QuantizedConv2d.from_conv(conv, group_size=32, bits=8)
    assert q.weight.dtype == mx.uint32 and q.weight.shape == (16, 3 * 3 * 32 * 8 // 32)
    ref, out = conv(x), q(x)
    assert out.shape == ref.shape
    assert float(mx.abs(out - ref).max()) < 0.02 * float(mx.abs(ref).max())
    assert module_bytes(q) < module_bytes(conv) / 3


def test_cpu_linear_path_matches_fused_quantized_matmul():
    mx.random.seed(1)
    layer = Q.QuantizedLinear.from_linear(nn.Linear(64, 8), group_size=64, bits=4)
    x = mx.random.normal((3, 64))
    fused = nn.QuantizedLinear.__call__(layer, x)
    assert mx.allclose(layer(x), fused, atol=1e-4).item()


def _no_mlx_dequantize(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("MLX's dequantize ran at CPU inference")
    monkeypatch.setattr(Q.mx, "dequantize", refuse)


needs_native = pytest.mark.skipif(cpu_native.dequantize_rows() is None, reason="no C compiler here")


@needs_native
@pytest.mark.parametrize("bits", [8, 4, 6])
def test_at_cpu_inference_quantized_layers_run_in_the_cpu_kernels_from_the_compiled_dequantize(monkeypatch, bits):
    """Linears of any row count (a UNet's tokens, an AdaLN's one row) and convolutions (on the Winograd path and
    below it, with a resnet's per-image bias and skip connection) give what MLX's dequantize-then-compute gives,
    without MLX's dequantize (17 ns a weight on the CPU, as long as the product it feeds)."""
    mx.random.seed(bits)
    linear = Q.QuantizedLinear.from_linear(nn.Linear(128, 96), group_size=64, bits=bits)
    conv = Q.QuantizedConv2d.from_conv(nn.Conv2d(64, 48, 3, padding=1), group_size=64, bits=bits)
    rows, row, image = mx.random.normal((2, 600, 128)), mx.random.normal((2, 128)), mx.random.normal((2, 32, 32, 64))
    small, image_bias = image[:, :6, :6], mx.random.normal((2, 48))
    w = mx.dequantize(linear.weight, linear.scales, linear.biases, 64, bits)
    k = mx.dequantize(conv.weight, conv.scales, conv.biases, 64, bits).reshape(conv.kernel_shape)

    def conv_reference(x):
        return mx.conv2d(x, k, 1, 1) + conv.bias + image_bias[:, None, None, :] + x[..., :48]

    expected = [rows @ w.T + linear.bias, row @ w.T + linear.bias, conv_reference(image), conv_reference(small)]
    mx.eval(expected)
    _no_mlx_dequantize(monkeypatch)
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
    with cpu_kernels.eager_chunks():
        assert layers.kernel_linear(linear) and not layers.plain_linear(linear)
        assert layers.winograd_applies(conv, image, conv.kernel_shape, conv.scales.dtype)
        got = [linear(rows), linear(row), conv(image, image_bias, image[..., :48]),
               layers.convolve(conv, small, image_bias, small[..., :48])]
    for out, ref in zip(got, expected):
        assert out.shape == ref.shape
        np.testing.assert_allclose(np.array(out), np.array(ref), rtol=0, atol=2e-5 * float(mx.abs(ref).max()))


@needs_native
def test_only_large_calls_or_large_weights_enter_the_cpu_kernels():
    """An AdaLN-like one-row product over a large weight goes to the kernels (MLX's dequantize of its weight costs
    more than the whole call there); a small model's small layer keeps MLX's ops; nothing does outside inference."""
    large = Q.QuantizedLinear.from_linear(nn.Linear(512, 1024), group_size=64, bits=8)  # 512K weights
    small = Q.QuantizedLinear.from_linear(nn.Linear(128, 96), group_size=64, bits=8)
    assert not Q._in_cpu_kernels(large, 1024)
    with cpu_kernels.eager_chunks():
        assert Q._in_cpu_kernels(large, 1024)
        assert not Q._in_cpu_kernels(small, 2 * 96)
        assert Q._in_cpu_kernels(small, layers.NUMPY_KERNEL_MIN)


@needs_native
def test_quantized_blocks_take_the_numpy_paths_of_fp32_ones(monkeypatch):
    """A quantized FeedForward, UNet attention and SD3 joint attention run their numpy paths at CPU inference (one
    product for q, k and v, the activation and the residual in numpy), with MLX's results."""
    from backend.engines.mlx.mmdit import JointAttention
    mx.random.seed(3)
    ff, attn = layers.FeedForward(64), layers.Attention(64, heads=2, dim_head=32, bias=True)
    joint = JointAttention(64, heads=2, head_dim=32, qk_norm="rms_norm", joint=True, context_pre_only=False)
    for block in (ff, attn, joint):
        Q.quantize_module(block, "unet", Q.uniform_recipe(8, 32))
    x, context, gate = mx.random.normal((2, 300, 64)), mx.random.normal((2, 20, 64)), mx.random.normal((2, 1, 64))
    calls = [lambda: ff(x, residual=(x, gate)), lambda: attn(x, residual=(x, gate)),
             lambda: joint(x, context, residuals=((x, gate), (context, gate)))]
    expected = [c() for c in calls]
    mx.eval(expected)
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
    _no_mlx_dequantize(monkeypatch)
    with cpu_kernels.eager_chunks():
        assert ff.takes_rows(x) and attn.takes_rows(x) and joint.numpy_path(x)
        got = [c() for c in calls]
    got, expected = tree_flatten(got), tree_flatten(expected)
    assert len(got) == len(expected) == 4  # the FeedForward's, the attention's, the joint image and context outputs
    for (_, out), (_, ref) in zip(got, expected):
        np.testing.assert_allclose(np.array(out), np.array(ref), rtol=0, atol=1e-4)


def test_group_size_falls_back_to_32_and_unfit_rows_stay():
    model = nn.Sequential(nn.Linear(128, 8), nn.Linear(96, 8), nn.Linear(37, 8))
    p = Q.plan(model, [{"match": ["*"], "bits": 4}], group_size=64)
    assert p["layers"] == {"layers.0": ["linear", 4, 64], "layers.1": ["linear", 4, 32]}
    assert p["unfit"] == {"layers.2": 37}


def test_mixed_recipe_follows_its_rules(sd1):
    pipe = load_pipeline(str(sd1), engine="mlx", quantization="mixed")
    plans = pipe.stages.quantization_plans
    unet = plans["unet"]["layers"]
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"][1] == 4
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"][1] == 4
    assert unet["down_blocks.0.resnets.0.conv1"][1] == 5
    assert unet["down_blocks.0.attentions.0.proj_in"][1] == 8
    assert {"conv_in", "conv_out", "time_embedding.linear_1"} <= set(plans["unet"]["kept"])
    assert {bits for _, bits, _ in plans["text_encoder"]["layers"].values()} == {8}
    assert "mixed: " in pipe.stages.quantized_layers and "kept fp16 by the recipe" in pipe.stages.quantized_layers


def test_bad_names_and_recipes_are_user_errors(sd1, tmp_path):
    with pytest.raises(UserError, match="unknown quantization 'q5'"):
        load_pipeline(str(sd1), engine="mlx", quantization="q5")
    bad = tmp_path / "bad.json"
    bad.write_text('{"unet": [{"match": ["*"], "bits": 7}]}')
    with pytest.raises(UserError, match="bits"):
        Q.load_recipe(bad)
    with pytest.raises(UserError, match="does not exist"):
        Q.load_recipe(tmp_path / "missing.json")
    with pytest.raises(UserError, match="group size"):
        Q.scheme_recipe("q4", group_size=48)


def test_apple_style_recipe_applies_to_the_unet(tmp_path):
    path = tmp_path / "apple.json"
    path.write_text('{"recipes": {"r": {"down_blocks.0.resnets.0.conv1": 6, "conv_out": 16}}}')
    recipe = Q.load_recipe(path)
    assert Q._rule_bits(recipe["unet"], "down_blocks.0.resnets.0.conv1", "conv") == 6
    assert Q._rule_bits(recipe["unet"], "conv_out", "conv") == Q.KEEP
    assert Q._rule_bits(recipe["unet"], "down_blocks.0.resnets.0.conv2", "conv") == Q.KEEP


def test_quantizing_as_weights_load_never_holds_the_component_at_full_precision(tmp_path):
    """On-the-fly quantization (W.load_into's before_eval): each layer is read, cast and quantized in turn, so
    MLX's peak while loading stays near the quantized bytes, far below the layers at full precision."""
    from backend.engines.mlx import weights as W

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(1024, 1024) for _ in range(8)]

    source = Stack()
    file = tmp_path / "stack.safetensors"
    mx.save_safetensors(str(file), dict(nn.utils.tree_flatten(source.parameters())))
    full = module_bytes(source)  # fp32: 32 MiB of kernels
    del source
    plan = Q.plan(Stack(), [{"match": ["*"], "bits": 4}])["layers"]
    assert len(plan) == 8
    expected = W.load_into(Stack(), W.read_safetensors([file]).items(), mx.float32,
                           lambda m: Q.apply_plan(m, plan))  # warm-up; also the reference result

    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    module = W.load_into(Stack(), W.drained(W.read_safetensors([file])), mx.float32, lambda m: Q.apply_plan(m, plan))
    peak = mx.get_peak_memory() - before
    quantized = module_bytes(module)
    assert quantized < full / 5
    assert peak < quantized + 3 * full / 8  # the quantized layers and a layer or two in flight, not all eight
    assert isinstance(module.layers[0], Q.QuantizedLinear)
    for a, b in zip(nn.utils.tree_flatten(module.parameters()), nn.utils.tree_flatten(expected.parameters())):
        assert a[0] == b[0] and mx.array_equal(a[1], b[1])
