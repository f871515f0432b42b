"""Core ML export of the tiny pipelines into Apple's layout, and reading that layout back (resources.py).

Two real exports run once per session (shared with test_coreml_quantize.py through `tiny_export`):
sd1 with original attention in one UNet package, and SDXL with split-einsum attention and the UNet
in two chunks. Core ML cannot run on Linux, so the packages are checked through their specs; the torch
modules the export traces (split-einsum attention, UNet halves) are checked numerically against diffusers.
"""
import json
import shutil

import pytest

try:
    import coremltools  # noqa: F401
    HAVE_COREMLTOOLS = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_COREMLTOOLS = False

pytestmark = pytest.mark.skipif(not HAVE_COREMLTOOLS, reason="coremltools cannot be imported here")

from backend.types import UserError  # noqa: E402
from backend.engines.coreml import resources as res  # noqa: E402

_EXPORTS = {}


def tiny_export(tmp_path_factory, tiny_pipelines, family, **settings):
    """Export a tiny family once per session and settings; returns (pipe, diffusers folder, CoreMLResources)."""
    from backend.engines.coreml.export import export
    key = (family, tuple(sorted(settings.items())))
    if key not in _EXPORTS:
        pipe, folder = tiny_pipelines(family)
        out = tmp_path_factory.mktemp("coreml") / f"{family}-{settings.get('attention', 'original')}"
        _EXPORTS[key] = (pipe, folder, export(folder, out, model_version=f"tiny-{family}", **settings))
    return _EXPORTS[key]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_pipelines):
    return tiny_export(tmp_path_factory, tiny_pipelines, "sd1", attention="original")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tiny_pipelines):
    return tiny_export(tmp_path_factory, tiny_pipelines, "sdxl", attention="split_einsum", chunk_unet=True)


def shapes(tensors):
    return {name: (t.shape, t.dtype) for name, t in tensors.items()}


def test_sd1_original_export_has_apples_layout_and_tensors(sd1):
    pipe, _, found = sd1
    assert set(found.models) == {"TextEncoder", "Unet", "VAEDecoder"}
    assert not found.compiled and not found.is_sdxl and not found.chunked
    assert found.attention == "original"
    assert found.models["Unet"].name == "Stable_Diffusion_version_tiny-sd1_unet.mlpackage"
    assert found.vocab.name == "vocab.json" and found.merges.name == "merges.txt"
    assert json.loads(found.vocab.read_text()) == pipe.tokenizer.get_vocab()
    assert (found.configs / "scheduler" / "scheduler_config.json").is_file()
    assert all(found.disk_bytes[s] > 0 for s in found.models)

    unet_cfg, width = pipe.unet.config, pipe.text_encoder.config.hidden_size
    h = w = unet_cfg.sample_size
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    te, unet, vae = (found.io(s) for s in ("TextEncoder", "Unet", "VAEDecoder"))
    assert shapes(te.inputs) == {"input_ids": ((1, 77), "float32")}
    assert shapes(te.outputs) == {"last_hidden_state": ((1, 77, width), "float32"),
                                  "pooled_outputs": ((1, width), "float32")}
    assert shapes(unet.inputs) == {
        "sample": ((2, unet_cfg.in_channels, h, w), "float16"), "timestep": ((2,), "float16"),
        "encoder_hidden_states": ((2, unet_cfg.cross_attention_dim, 1, 77), "float16")}
    assert shapes(unet.outputs) == {"noise_pred": ((2, unet_cfg.out_channels, h, w), "float32")}
    assert shapes(vae.inputs) == {"z": ((1, pipe.vae.config.latent_channels, h, w), "float16")}
    assert shapes(vae.outputs) == {"image": ((1, 3, h * scale, w * scale), "float32")}
    # what a Core ML pipeline chains: text -> UNet -> VAE
    assert te.outputs["last_hidden_state"].shape[-1] == unet.inputs["encoder_hidden_states"].shape[1]
    assert unet.outputs["noise_pred"].shape[1:] == vae.inputs["z"].shape[1:]
    assert unet.metadata[res.META_ATTENTION] == "original" and unet.metadata[res.META_STAGE] == "Unet"
    assert unet.op_counts["conv"] > 0 and unet.op_counts.get("einsum", 0) == 0

    manifest = found.manifest
    assert manifest["method"] == "export" and manifest["precision"] == "fp16"
    assert set(manifest["stages"]) == set(found.models)
    assert manifest["bytes"] == sum(found.disk_bytes.values())


