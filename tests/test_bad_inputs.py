"""Bad input through every door (the HTTP API with gradio_client and raw HTTP, the Python API, the CLI): each
gets one sentence that names the problem, and the next good request is served. Runs on the embedded model."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import gradio_client
import pytest
from gradio_client import handle_file

from backend.types import GenerationRequest, UserError

MODEL = "tiny-shapes"
PROMPT = "a large red circle in the center on a blue background"
BASE = dict(prompt=PROMPT, negative_prompt="", model=MODEL, engine="auto", compute_units="auto", precision="auto",
            scheduler="default", steps=2, guidance=-1, width=-1, height=-1, seed=1)

# (what the request changes, a piece of the sentence the user must see)
API_CASES = [
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(steps="abc"), "steps must be a number"),
    (dict(steps=0), "steps must be a whole number from 1"),
    (dict(guidance="nan"), "guidance must be a finite number"),
    (dict(guidance="inf"), "guidance must be a finite number"),
    (dict(guidance=-3), "guidance cannot be negative"),
    (dict(width=-64), "width cannot be negative"),
    (dict(width=64.5), "width must be a whole number"),
    (dict(width=66), "not a multiple of"),
    (dict(seed=2**64), "seed must be a whole number from 0 to 18446744073709551615"),
    (dict(seed=-5), "seed cannot be negative"),
    (dict(seed="lucky"), "seed must be a number"),
    (dict(compute_units="FOO"), "unknown compute units 'FOO'"),
    (dict(engine="cuda"), "unknown engine 'cuda'"),
    (dict(precision="fp8"), "unknown precision 'fp8'"),
    (dict(scheduler="nope"), "Unknown scheduler 'nope'"),
    (dict(prompt="   "), "enter a prompt"),
    (dict(model="/"), "/"),
    (dict(strength=0.5), "strength needs an init image"),
    (dict(loras="missing.safetensors"), "missing.safetensors"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    os.environ["SILICON_DIFFUSION_HOME"] = str(tmp_path_factory.mktemp("home"))
    import app as webapp
    application = webapp.App(MODEL)
    demo, url = webapp.launch(application, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield application, url
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[1], verbose=False)


def good_request_is_served(client):
    path, report = client.predict(**BASE, api_name="/generate")
    assert os.path.isfile(path) and report["seed"] == 1 and len(report["seconds"]["steps"]) == 2


@pytest.mark.parametrize("change, sentence", API_CASES, ids=[next(iter(c)) + "=" + str(next(iter(c.values())))
                                                             for c, _ in API_CASES])
def test_http_api_refuses_with_a_sentence_then_serves(client, change, sentence):
    with pytest.raises(Exception) as refused:
        client.predict(**{**BASE, **change}, api_name="/generate")
    message = str(refused.value)
    assert sentence.lower() in message.lower(), message
    assert "verbose error reporting" not in message  # never Gradio's empty error
    good_request_is_served(client)


def test_an_oversized_request_is_refused_within_a_second(client):
    start = time.perf_counter()
    with pytest.raises(Exception, match=r"4096x4096 is too large for this model: at most 128x128"):
        client.predict(**{**BASE, "width": 4096, "height": 4096}, api_name="/generate")
    assert time.perf_counter() - start < 1.0
    good_request_is_served(client)


@pytest.mark.parametrize("content, sentence", [(b"this is not an image", "is not an image"),
                                               (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "is not an image")])
def test_a_non_image_or_corrupt_upload_is_refused(client, tmp_path, content, sentence):
    bad = tmp_path / "upload.png"
    bad.write_bytes(content)
    with pytest.raises(Exception) as refused:
        client.predict(**BASE, init_image=handle_file(str(bad)), api_name="/generate")
    assert sentence in str(refused.value), str(refused.value)
    good_request_is_served(client)


def test_raw_http_nan_is_refused_with_a_sentence(served, client):
    """JSON has no NaN, but Python's parser (Gradio's) accepts the token: a raw client can send it."""
    url = served[1].rstrip("/")
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in info["parameters"]]
    values = {**BASE, "guidance": float("nan")}
    body = json.dumps({"data": [values.get(n) for n in names]}, allow_nan=True).encode()
    assert b"NaN" in body
    request = urllib.request.Request(f"{url}/gradio_api/call/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/generate/{event_id}", timeout=60) as stream:
        text = stream.read().decode()
    assert "event: error" in text and "guidance must be a finite number" in text, text
    good_request_is_served(client)


def test_a_full_queue_answers_with_the_apps_sentence(served):
    """The queue's refusal is the app's sentence (app.say_when_full), not Gradio's."""
    import asyncio
    import app as webapp
    import gradio as gr
    with gr.Blocks() as demo:
        gr.Button().click(lambda: None, None, None)
    demo.queue(max_size=0)
    webapp.say_when_full(demo, 0)
    ok, message, kind = asyncio.run(demo._queue.push(type("Body", (), {"fn_index": 0})(), None, None))
    assert not ok and kind == "queue_full" and "queue is full" in message and "try again" in message


