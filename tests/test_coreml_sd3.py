"""SD3 on Core ML: the export of the tiny SD3 pipeline in MobileDiffuser's split layout (and Apple's single
MultiModalDiffusionTransformer), the resources reading both layouts, and the engine chaining the stages.

Exports run once per module (a few seconds each). Core ML prediction needs macOS: elsewhere `TorchStandIn`
takes the runtime's place. For each package it builds the torch wrapper the export traced
(torch_modules.py: the text encoders, the MMDiT's conditioning and stages, the VAE decoder, all diffusers'
own modules) and runs it on exactly the arrays Core ML would receive (names, shapes and dtypes checked
against the package's description), answering with the description's output names and dtypes. So the
engine's layouts, batch handling and stage chaining (each stage's `X_out` fed as `X` to the next) are
checked against diffusers' transformer and pipeline. On macOS the `coreml` cases run the real runtime.
"""
import json
import shutil
import sys
import weakref

import numpy as np
import pytest

from tests.test_coreml_export import HAVE_COREMLTOOLS, _fake_compiled

pytestmark = pytest.mark.skipif(not HAVE_COREMLTOOLS, reason="coremltools cannot be imported here")

from backend import GenerationRequest  # noqa: E402
from backend.engines.coreml import resources as res  # noqa: E402
from backend.engines.coreml.engine import CoreMLStages  # noqa: E402
from backend.engines.coreml.runtime import CoreMLRuntime  # noqa: E402
from backend.engines.coreml.sources import coreml_choice  # noqa: E402
from backend.engines.coreml.spec import coreml_spec  # noqa: E402
from backend.measure import psnr  # noqa: E402
from backend.pipeline import Pipeline  # noqa: E402
from backend.types import UserError  # noqa: E402
from tests.test_coreml_engine import check_inputs  # noqa: E402
from tests.tiny_models import SD3_JOINT_DIM  # noqa: E402

PROMPT = "a red circle at the top"
COND, STAGE, SINGLE = res.MMDIT_CONDITIONING, res.MMDIT_STAGE, res.MMDIT
RUNTIMES = ["stand-in", pytest.param("coreml", marks=pytest.mark.skipif(
    sys.platform != "darwin", reason="Core ML prediction needs macOS"))]


# ------------------------------------------------------------------ the runtime stand-in

class TorchModel:
    """One "Core ML model": checks its inputs against the description, runs the traced torch wrapper."""

    def __init__(self, stage, io, module, compute_units):
        self.stage, self.io, self.module, self.compute_units = stage, io, module, compute_units

    def predict(self, inputs):
        import torch
        check_inputs(self.io, inputs, self.stage)
        with torch.no_grad():
            out = self.module(**{n: torch.from_numpy(np.asarray(a, np.float32)) for n, a in inputs.items()})
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(self.io.outputs), self.stage
        return {name: o.numpy().astype(t.dtype) for (name, t), o in zip(self.io.outputs.items(), out)}


class TorchStandIn:
    """The runtime contract (`load(path, compute_units)` -> model with `predict`), served by the torch
    modules export.py converted, built from the diffusers pipeline for whatever package is loaded."""
    name = "torch-stand-in"

    def __init__(self, pipe):
        self.pipe = pipe

    def module(self, stage, io):
        from backend.engines.coreml import torch_modules as tm
        pipe, t = self.pipe, self.pipe.transformer
        if stage in ("TextEncoder", "TextEncoder2"):
            return tm.TextEncoderIO(pipe.text_encoder if stage == "TextEncoder" else pipe.text_encoder_2, -2)
        if stage == "VAEDecoder":
            return tm.VaeDecoderIO(pipe.vae)
        if stage == SINGLE:
            return tm.MMDiTIO(t)
        if stage == COND:
            return tm.MMDiTConditioning(t)
        first, last = map(int, io.metadata[res.META_MMDIT_BLOCKS].split(":"))
        final = "noise_pred" in io.outputs
        return tm.MMDiTStage(t, first, last, embed=stage == STAGE + "0", final=final,
                             latent_size=io.outputs["noise_pred"].shape[-2:] if final else None)

    def load(self, path, compute_units):
        stage, io = res.stage_of(path), res.describe_model(path)
        return TorchModel(stage, io, self.module(stage, io), compute_units)