def test_sdxl_split_einsum_chunked_export_hands_tensors_over_by_name(sdxl):
    pipe, _, found = sdxl
    assert set(found.models) == {"TextEncoder", "TextEncoder2", "UnetChunk1", "UnetChunk2", "VAEDecoder"}
    assert found.is_sdxl and found.chunked and found.unet_stages == ["UnetChunk1", "UnetChunk2"]
    assert found.attention == "split_einsum"

    te1, te2 = found.io("TextEncoder"), found.io("TextEncoder2")
    for te, encoder in ((te1, pipe.text_encoder), (te2, pipe.text_encoder_2)):
        assert set(te.outputs) == {"hidden_embeds", "pooled_outputs"}
        assert te.outputs["hidden_embeds"].shape == (1, 77, encoder.config.hidden_size)
    assert te2.outputs["pooled_outputs"].shape == (1, pipe.text_encoder_2.config.projection_dim)

    first, second = found.io("UnetChunk1"), found.io("UnetChunk2")
    h = w = pipe.unet.config.sample_size
    assert shapes(first.inputs) == {
        "sample": ((2, 4, h, w), "float16"), "timestep": ((2,), "float16"),
        "encoder_hidden_states": ((2, pipe.unet.config.cross_attention_dim, 1, 77), "float16"),
        "time_ids": ((2, 6), "float16"),
        "text_embeds": ((2, te2.outputs["pooled_outputs"].shape[1]), "float16")}
    text_width = te1.outputs["hidden_embeds"].shape[-1] + te2.outputs["hidden_embeds"].shape[-1]
    assert first.inputs["encoder_hidden_states"].shape[1] == text_width
    # every input of chunk 2 is an output of chunk 1 (same shape and dtype) or an input of the whole UNet
    for name, spec in second.inputs.items():
        assert spec == first.outputs.get(name) or spec == first.inputs.get(name), name
    assert shapes(second.outputs) == {"noise_pred": ((2, 4, h, w), "float32")}
    for io in (first, second):
        assert io.op_counts["einsum"] > 0 and io.metadata[res.META_ATTENTION] == "split_einsum"
    sizes = found.disk_bytes
    assert 0.33 < sizes["UnetChunk1"] / sizes["UnetChunk2"] < 3
    # SDXL's VAE overflows in float16: it stays float32
    assert found.io("VAEDecoder").inputs["z"].dtype == "float32"


def test_export_again_returns_the_folder_and_refuses_other_settings(sd1):
    from backend.engines.coreml.export import export
    _, folder, found = sd1
    again = export(folder, found.folder, attention="original", model_version="tiny-sd1")
    assert again.folder == found.folder and again.manifest == found.manifest
    with pytest.raises(UserError, match="already exists"):
        export(folder, found.folder, attention="split_einsum")
    with pytest.raises(UserError, match="attention"):
        export(folder, found.folder.with_name("x"), attention="fast")


# ------------------------------------------------------------ the traced torch modules, numerically

def test_split_einsum_attention_equals_diffusers(tiny_pipelines):
    import torch
    from backend.engines.coreml.torch_modules import SplitEinsumAttnProcessor
    pipe, _ = tiny_pipelines("sd2")  # linear projections, upcast attention, several head counts
    unet = pipe.unet
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32))
    with torch.no_grad():
        expected = unet(*inputs).sample
        processors = unet.attn_processors
        unet.set_attn_processor(SplitEinsumAttnProcessor())
        try:
            got = unet(*inputs).sample
        finally:
            unet.set_attn_processor(processors)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "lcm"])
