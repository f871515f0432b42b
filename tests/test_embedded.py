"""The embedded model: its data generator, the image analysis that judges it, and the shipped model itself."""
import backend  # noqa: F401  (OpenBLAS before mlx)

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from backend.embedded import analysis, dataset


def test_captions_follow_the_grammar_and_parse_back():
    rng = np.random.default_rng(0)
    for _ in range(200):
        full, partial = dataset.random_scene(rng)
        assert full.color != full.background
        assert dataset.parse_caption(partial.caption()) == partial
        assert dataset.parse_caption(full.caption()) == full
    caption = dataset.Scene("large", "red", "circle", "at the top", "blue").caption()
    assert caption == "a large red circle at the top on a blue background"
    assert dataset.Scene(color="red").caption() == "a red shape"


def test_completion_fills_only_what_the_caption_leaves_open():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = dataset.complete(dataset.Scene(color="white", position="on the left"), rng)
        assert scene.color == "white" and scene.position == "on the left" and scene.background != "white"
        assert None not in scene.said().values() and len(scene.said()) == 5


def test_data_is_deterministic():
    a_images, a_captions = dataset.make_dataset(8, seed=3)
    b_images, b_captions = dataset.make_dataset(8, seed=3)
    c_images, _ = dataset.make_dataset(8, seed=4)
    assert a_captions == b_captions and np.array_equal(a_images, b_images)
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (8, 64, 64, 3) and a_images.dtype == np.uint8


def test_every_caption_word_is_in_the_vocabulary():
    words = set(dataset.vocabulary())
    for caption in dataset.evaluation_captions(50):
        assert set(caption.split()) <= words


def test_every_caption_fits_the_models_text_context(tmp_path):
    """Each vocabulary word is one token, so a full caption is its words plus BOS and EOS (13 tokens)."""
    from backend.embedded.model import TEXT_LENGTH
    from backend.tokenizer import CLIPTokenizer
    from backend.vocab import write_tokenizer_folder
    tokenizer = CLIPTokenizer.from_folder(write_tokenizer_folder(tmp_path, dataset.vocabulary(), max_length=TEXT_LENGTH))
    assert all(len(tokenizer.tokens(word)) == 1 for word in dataset.vocabulary())
    for caption in dataset.evaluation_captions(200):
        encoded = tokenizer.encode(caption)
        assert encoded.length == len(caption.split()) + 2 <= TEXT_LENGTH and not encoded.truncated, caption


def test_analysis_reads_the_generators_clean_images():
    wrong = {k: 0 for k in ("background", "color", "position", "shape")}
    n = 400
    for i in range(n):
        _, image, scene = dataset.sample(i, seed=11)
        for field, ok in analysis.read_scene(image).matches(scene.said()).items():
            wrong[field] += not ok
    assert wrong == {k: 0 for k in wrong}, wrong


def test_analysis_tolerates_mild_blur_and_noise():
    rng = np.random.default_rng(2)
    correct, n = 0, 200
    for i in range(n):
        _, image, scene = dataset.sample(i, seed=12)
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)), np.float32)
        noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
        correct += all(analysis.read_scene(noisy).matches(scene.said()).values())
    assert correct >= 0.95 * n


def _drawn(shape: str, side: int, amount: float) -> np.ndarray:
    """A yellow shape on blue, `side` pixels wide at 64x64: a square with corners rounded by `amount` of its
    half-side ("rounded"), or with its sides bowed in by `amount` of its side ("bowed")."""
    big = Image.new("RGB", (256, 256), dataset.COLORS["blue"])
    draw, s = ImageDraw.Draw(big), side * 4
    x0, x1, mid, dent = 128 - s // 2, 128 + s // 2, 128, amount * s
    if shape == "rounded":
        draw.rounded_rectangle((x0, x0, x1, x1), radius=int(amount * s / 2), fill=dataset.COLORS["yellow"])
    else:
        draw.polygon([(x0, x0), (mid, x0 + dent), (x1, x0), (x1 - dent, mid), (x1, x1), (mid, x1 - dent),
                      (x0, x1), (x0 + dent, mid)], fill=dataset.COLORS["yellow"])
    return np.asarray(big.resize((64, 64), Image.Resampling.BOX))


@pytest.mark.parametrize("side", [14, 23])
def test_analysis_tells_squares_from_circles_by_their_corners(side):
    """A square with bowed sides (as models often draw them) is a square; one rounded most of the way is not."""
    for bowed in (0.08, 0.10):   # they fill under 0.89 of their box, where fill alone says "circle"
        reading = analysis.read_scene(_drawn("bowed", side, bowed))
        assert reading.shape == "square" and reading.fill < 0.89, (bowed, reading)
    assert analysis.read_scene(_drawn("rounded", side, 0.3)).shape == "square"
    assert analysis.read_scene(_drawn("rounded", side, 0.8)).shape == "circle"
    assert analysis.read_scene(_drawn("rounded", side, 1.0)).shape == "circle"


def test_analysis_sees_no_object_on_a_plain_image():
    plain = np.full((64, 64, 3), dataset.COLORS["green"], np.uint8)
    reading = analysis.read_scene(plain)
    assert reading.background == "green" and reading.color is None and reading.shape is None


