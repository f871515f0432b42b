"""The web app end to end: launched in-process on a free localhost port with a tiny random model, driven
through gradio_client's /generate, /compare and /stop, including a cancelled run and bad inputs."""
import json
import os
import shutil
import socket
import sys
import time

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_pipelines, tmp_path_factory):
    """(app module, App, blocks, url, model folder) with the tiny SD1 model as the default model."""
    _, folder = tiny_pipelines("sd1")
    home = tmp_path_factory.mktemp("home")
    os.environ["SILICON_DIFFUSION_HOME"] = str(home)
    import app as webapp
    application = webapp.App(str(folder))
    demo, url = webapp.launch(application, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield webapp, application, demo, url, folder
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[3], verbose=False)


def test_serves_locally_with_one_engine_queue(served):
    webapp, application, demo, url, _ = served
    assert url.startswith("http://127.0.0.1:")
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert demo._queue.max_size == 16
    engine_fns = [fn for fn in demo.fns.values() if fn.api_name in ("generate", "compare")]
    assert len(engine_fns) == 2
    for fn in engine_fns:
        assert fn.concurrency_id == "engine" and fn.concurrency_limit == 1
    stop = next(fn for fn in demo.fns.values() if fn.api_name == "stop")
    assert not stop.queue  # a Stop is never stuck behind the run it stops


def test_generate_returns_png_with_parameters_and_timings(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    params = info["parameters"]
    assert params[0]["parameter_name"] == "prompt" and not params[0]["parameter_has_default"]
    assert all(p["parameter_has_default"] for p in params[1:])

    path, measurements = client.predict("a red circle at the top", steps=3, seed=7, api_name="/generate")
    image = Image.open(path)
    assert image.format == "PNG"
    assert "Seed: 7" in image.text["parameters"] and "Steps: 3" in image.text["parameters"]
    from backend.png import read_parameters
    restored = read_parameters(path)
    assert restored["seed"] == 7 and restored["prompt"] == "a red circle at the top"
    assert measurements["seed"] == 7
    assert len(measurements["seconds"]["steps"]) == 3
    assert measurements["seconds"]["total"] > 0 and measurements["steps_per_second"] > 0
    assert measurements["engine"]["engine"] == "mlx" and measurements["engine"]["reason"]

    # same seed, same request: the same pixels (the PNG reached us losslessly)
    again, _ = client.predict("a red circle at the top", steps=3, seed=7, api_name="/generate")
    assert Image.open(again).tobytes() == image.tobytes()


def test_compare_fills_every_cell_and_reports_failures_in_their_cell(client):
    images, summary = client.predict("a blue square", variants=["mlx-fp16", "mlx-8bit", "coreml-fp16"], seed=3,
                                     steps=2, api_name="/compare")
    by_key = {v["variant"]: v for v in summary["variants"]}
    assert [v["variant"] for v in summary["variants"]] == ["mlx-fp16", "mlx-8bit", "coreml-fp16"]
    assert summary["seed"] == 3 and "random generators" in summary["note"]
    assert by_key["mlx-fp16"]["status"] == "done" and by_key["mlx-fp16"]["identical"]
    q8 = by_key["mlx-8bit"]
    assert q8["status"] == "done" and q8["psnr"] > 30 and 0 < q8["ssim"] <= 1
    # the variant is written to disk once, so its size on disk is its own
    assert 0 < q8["disk_bytes"] < by_key["mlx-fp16"]["disk_bytes"]
    if sys.platform != "darwin":
        assert by_key["coreml-fp16"]["status"] == "error" and "macOS" in by_key["coreml-fp16"]["error"]
    assert len(images) == sum(v["status"] == "done" for v in summary["variants"])
    assert Image.open(images[0]["image"]).format == "PNG"


def test_stop_ends_a_run_between_two_steps(served):
    c = gradio_client.Client(served[3], verbose=False)
    job = c.submit("a long run", steps=400, api_name="/generate")
    deadline = time.time() + 30
    while time.time() < deadline:
        status = job.status()
        if status.progress_data and status.progress_data[0].index:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the run did not start")
    assert c.predict(api_name="/stop") == "stopping"
    start = time.time()
    with pytest.raises(AppError, match=r"Stopped: (stopped after step \d+ of 400|in the middle of a stage)"):
        job.result(timeout=30)
    assert time.time() - start < 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "enter a prompt"),
    (dict(prompt="x", width=63), "width 63 is not a multiple of"),
    (dict(prompt="x", steps=0), "steps must be a whole number from 1 to"),
    (dict(prompt="x", steps=10_000), "steps must be a whole number from 1 to"),
    (dict(prompt="x", model="no-such-model"), "unknown model 'no-such-model'"),
    (dict(prompt="x", precision="fp5"), "unknown precision 'fp5'"),
])
def test_bad_inputs_give_a_clear_message_and_the_app_keeps_serving(client, kwargs, message):
    with pytest.raises(AppError, match=message):
        client.predict(api_name="/generate", **kwargs)
    path, measurements = client.predict("a green triangle", steps=1, api_name="/generate")
    assert Image.open(path).size == (32, 32) and measurements["seconds"]["steps"]