def test_restoring_a_png_with_broken_metadata_says_so(served, tmp_path):
    from PIL import Image, PngImagePlugin
    application, _ = served
    meta = PngImagePlugin.PngInfo()
    meta.add_text("silicon_diffusion", "{not json")
    path = tmp_path / "broken.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=meta)
    note = application.restore(str(path))[-1]
    assert "carries no generation parameters" in note


# -- the Python API -------------------------------------------------------------------------------------
PYTHON_CASES = [
    (dict(steps=2.5), "steps must be a whole number from 1 to 500"),
    (dict(steps=float("nan")), "steps must be a whole number"),
    (dict(guidance=float("inf")), "guidance must be a number from 0 to 50"),
    (dict(guidance="loud"), "guidance must be a number"),
    (dict(width=float("nan")), "width must be a whole number"),
    (dict(width=4096, height=4096), "at most 128x128"),
    (dict(seed=2**64), "seed must be a whole number from 0"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(batch_size=9), "batch size must be a whole number from 1 to 8"),
    (dict(init_image="/no/such/file.png"), "file.png"),
]


@pytest.fixture(scope="module")
def embedded():
    from backend.pipeline import load_pipeline
    return load_pipeline(MODEL)


@pytest.mark.parametrize("change, sentence", PYTHON_CASES, ids=[str(c) for c, _ in PYTHON_CASES])
def test_python_api_refuses_with_a_sentence_then_serves(embedded, change, sentence):
    with pytest.raises(UserError, match=None) as refused:
        embedded.generate(GenerationRequest(**{"prompt": PROMPT, "steps": 2, "seed": 1, **change}))
    assert sentence.lower() in str(refused.value).lower(), str(refused.value)
    assert embedded.generate(GenerationRequest(prompt=PROMPT, steps=2, seed=1)).image.size == (64, 64)


def test_python_api_refuses_unknown_compute_units_and_attention():
    from backend.pipeline import load_pipeline
    with pytest.raises(UserError, match="unknown compute units 'GPU'"):
        load_pipeline(MODEL, compute_units="GPU")
    with pytest.raises(UserError, match="unknown attention 'flash'"):
        load_pipeline(MODEL, attention="flash")


def test_memory_budget_names_the_figures():
    from backend import budget
    from backend.registry import load_spec
    spec = load_spec(MODEL, local_only=True)[0]
    budget.check_memory(spec, 64, 64, 1, True, 4, free=8 * 2**30)  # fits
    with pytest.raises(UserError, match=r"8 images of 2048x2048 need about [\d.]+ GiB of working memory and this "
                                        r"machine has 1.0 GiB free"):
        budget.check_memory(spec, 2048, 2048, 8, True, 4, free=2**30)


# -- the CLI --------------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "backend", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, sentence", [
    (["--steps", "2.5"], "--steps"),
    (["--guidance", "inf"], "guidance must be"),
    (["--compute-units", "FOO"], "FOO"),
    (["--attention", "flash"], "flash"),
    (["--init-image", "NOT_AN_IMAGE"], "is not an image"),
    (["--out", "/proc/no-such-dir/x.png"], "x.png"),
])
def test_cli_refuses_with_one_line(tmp_path, args, sentence):
    not_image = tmp_path / "not-image.png"
    not_image.write_text("hello")
    args = [str(not_image) if a == "NOT_AN_IMAGE" else a for a in args]
    out = tmp_path / "x.png"
    base = ["generate", "--model", MODEL, "--prompt", PROMPT, "--steps", "1", "--out", str(out)]
    proc = run_cli(*base, *args)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and sentence in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_api_takes_a_batch_and_returns_every_image_with_its_seed(client):
    path, report = client.predict(**{**BASE, "seed": 40}, batch_size=3, api_name="/generate")
    assert report["seeds"] == [40, 41, 42] and len(report["images"]) == 3 and report["images"][0].endswith(".png")
    with pytest.raises(Exception, match="batch size must be a whole number from 1 to 8"):
        client.predict(**BASE, batch_size=9, api_name="/generate")
