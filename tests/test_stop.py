"""Stop means stop: a stop reaches inside a long stage (between UNet blocks, transformer blocks, VAE bands),
the engine is free for the next request at once, and a request stopped while it waits never runs."""
import threading
import time

import pytest

from backend import interrupt
from backend.session import PipelineCache, PipelineKey, StopSignal, stream_generation
from backend.types import Cancelled, GenerationRequest


class StopAfter:
    """should_stop(): true from its `n`-th call on; counts the calls."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.fixture(scope="module")
def sd1(tiny_pipelines):
    from backend.pipeline import load_pipeline
    return load_pipeline(str(tiny_pipelines("sd1")[1]), engine="mlx", precision="fp32")


@pytest.fixture(scope="module")
def sd3(tiny_pipelines):
    from backend.pipeline import load_pipeline
    return load_pipeline(str(tiny_pipelines("sd3")[1]), engine="mlx", precision="fp32")


def checkpoints_per_step(pipe) -> int:
    counter = StopAfter(10**9)
    pipe.generate(GenerationRequest("a red circle", steps=1, seed=0), should_stop=counter)
    return counter.calls


@pytest.mark.parametrize("name", ["sd1", "sd3"])
def test_a_stop_inside_the_first_step_ends_it_before_the_step_completes(request, name):
    pipe = request.getfixturevalue(name)
    per_step = checkpoints_per_step(pipe)
    assert per_step >= 4  # blocks of the denoiser (and the decoder's parts) each check
    steps = []
    with pytest.raises(Cancelled, match="in the middle of a stage"):
        pipe.generate(GenerationRequest("a red circle", steps=3, seed=0), callback=lambda info: steps.append(info),
                      should_stop=StopAfter(2))
    assert steps == []  # the first step never finished
    # and the pipeline is whole afterwards: the same request runs to the end
    assert pipe.generate(GenerationRequest("a red circle", steps=2, seed=0)).image.size[0] > 0


def test_a_stop_during_the_vae_decode_ends_the_decode(sd1):
    finished = threading.Event()

    def after_the_last_step(info):
        if info.step == info.total:
            finished.set()

    with pytest.raises(Cancelled, match="in the middle of a stage"):
        sd1.generate(GenerationRequest("a red circle", steps=2, seed=0), callback=after_the_last_step,
                     should_stop=finished.is_set)
    assert finished.is_set()


def test_checkpoints_do_nothing_without_a_watcher():
    interrupt.checkpoint()  # no should_stop installed on this thread: no error, no evaluation
    with interrupt.watching(lambda: True):
        with pytest.raises(Cancelled):
            interrupt.checkpoint()
    interrupt.checkpoint()


def test_after_a_stop_the_next_request_starts_at_once(tiny_pipelines):
    """Stop a long run in its middle; measure from the stop to the next request's first event."""
    cache = PipelineCache(2)
    key = PipelineKey(str(tiny_pipelines("sd1")[1]), engine="mlx", precision="fp32")
    stop = StopSignal()
    events = stream_generation(cache, key, GenerationRequest("a red circle", steps=400, seed=0, width=64,
                                                             height=64), stop)
    for event in events:
        if event.kind == "step" and event.step.step >= 2:
            break
    stopped_at = time.perf_counter()
    stop.set()
    outcome = [e for e in events if e.kind in ("stopped", "done", "error")]
    assert outcome and outcome[-1].kind == "stopped"
    second = stream_generation(cache, key, GenerationRequest("a red circle", steps=1, seed=1))
    first_event = next(second)
    started = time.perf_counter() - stopped_at
    assert first_event.kind == "status"
    assert [e.kind for e in second][-1] == "done"
    print(f"stop -> next request started: {started * 1000:.0f} ms")
    assert started < 5.0


def test_a_request_stopped_while_waiting_never_runs(tiny_pipelines):
    cache = PipelineCache(2)
    key = PipelineKey(str(tiny_pipelines("sd1")[1]), engine="mlx", precision="fp32")
    stop = StopSignal()
    stop.set()
    start = time.perf_counter()
    kinds = [e.kind for e in stream_generation(cache, key, GenerationRequest("a red circle", steps=50), stop)]
    assert kinds == ["stopped"] and time.perf_counter() - start < 1.0
    assert cache.keys() == []  # nothing was even loaded


@pytest.fixture(scope="module")
def app_url(tiny_pipelines, tmp_path_factory):
    import os
    import socket
    os.environ["SILICON_DIFFUSION_HOME"] = str(tmp_path_factory.mktemp("home"))
    import app as webapp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = webapp.launch(webapp.App(str(tiny_pipelines("sd1")[1])), port=port, prevent_thread_lock=True,
                              quiet=True)
    yield url
    demo.close()


def wait_for_steps(job, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job.status()
        if status.progress_data and status.progress_data[0].index:
            return
        time.sleep(0.05)
    pytest.fail("the run did not start")


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_a_stopped_or_abandoned_api_run_frees_the_engine_for_the_next_request(app_url, how):
    """/stop, or the client cancelling its job (what a closed connection does): the next request is served
    without waiting for the long run's 400 steps."""
    import gradio_client
    client = gradio_client.Client(app_url, verbose=False)
    client.predict("a green square", steps=1, api_name="/generate")  # loaded and warm
    start = time.perf_counter()
    client.predict("a green square", steps=20, api_name="/generate")
    twenty_steps = time.perf_counter() - start
    job = client.submit("a red circle", steps=400, api_name="/generate")
    wait_for_steps(job)
    stopped_at = time.perf_counter()
    if how == "stop":
        client.predict(api_name="/stop")
    else:
        job.cancel()
    other = gradio_client.Client(app_url, verbose=False)
    path, report = other.predict("a blue circle", steps=1, seed=4, api_name="/generate")
    served_after = time.perf_counter() - stopped_at
    print(f"{how}: the next request was served {served_after * 1000:.0f} ms after it "
          f"(20 steps alone: {twenty_steps * 1000:.0f} ms)")
    assert report["seed"] == 4
    assert served_after < 2 * twenty_steps + 2.0  # not the 380 steps left of the long run
