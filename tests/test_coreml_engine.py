"""The Core ML engine on exported tiny pipelines: its images match the MLX engine's.

The tiny sd1 (original attention, one UNet package) and SDXL (split-einsum, UNet in two chunks) exports
are shared with test_coreml_export.py. Everything of the Core ML pipeline runs for real: resources and
spec reading, input preparation from each model's description, the (B, C, 1, 77) text layout, batch
split/pad, chunk hand-off by name, the loop of backend/pipeline.py, decoding, reduce-memory loading.
Only the Core ML prediction itself needs macOS: elsewhere `MLXStandIn` takes the runtime's place and
runs the checkpoint's MLX modules on exactly the arrays Core ML would receive (names, shapes and
dtypes checked against the description) and answers with Core ML's output names, layouts and dtypes.
On macOS the same tests also run with the real runtime (runtime.CoreMLRuntime).
"""
import dataclasses
import sys
import weakref

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from backend import GenerationRequest
from backend.checkpoint import ModelSpec
from backend.engines.coreml import resources as res
from backend.engines.coreml.runtime import CoreMLRuntime
from backend.engines.coreml.sources import coreml_choice
from backend.engines.coreml.spec import coreml_spec, coreml_tokenizers
from backend.engines.mlx.engine import MLXStages
from backend.measure import psnr
from backend.pipeline import Pipeline
from backend.tokenizer import CLIPTokenizer
from backend.types import UserError
from tests.test_coreml_export import HAVE_COREMLTOOLS, tiny_export

pytestmark = pytest.mark.skipif(not HAVE_COREMLTOOLS, reason="coremltools cannot be imported here")


# ------------------------------------------------------------------ the runtime stand-in

def nhwc(a):
    return mx.array(np.asarray(a, dtype=np.float32).transpose(0, 2, 3, 1))


def nchw(a):
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


def _segments(unet):
    """The UNet's blocks in running order, as torch_modules.unet_segments lists diffusers'."""
    return ([("down", i) for i in range(len(unet.down_blocks))] + ([("mid", 0)] if "mid_block" in unet else [])
            + [("up", i) for i in range(len(unet.up_blocks))])


def _block(unet, segment):
    kind, i = segment
    return unet.mid_block if kind == "mid" else (unet.down_blocks if kind == "down" else unet.up_blocks)[i]


def _count(module):
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def balanced_split(unet) -> int:
    """torch_modules.balanced_split on the MLX UNet: the same names hold the same weights."""
    segments, total = _segments(unet), _count(unet)
    first = total - sum(_count(_block(unet, s)) for s in segments) - _count(unet.conv_out)
    best, best_gap = 1, None
    for k, segment in enumerate(segments[:-1], start=1):
        first += _count(_block(unet, segment))
        if best_gap is None or abs(2 * first - total) < best_gap:
            best, best_gap = k, abs(2 * first - total)
    return best


def run_segments(unet, segments, x, emb, context, skips):
    factor = 2 ** sum(1 for b in unet.up_blocks if "upsamplers" in b)
    forward_size = any(d % factor for d in skips[0].shape[1:3])
    for kind, i in segments:
        if kind == "down":
            x, block_skips = unet.down_blocks[i](x, emb, context)
            skips.extend(block_skips)
        elif kind == "mid":
            x = unet.mid_block(x, emb, context)
        else:
            block = unet.up_blocks[i]
            taken, skips[:] = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            size = skips[-1].shape[1:3] if forward_size and i < len(unet.up_blocks) - 1 else None
            x = block(x, taken, emb, context, size)
    return x


def check_inputs(io, inputs: dict, stage: str) -> None:
    """What Core ML would check: the arrays are exactly the inputs the model's description declares."""
    got = {n: (tuple(a.shape), a.dtype.name) for n, a in inputs.items()}
    assert got == {n: (t.shape, t.dtype) for n, t in io.inputs.items()}, stage


