"""Where the app finds LoRA files: the LoRA folder and the LoRA repositories of the Hub cache, and the API's list."""
import pytest

from backend import lora_files
from backend.types import UserError


def _repo(cache, repo_id, files):
    snapshot = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("0" * 40)
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(b"{}")
    (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)


@pytest.fixture
def places(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    cache = tmp_path / "hub"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("SILICON_DIFFUSION_LORA_DIR", str(tmp_path / "loras"))
    (tmp_path / "loras" / "styles").mkdir(parents=True)
    for name in ("loras/ink.safetensors", "loras/styles/watercolor.safetensors", "loras/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    _repo(cache, "someone/pixel-art-lora", ["pixel_art.safetensors", "README.md"])
    _repo(cache, "someone/a-model", ["model_index.json", "unet/diffusion_pytorch_model.safetensors",
                                     "extra.safetensors"])
    return tmp_path


def test_the_lora_folder_and_the_hubs_lora_repositories_are_listed(places):
    names = [f.name for f in lora_files.find_lora_files()]
    assert names == ["ink.safetensors", "watercolor.safetensors", "pixel_art.safetensors"]  # not a model's files


def test_the_apis_list_takes_names_or_paths_with_scales(places):
    chosen = lora_files.parse_lora_list("ink.safetensors:0.5,\n pixel_art.safetensors")
    assert [(name.rsplit("/", 1)[-1], scale) for name, scale in chosen] == [("ink.safetensors", 0.5),
                                                                            ("pixel_art.safetensors", 1.0)]
    assert lora_files.parse_lora_list("") == []
    with pytest.raises(UserError, match="was not found"):
        lora_files.parse_lora_list("missing.safetensors:1")
    with pytest.raises(UserError, match="safetensors only"):
        lora_files.parse_lora_list(str(places / "loras" / "notes.txt"))
