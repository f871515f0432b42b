"""The Models tab and model folders: each registry entry's state and size, the download button, the dropdown's
"(not downloaded)" marks and native settings without a download; adding a folder only when the server allows it
(and from loopback), only a folder that holds a model, never a built-in name; "/" and other non-model folders
answered at once; an incomplete tokenizer named in one sentence (the loader and the CLI)."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest

from backend import registry
from backend.types import UserError
from tests.tiny_models import fake_hub_cache

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-shapes"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hub cache in a tmp folder, offline, no login, and a tmp home for the user's models file."""
    import huggingface_hub.constants as c
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("SILICON_DIFFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "USER_MODELS_FILE", None)
    return cache


def loopback(host="127.0.0.1", **headers):
    return gr.Request(client={"host": host, "port": 50000}, headers=headers)


def make_app(mode="off", model=str(TINY)):
    import app as webapp
    return webapp.App(model, add_folder=mode)


def message(html: str) -> str:
    return html.split("<span class='msg'>")[1].split("</span>")[0] if "<span class='msg'>" in html else html


# ----------------------------------------------------------------------------------- states, sizes, defaults

def test_every_generate_model_has_native_settings_without_a_download(hub):
    from backend.session import model_defaults
    from ui.generate import GenerateTab
    for entry in registry.list_models():
        if entry.hub and not entry.refines:
            d = model_defaults(entry.name)
            assert d is not None, entry.name
            assert d["width"] == d["height"] == registry.native_defaults(entry)["size"]
    d = model_defaults("sd-1.5")
    assert (d["steps"], d["guidance"], d["scheduler"], d["width"], d["size_step"]) == (25, 7.5, "dpmpp_2m", 512, 8)
    sd3 = model_defaults("sd3-medium")
    assert (sd3["width"], sd3["size_step"], sd3["scheduler"]) == (1024, 16, "flow_euler")
    assert "flow_euler" in sd3["schedulers"] and "ddim" not in sd3["schedulers"]
    steps, guidance, scheduler, width, height = GenerateTab.on_model_change("sd-1.5")  # the Generate tab's event
    assert (steps, guidance, width["value"], height["value"]) == (25, 7.5, 512, 512)
    assert model_defaults("someone/not-in-the-registry") is None  # nothing known without a download


def test_states_sizes_and_marks_follow_the_hub_cache(hub, monkeypatch):
    from ui.common import model_choices
    from ui.models import ModelsTab
    labels = dict((v, k) for k, v in model_choices())
    assert labels["sd-1.5"] == "Stable Diffusion 1.5 (not downloaded)"
    assert labels["tiny-shapes"].endswith("(embedded, 64x64, trained by this project)")

    status = {e.name: registry.model_status(e) for e in registry.list_models()}
    assert status["tiny-shapes"].state == "embedded" and status["tiny-shapes"].disk_bytes > 1_000_000
    assert status["sd-1.5"].state == "not downloaded" and status["sd-1.5"].download_gb == 2.1
    assert status["sd3-medium"].state == "needs Hub login"  # gated, and no token is found
    assert "hf auth login" in status["sd3-medium"].detail
    assert status["sd-turbo"].coreml.startswith("needs export for Core ML")
    assert status["sd-1.5"].coreml.startswith("published: apple/coreml-stable-diffusion-v1-5")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert registry.hub_token_found()
    assert registry.model_status(registry.get_entry("sd3-medium")).state == "not downloaded"
    monkeypatch.delenv("HF_TOKEN")

    fake_hub_cache(hub, SD15, TINY)
    s = registry.model_status(registry.get_entry("sd-1.5"))
    assert s.state == "downloaded" and s.disk_bytes > 1_000_000
    assert dict((v, k) for k, v in model_choices())["sd-1.5"] == "Stable Diffusion 1.5"
    table = ModelsTab.registry_table().set_index("Name")
    assert table.loc["sd-1.5", "State"] == "downloaded" and table.loc["sd-1.5", "Size"].endswith("MB on disk")
    assert table.loc["sdxl", "Size"] == "≈ 6.9 GB to download"
    assert table.loc["sd3-medium", "State"] == "needs Hub login"
    assert table.loc["tiny-shapes", "State"] == "embedded"


def test_a_configs_only_cache_is_not_downloaded(hub):
    configs = hub.parent / "configs-only"
    shutil.copytree(TINY, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    fake_hub_cache(hub, SD15, configs)
    assert registry.model_status(registry.get_entry("sd-1.5")).state == "not downloaded"


def test_the_download_button_fetches_the_picked_entry_with_progress(hub):
    app = make_app()
    calls = []
    progress = lambda *a, **k: calls.append((a, k))  # noqa: E731  (gr.Progress's call)
    out = app.download("sd-1.5", progress=progress)
    assert "offline mode" in message(out[0]) and all(isinstance(o, dict) for o in out[1:])  # skipped
    fake_hub_cache(hub, SD15, TINY)
    out = app.download("sd-1.5", progress=progress)
    assert "is ready" in message(out[0]) and calls
    progress_html, cached, delete_pick, info, table, model, cmp_model, pick = out
    assert SD15 in cached["Repository"].tolist() and SD15 in delete_pick["choices"]
    assert table.set_index("Name").loc["sd-1.5", "State"] == "downloaded"
    assert ("Stable Diffusion 1.5", "sd-1.5") in model["choices"] and model["choices"] == cmp_model["choices"]
    assert "downloaded" in info
    assert "nothing to download" in message(app.download("tiny-shapes", progress=progress)[0])


# ----------------------------------------------------------------------------------- adding a model folder

def test_the_option_reaches_the_app_and_is_off_by_default(monkeypatch):
    import app as webapp
    made = []
    monkeypatch.setattr(webapp, "launch", lambda app, *a, **k: made.append(app))
    for argv, mode in (([], "off"), (["--allow-add-folder"], "local"), (["--allow-add-folder", "any"], "any")):
        webapp.main(argv)
        assert made[-1].add_folder_mode == mode
    assert webapp.App().add_folder_mode == "off"


def test_adding_a_folder_is_off_unless_allowed_and_loopback_only(hub, tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(TINY, folder)
    off = make_app("off")
    out = off.add_folder(str(folder), "", loopback())
    assert "off" in message(out[0]) and "--allow-add-folder" in message(out[0])
    note, *controls = off.add_folder_section(loopback())
    assert "--allow-add-folder" in note and all(c["interactive"] is False for c in controls)
    assert not registry.user_models_file().exists()

    local = make_app("local")
    for request, why in ((loopback("192.168.1.20"), "came from 192.168.1.20"),
                         (loopback(**{"X-Forwarded-For": "203.0.113.9"}), "through a proxy"), (None, "unknown")):
        assert why in message(local.add_folder(str(folder), "", request)[0])
        assert all(c["interactive"] is False for c in local.add_folder_section(request)[1:])
    local.shared = True  # a public link: every client looks local
    assert "public link" in message(local.add_folder(str(folder), "", loopback())[0])
    local.shared = False
    assert all(c["interactive"] is True for c in local.add_folder_section(loopback("::1"))[1:])
    out = local.add_folder(str(folder), "", loopback("::1"))
    assert "Added my-model" in message(out[0])
    table, model, cmp_model, pick = out[1:]
    assert "my-model" in table["Name"].tolist()  # the added folder appears in the table
    assert table.set_index("Name").loc["my-model", "State"] == "local folder"
    assert ("my-model (local folder)", "my-model") in model["choices"]

    remote = make_app("any")
    assert "Added other" in message(remote.add_folder(str(folder), "other", loopback("198.51.100.4"))[0])
    assert [e.name for e in registry.list_models()][-2:] == ["my-model", "other"]


@pytest.mark.parametrize("given, sentence", [
    ("/", "the filesystem root, not a model folder"),
    ("HOME", "a home folder, not a model folder"),
    ("PLAIN", "not a model folder: it has no model_index.json"),
])
def test_non_model_folders_are_refused_at_once_and_never_remembered(hub, tmp_path, monkeypatch, given, sentence):
    from backend.pipeline import load_pipeline
    home = tmp_path / "user"
    (home / "Pictures").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(50):
        (plain / f"photo-{i}.jpg").write_bytes(b"x")
    folder = {"/": "/", "HOME": str(home), "PLAIN": str(plain)}[given]
    app = make_app("local")
    for call in (lambda: registry.add_local_model(folder), lambda: registry.resolve(folder),
                 lambda: registry.load_spec(folder), lambda: load_pipeline(folder)):
        start = time.perf_counter()
        with pytest.raises(UserError, match=sentence):
            call()
        assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    out = app.add_folder(folder, "", loopback())
    assert sentence in message(out[0]) and time.perf_counter() - start < 1.0
    start = time.perf_counter()
    with pytest.raises(gr.Error, match=sentence):
        list(app.generate_api("a red circle", "", folder, "auto", "auto", "auto", "default", -1, -1, -1, -1, -1,
                              request=loopback(), progress=lambda *a, **k: None))  # a generator: run it
    assert time.perf_counter() - start < 1.0
    assert not registry.user_models_file().exists()


def test_an_added_folder_must_hold_a_whole_model_under_a_new_name(hub, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(TINY, good)
    for folder, name, sentence in (
            ("relative/path", None, "full path"), (str(tmp_path / "nowhere"), None, "does not exist"),
            (str(good / "unet" / "config.json"), None, "is not a folder"),
            (str(good), "sd-1.5", "built-in model's name"), (str(good), "tiny-shapes", "built-in model's name"),
            (str(good), "../escape", "cannot name a model"), (str(good), "owner/name", "cannot name a model")):
        with pytest.raises(UserError, match=sentence):
            registry.add_local_model(folder, name)
    sdxl = tmp_path / "sdxl"  # the folder's own name is the default name: it must not shadow either
    shutil.copytree(TINY, sdxl)
    with pytest.raises(UserError, match="built-in model's name"):
        registry.add_local_model(str(sdxl))
    no_merges = tmp_path / "no-merges"
    shutil.copytree(TINY, no_merges)
    (no_merges / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(UserError, match="merges.txt missing"):
        registry.add_local_model(str(no_merges))
    pickled = tmp_path / "pickled"
    shutil.copytree(TINY, pickled)
    (pickled / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (pickled / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="only has pickle weights"):
        registry.add_local_model(str(pickled))
    assert not registry.user_models_file().exists()  # nothing was remembered

    entry = registry.add_local_model(str(good), "mine")
    assert entry.path == str(good.resolve()) and registry.get_entry("mine").local_folder == good.resolve()
    assert json.loads(registry.user_models_file().read_text()) == [
        {"name": "mine", "title": "mine (local folder)", "path": str(good.resolve())}]


def test_a_hand_written_user_file_cannot_shadow_or_break_the_registry(hub):
    path = registry.user_models_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([{"name": "sd-1.5", "title": "evil", "path": "/"},
                                {"name": "relative", "title": "r", "path": "some/folder"},
                                {"name": "odd", "title": "o", "path": "/nowhere", "unknown_key": 1}, "junk"]))
    assert registry.get_entry("sd-1.5").hub == SD15
    assert registry.get_entry("relative") is None
    odd = registry.get_entry("odd")
    assert odd is not None and registry.model_status(odd).state == "missing"
    path.write_text("{not json")
    assert [e.name for e in registry.list_models()] == [e.name for e in registry.builtin_models()]


# ----------------------------------------------------------------------------------- incomplete tokenizer

def test_an_incomplete_tokenizer_is_one_sentence_from_the_loader_and_the_cli(tmp_path):
    from backend.pipeline import load_pipeline
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    (folder / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(UserError, match="tokenizer in .* is incomplete: merges.txt missing"):
        load_pipeline(str(folder), engine="mlx")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for model, sentence in ((str(folder), "merges.txt missing"), ("/", "the filesystem root, not a model folder")):
        proc = subprocess.run([sys.executable, "-m", "backend", "generate", "--model", model, "--prompt", "x",
                               "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120,
                              env=env, cwd=ROOT)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and sentence in lines[0], proc.stderr
        assert not (tmp_path / "x.png").exists()
