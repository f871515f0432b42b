"""The embedded model: its data generator, the image analysis that judges it, and the shipped model itself."""
import backend  # noqa: F401  (OpenBLAS before mlx)

import numpy as np
from PIL import Image, ImageFilter

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


def test_analysis_sees_no_object_on_a_plain_image():
    plain = np.full((64, 64, 3), dataset.COLORS["green"], np.uint8)
    reading = analysis.read_scene(plain)
    assert reading.background == "green" and reading.color is None and reading.shape is None