class StandInModel:
    """One "Core ML model": checks its inputs against the description, runs MLX, answers by output name."""

    def __init__(self, stage, io, mlx_stages, compute_units):
        self.stage, self.io, self.mlx, self.compute_units = stage, io, mlx_stages, compute_units

    def predict(self, inputs):
        check_inputs(self.io, inputs, self.stage)
        out = getattr(self, "_" + self.stage.lower())(inputs)
        return {name: np.asarray(out[name]).astype(t.dtype) for name, t in self.io.outputs.items()}

    def _text(self, index, ids):
        out = self.mlx.text_encoders[index](mx.array(ids.astype(np.int32)))
        hidden = out.hidden_states[-2] if self.mlx.spec.traits.clip_layer == -2 else out.last_hidden_state
        pooled = out.text_embeds if out.text_embeds is not None else out.pooled_output
        name = next(n for n in ("hidden_embeds", "last_hidden_state") if n in self.io.outputs)
        return {name: np.array(hidden), "pooled_outputs": np.array(pooled)}

    def _textencoder(self, x):
        return self._text(0, x["input_ids"])

    def _textencoder2(self, x):  # the last encoder: SDXL's second, the refiner's only one
        return self._text(len(self.mlx.text_encoders) - 1, x["input_ids"])

    def _conditions(self, x):
        context = mx.array(x["encoder_hidden_states"].astype(np.float32)[:, :, 0, :].transpose(0, 2, 1))
        extra = {n: mx.array(x[n].astype(np.float32)) for n in ("text_embeds", "time_ids", "timestep_cond") if n in x}
        return mx.array(x["timestep"].astype(np.float32)), context, extra

    def _unet(self, x):
        t, context, extra = self._conditions(x)
        return {"noise_pred": nchw(self.mlx.denoiser(nhwc(x["sample"]), t, context, **extra))}

    _unetrefiner = _unet

    def _unetchunk1(self, x):
        unet, (t, context, extra) = self.mlx.denoiser, self._conditions(x)
        sample = nhwc(x["sample"])
        emb = unet.time_embed(t, sample.shape[0], mx.float32, extra.get("text_embeds"), extra.get("time_ids"),
                              extra.get("timestep_cond"))
        h = unet.conv_in(sample)
        skips = [h]
        h = run_segments(unet, _segments(unet)[:balanced_split(unet)], h, emb, context, skips)
        out = {"chunk_sample": nchw(h), "chunk_temb": np.array(emb)}
        out.update({f"chunk_skip_{i}": nchw(s) for i, s in enumerate(skips)})
        return out

    def _unetchunk2(self, x):
        unet = self.mlx.denoiser
        skips = [nhwc(x[f"chunk_skip_{i}"]) for i in range(sum(n.startswith("chunk_skip_") for n in x))]
        context = None
        if "encoder_hidden_states" in x:
            context = mx.array(x["encoder_hidden_states"].astype(np.float32)[:, :, 0, :].transpose(0, 2, 1))
        h = run_segments(unet, _segments(unet)[balanced_split(unet):], nhwc(x["chunk_sample"]),
                         mx.array(x["chunk_temb"].astype(np.float32)), context, skips)
        return {"noise_pred": nchw(unet.conv_out(unet.conv_act(unet.conv_norm_out(h))))}

    def _vaeencoder(self, x):  # torch2coreml's VAEEncoder: quant_conv(encoder(x)), the mean and log-variance
        mean, logvar = self.mlx.vae.encode(nhwc(x["x"]))
        return {"latent": np.concatenate([nchw(mean), nchw(logvar)], axis=1)}

    def _vaedecoder(self, x):
        return {"image": nchw(self.mlx.vae.decode(nhwc(x["z"])))}


class MLXStandIn:
    """The runtime contract (`load(path, compute_units)` -> model with `predict`) served by MLX."""
    name = "mlx-stand-in"

    def __init__(self, diffusers_folder):
        self.mlx = MLXStages(ModelSpec.from_folder(diffusers_folder), precision="fp32")

    def load(self, path, compute_units):
        return StandInModel(res.stage_of(path), res.describe_model(path), self.mlx, compute_units)


class Recorder:
    """Wraps a runtime: which models were loaded for which compute units, and which are still alive."""

    def __init__(self, runtime):
        self.runtime, self.name = runtime, runtime.name
        self.loads = []
        self.live = weakref.WeakSet()

    def load(self, path, compute_units):
        model = self.runtime.load(path, compute_units)
        self.loads.append((res.stage_of(path), compute_units))
        self.live.add(model)
        return model


