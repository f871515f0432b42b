"""Every Core ML registry entry resolves, on the repositories as they really are laid out, to the parts it needs.

The layouts come from tests/fixtures/coreml_hub_layouts.json (real names, each folder with the page that
lists it); here they become repository file lists and, for the offline tests, a Hugging Face cache of
empty files. Nothing is downloaded.
"""
import fnmatch
import json
from pathlib import Path

import pytest

from backend import registry
from backend.engines.coreml import resources as res
from backend.engines.coreml import sources
from backend.types import UserError

LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "coreml_hub_layouts.json").read_text())["repos"]
#: Core ML's bundle files (what a compiled model / a package folder holds)
BUNDLE = {".mlmodelc": ["coremldata.bin", "metadata.json", "model.mil", "weights/weight.bin", "analytics/coremldata.bin"],
          ".mlpackage": ["Manifest.json", "Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin"]}


def repo_files(repo: str) -> list:
    files = []
    for folder, listing in LAYOUTS[repo]["folders"].items():
        for entry in listing["entries"]:
            path = f"{folder}/{entry}" if folder else entry
            suffix = Path(entry).suffix
            files += [f"{path}/{inner}" for inner in BUNDLE[suffix]] if suffix in BUNDLE else [path]
    return files


def coreml_entries():
    return [e for e in registry.list_models() if e.coreml]


def fetched(plan, files) -> set:
    return {f for f in files if any(fnmatch.fnmatch(f, p) for p in plan.patterns)}


def models_fetched(plan, files) -> set:
    return {f[len(plan.folder) + 1:].split("/", 1)[0] if plan.folder else f.split("/", 1)[0]
            for f in fetched(plan, files) if Path(f).suffixes and ".ml" in f}


# ------------------------------------------------------------------ every entry

def test_every_core_ml_entry_names_a_recorded_repository():
    assert {e.coreml["repo"] for e in coreml_entries()} <= set(LAYOUTS)
    names = {e.name for e in coreml_entries()}
    assert {"sd-1.5", "sd-1.5-palettized", "sd-2.1-base", "sd-2.1-base-palettized", "sdxl", "sdxl-mixed-bit"} <= names


@pytest.mark.parametrize("entry", coreml_entries(), ids=lambda e: e.name)
@pytest.mark.parametrize("cores", [12, 4])
def test_each_entry_resolves_to_compiled_models_and_only_the_parts_a_generation_needs(entry, cores, monkeypatch):
    monkeypatch.setattr(sources, "performance_cores", lambda: cores)
    files = repo_files(entry.coreml["repo"])
    plan, attention, reason = sources.entry_plan(entry, files=files)
    assert plan.compiled, "Apple's compiled models are preferred: a load then compiles nothing"
    wanted = set(plan.stages)
    assert "SafetyChecker" not in wanted and "VAEEncoder" not in wanted
    assert {"VAEDecoder"} <= wanted and wanted & {"TextEncoder", "TextEncoder2"}
    denoiser = wanted - {"TextEncoder", "TextEncoder2", "VAEDecoder"}
    if entry.coreml.get("denoiser") == "UnetRefiner":  # the refiner: its UNet and bigG encoder only
        assert wanted == {"TextEncoder2", "UnetRefiner", "VAEDecoder"}
    else:
        assert denoiser in ({"Unet"}, {"UnetChunk1", "UnetChunk2"}) or all(map(res.is_mmdit_stage, denoiser))
    # nothing else of the repository is fetched: no second UNet, no zip, no other variant
    assert models_fetched(plan, files) == {plan.stages[s] for s in wanted}
    assert not any(f.endswith(".zip") for f in fetched(plan, files))
    variants = entry.coreml["variants"]
    assert plan.folder.startswith(variants[attention]) and attention in variants
    offered_engine = [a for a in variants if a in res.NEURAL_ENGINE_ATTENTIONS]
    if cores >= 8 or not offered_engine:
        assert attention == "original", reason
    else:
        assert attention == offered_engine[0], reason


def test_the_layouts_as_published():
    """The facts the issue named, each checked against the recorded listings."""
    def plan(name, **kw):
        entry = registry.get_entry(name)
        return sources.entry_plan(entry, files=repo_files(entry.coreml["repo"]), **kw)[0]
    assert registry.get_entry("sd-1.5-palettized").coreml["repo"] == "apple/coreml-stable-diffusion-v1-5-palettized"
    assert plan("sd-1.5-palettized", attention="split_einsum").folder == "split_einsum_v2/compiled"
    assert plan("sd-1.5", attention="split_einsum").stages["Unet"] == "Unet.mlmodelc"  # whole UNet on a Mac
    assert plan("sdxl").folder == "compiled" and set(plan("sdxl").stages) == {
        "TextEncoder", "TextEncoder2", "Unet", "VAEDecoder"}
    mbp = plan("sdxl-mixed-bit")
    assert mbp.folder == "coreml-stable-diffusion-xl-base_mbp_4_50_palettized/compiled"
    assert set(plan("sd-1.5").patterns) >= {"original/compiled/vocab.json", "original/compiled/merges.txt"}


