"""A stop that reaches inside a long stage: a UNet step of SDXL at 1024² or a VAE decode takes seconds to
minutes on a CPU, so a Stop that waited for the step's end would leave the engine busy for that long.

The pipeline installs a `should_stop` check for the generating thread (`watching`); the engines call
`checkpoint()` between the parts of a stage (UNet blocks, transformer blocks, VAE bands). With a check
installed, a checkpoint first finishes the work so far (MLX builds its graph lazily: `mx.eval`) and raises
Cancelled when a stop was asked. Without one (training, tests, benchmarks) a checkpoint does nothing, so the
lazy graph of a whole step stays one graph there.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Optional

from backend.types import Cancelled

_local = threading.local()


@contextmanager
def watching(should_stop: Optional[Callable[[], bool]]):
    """Within the block, checkpoints on this thread raise Cancelled once `should_stop()` is true."""
    previous = getattr(_local, "should_stop", None)
    _local.should_stop = should_stop
    try:
        yield
    finally:
        _local.should_stop = previous


def active() -> bool:
    return getattr(_local, "should_stop", None) is not None


def checkpoint(*arrays) -> None:
    """Between two parts of a stage: with a check installed, evaluate `arrays` (MLX arrays: the work so far)
    and raise Cancelled if a stop was asked."""
    should_stop = getattr(_local, "should_stop", None)
    if should_stop is None:
        return
    if arrays:
        import mlx.core as mx
        mx.eval(*arrays)
    if should_stop():
        raise Cancelled("in the middle of a stage")
