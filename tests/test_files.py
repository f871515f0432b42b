"""A model folder's small files are read bounded, and each bad one is one sentence naming it (CLI included)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backend import files
from backend.types import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_missing_oversized_binary_and_malformed_files_are_sentences(tmp_path):
    (tmp_path / "unet").mkdir()
    config = tmp_path / "unet" / "config.json"
    with pytest.raises(UserError, match="unet/config.json is missing"):
        files.read_json(config)
    config.write_bytes(b"{" + b" " * (files.CONFIG_BYTES + 1) + b"}")
    with pytest.raises(UserError, match="more than such a file can be"):
        files.read_json(config)
    config.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="is not a text file"):
        files.read_json(config)
    config.write_text('{"a": ')
    with pytest.raises(UserError, match="is not valid JSON"):
        files.read_json(config)
    config.unlink()
    config.mkdir()
    with pytest.raises(UserError, match="is not a regular file"):
        files.read_json(config)


@pytest.mark.parametrize("damage, sentence", [
    (lambda f: (f / "tokenizer" / "merges.txt").unlink(), "incomplete: merges.txt missing"),
    (lambda f: (f / "tokenizer" / "vocab.json").write_text('{"a": '), "tokenizer/vocab.json is not valid JSON"),
    (lambda f: (f / "unet" / "config.json").write_bytes(b"\x00" * (2 << 20)), "unet/config.json is 2.0 MB"),
])
def test_a_damaged_model_folder_is_one_line_from_the_cli(tmp_path, damage, sentence):
    folder = tmp_path / "model"
    shutil.copytree(ROOT / "assets" / "tiny-shapes", folder)
    damage(folder)
    proc = subprocess.run([sys.executable, "-m", "backend", "generate", "--model", str(folder), "--prompt", "x",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and sentence in lines[0], proc.stderr


def test_uploaded_images_are_size_and_pixel_limited_before_decoding(tmp_path):
    import struct
    import zlib
    from PIL import Image
    from backend.images import load_image

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    bomb = tmp_path / "bomb.png"  # a few hundred bytes declaring 20000 x 20000 pixels
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 20001 * 8)) + chunk(b"IEND", b""))
    with pytest.raises(UserError, match="declares more than 64 million pixels"):
        load_image(bomb, "init image")
    big = tmp_path / "big.png"
    Image.new("L", (9000, 8000)).save(big)
    with pytest.raises(UserError, match="9000x8000: more than 64 million pixels"):
        load_image(big, "init image")
    with pytest.raises(UserError, match="not an image"):
        load_image(_text_file(tmp_path), "mask")


def _text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    return path


def test_oversized_parameter_chunks_and_non_images_are_ignored_with_a_warning(tmp_path, caplog):
    from PIL import Image, PngImagePlugin
    from backend.png import read_parameters
    info = PngImagePlugin.PngInfo()
    info.add_text("silicon_diffusion", '{"prompt": "' + "x" * 100_000 + '"}')
    info.add_text("parameters", "a cat\nSteps: 3, Sampler: euler, CFG scale: 5, Seed: 4, Size: 8x8, Model: m")
    Image.new("RGB", (8, 8)).save(tmp_path / "huge.png", pnginfo=info)
    with caplog.at_level("WARNING"):
        params = read_parameters(tmp_path / "huge.png")
    assert params["seed"] == 4 and "ignored the silicon_diffusion chunk" in caplog.text  # the text chunk still read
    (tmp_path / "fake.png").write_text("hello")
    assert read_parameters(tmp_path / "fake.png") is None