def test_unet_halves_reproduce_the_whole_unet_at_every_split(tiny_pipelines, family):
    import torch
    from backend.engines.coreml import torch_modules as tm
    pipe, _ = tiny_pipelines(family)
    unet = pipe.unet
    cfg = unet.config
    extra, values = [], []
    if cfg.addition_embed_type == "text_time":
        extra, values = ["time_ids", "text_embeds"], [torch.tensor([[30.0, 30, 0, 0, 30, 30]] * 2), torch.randn(2, 32)]
    if cfg.time_cond_proj_dim:
        extra, values = ["timestep_cond"], [torch.randn(2, cfg.time_cond_proj_dim)]
    # 15 x 15 latents are not a multiple of the upsampling: the halves must pass explicit sizes
    sample, t, text = torch.randn(2, 4, 15, 15), torch.tensor([10.0, 10.0]), torch.randn(2, cfg.cross_attention_dim, 1, 77)
    with torch.no_grad():
        whole = tm.UnetIO(unet, extra)(sample, t, text, *values)
        assert 1 <= tm.balanced_split(unet) < len(tm.unet_segments(unet))
        for split in range(1, len(tm.unet_segments(unet))):
            first, second = tm.UnetChunk1(unet, split, extra), tm.UnetChunk2(unet, split)
            carried = first(sample, t, text, *values)
            assert len(carried) == 2 + tm.skip_count(unet, split)
            joined = second(carried[0], carried[1], *((text,) if second.uses_text else ()), *carried[2:])
            assert torch.allclose(joined, whole, atol=1e-5), split


# ------------------------------------------------------------ reading layouts export.py does not write

def _fake_compiled(folder, stage, inputs, outputs, histogram=None, with_metadata=True):
    """A .mlmodelc as Xcode's compiler writes it, reduced to the files resources.py reads."""
    model = folder / f"{stage}.mlmodelc"
    model.mkdir(parents=True)
    if with_metadata:
        schema = lambda items: [{"name": n, "shape": str(list(s)), "dataType": d, "type": "MultiArray"}
                                for n, s, d in items]
        (model / "metadata.json").write_text(json.dumps([{
            "inputSchema": schema(inputs), "outputSchema": schema(outputs),
            "mlProgramOperationTypeHistogram": histogram or {"Ios16.conv": 3},
            "userDefinedMetadata": {"com.github.apple.coremltools.version": "7.1"}}]))
    mil = ", ".join(f"tensor<{'fp16' if d == 'Float16' else 'fp32'}, {list(s)}> {n}" for n, s, d in inputs)
    body = "".join(f"            tensor<{'fp16' if d == 'Float16' else 'fp32'}, {list(s)}> {n} = einsum(x = a)"
                   f"[name = string(\"{n}\")];\n" for n, s, d in outputs)
    (model / "model.mil").write_text(f"program(1.0)\n{{\n    func main<ios16>({mil}) {{\n{body}"
                                     f"        }} -> ({', '.join(n for n, _, _ in outputs)});\n}}\n")
    (model / "coremldata.bin").write_bytes(b"\0" * 64)
    return model


def _apple_compiled_sd(folder, histogram=None):
    _fake_compiled(folder, "TextEncoder", [("input_ids", (1, 77), "Float32")],
                   [("last_hidden_state", (1, 77, 768), "Float32"), ("pooled_outputs", (1, 768), "Float32")])
    _fake_compiled(folder, "Unet", [("sample", (2, 4, 64, 64), "Float16"), ("timestep", (2,), "Float16"),
                                    ("encoder_hidden_states", (2, 768, 1, 77), "Float16")],
                   [("noise_pred", (2, 4, 64, 64), "Float16")], histogram)
    _fake_compiled(folder, "VAEDecoder", [("z", (1, 4, 64, 64), "Float16")], [("image", (1, 3, 512, 512), "Float32")])
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")