# ------------------------------------------------------------------ fixtures and helpers

EXPORTS = {"sd1": dict(attention="original"), "sdxl": dict(attention="split_einsum", chunk_unet=True)}
RUNTIMES = ["stand-in", pytest.param("coreml", marks=pytest.mark.skipif(
    sys.platform != "darwin", reason="Core ML prediction needs macOS"))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_pipelines):
    return lambda family: tiny_export(tmp_path_factory, tiny_pipelines, family, **EXPORTS[family])


def make_runtime(kind, folder):
    return Recorder(CoreMLRuntime if kind == "coreml" else MLXStandIn(folder))


def min_psnr(kind):
    # the stand-in differs from MLX in fp32 only by the fp16 inputs (a different prompt scores 35-42 dB);
    # Core ML computes in fp16 itself
    return 60.0 if kind == "stand-in" else 45.0


def coreml_pipeline(found, runtime, **options):
    choice = coreml_choice(str(found.folder), "test", None)
    stages = choice.load(runtime=runtime, **options)
    return Pipeline(choice.spec, stages, choice.tokenizers, name="tiny", reason=choice.reason, load_seconds=0.0,
                    disk=choice.disk_bytes)


def mlx_pipeline(folder):
    spec = ModelSpec.from_folder(folder)
    return Pipeline(spec, MLXStages(spec, precision="fp32"),
                    [CLIPTokenizer.from_folder(folder / t) for t in spec.tokenizers], name="tiny", reason="mlx",
                    load_seconds=0.0)


def request(**kw):
    return GenerationRequest(**{"prompt": "a red circle at the top", "negative_prompt": "blue", "steps": 3,
                                "seed": 7, "scheduler": "euler", **kw})


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", RUNTIMES)
def test_coreml_images_match_the_mlx_engine(exported, family, kind):
    pipe, folder, found = exported(family)
    units = "CPU_ONLY" if kind == "coreml" else "CPU_AND_NE"  # CPU_ONLY: the same figures on any Mac
    coreml = coreml_pipeline(found, make_runtime(kind, folder), compute_units=units)
    assert coreml.spec.family == ("sdxl" if family == "sdxl" else "sd") and coreml.spec.native_size == 32
    result = coreml.generate(request())
    reference = mlx_pipeline(folder).generate(request())
    score = psnr(result.pixels, reference.pixels)
    print(f"{family} {found.attention}{' chunked' if found.chunked else ''} via {kind}: PSNR {score:.1f} dB")
    assert score >= min_psnr(kind)
    assert result.engine["attention"] == EXPORTS[family]["attention"] and result.engine["engine"] == "coreml"
    assert result.parameters["compute_units"] == result.engine["compute_units"] == units
    assert result.engine["chunked_unet"] == (family == "sdxl")