# ------------------------------------------------------------------------------------------------
# The shipped model
# ------------------------------------------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "tiny-shapes"
# (caption, seed): full captions over every color, shape and position; checked at a few steps.
CASES = [
    ("a large red circle in the center on a blue background", 0),
    ("a large yellow square on the left on a black background", 1),
    ("a small white triangle at the top on a green background", 2),
    ("a large blue square on the right on a orange background", 3),
    ("a large purple circle at the bottom on a white background", 4),
    ("a small green square on the right on a purple background", 5),
]


@pytest.fixture(scope="module")
def shipped_pipeline():
    return backend.load_pipeline(str(SHIPPED), engine="mlx", precision="fp16")


def test_shipped_model_folder_is_small_and_complete():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    names = {p.relative_to(SHIPPED).as_posix() for p in files}
    assert {"model_index.json", "silicon_diffusion.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
            "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors"} <= names
    settings = json.loads((SHIPPED / "silicon_diffusion.json").read_text())
    assert settings["scheduler"] == "dpmpp_2m" and settings["size"] >= 64


def test_shipped_model_draws_what_the_caption_says(shipped_pipeline):
    right = {"background": 0, "color": 0, "position": 0}
    for caption, seed in CASES:
        result = shipped_pipeline.generate(backend.GenerationRequest(prompt=caption, steps=10, seed=seed))
        assert result.image.size == (64, 64)
        reading = analysis.read_scene(result.image)
        expected = dataset.parse_caption(caption)
        right["background"] += reading.background == expected.background
        right["color"] += reading.color == expected.color
        right["position"] += reading.position == expected.position
    n = len(CASES)
    assert right["background"] == n and right["color"] >= n - 1 and right["position"] >= n - 1, right


def test_shipped_model_loads_in_diffusers_with_the_same_result(shipped_pipeline):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(str(SHIPPED), safety_checker=None,
                                                                   requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    caption = "a large red circle in the center on a blue background"
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    expected = reference(caption, num_inference_steps=4, guidance_scale=4.0, latents=noise, output_type="np").images[0]
    fp32 = backend.load_pipeline(str(SHIPPED), engine="mlx", precision="fp32")
    ours = fp32.generate(backend.GenerationRequest(prompt=caption, steps=4, guidance=4.0, latents=noise.numpy(), seed=0))
    assert np.abs(np.asarray(ours.image, np.float32) / 255 - expected).max() < 0.02


def test_shipped_model_draws_one_shape_on_a_plain_background(shipped_pipeline):
    """One object on a uniform background, every time."""
    for caption, seed in CASES:
        reading = analysis.read_scene(shipped_pipeline.generate(
            backend.GenerationRequest(prompt=caption, steps=10, seed=seed)).image)
        assert reading.background is not None and reading.color is not None and reading.shape is not None


def test_shipped_model_still_follows_captions_at_4_bits():
    q4 = backend.load_pipeline(str(SHIPPED), engine="mlx", precision="fp16", quantization="q4")
    caption, seed = CASES[1]
    reading = analysis.read_scene(q4.generate(backend.GenerationRequest(prompt=caption, steps=10, seed=seed)).image)
    expected = dataset.parse_caption(caption)
    assert (reading.background, reading.color, reading.position) == \
        (expected.background, expected.color, expected.position)


def test_shipped_model_exports_to_core_ml(tmp_path):
    pytest.importorskip("coremltools")
    pytest.importorskip("torch")
    from backend.engines.coreml.export import export
    found = export(SHIPPED, tmp_path / "coreml", attention="split_einsum", model_version="tiny-shapes")
    assert set(found.models) == {"TextEncoder", "Unet", "VAEDecoder"}
    assert found.attention == "split_einsum"
    unet = found.io("Unet")
    assert unet.inputs["sample"].shape == (2, 4, 16, 16)
    assert found.io("VAEDecoder").outputs["image"].shape == (1, 3, 64, 64)


def test_a_model_folder_loads_for_training_with_its_own_configs(tmp_path):
    """load_folder (resume, fine-tune) takes the folder's vocabulary size and widths, not the current constants."""
    from backend.embedded.model import UNET_CONFIG, Parts, load_folder, save_folder
    config = json.loads((SHIPPED / "text_encoder" / "config.json").read_text())
    parts = load_folder(SHIPPED)
    assert parts.text_encoder.text_model.embeddings.token_embedding.weight.shape == \
        (config["vocab_size"], config["hidden_size"])
    wider = {**UNET_CONFIG, "block_out_channels": [64, 64, 64, 64]}
    folder = save_folder(Parts(unet_config=wider), tmp_path / "wider")
    assert load_folder(folder).unet.conv_in.weight.shape[0] == 64


def test_the_embedded_model_shows_its_words_and_warns_about_others(shipped_pipeline, tiny_pipelines):
    from backend.session import prompt_help
    from ui.present import prompt_help_html
    words, example, ignored = prompt_help(str(SHIPPED), "a large red cat at the top")
    assert set(dataset.vocabulary()) == set(words) and ignored == ["cat"]
    assert dataset.parse_caption(example).color  # the example is a caption of its own grammar
    assert "Ignored in this prompt: cat" in prompt_help_html((words, example, ignored))
    assert prompt_help(str(tiny_pipelines("sd1")[1]), "a cat") is None  # a model that declares no vocabulary
    result = shipped_pipeline.generate(backend.GenerationRequest(prompt="a large red cat at the top", steps=2, seed=1))
    assert any("cat mean nothing to it" in w for w in result.warnings)
    clean = shipped_pipeline.generate(backend.GenerationRequest(prompt=example, steps=2, seed=1))
    assert not any("mean nothing" in w for w in clean.warnings)