def test_packages_are_fetched_only_to_quantize_and_only_where_they_exist():
    entry = registry.get_entry("sdxl")
    files = repo_files(entry.coreml["repo"])
    plan = sources.entry_plan(entry, packages=True, files=files)[0]
    assert plan.folder == "packages" and not plan.compiled
    assert plan.stages["Unet"] == "Stable_Diffusion_version_stabilityai_stable-diffusion-xl-base-1.0_unet.mlpackage"
    # the tokenizer files live beside the compiled models
    assert {"compiled/vocab.json", "compiled/merges.txt"} <= fetched(plan, files)
    palettized = registry.get_entry("sd-1.5-palettized")  # its packages' listing is not confirmed: none recorded
    with pytest.raises(UserError, match="no complete set of packages"):
        sources.entry_plan(palettized, packages=True, files=repo_files(palettized.coreml["repo"]))


def test_image_to_image_and_the_refiner_fetch_their_extra_models():
    files = repo_files("apple/coreml-stable-diffusion-xl-base-with-refiner")
    with_encoder = sources.plan_download(files, "", vae_encoder=True)
    assert set(with_encoder.stages) == {"TextEncoder", "TextEncoder2", "Unet", "VAEDecoder", "VAEEncoder"}
    refiner = sources.plan_download(files, "", refiner=True)
    assert set(refiner.stages) == {"TextEncoder2", "UnetRefiner", "VAEDecoder"}
    with pytest.raises(UserError):  # the base repository has no refiner
        sources.plan_download(repo_files("apple/coreml-stable-diffusion-xl-base"), "", refiner=True)


# ------------------------------------------------------------------ Apple's choice of attention and units

@pytest.mark.parametrize("units,cores,offered,expected", [
    (None, None, ["original", "split_einsum"], "original"),        # unknown cores: Apple's Mac default
    (None, 10, ["original", "split_einsum"], "original"),
    (None, 4, ["original", "split_einsum"], "split_einsum"),       # M1/M2 base: the Neural Engine
    (None, 4, ["original", "split_einsum_v2"], "split_einsum_v2"),
    ("CPU_AND_GPU", 4, ["original", "split_einsum"], "original"),
    ("CPU_ONLY", 4, ["original", "split_einsum"], "original"),
    ("CPU_AND_NE", 12, ["original", "split_einsum", "split_einsum_v2"], "split_einsum_v2"),
    ("ALL", 12, ["original", "split_einsum", "split_einsum_v2"], "split_einsum"),
    ("CPU_AND_NE", 12, ["original"], "original"),                  # SDXL: ORIGINAL only
])
def test_attention_follows_swift_coreml_diffusers(units, cores, offered, expected):
    assert sources.recommended_settings(offered, None, units, cores)[0] == expected


def test_asked_attention_wins_and_split_einsum_means_the_neural_engine_variant_offered():
    assert sources.recommended_settings(["original", "split_einsum_v2"], "split_einsum")[0] == "split_einsum_v2"
    with pytest.raises(UserError, match="no split_einsum Core ML variant"):
        sources.recommended_settings(["original"], "split_einsum")


# ------------------------------------------------------------------ the Hub cache, offline

def _hub_cache(cache: Path, repo: str) -> Path:
    snapshot = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    for name in repo_files(repo):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(b"")
    (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "performance_cores", lambda: 10)
    return tmp_path / "hub"


@pytest.mark.parametrize("name,folder", [("sd-1.5", "original/compiled"), ("sd-1.5-palettized", "original/compiled"),
                                         ("sdxl", "compiled"), ("sd3-medium-4step", "coremlsd3_4step")])
def test_a_cached_repository_resolves_offline_to_its_compiled_folder(offline_hub, name, folder):
    entry = registry.get_entry(name)
    snapshot = _hub_cache(offline_hub, entry.coreml["repo"])
    located = sources.locate(name)
    assert located.folder == snapshot / folder and located.entry == entry
    assert set(res._models_in(located.folder)) >= {"TextEncoder", "VAEDecoder"}


def test_an_uncached_repository_offline_is_one_sentence(offline_hub):
    with pytest.raises(UserError, match="not downloaded and offline mode is on"):
        sources.locate("sd-2.1-base")


def test_a_local_folder_of_apples_palettized_layout_is_recognised(tmp_path, monkeypatch):
    for folder in ("original/compiled", "split_einsum_v2/compiled"):
        for name in LAYOUTS["apple/coreml-stable-diffusion-v1-5-palettized"]["folders"][folder]["entries"]:
            path = tmp_path / "repo" / folder / name
            (path.mkdir(parents=True) if name.endswith(".mlmodelc") else
             (path.parent.mkdir(parents=True, exist_ok=True), path.write_text("")))
    monkeypatch.setattr(sources, "performance_cores", lambda: 4)
    located = sources.locate(str(tmp_path / "repo"))
    assert located.folder == tmp_path / "repo" / "split_einsum_v2" / "compiled"
    assert located.offered == ["original", "split_einsum_v2"] and located.attention == "split_einsum_v2"
    assert res._attention_from_name(located.folder) == "split_einsum_v2"
    assert sources.locate(str(tmp_path / "repo"), units="CPU_AND_GPU").folder.parent.name == "original"


def test_a_folder_that_is_not_resources_is_never_walked(tmp_path):
    """A model given as "/" (or any big folder) gets a sentence at once: only Apple's variant places are looked at."""
    import time
    from backend.engines.select import coreml_resources_for
    for i in range(80):
        (tmp_path / f"d{i}" / "x" / "y").mkdir(parents=True)
    started = time.perf_counter()
    assert coreml_resources_for("/") is None and coreml_resources_for(str(tmp_path)) is None
    for folder in ("/", tmp_path):
        with pytest.raises(UserError, match="too many folders to be a resources folder"):
            res.find_resources(folder)
    assert time.perf_counter() - started < 1.0
