"""Text encoder outputs reused per token row (backend/text_rows.py) on the tiny pipelines: each distinct row is
encoded once, kept rows give the same images, a LoRA context or an evicted row is encoded again, and SDXL's zeroed
unconditional half is not encoded at all (its images against diffusers: test_pipeline_parity)."""
import numpy as np

from backend import GenerationRequest
from backend.pipeline import load_pipeline
from backend.text_rows import EncodedRows


def _request(**kw):
    base = dict(prompt="a red circle at the top", steps=2, guidance=5.0, scheduler="euler", width=32, height=32,
                seed=3)
    return GenerationRequest(**{**base, **kw})


def test_a_guided_batch_encodes_each_distinct_row_once_and_reruns_reuse_them(tiny_pipelines):
    _, folder = tiny_pipelines("sd1")
    pipe = load_pipeline(str(folder), engine="mlx", precision="fp32")
    first = pipe.generate(_request(negative_prompt="blue square", batch_size=2))
    assert pipe.text_rows.encoded == 2  # the negative and the prompt, not 2 x 2 rows
    assert not first.timings.text_reused
    again = pipe.generate(_request(negative_prompt="blue square", batch_size=2, seed=4))
    assert pipe.text_rows.encoded == 2 and again.timings.text_reused  # nothing new to encode
    assert again.measurements()["seconds"]["text_reused"] is True
    fresh = load_pipeline(str(folder), engine="mlx", precision="fp32")
    same_seed = fresh.generate(_request(negative_prompt="blue square", batch_size=2, seed=4))
    np.testing.assert_array_equal(again.pixels, same_seed.pixels)
    assert not np.array_equal(first.pixels, again.pixels)  # the seed still counts
    pipe.generate(_request(negative_prompt="green", batch_size=1))
    assert pipe.text_rows.encoded == 3  # only the new negative


def test_sdxl_does_not_encode_the_unconditional_half_it_zeroes(tiny_pipelines):
    _, folder = tiny_pipelines("sdxl")
    pipe = load_pipeline(str(folder), engine="mlx", precision="fp32")
    assert pipe.spec.force_zeros_for_empty_prompt
    pipe.generate(_request(negative_prompt=""))
    assert pipe.text_rows.encoded == 2  # the prompt's row in each of the two encoders


def test_context_and_eviction_decide_what_is_encoded_again(tiny_pipelines):
    _, folder = tiny_pipelines("sd1")
    pipe = load_pipeline(str(folder), engine="mlx", precision="fp32")
    tokenizer = pipe.tokenizers[0]
    ids = {w: np.array([tokenizer.encode(w).ids], np.int32) for w in ("red", "green", "blue")}
    rows = EncodedRows(kept=2)
    red = rows.encode(0, ids["red"], "", pipe.stages.encode_text)
    np.testing.assert_array_equal(red.hidden, pipe.stages.encode_text(0, ids["red"]).hidden)
    rows.encode(0, ids["red"], "lora-a", pipe.stages.encode_text)
    assert rows.encoded == 2  # another LoRA context: encoded again
    rows.encode(0, ids["green"], "", pipe.stages.encode_text)
    rows.encode(0, ids["blue"], "", pipe.stages.encode_text)
    assert rows.encoded == 4
    rows.encode(0, ids["blue"], "", pipe.stages.encode_text)
    assert rows.encoded == 4  # kept
    again = rows.encode(0, ids["red"], "", pipe.stages.encode_text)
    assert rows.encoded == 5  # evicted (two rows kept), encoded again, to the same result
    np.testing.assert_array_equal(again.hidden, red.hidden)