@pytest.mark.parametrize("kind", RUNTIMES)
def test_batch_is_split_and_padded_to_the_exported_unet_batch(exported, kind):
    _, folder, found = exported("sd1")
    runtime = make_runtime(kind, folder)
    coreml = coreml_pipeline(found, runtime)
    # no guidance: 3 images -> UNet batches of 2 + 1 (padded to 2); the text encoder runs row by row
    req = request(guidance=1.0, batch_size=3, steps=2)
    result = coreml.generate(req)
    reference = mlx_pipeline(folder).generate(req)
    assert len(result.images) == 3
    assert psnr(result.pixels, reference.pixels) >= min_psnr(kind)
    assert [stage for stage, _ in runtime.loads] == ["TextEncoder", "Unet", "VAEDecoder"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", RUNTIMES)
def test_reduce_memory_loads_each_stage_when_it_runs_and_releases_it(exported, family, kind):
    _, folder, found = exported(family)
    runtime = make_runtime(kind, folder)
    lean = coreml_pipeline(found, runtime, reduce_memory=True)
    assert runtime.loads == [] and lean.stages.loaded_stages() == []
    result = lean.generate(request(steps=2))
    order = ["TextEncoder", "TextEncoder2"][:2 if family == "sdxl" else 1] + found.unet_stages + ["VAEDecoder"]
    assert [stage for stage, _ in runtime.loads] == order
    assert lean.stages.loaded_stages() == [] and len(runtime.live) == 0  # released and collected
    largest = max(sum(found.disk_bytes[s] for s in group) for group in lean.stages.models_of.values())
    assert result.memory.weight_bytes == largest < found.total_bytes

    full = coreml_pipeline(found, make_runtime(kind, folder))
    full_result = full.generate(request(steps=2))
    assert full_result.memory.weight_bytes == found.total_bytes
    assert np.allclose(result.pixels, full_result.pixels, atol=2e-3)  # the same models, loaded later
    assert result.engine["reduce_memory"] and not full_result.engine["reduce_memory"]
    lean.generate(request(steps=1))  # a second run loads every model again
    assert len(runtime.loads) == 2 * len(order)


@pytest.mark.parametrize("kind", RUNTIMES)
def test_compute_units_are_chosen_per_generation_and_models_cached_per_unit(exported, kind):
    _, folder, found = exported("sd1")
    runtime = make_runtime(kind, folder)
    coreml = coreml_pipeline(found, runtime, compute_units="ALL")
    assert {u for _, u in runtime.loads} == {"ALL"} and len(runtime.loads) == 3
    coreml.stages.set_compute_units("CPU_AND_GPU")
    result = coreml.generate(request(steps=1))
    assert result.parameters["compute_units"] == "CPU_AND_GPU" and result.engine["device"] == "CPU and GPU"
    assert len(runtime.loads) == 6
    coreml.stages.set_compute_units("ALL")  # loaded before: nothing loads again
    assert coreml.generate(request(steps=1)).engine["compute_units"] == "ALL" and len(runtime.loads) == 6
    with pytest.raises(UserError, match="compute units"):
        coreml.stages.set_compute_units("GPU")


def test_spec_and_tokenizers_without_configs_use_the_descriptions_and_sd_defaults(exported):
    pipe, _, found = exported("sdxl")
    bare = dataclasses.replace(found, configs=None)
    spec = coreml_spec(bare)
    assert spec.family == "sdxl" and spec.text_encoders == ["text_encoder", "text_encoder_2"]
    assert spec.native_size == 32 and spec.vae_scale_factor == 2 and spec.latent_channels == 4
    assert spec.vae_config["scaling_factor"] == 0.13025
    assert spec.scheduler_config["beta_schedule"] == "scaled_linear" and spec.prediction_type == "epsilon"
    assert spec.denoiser_config["addition_embed_type"] == "text_time"
    tokenizers = coreml_tokenizers(bare, spec)
    prompt = "a small cat at the left"
    for mine, theirs in zip(tokenizers, (pipe.tokenizer, pipe.tokenizer_2)):  # "!" pads SDXL's second encoder
        expected = theirs(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert mine.encode(prompt).ids.tolist() == list(expected)

    sd1_pipe, _, sd1 = exported("sd1")
    spec1 = coreml_spec(sd1)  # with the export's configs: the checkpoint's own scheduler
    assert spec1.scheduler_config["_class_name"] == type(sd1_pipe.scheduler).__name__
    assert coreml_spec(dataclasses.replace(sd1, configs=None)).vae_config["scaling_factor"] == 0.18215


def test_wrong_size_and_missing_inputs_are_user_errors(exported):
    _, folder, found = exported("sdxl")
    coreml = coreml_pipeline(found, MLXStandIn(folder))
    with pytest.raises(UserError, match="exported for 32x32 images; 48x32"):
        coreml.generate(request(width=48, height=32, steps=1))
    with pytest.raises(UserError, match="time_ids"):
        hidden = np.zeros((2, 77, 64), np.float32)
        coreml.stages.predict_noise(np.zeros((2, 4, 16, 16), np.float32), 10.0, hidden, np.zeros((2, 32), np.float32))
    with pytest.raises(UserError, match="unknown Core ML quantization"):
        coreml_choice(str(found.folder), "test").load(quantization="q5", runtime=MLXStandIn(folder))
    with pytest.raises(UserError, match="split_einsum attention, not original"):
        coreml_choice(str(found.folder), "test").load(attention="original", runtime=MLXStandIn(folder))


def test_quantized_variant_is_made_on_demand_and_cached(exported):
    _, folder, found = exported("sd1")
    choice = coreml_choice(str(found.folder), "test")
    stages = choice.load(quantization="q8", runtime=MLXStandIn(folder))
    variant = stages.resources.folder
    assert variant != found.folder and (variant / "manifest.json").is_file()
    assert stages.info["quantization"] == "linear_quantize 8-bit"
    made = (variant / "manifest.json").stat().st_mtime
    again = choice.load(quantization="q8", runtime=MLXStandIn(folder))
    assert again.resources.folder == variant and (variant / "manifest.json").stat().st_mtime == made


def test_choice_off_macos_explains_itself(exported):
    from backend.engines.select import choose_engine
    _, _, found = exported("sd1")
    if sys.platform == "darwin":
        pytest.skip("on macOS Core ML can run")
    with pytest.raises(UserError, match="Core ML was asked for, but Core ML prediction needs macOS"):
        choose_engine(str(found.folder), "coreml")
    with pytest.raises(UserError, match="holds only Core ML resources"):
        choose_engine(str(found.folder), "auto")
    with pytest.raises(UserError, match="Core ML prediction needs macOS"):
        CoreMLRuntime.load(found.models["Unet"], "ALL")


def test_export_command_needs_the_converters(monkeypatch, capsys):
    from backend.__main__ import main
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["export-coreml", "--model", "x", "--out", "y"]) == 1
    assert "requirements-convert.txt" in capsys.readouterr().err


def test_apples_downloaded_layout_without_configs_generates_the_same_image(exported, tmp_path):
    """What a registry download leaves: <variant>/packages/*.mlpackage, vocab + merges in <variant>/compiled/."""
    import shutil
    _, folder, found = exported("sd1")
    packages, compiled = tmp_path / "repo" / "original" / "packages", tmp_path / "repo" / "original" / "compiled"
    compiled.mkdir(parents=True)
    for path in found.models.values():
        shutil.copytree(path, packages / path.name)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(found.folder / name, compiled / name)
    choice = coreml_choice(str(tmp_path / "repo"), "test")
    assert choice.spec.scheduler_config["_class_name"] == "PNDMScheduler"  # SD's default, no configs here
    coreml = Pipeline(choice.spec, choice.load(runtime=MLXStandIn(folder)), choice.tokenizers, name="tiny",
                      reason="", load_seconds=0.0)
    assert coreml.stages.resources.folder == packages and coreml.stages.info["attention"] == "original"
    # the tiny checkpoint's config says timestep_spacing "leading"; SD's defaults leave the spacing to each
    # scheduler's own default, which for DDIM is "leading" too
    req = request(scheduler="ddim")
    assert psnr(coreml.generate(req).pixels, mlx_pipeline(folder).generate(req).pixels) >= min_psnr("stand-in")


def test_auto_falls_back_to_mlx_when_the_resources_cannot_be_had(exported, monkeypatch, tmp_path):
    import json
    from backend import registry
    from backend.engines import machine, select
    _, folder, _ = exported("sd1")
    models = tmp_path / "models.json"
    models.write_text(json.dumps([{"name": "tiny-sd1", "title": "tiny", "path": str(folder), "coreml": {
        "repo": "silicon-diffusion-tests/not-a-repo", "variants": {"original": "original/packages"}}}]))
    monkeypatch.setattr(registry, "USER_MODELS_FILE", models)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(machine, "coreml_unavailable_reason", lambda: None)  # as on an Apple Silicon Mac
    choice = select.choose_engine("tiny-sd1", "auto")
    assert choice.kind == "mlx"
    assert "not downloaded and offline mode is on" in choice.reason and "running MLX" in choice.reason


# ------------------------------------------------------------------ Apple's defaults and packaged shapes

def test_auto_units_follow_the_attention_and_sdxls_vae_runs_on_cpu_and_gpu(exported):
    _, folder, found = exported("sd1")  # original attention
    runtime = make_runtime("stand-in", folder)
    result = coreml_pipeline(found, runtime).generate(request(steps=1))
    assert result.engine["compute_units"] == "CPU_AND_GPU" and result.engine["compute_units_asked"] == "auto"
    assert {u for _, u in runtime.loads} == {"CPU_AND_GPU"}

    _, folder, found = exported("sdxl")  # split-einsum attention
    runtime = make_runtime("stand-in", folder)
    result = coreml_pipeline(found, runtime).generate(request(steps=1))
    assert result.engine["compute_units"] == "CPU_AND_NE"
    assert dict(runtime.loads)["VAEDecoder"] == "CPU_AND_GPU" and dict(runtime.loads)["UnetChunk1"] == "CPU_AND_NE"
    assert result.engine["stage_units"] == {"VAEDecoder": "CPU_AND_GPU"}
    runtime = make_runtime("stand-in", folder)
    coreml_pipeline(found, runtime, compute_units="CPU_ONLY").generate(request(steps=1))
    assert {u for _, u in runtime.loads} == {"CPU_ONLY"}  # asked units are kept, the VAE's included


def test_time_ids_are_shaped_as_the_package_declares_them(exported):
    """Apple's first SDXL packages took time_ids flat, (12,) for the guidance batch of 2 (torch2coreml before
    PR #227); later ones (2, 6). The engine hands each package the shape its description declares."""
    _, folder, found = exported("sdxl")
    base = MLXStandIn(folder)
    seen = []

    class Flat:
        name = "flat"

        def load(self, path, units):
            model = base.load(path, units)
            if "time_ids" not in model.io.inputs:
                return model
            declared = dataclasses.replace(model.io, inputs={
                n: (res.TensorSpec(n, (12,), t.dtype) if n == "time_ids" else t) for n, t in model.io.inputs.items()})

            class Unflatten:
                def predict(self, inputs):
                    seen.append(inputs["time_ids"].shape)
                    return model.predict({**inputs, "time_ids": inputs["time_ids"].reshape(2, 6)})
            loaded = Unflatten()
            loaded.declared = declared
            return loaded

    pipe = coreml_pipeline(found, Flat())
    unet = found.unet_stages[0]
    pipe.stages.io[unet] = dataclasses.replace(pipe.stages.io[unet], inputs={
        n: (res.TensorSpec(n, (12,), t.dtype) if n == "time_ids" else t) for n, t in pipe.stages.io[unet].inputs.items()})
    flat = pipe.generate(request(steps=2))
    assert seen and set(seen) == {(12,)}
    reference = coreml_pipeline(found, MLXStandIn(folder)).generate(request(steps=2))
    assert np.array_equal(flat.pixels, reference.pixels)


def test_doctor_runs_one_image_per_compute_unit_and_reports_each(exported, capsys):
    from backend import doctor
    _, folder, found = exported("sd1")
    runtime = make_runtime("stand-in", folder)

    def load(model, engine, compute_units, progress):
        assert engine == "coreml"
        return coreml_pipeline(found, runtime, compute_units=compute_units)

    rows = doctor.run(str(found.folder), doctor.UNITS, steps=2, load=load)
    assert [r["compute_units"] for r in rows] == list(doctor.UNITS)
    assert all(r["s_per_step"] > 0 and r["first_image_s"] >= r["load_s"] >= 0 and r["peak_memory_gib"] > 0
               for r in rows)
    assert sorted({u for _, u in runtime.loads}) == sorted(doctor.UNITS)
    printed = capsys.readouterr().out
    assert printed.count("s/step") == 4 and "CPU_AND_NE" in printed


def test_doctor_off_macos_is_one_sentence(capsys):
    from backend.__main__ import main
    if sys.platform == "darwin":
        pytest.skip("this is a Mac")
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Core ML prediction needs macOS" in err


def test_sdxl_base_then_refiner_on_core_ml_matches_the_mlx_engine(exported, tmp_path_factory, tiny_pipelines,
                                                                  monkeypatch):
    """Apple's layout bundles the refiner as UnetRefiner beside the base's models (--refiner-version); the
    refiner runs with TextEncoder2 alone and its 5 time ids, the end of the base's schedule, then decodes."""
    import shutil
    from backend.pipeline import _check_refiner
    from backend.engines.base import EngineChoice
    _, base_folder, base = exported("sdxl")
    _, refiner_folder, alone = tiny_export(tmp_path_factory, tiny_pipelines, "sdxl-refiner", attention="split_einsum")
    assert set(alone.models) == {"TextEncoder2", "Unet", "VAEDecoder"}  # a refiner exported on its own
    bundle = tmp_path_factory.mktemp("bundle") / "compiled"  # Apple's layout: the refiner beside the base
    shutil.copytree(base.folder, bundle)
    shutil.copytree(alone.models["Unet"], bundle / "Stable_Diffusion_version_tiny_refiner.mlpackage")
    found = res.find_resources(bundle, refiner=True)
    assert found.denoiser_stages == ["UnetRefiner"] and set(found.models) == set(res.REFINER_STAGES)
    assert res.find_resources(bundle).denoiser_stages == base.unet_stages  # the base run skips the refiner

    from backend.engines.coreml import sources
    # the registry pairs the refiner with its diffusers model when cached (its configs: scheduler, VAE scale)
    monkeypatch.setattr(sources, "_paired_folder", lambda entry: refiner_folder)
    choice = coreml_choice(str(bundle), "test", refiner=True)
    assert choice.spec.family == "sdxl-refiner"  # from its 5 time ids per row, as Apple's Swift pipeline reads it
    pipe = coreml_pipeline(base, MLXStandIn(base_folder))
    _check_refiner(EngineChoice("base", "coreml", "", pipe.spec, [], 0, None),
                   EngineChoice("refiner", "coreml", "", choice.spec, [], 0, None))
    runtime = Recorder(MLXStandIn(refiner_folder))
    pipe.refiner = Pipeline(choice.spec, choice.load(runtime=runtime), choice.tokenizers, name="refiner",
                            reason="", load_seconds=0.0)
    req = request(steps=5, refiner_start=0.6, guidance=5.0)
    result = pipe.generate(req)
    assert {stage for stage, _ in runtime.loads} == {"TextEncoder2", "UnetRefiner", "VAEDecoder"}

    reference = mlx_pipeline(base_folder)
    reference.refiner = mlx_pipeline(refiner_folder)
    expected = reference.generate(req)
    assert psnr(result.pixels, expected.pixels) >= min_psnr("stand-in")
    assert psnr(result.pixels, mlx_pipeline(base_folder).generate(request(steps=5, guidance=5.0)).pixels) < 40
    assert result.parameters["refiner_start"] == 0.6 and len(result.timings.steps) == 5


def test_image_to_image_encodes_with_apples_vae_encoder_fetched_on_first_use(exported, tmp_path_factory,
                                                                           tiny_pipelines):
    _, folder, found = exported("sd1")  # exported without a VAE encoder
    _, _, with_encoder = tiny_export(tmp_path_factory, tiny_pipelines, "sd1", attention="original", vae_encoder=True)
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    runtime = make_runtime("stand-in", folder)
    stages = coreml_pipeline(found, runtime).stages
    with pytest.raises(UserError, match="no VAEEncoder, which image-to-image needs"):
        stages.encode_image(pixels)
    assert "VAEEncoder" not in {s for s, _ in runtime.loads}  # nothing loaded for it at load time

    fetched = []
    stages.fetch_model = lambda stage: fetched.append(stage) or with_encoder.models[stage]
    mean = stages.encode_image(pixels)
    expected = np.array(MLXStandIn(folder).mlx.vae.encode(nhwc(pixels))[0]).transpose(0, 3, 1, 2)
    assert fetched == ["VAEEncoder"] and mean.shape == (1, 4, 16, 16)
    assert np.abs(mean - expected).max() < 1e-2  # the package's fp16 input against MLX in fp32
    assert dict(runtime.loads)["VAEEncoder"] == "CPU_AND_GPU"
    stages.encode_image(pixels)
    assert fetched == ["VAEEncoder"]  # fetched once


def test_core_ml_refuses_lora_at_generation_time(exported):
    _, folder, found = exported("sd1")
    stages = coreml_pipeline(found, make_runtime("stand-in", folder)).stages
    stages.set_loras([])
    with pytest.raises(UserError, match="export-coreml --lora"):
        stages.set_loras([("style.safetensors", 1.0)])