def test_corrupted_weights_give_a_clear_message(served, client, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(served[4], broken)
    unet = next((broken / "unet").glob("*.safetensors"))
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 3])
    with pytest.raises(AppError, match=r"unet.*(cannot read|truncated|corrupt)"):
        client.predict("x", model=str(broken), api_name="/generate")
    path, _ = client.predict("x", steps=1, api_name="/generate")
    assert Image.open(path).format == "PNG"


def test_a_png_restores_its_settings(served, client):
    from ui.generate import SETTING_NAMES
    application = served[1]
    path, m = client.predict("a small red circle", negative_prompt="blur", steps=2, seed=11, api_name="/generate")
    values = application.restore(path)
    named = dict(zip(SETTING_NAMES, values))
    assert named["prompt"]["value"] == "a small red circle" and named["negative_prompt"]["value"] == "blur"
    assert named["seed"]["value"] == 11 and named["steps"]["value"] == 2
    saved = json.loads(Image.open(path).text["silicon_diffusion"])
    assert saved["seed"] == 11
    # "auto" resolves per device (fp32 on this CPU); restoring gives the precision that was actually used
    assert named["precision"]["value"] == saved["precision"] in ("fp16", "fp32")


def test_offline_download_says_the_hub_cannot_be_reached(served, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message, *_ = served[1].download("sd-1.5")
    assert "cannot be reached" in message and "error" in message


def test_pipeline_cache_keeps_the_most_recent_pipelines():
    from backend.session import PipelineCache, PipelineKey
    loads = []
    cache = PipelineCache(2, loader=lambda key, progress: loads.append(key.model) or object())
    a, b, c = (PipelineKey.from_choice(m, "mlx", "fp16", "ALL") for m in "abc")
    first, cached = cache.get(a)
    assert not cached and cache.get(a) == (first, True)
    cache.get(b), cache.get(c)
    assert cache.keys() == [b, c] and loads == ["a", "b", "c"]
    assert PipelineKey.from_choice("m", "mlx", "4-bit", "ALL").quantization == "q4"


def test_sd3_generates_and_compares_through_the_api(tiny_pipelines, client):
    """An SD3 model folder: /generate with and without T5 (the result says which), /compare with q8."""
    _, folder = tiny_pipelines("sd3-t5")
    path, m = client.predict("a red circle at the top", model=str(folder), steps=2, seed=5, api_name="/generate")
    assert m["engine"]["family"] == "sd3" and m["parameters"]["t5"] == "skipped"
    assert any("T5 text encoder skipped" in w for w in m["warnings"])
    assert m["parameters"]["scheduler"] == "flow_euler" and Image.open(path).size == (32, 32)
    _, with_t5 = client.predict("a red circle at the top", model=str(folder), steps=2, seed=5, t5=True,
                                api_name="/generate")
    assert with_t5["parameters"]["t5"] == "loaded" and not with_t5["warnings"]
    images, summary = client.predict("a red circle", model=str(folder), variants=["mlx-fp16", "mlx-8bit"], seed=3,
                                     steps=2, api_name="/compare")
    by_key = {v["variant"]: v for v in summary["variants"]}
    assert by_key["mlx-8bit"]["status"] == "done" and by_key["mlx-8bit"]["psnr"] > 30
    assert len(images) == 2


# ------------------------------------------------------------------ start image, inpainting, LoRA

def test_start_image_mask_and_lora_through_the_api(client, served, tiny_pipelines, tmp_path):
    from pathlib import Path
    from gradio_client import handle_file
    from backend.png import read_parameters
    from tests.lora_files import write_peft
    pipe, _ = tiny_pipelines("sd1")
    start, mask = tmp_path / "start.png", tmp_path / "mask.png"
    Image.new("RGB", (48, 40), (200, 40, 40)).save(start)  # another size: resized to the request's
    painted = Image.new("L", (48, 40), 0)
    painted.paste(255, (12, 10, 36, 30))
    painted.save(mask)
    lora = Path(os.environ["SILICON_DIFFUSION_HOME"]) / "loras" / "style.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    write_peft(lora, pipe, rank=4, seed=1)

    path, m = client.predict("a red circle", steps=4, seed=3, init_image=handle_file(str(start)), strength=0.5,
                             api_name="/generate")
    params = read_parameters(path)
    assert params["strength"] == 0.5 and params["init_image"] and not params.get("mask")
    assert len(m["seconds"]["steps"]) == 2 and m["seconds"]["image_encoder"] > 0  # int(4 * 0.5) of 4 steps

    path, _ = client.predict("a red circle", steps=3, seed=3, init_image=handle_file(str(start)),
                             mask=handle_file(str(mask)), strength=1.0, api_name="/generate")
    params = read_parameters(path)
    assert params["mask"] and params["strength"] == 1.0

    path, _ = client.predict("a red circle", steps=2, seed=3, loras="style.safetensors:0.5", api_name="/generate")
    assert read_parameters(path)["loras"][0]["name"] == "style.safetensors"
    assert read_parameters(path)["loras"][0]["scale"] == 0.5

    for kwargs, sentence in (({"mask": handle_file(str(mask))}, "a mask needs an init image"),
                             ({"loras": "nowhere.safetensors"}, "was not found"),
                             ({"init_image": handle_file(str(start)), "strength": 1.5}, "strength")):
        with pytest.raises(AppError, match=sentence):
            client.predict("x", steps=1, api_name="/generate", **kwargs)


def test_the_editor_gives_the_start_image_and_the_painted_mask():
    import numpy as np
    from ui.generate_inputs import editor_image_and_mask
    background = Image.new("RGB", (40, 30), (10, 20, 30))
    layer = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (5, 5, 15, 15))
    init, mask = editor_image_and_mask({"background": background, "layers": [layer], "composite": None})
    assert init.size == (40, 30)
    assert np.asarray(mask)[10, 10] == 255 and np.asarray(mask)[20, 30] == 0
    unpainted = {"background": background, "layers": [Image.new("RGBA", (40, 30))], "composite": None}
    assert editor_image_and_mask(unpainted)[1] is None  # nothing painted: image to image
    uploaded = Image.new("L", (40, 30), 255)
    assert np.asarray(editor_image_and_mask(unpainted, uploaded)[1]).min() == 255  # an uploaded mask wins
    assert editor_image_and_mask(None) == (None, None)


