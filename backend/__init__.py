"""Silicon Diffusion's backend: the public API the app, the CLI and the tests use.

    from backend import load_pipeline, GenerationRequest
    pipe = load_pipeline("assets/tiny-shapes", engine="auto", precision="fp16")
    result = pipe.generate(GenerationRequest(prompt="a red circle"), callback=None)

Importing this package loads an optimized BLAS before MLX (see backend/blas.py) and has freed memory kept for
reuse during a generation (backend/allocator.py).
"""
from backend import allocator as _allocator, blas as _blas

_blas.load_optimized_blas()
_allocator.keep_freed_memory()

from backend.types import (  # noqa: E402
    Cancelled, GenerationRequest, GenerationResult, Memory, StepInfo, Timings, UserError,
)

__all__ = ["load_pipeline", "GenerationRequest", "GenerationResult", "StepInfo", "Timings", "Memory",
           "UserError", "Cancelled"]


def load_pipeline(model: str, **options):
    """Load a model (local folder, Hub id or registry name) once; see backend.pipeline.load_pipeline."""
    from backend.pipeline import load_pipeline as _load
    return _load(model, **options)
