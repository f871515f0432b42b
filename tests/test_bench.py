"""backend.bench's own logic: what each text encoder row computes, and the engines taking turns over rounds."""
import numpy as np

from backend import bench


def test_text_rows_ask_what_each_pipeline_conditions_on():
    assert bench._conditioning("sd-1.5", "text_encoder") == (-1, False)   # last hidden state
    assert bench._conditioning("sdxl", "text_encoder") == (-2, False)     # penultimate, no pooled output
    assert bench._conditioning("sdxl", "text_encoder_2") == (-2, True)    # penultimate + projected pooled output
    ids = bench._text_ids()
    assert ids.shape == (2, 77) and (ids[:, 0] == 49406).all()
    # a 20-word prompt and an empty one: each row's first end token where the tokenizer puts it
    assert [int(np.argmax(row == 49407)) for row in ids] == [21, 1]
    assert len(set(ids[0, 1:21])) > 1 and (ids[0, 1:21] < 49406).all()


def test_rounds_alternate_the_engines_and_pool_their_runs():
    calls = []

    def worker(name, rounds):  # one result per spawn: (timed runs, peak)
        results = iter(rounds)

        def spawn():
            calls.append(name)
            times, peak = next(results)
            return {"seconds": float(np.median(times)), "times": times, "peak_rss": peak}
        return spawn

    out = bench.alternated({"mlx": worker("mlx", [([1.0, 2.0], 10), ([3.0, 4.0], 30)]),
                            "diffusers": worker("diffusers", [([5.0, 5.0], 20), ([9.0, 9.0], 5)])}, rounds=2)
    assert calls == ["mlx", "diffusers", "mlx", "diffusers"]
    assert out["mlx"]["times"] == [1.0, 2.0, 3.0, 4.0] and out["mlx"]["seconds"] == 2.5
    assert out["mlx"]["peak_rss"] == 30 and out["diffusers"]["peak_rss"] == 20 and out["mlx"]["rounds"] == 2
    assert out["diffusers"]["seconds"] == 7.0
    single = bench.alternated({"mlx": lambda: {"seconds": 1.0, "times": [1.0], "peak_rss": 1}}, rounds=1)
    assert single == {"mlx": {"seconds": 1.0, "times": [1.0], "peak_rss": 1}}
    failed = bench.alternated({"mlx": lambda: {"error": "out of memory"}}, rounds=2)
    assert failed == {"mlx": {"error": "out of memory"}}