class Recorder:
    """Wraps a runtime: which models were loaded, and which are still alive."""

    def __init__(self, runtime):
        self.runtime, self.name = runtime, runtime.name
        self.loads = []
        self.live = weakref.WeakSet()

    def load(self, path, compute_units):
        model = self.runtime.load(path, compute_units)
        self.loads.append(res.stage_of(path))
        self.live.add(model)
        return model


def make_runtime(kind, pipe):
    return Recorder(CoreMLRuntime if kind == "coreml" else TorchStandIn(pipe))


# ------------------------------------------------------------------ the exports, shared by the module

@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_pipelines):
    """name -> (pipe, diffusers folder, CoreMLResources): made on first use, once per module."""
    from backend.engines.coreml.export import export
    made = {}
    settings = {
        "split2": ("sd3", dict(mmdit_stages=2)),            # Stage0 = embedding + block 0, Stage1 = block 1 + output
        "split3": ("sd3", dict(mmdit_stages=3)),            # through the CLI: Stage0 = the embedding alone
        "single": ("sd3", dict(mmdit_layout="single")),     # Apple's one MultiModalDiffusionTransformer
        "sd35": ("sd35", dict(mmdit_stages=3, precision="fp32", unet_batch_size=1)),  # q/k RMS norm, dual attention
    }

    def get(name):
        if name not in made:
            family, options = settings[name]
            pipe, folder = tiny_pipelines(family)
            out = tmp_path_factory.mktemp("coreml-sd3") / name
            if name == "split3":
                from backend.__main__ import main
                assert main(["export-coreml", "--model", str(folder), "--out", str(out), "--stages", "3",
                             "--size", "32"]) == 0
                found = res.find_resources(out)
            else:
                found = export(folder, out, model_version=f"tiny-{name}", **options)
            made[name] = (pipe, folder, found)
        return made[name]
    return get


def shapes(tensors):
    return {name: (t.shape, t.dtype) for name, t in tensors.items()}


def transformer_inputs(pipe, batch, seed=0, tokens=154):
    rng = np.random.default_rng(seed)
    cfg = pipe.transformer.config
    return (rng.standard_normal((batch, 16, 16, 16)).astype(np.float32), 650.0,
            rng.standard_normal((batch, tokens, SD3_JOINT_DIM)).astype(np.float32),
            rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32))


def diffusers_velocity(pipe, latents, timestep, hidden, pooled):
    import torch
    with torch.no_grad():
        return pipe.transformer(torch.from_numpy(latents), torch.from_numpy(hidden), torch.from_numpy(pooled),
                                torch.full((len(latents),), timestep), return_dict=False)[0].numpy()


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def coreml_pipeline(found, runtime, **options):
    choice = coreml_choice(str(found.folder), "test", None)
    stages = choice.load(runtime=runtime, **options)
    return Pipeline(choice.spec, stages, choice.tokenizers, name="tiny-sd3", reason=choice.reason,
                    load_seconds=0.0, disk=choice.disk_bytes)


def latents(seed=3):
    return np.random.default_rng(seed).standard_normal((1, 16, 16, 16)).astype(np.float32)


def diffusers_image(pipe, steps, guidance, negative=""):
    import torch
    return pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                width=32, height=32, latents=torch.from_numpy(latents()), max_sequence_length=77,
                output_type="np").images[0]


def request(**kw):
    return GenerationRequest(**{"prompt": PROMPT, "steps": 3, "guidance": 5.0, "latents": latents(), **kw})


# ------------------------------------------------------------------ the export's layout