def test_compiled_resources_are_described_from_metadata_or_model_mil(tmp_path):
    folder = tmp_path / "coreml-stable-diffusion-v1-5" / "split_einsum" / "compiled"
    _apple_compiled_sd(folder, histogram={"Ios16.einsum": 32, "Ios16.constexprLutToDense": 5})
    found = res.find_resources(tmp_path / "coreml-stable-diffusion-v1-5" / "split_einsum")
    assert found.folder == folder and found.compiled and found.attention == "split_einsum"
    unet = found.io("Unet")
    assert unet.inputs["encoder_hidden_states"] == res.TensorSpec("encoder_hidden_states", (2, 768, 1, 77), "float16")
    assert unet.op_counts["constexpr_lut_to_dense"] == 5 and unet.compiled
    # without metadata.json, model.mil's signature tells the same
    shutil.rmtree(folder / "VAEDecoder.mlmodelc")
    _fake_compiled(folder, "VAEDecoder", [("z", (1, 4, 64, 64), "Float16")], [("image", (1, 3, 512, 512), "Float32")],
                   with_metadata=False)
    vae = res.describe_model(folder / "VAEDecoder.mlmodelc")
    assert shapes(vae.inputs) == {"z": ((1, 4, 64, 64), "float16")}
    assert shapes(vae.outputs) == {"image": ((1, 3, 512, 512), "float32")}


def test_attention_variant_from_the_folder_name_then_the_ops(tmp_path):
    _apple_compiled_sd(tmp_path / "sd_original_compiled")
    assert res.find_resources(tmp_path / "sd_original_compiled").attention == "original"
    _apple_compiled_sd(tmp_path / "plain", histogram={"Ios16.einsum": 4})
    assert res.find_resources(tmp_path / "plain").attention == "split_einsum"
    _apple_compiled_sd(tmp_path / "plain2")
    assert res.find_resources(tmp_path / "plain2").attention == "original"


def test_missing_pieces_are_user_errors_that_name_them(tmp_path):
    _apple_compiled_sd(tmp_path / "a")
    shutil.rmtree(tmp_path / "a" / "VAEDecoder.mlmodelc")
    with pytest.raises(UserError, match="no VAE decoder"):
        res.find_resources(tmp_path / "a")
    _apple_compiled_sd(tmp_path / "b")
    (tmp_path / "b" / "Unet.mlmodelc").rename(tmp_path / "b" / "UnetChunk1.mlmodelc")
    with pytest.raises(UserError, match="UnetChunk2 is missing"):
        res.find_resources(tmp_path / "b")
    _apple_compiled_sd(tmp_path / "c")
    (tmp_path / "c" / "merges.txt").unlink()
    with pytest.raises(UserError, match="merges.txt"):
        res.find_resources(tmp_path / "c")
    assert res.find_resources(tmp_path / "c", require_tokenizer=False).merges is None
    _apple_compiled_sd(tmp_path / "d" / "original")
    _apple_compiled_sd(tmp_path / "d" / "split_einsum")
    with pytest.raises(UserError, match="several Core ML variants"):
        res.find_resources(tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No Core ML model"):
        res.find_resources(tmp_path / "empty")


def test_both_naming_styles_name_the_same_stages():
    assert res.stage_of("Unet.mlmodelc") == "Unet"
    assert res.stage_of("UnetChunk2.mlpackage") == "UnetChunk2"
    assert res.stage_of("Stable_Diffusion_version_stabilityai_sdxl_text_encoder_2.mlpackage") == "TextEncoder2"
    assert res.stage_of("Stable_Diffusion_version_x_unet_chunk1.mlpackage") == "UnetChunk1"
    assert res.stage_of("Stable_Diffusion_version_x_vae_decoder.mlmodelc") == "VAEDecoder"
    assert res.stage_of("vocab.json") is None and res.stage_of("Stable_Diffusion_version_x_unet.zip") is None
