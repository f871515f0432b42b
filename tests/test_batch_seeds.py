"""Batches: image i of a batch drawn with seed S is the image seed S + i gives alone (backend/seeds.py), with
a deterministic scheduler and with one that adds noise at every step; a batch of one is unchanged."""
import numpy as np
import pytest

from backend import GenerationRequest, load_pipeline
from backend.measure import psnr
from backend.seeds import BatchNoise, item_seed

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe(tiny_pipelines):
    return load_pipeline(str(tiny_pipelines("sd1")[1]), engine="mlx", precision="fp32")


def test_a_batch_of_one_draws_what_one_generator_always_drew():
    noise = BatchNoise(7, 1).standard_normal((1, 4, 8, 8))
    assert np.array_equal(noise, np.random.default_rng(7).standard_normal((1, 4, 8, 8)))
    batch = BatchNoise(7, 3)
    assert batch.seeds == [7, 8, 9] and item_seed(2**64 - 1, 1) == 0
    drawn = batch.standard_normal((3, 4, 8, 8))
    for i in range(3):
        assert np.array_equal(drawn[i], np.random.default_rng(7 + i).standard_normal((4, 8, 8)))


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_each_image_of_a_batch_is_reproduced_by_its_own_seed(pipe, scheduler):
    request = dict(prompt=PROMPT, steps=3, guidance=5.0, scheduler=scheduler)
    batch = pipe.generate(GenerationRequest(seed=11, batch_size=3, **request))
    assert batch.seeds == [11, 12, 13] and len(batch.images) == 3
    assert not np.array_equal(batch.pixels[0], batch.pixels[1])
    for i, seed in enumerate(batch.seeds):
        params = batch.image_parameters(i)
        assert params["seed"] == seed and params["batch_size"] == 1
        alone = pipe.generate(GenerationRequest(seed=params["seed"], **request))
        assert psnr(alone.pixels[0], batch.pixels[i]) >= 50.0
        assert np.abs(np.asarray(alone.image, np.int16) - np.asarray(batch.images[i], np.int16)).max() <= 1
    assert batch.image_parameters(0)["batch"] == {"index": 0, "size": 3, "first_seed": 11}
    single = pipe.generate(GenerationRequest(seed=11, **request))
    assert single.image_parameters(0) == single.parameters and single.seeds == [11]