@pytest.mark.parametrize("name, blocks", [("split2", [[0, 1], [1, 2]]), ("split3", [[0, 0], [0, 1], [1, 2]])])
def test_split_export_has_mobilediffusers_names_and_shapes(exports, name, blocks):
    pipe, _, found = exports(name)
    n = len(blocks)
    stages = [COND] + [f"{STAGE}{k}" for k in range(n)]
    assert set(found.models) == {"TextEncoder", "TextEncoder2", "VAEDecoder", *stages}
    assert found.is_sd3 and found.split_mmdit and found.denoiser_stages == stages and not found.compiled
    assert found.attention == "original"
    assert found.models[STAGE + "0"].name.endswith("_mmdit_stage0.mlpackage")
    assert found.models[COND].name.endswith("_mmdit_conditioning.mlpackage")
    assert found.manifest["mmdit_blocks"] == blocks and found.manifest["t5_tokens"] == 77
    assert (found.configs / "transformer" / "config.json").is_file()

    t = pipe.transformer.config
    dim, f32 = t.num_attention_heads * t.attention_head_dim, "float32"
    tokens, seq = (16 // t.patch_size) ** 2, 77 + 77
    for stage, encoder in (("TextEncoder", pipe.text_encoder), ("TextEncoder2", pipe.text_encoder_2)):
        io = found.io(stage)
        assert shapes(io.inputs) == {"input_ids": ((1, 77), f32)}
        assert shapes(io.outputs) == {"hidden_embeds": ((1, 77, encoder.config.hidden_size), f32),
                                      "pooled_outputs": ((1, encoder.config.projection_dim), f32)}
    assert shapes(found.io(COND).inputs) == {"pooled_text_embeddings": ((2, t.pooled_projection_dim, 1, 1), f32),
                                             "timestep": ((2,), f32)}
    assert shapes(found.io(COND).outputs) == {"modulation_inputs": ((2, dim), f32)}
    hand_over = {"latent_image_embeddings": ((2, tokens, dim), f32),
                 "token_level_text_embeddings": ((2, seq, t.caption_projection_dim), f32)}
    for k, (first, last) in enumerate(blocks):
        io = found.io(f"{STAGE}{k}")
        expected = dict(hand_over)
        if k == 0:
            expected = {"latent_image_embeddings": ((2, 16, 16, 16), f32),
                        "token_level_text_embeddings": ((2, SD3_JOINT_DIM, 1, seq), f32)}
        if last > first:
            expected["modulation_inputs"] = ((2, dim), f32)
        assert shapes(io.inputs) == expected, k
        outputs = ({"noise_pred": ((2, 16, 16, 16), f32)} if k == n - 1
                   else {name + "_out": spec for name, spec in hand_over.items()})
        assert shapes(io.outputs) == outputs, k
        assert io.metadata[res.META_MMDIT_BLOCKS] == f"{first}:{last}"
    # the VAE decoder: 16 channels in, and no post_quant_conv (the SD3 VAE's config has none)
    vae = found.io("VAEDecoder")
    assert shapes(vae.inputs) == {"z": ((1, 16, 16, 16), "float16")}
    assert shapes(vae.outputs) == {"image": ((1, 3, 32, 32), f32)}
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    weights = cto.get_weights_metadata(ct.models.MLModel(str(found.models["VAEDecoder"]), skip_model_load=True),
                                       weight_threshold=0)
    assert weights and not any("post_quant_conv" in w for w in weights)


def test_single_export_has_apples_names(exports):
    pipe, _, found = exports("single")
    assert found.denoiser_stages == [SINGLE] and found.is_sd3 and not found.split_mmdit
    assert found.models[SINGLE].name.endswith("_mmdit.mlpackage")
    io, f32 = found.io(SINGLE), "float32"
    assert shapes(io.inputs) == {"latent_image_embeddings": ((2, 16, 16, 16), f32),
                                 "token_level_text_embeddings": ((2, SD3_JOINT_DIM, 1, 154), f32),
                                 "pooled_text_embeddings": ((2, 64, 1, 1), f32), "timestep": ((2,), f32)}
    assert shapes(io.outputs) == {"denoiser_output": ((2, 16, 16, 16), f32)}


def test_default_split_keeps_every_stage_under_a_gigabyte_at_sd3_medium_size():
    """SD3 Medium's real transformer (config from stable-diffusion-3-medium-diffusers), built without weights."""
    import torch
    from diffusers import SD3Transformer2DModel
    from backend.engines.coreml import export as ex, export_sd3 as sd3, torch_modules as tm
    with torch.device("meta"):
        t = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    weights = tm.mmdit_weight_counts(t, (64, 64))  # 512x512, MobileDiffuser's size
    total = sum(weights[1]) + weights[0] + weights[2]
    assert 1.9e9 < total < 2.2e9  # "2B"
    exporter = ex._Exporter.__new__(ex._Exporter)
    exporter.parts, exporter.fp16 = {"transformer": t}, True
    exporter.settings = {"latent_size": (64, 64), "mmdit_stages": None}
    plan = sd3.mmdit_plan(exporter)
    sizes = sd3._stage_weights(weights, plan)
    assert len(plan) == 5 and max(sizes) * 2 <= sd3.MAX_STAGE_BYTES  # 4.1 GB at fp16 in five stages
    assert [b for a, b in plan][-1] == 24 and all(plan[k][1] == plan[k + 1][0] for k in range(4))
    fewer = tm.split_mmdit(weights, 4)
    assert max(sd3._stage_weights(weights, fewer)) * 2 > sd3.MAX_STAGE_BYTES
    # --stages 7, MobileDiffuser's count: no stage holds more than its 4 blocks
    assert max(b - a for a, b in tm.split_mmdit(weights, 7)) == 4


def test_export_refuses_what_sd3_cannot_do(exports, tiny_pipelines, tmp_path):
    from backend.engines.coreml.export import export
    _, folder, _ = exports("split2")
    with pytest.raises(UserError, match="original attention"):
        export(folder, tmp_path / "a", attention="split_einsum")
    with pytest.raises(UserError, match="--stages"):
        export(folder, tmp_path / "b", chunk_unet=True)
    with pytest.raises(UserError, match="from 1 to 3"):
        export(folder, tmp_path / "c", mmdit_stages=4)
    with pytest.raises(UserError, match="position table covers 64x64 latents"):
        export(folder, tmp_path / "d", latent_size=(68, 64))
    _, sd1_folder = tiny_pipelines("sd1")
    with pytest.raises(UserError, match="for SD3 models"):
        export(sd1_folder, tmp_path / "e", mmdit_stages=2)


# ------------------------------------------------------------------ the engine

@pytest.mark.parametrize("name", ["split2", "split3", "single", "sd35"])
@pytest.mark.parametrize("kind", RUNTIMES)
def test_stage_chaining_gives_diffusers_transformer_velocity(exports, name, kind):
    pipe, _, found = exports(name)
    spec = coreml_spec(found)
    stages = CoreMLStages(found, spec, runtime=make_runtime(kind, pipe), compute_units="CPU_ONLY")
    for batch in (2, 3):  # 3: one exported batch, then one padded
        args = transformer_inputs(pipe, batch, seed=batch)
        got = stages.predict_noise(*args[:3], text_embeds=args[3])
        error = relative_error(got, diffusers_velocity(pipe, *args))
        print(f"{name} via {kind}, batch {batch}: relative error {error:.2e}")
        fp32 = found.manifest["precision"] == "fp32"
        assert error < (1e-3 if kind == "stand-in" or fp32 else 5e-2)
    assert stages.info["t5_tokens"] == 77 and stages.info["mmdit"] == ("single" if name == "single" else "split")


@pytest.mark.parametrize("kind", RUNTIMES)
def test_image_matches_the_diffusers_pipeline(exports, kind):
    pipe, _, found = exports("split2")
    coreml = coreml_pipeline(found, make_runtime(kind, pipe), compute_units="CPU_ONLY")
    spec = coreml.spec
    assert spec.family == "sd3" and spec.native_size == 32 and spec.latent_channels == 16
    assert spec.denoiser_config["joint_attention_dim"] == SD3_JOINT_DIM and spec.denoiser_config["patch_size"] == 2
    assert (spec.vae_config["scaling_factor"], spec.vae_config["shift_factor"]) == (1.5305, 0.0609)
    assert spec.default("scheduler") == "flow_euler"
    for negative, guidance in (("", 5.0), ("blue", 3.0)):
        result = coreml.generate(request(negative_prompt=negative, guidance=guidance))
        score = psnr(result.pixels[0], diffusers_image(pipe, 3, guidance, negative))
        print(f"SD3 split via {kind}, guidance {guidance}: PSNR {score:.1f} dB")
        assert score >= (50.0 if kind == "stand-in" else 30.0)
    assert result.parameters["max_sequence_length"] == 77 and result.engine["engine"] == "coreml"
    assert any("no T5 text encoder" in w for w in result.warnings)


@pytest.mark.parametrize("kind", RUNTIMES)
def test_reduce_memory_releases_each_mmdit_stage_after_it_runs(exports, kind):
    pipe, _, found = exports("split3")
    runtime = make_runtime(kind, pipe)
    lean = coreml_pipeline(found, runtime, reduce_memory=True)
    assert runtime.loads == []
    result = lean.generate(request(steps=2))
    mmdit = found.denoiser_stages
    assert runtime.loads == ["TextEncoder", "TextEncoder2", *mmdit, *mmdit, "VAEDecoder"]  # per step
    assert lean.stages.loaded_stages() == [] and len(runtime.live) == 0
    groups = [found.disk_bytes["TextEncoder"] + found.disk_bytes["TextEncoder2"], found.disk_bytes["VAEDecoder"],
              *(found.disk_bytes[s] for s in mmdit)]
    assert result.memory.weight_bytes == max(groups) < found.total_bytes

    full = coreml_pipeline(found, make_runtime(kind, pipe))
    full_result = full.generate(request(steps=2))
    assert full_result.memory.weight_bytes == found.total_bytes
    assert np.allclose(result.pixels, full_result.pixels, atol=2e-3)


def test_apples_single_package_folder_without_configs(exports, tmp_path):
    """Apple's layout: Swift names, vocab.json + merges.txt, no configs: SD3's defaults, silicon_diffusion.json."""
    pipe, _, found = exports("single")
    folder = tmp_path / "coreml-sd3_original_compiled"
    folder.mkdir()
    for stage, path in found.models.items():
        shutil.copytree(path, folder / f"{stage}.mlpackage")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(found.folder / name, folder / name)
    (folder / "silicon_diffusion.json").write_text(json.dumps({"steps": 3, "guidance": 4.0}))
    choice = coreml_choice(str(folder), "test")
    spec = choice.spec
    assert choice.spec.family == "sd3" and spec.text_encoders == ["text_encoder", "text_encoder_2"]
    assert spec.scheduler_config == {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                     "shift": 3.0}
    assert (spec.vae_config["scaling_factor"], spec.vae_config["shift_factor"]) == (1.5305, 0.0609)
    assert (spec.default("steps"), spec.default("guidance"), spec.native_size) == (3, 4.0, 32)
    coreml = Pipeline(spec, choice.load(runtime=TorchStandIn(pipe)), choice.tokenizers, name="apple", reason="",
                      load_seconds=0.0)
    assert coreml.stages.resources.attention == "original"  # from the folder's name
    result = coreml.generate(GenerationRequest(prompt=PROMPT, latents=latents()))
    assert psnr(result.pixels[0], diffusers_image(pipe, 3, 4.0)) >= 50.0


def test_wrong_size_and_missing_pooled_text_are_user_errors(exports):
    pipe, _, found = exports("split2")
    coreml = coreml_pipeline(found, TorchStandIn(pipe))
    with pytest.raises(UserError, match="exported for 32x32 images; 48x32"):
        coreml.generate(request(width=48, height=32, latents=None, steps=1))
    with pytest.raises(UserError, match="exactly 77 T5 tokens"):
        coreml.generate(request(max_sequence_length=256, steps=1))
    with pytest.raises(UserError, match="pooled"):
        coreml.stages.predict_noise(*transformer_inputs(pipe, 2)[:3])
    with pytest.raises(UserError, match="no mixed-bit recipe for SD3"):
        coreml_choice(str(found.folder), "test").load(quantization="mixed", runtime=TorchStandIn(pipe))


# ------------------------------------------------------------------ quantization of the split packages

def test_quantize_command_compresses_every_mmdit_stage(exports, tmp_path):
    from backend.quantize import quantize
    from tests.test_coreml_quantize import KMEANS
    _, _, found = exports("split2")
    runs = [("linear", 8, "constexpr_affine_dequantize"), ("palettize", 6, "constexpr_lut_to_dense")]
    if KMEANS:
        runs.append(("palettize", 4, "constexpr_lut_to_dense"))
    for method, bits, op in runs:
        out = tmp_path / f"{method}{bits}"
        if method == "linear":  # the command as written: MobileDiffuser's int8 linear_symmetric recipe
            from backend.__main__ import main
            assert main(["quantize", "--model", str(found.folder), "--method", "linear", "--bits", "8",
                         "--out", str(out)]) == 0
            manifest = json.loads((out / "manifest.json").read_text())
            assert manifest["mode"] == "linear_symmetric"
        else:
            out, manifest, _ = quantize(str(found.folder), method, bits, out=out)
        after = res.find_resources(out)
        assert after.denoiser_stages == found.denoiser_stages and after.is_sd3
        results = manifest["stage_results"]
        for stage in ["TextEncoder", "TextEncoder2", *found.denoiser_stages]:
            assert results[stage]["action"] == "compressed", (method, stage)
        for stage in found.denoiser_stages[1:]:  # the block stages: their large weights are compressed
            assert res.describe_model(after.models[stage]).op_counts[op] > 0, (method, stage)
            assert after.disk_bytes[stage] < found.disk_bytes[stage]
        assert results["VAEDecoder"]["action"] == "copied"
        for stage in found.models:  # what the engine reads is unchanged
            assert after.io(stage).inputs == found.io(stage).inputs
            assert after.io(stage).outputs == found.io(stage).outputs
    assert "linear_quantize 8-bit" in CoreMLStages(res.find_resources(tmp_path / "linear8"), coreml_spec(found),
                                                   runtime=TorchStandIn(exports("split2")[0])).info["quantization"]


# ------------------------------------------------------------------ layouts the export does not write

def _mobilediffuser_folder(folder, stages=3, conditioning=True):
    """MobileDiffuser's coremlsd3_4step/ reduced to what resources.py reads (MD's 512x512 shapes)."""
    f32 = "Float32"
    text = lambda width: [("hidden_embeds", (1, 77, width), f32), ("pooled_outputs", (1, width), f32)]  # noqa: E731
    _fake_compiled(folder, "TextEncoder", [("input_ids", (1, 77), f32)], text(768))
    _fake_compiled(folder, "TextEncoder2", [("input_ids", (1, 77), f32)], text(1280))
    _fake_compiled(folder, "VAEDecoder", [("z", (1, 16, 64, 64), "Float16")], [("image", (1, 3, 512, 512), f32)])
    if conditioning:
        _fake_compiled(folder, COND, [("pooled_text_embeddings", (1, 2048, 1, 1), f32), ("timestep", (1,), f32)],
                       [("modulation_inputs", (1, 1536), f32)])
    hand_over = [("latent_image_embeddings", (1, 1024, 1536), f32), ("token_level_text_embeddings", (1, 154, 1536), f32)]
    for k in range(stages):
        inputs = ([("latent_image_embeddings", (1, 16, 64, 64), f32),
                   ("token_level_text_embeddings", (1, 4096, 1, 154), f32)] if k == 0 else hand_over)
        outputs = ([("noise_pred", (1, 16, 64, 64), f32)] if k == stages - 1
                   else [(n + "_out", s, d) for n, s, d in hand_over])
        _fake_compiled(folder, f"{STAGE}{k}", inputs + [("modulation_inputs", (1, 1536), f32)], outputs)
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def test_mobilediffuser_compiled_layout_is_read_in_numeric_stage_order(tmp_path):
    folder = _mobilediffuser_folder(tmp_path / "coremlsd3_4step", stages=12)
    found = res.find_resources(folder)
    assert found.compiled and found.is_sd3 and found.split_mmdit
    assert found.denoiser_stages == [COND] + [f"{STAGE}{k}" for k in range(12)]  # Stage10 after Stage9
    spec = coreml_spec(found)
    assert spec.family == "sd3" and spec.native_size == 512 and spec.latent_channels == 16
    assert spec.denoiser_config["joint_attention_dim"] == 4096 and spec.denoiser_config["patch_size"] == 2
    assert spec.denoiser_config["pooled_projection_dim"] == 2048
    assert spec.scheduler_config["shift"] == 3.0 and spec.vae_config["shift_factor"] == 0.0609
    (folder / "silicon_diffusion.json").write_text(json.dumps({"steps": 4, "guidance": 1.0, "scheduler": "flow_4step"}))
    spec = coreml_spec(res.find_resources(folder))
    assert (spec.default("steps"), spec.default("guidance"), spec.default("scheduler")) == (4, 1.0, "flow_4step")

    class Nothing:  # loads nothing: only what the stages read from descriptions is checked
        name = "nothing"

        @staticmethod
        def load(path, units):
            return None
    stages = CoreMLStages(found, spec, runtime=Nothing, reduce_memory=True)
    assert stages.info["t5_tokens"] == 77 and stages.info["denoiser_stages"] == 13
    with pytest.raises(UserError, match="exported for 512x512 images; 1024x1024"):
        stages.predict_noise(np.zeros((1, 16, 128, 128), np.float32), 1000.0, np.zeros((1, 154, 4096), np.float32),
                             np.zeros((1, 2048), np.float32))


def test_incomplete_sd3_layouts_are_user_errors_that_name_the_missing_piece(tmp_path):
    folder = _mobilediffuser_folder(tmp_path / "a", stages=3)
    shutil.rmtree(folder / f"{STAGE}1.mlmodelc")
    with pytest.raises(UserError, match=f"{STAGE}1 missing"):
        res.find_resources(folder)
    with pytest.raises(UserError, match=f"no {COND}"):
        res.find_resources(_mobilediffuser_folder(tmp_path / "b", conditioning=False))
    folder = _mobilediffuser_folder(tmp_path / "c")
    shutil.rmtree(folder / "TextEncoder2.mlmodelc")
    with pytest.raises(UserError, match="no TextEncoder2"):
        res.find_resources(folder)
    folder = _mobilediffuser_folder(tmp_path / "d", stages=0)
    with pytest.raises(UserError, match="no MultiModalDiffusionTransformerStage0"):
        res.find_resources(folder)
    # a monolithic package beside the split one: MobileDiffuser's loader prefers the split stages
    folder = _mobilediffuser_folder(tmp_path / "e", stages=2)
    shutil.copytree(folder / f"{STAGE}1.mlmodelc", folder / f"{SINGLE}.mlmodelc")
    assert res.find_resources(folder).denoiser_stages == [COND, STAGE + "0", STAGE + "1"]


def test_both_naming_styles_name_the_mmdit_stages():
    assert res.stage_of("MultiModalDiffusionTransformer.mlmodelc") == SINGLE
    assert res.stage_of("MultiModalDiffusionTransformerConditioning.mlmodelc") == COND
    assert res.stage_of("MultiModalDiffusionTransformerStage11.mlmodelc") == STAGE + "11"
    assert res.stage_of("Stable_Diffusion_version_sd3_mmdit.mlpackage") == SINGLE
    assert res.stage_of("Stable_Diffusion_version_sd3_mmdit_conditioning.mlpackage") == COND
    assert res.stage_of("Stable_Diffusion_version_sd3_mmdit_stage2.mlpackage") == STAGE + "2"
    assert res.stage_of("TextEncoderT5.mlmodelc") is None  # T5 is not run by the Core ML engine
    assert res.python_suffix(STAGE + "3") == "mmdit_stage3" and res.known_stage(STAGE + "3")
