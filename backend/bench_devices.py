"""Where the bench's workers run, and how a stage's time and peak memory are read there.

MLX runs on its default device: the GPU on a Mac, and on Linux with `mlx[cuda]`. torch runs on CUDA where it
has it, else on MPS (a Mac), else on the CPU. `--device cpu` holds both engines to the CPU.

Time: a run is timed to the end of its device's work (MLX's `eval` waits for it; torch's CUDA and MPS calls
return before the kernels finish, so the timer waits on `synchronize`).

Memory: on the CPU, the process's high-water mark (measure.ProcessPeak), as every CPU figure of this project.
On an accelerator a stage's memory is not in the process's RSS, so it is each engine's own allocator peak:
MLX's `mx.get_peak_memory()` (Metal or CUDA) and torch's `torch.cuda.max_memory_allocated()`. Both count the
bytes handed out (weights included) and neither the freed blocks kept for reuse, so the two are comparable.
torch keeps no peak on MPS: there its memory reads "not measured".
"""
from __future__ import annotations

from backend.measure import ProcessPeak

CHOICES = ("auto", "cpu")
PRECISIONS = ("fp32", "fp16", "bf16")


def mlx_dtype(precision: str):
    """The MLX dtype of a bench precision name ("fp32", "fp16", "bf16")."""
    import mlx.core as mx
    return {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}[precision]


def torch_dtype(precision: str):
    """The torch dtype of a bench precision name ("fp32", "fp16", "bf16")."""
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class Meter:
    """One engine's device: what to wait on before a timer stops, and its peak-memory counter."""

    def __init__(self, device: str, memory: str, sync=None, reset=None, peak=None):
        self.device, self.memory = device, memory
        self._sync, self._reset, self._peak = sync, reset, peak

    def sync(self) -> None:
        if self._sync is not None:
            self._sync()

    def reset_peak(self) -> None:
        if self._reset is not None:
            self._reset()

    def peak_bytes(self):
        """This span's peak bytes (since reset_peak), or None where the device keeps no peak."""
        return None if self._peak is None else int(self._peak())

    def timed(self, fn):
        """`fn` followed by a wait for the device's work, for the bench's timer."""
        def run():
            out = fn()
            self.sync()
            return out
        return run

    def describe(self) -> dict:
        return {"device": self.device, "memory": self.memory}


def _process_meter(sync=None) -> Meter:
    process = ProcessPeak()
    return Meter("cpu", "process peak RSS", sync, process.reset, process.peak_bytes)


def mlx_meter(choice: str = "auto") -> Meter:
    """MLX's device for this worker (`choice` "cpu" moves MLX's default device to the CPU)."""
    import mlx.core as mx
    if choice == "cpu":
        mx.set_default_device(mx.cpu)
    if mx.default_device() == mx.cpu:
        return _process_meter()
    return Meter("gpu", "MLX allocator peak (mx.get_peak_memory)", mx.synchronize, mx.reset_peak_memory,
                 mx.get_peak_memory)


def torch_device(choice: str = "auto") -> str:
    import torch
    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def torch_meter(choice: str = "auto") -> Meter:
    """torch's device for this worker: CUDA, else MPS, else the CPU (`choice` "cpu": the CPU)."""
    import torch
    device = torch_device(choice)
    if device == "cuda":
        return Meter("cuda", "torch.cuda.max_memory_allocated", torch.cuda.synchronize,
                     torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated)
    if device == "mps":
        return Meter("mps", "not measured (torch keeps no peak on MPS)", torch.mps.synchronize)
    return _process_meter()
