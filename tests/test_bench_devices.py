"""backend.bench_devices on this machine: the CPU meter (process high-water mark), MLX and torch held to the CPU,
and the MLX meter on the default device where that is an accelerator."""
import subprocess
import sys

import numpy as np
import pytest

from backend import bench_devices


def test_the_cpu_meter_reads_a_span_s_peak_rss():
    meter = bench_devices._process_meter()
    assert meter.describe() == {"device": "cpu", "memory": "process peak RSS"}
    meter.reset_peak()
    before = meter.peak_bytes()
    block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
    after = meter.peak_bytes()
    del block
    assert after - before >= 200 * 2**20


def test_timed_waits_for_the_device_and_returns_the_result():
    waits = []
    meter = bench_devices.Meter("test", "none", sync=lambda: waits.append(1))
    assert meter.timed(lambda: 42)() == 42 and waits == [1]
    assert meter.peak_bytes() is None  # a device with no peak counter reads "not measured"


def _in_a_fresh_process(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_mlx_held_to_the_cpu():
    code = ("import backend, mlx.core as mx\n"
            "from backend import bench_devices\n"
            "m = bench_devices.mlx_meter('cpu')\n"
            "print(m.device, mx.default_device() == mx.cpu)")
    assert _in_a_fresh_process(code) == "cpu True"


def test_mlx_meter_on_the_default_device():
    import mlx.core as mx
    meter = bench_devices.mlx_meter("auto")
    if mx.default_device() == mx.cpu:
        assert meter.device == "cpu"
        return
    assert meter.device == "gpu"  # a Mac, or Linux with mlx[cuda]: MLX's own allocator peak
    meter.reset_peak()
    a = mx.ones((64, 2**20 // 4))  # 64 MiB
    meter.timed(lambda: mx.eval(a + 1))()
    assert meter.peak_bytes() >= 128 * 2**20


def test_torch_held_to_the_cpu_and_its_default():
    torch = pytest.importorskip("torch")
    assert bench_devices.torch_device("cpu") == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert bench_devices.torch_device("auto") == expected
    assert bench_devices.torch_meter("cpu").memory == "process peak RSS"