def test_a_png_restores_its_start_image_mask_and_lora_scales(served, client, tiny_pipelines, tmp_path):
    from pathlib import Path
    from gradio_client import handle_file
    from ui.generate import SETTING_NAMES
    from ui.generate_inputs import image_fields, lora_table
    application = served[1]
    start, mask = tmp_path / "s.png", tmp_path / "m.png"
    Image.new("RGB", (32, 32), (0, 200, 0)).save(start)
    Image.new("L", (32, 32), 255).save(mask)
    # the UI path keeps the start image and the mask by the hash the PNG records
    req_fields = image_fields({"background": Image.open(start), "layers": [], "composite": None},
                              Image.open(mask), 0.6, 0, lora_table([]))
    from backend.types import GenerationRequest
    params = {"init_image": "abc123", "mask": "def456", "strength": 0.6, "mask_blur": 2, "seed": 5,
              "prompt": "p", "loras": [{"name": "style.safetensors", "scale": 0.25}]}
    application.outputs.keep_inputs(params, GenerationRequest(prompt="p", **req_fields))
    from backend.png import save_png
    png = save_png(Image.new("RGB", (32, 32)), tmp_path / "made.png", params)
    lora_dir = Path(os.environ["SILICON_DIFFUSION_HOME"]) / "loras"
    table = lora_table(sorted(lora_dir.glob("*.safetensors")))
    out = application.restore(str(png), table)
    editor, strength, blur, rows = out[len(SETTING_NAMES):len(SETTING_NAMES) + 4]
    assert Path(editor["background"]).name == "abc123.png" and len(editor["layers"]) == 1
    assert strength == 0.6 and blur == 2
    assert float(rows.loc[rows["LoRA"] == "style.safetensors", "Scale"].iloc[0]) == 0.25


def test_the_servers_allow_large_option_reaches_the_pipelines(tiny_pipelines):
    from backend.session import PipelineCache, PipelineKey
    _, folder = tiny_pipelines("sd1")
    key = PipelineKey(str(folder), "mlx", "fp32", None, "auto")
    assert not PipelineCache(1).get(key)[0].allow_large
    assert PipelineCache(1, allow_large=True).get(key)[0].allow_large
