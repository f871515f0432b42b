"""Load and soak test of the web app: many clients at once, then many requests in a row, on the embedded model.

    python tools/load_test.py [--clients 20] [--per-client 5] [--sequential 500] [--steps 4] [--queue-size 16]

Starts `python app.py` on a free port with a fresh home folder, then
1. `--clients` threads, each with its own gradio_client.Client, send `--per-client` /generate requests at once:
   every request must be answered, either served (an image) or refused with the app's "queue is full ... try
   again" sentence; anything else (an empty error, a lost request) is counted as a failure;
2. `--sequential` requests one after another, sampling the server's resident memory (VmRSS) every 25:
   memory must stay flat (the growth over the second half is printed).
Prints the machine (CPU, BLAS), the counts, latency percentiles and the memory samples; exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle in the center on a blue background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def start_server(port: int, home: str, queue_size: int) -> subprocess.Popen:
    env = {**os.environ, "SILICON_DIFFUSION_HOME": home, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(Path(home) / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--model", "tiny-shapes",
                               "--queue-size", str(queue_size)], env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the app exited at start: see {home}/server.log")
            time.sleep(0.5)
    raise SystemExit("the app did not answer within 2 minutes")


def one_request(client, steps: int, seed: int) -> tuple[str, float, str]:
    """('served' | 'queue full' | 'failed', seconds, detail)."""
    start = time.perf_counter()
    try:
        path, report = client.predict(prompt=PROMPT, model="tiny-shapes", steps=steps, seed=seed,
                                      api_name="/generate")
        ok = os.path.isfile(path) and report.get("seed") == seed
        return ("served" if ok else "failed"), time.perf_counter() - start, "" if ok else "no image"
    except Exception as exc:  # noqa: BLE001 - every answer is classified
        text = str(exc)
        kind = "queue full" if "queue is full" in text.lower() and "try again" in text.lower() else "failed"
        return kind, time.perf_counter() - start, text[:200]


def concurrent_phase(url: str, clients: int, per_client: int, steps: int) -> dict:
    from gradio_client import Client
    results, lock = [], threading.Lock()

    def worker(index: int):
        client = Client(url, verbose=False)
        for j in range(per_client):
            outcome = one_request(client, steps, seed=index * 1000 + j)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    counts = {k: sum(r[0] == k for r in results) for k in ("served", "queue full", "failed")}
    served = sorted(r[1] for r in results if r[0] == "served")
    return {"sent": clients * per_client, "answered": len(results), **counts, "wall_seconds": wall,
            "latency_p50": statistics.median(served) if served else None,
            "latency_p95": served[int(0.95 * (len(served) - 1))] if served else None,
            "failures": [r[2] for r in results if r[0] == "failed"][:5]}


def sequential_phase(url: str, pid: int, count: int, steps: int) -> dict:
    from gradio_client import Client
    client = Client(url, verbose=False)
    samples, outcomes = [], []
    for i in range(count):
        outcomes.append(one_request(client, steps, seed=i)[0])
        if i % 25 == 0 or i == count - 1:
            samples.append((i + 1, rss_bytes(pid)))
    half = [rss for n, rss in samples if n > count // 2]
    return {"sent": count, "served": outcomes.count("served"), "failed": count - outcomes.count("served"),
            "rss_samples_mib": [(n, round(rss / 2**20, 1)) for n, rss in samples],
            "second_half_growth_mib": round((half[-1] - half[0]) / 2**20, 1) if len(half) > 1 else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--sequential", type=int, default=500)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--queue-size", type=int, default=16)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import backend  # noqa: F401  (the BLAS the app loads)
    from backend import blas
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; BLAS: {blas.loaded or 'reference'}")
    home = tempfile.mkdtemp(prefix="sd-load-")
    port = free_port()
    server = start_server(port, home, a.queue_size)
    url = f"http://127.0.0.1:{port}/"
    try:
        burst = concurrent_phase(url, a.clients, a.per_client, a.steps)
        print(f"{a.clients} clients x {a.per_client} requests ({a.steps} steps, queue {a.queue_size}): "
              f"{burst['answered']}/{burst['sent']} answered: {burst['served']} served, {burst['queue full']} "
              f"refused 'queue is full, try again', {burst['failed']} failed; {burst['wall_seconds']:.1f} s; "
              f"served latency p50 {burst['latency_p50'] or 0:.2f} s, p95 {burst['latency_p95'] or 0:.2f} s")
        for failure in burst["failures"]:
            print("  failure:", failure)
        soak = sequential_phase(url, server.pid, a.sequential, a.steps)
        print(f"{soak['sent']} sequential requests: {soak['served']} served, {soak['failed']} failed; server RSS "
              f"(requests, MiB): {soak['rss_samples_mib']}; growth over the second half "
              f"{soak['second_half_growth_mib']} MiB")
        outputs = Path(home) / "outputs"
        kept = sum(1 for f in outputs.rglob("*") if f.is_file())
        print(f"app folder: {kept} files kept ({outputs})")
        bad = burst["failed"] or burst["answered"] != burst["sent"] or soak["failed"]
        return 1 if bad else 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
