"""The one place that calls Core ML: load a model for a set of compute units, run a prediction.

`CoreMLRuntime.load(path, compute_units)` returns an object with
`predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]`; the engine (engine.py) knows nothing
else about Core ML. An `.mlpackage` is loaded with `ct.models.MLModel` (Core ML compiles it on load),
a compiled `.mlmodelc` with `ct.models.CompiledMLModel`. Anything with the same `load` / `predict`
contract can stand in for this class (the engine's tests run MLX behind it on Linux).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.types import UserError

#: coremltools' ct.ComputeUnit names, in the order the app lists them
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")


def check_compute_units(units: str) -> str:
    if units not in COMPUTE_UNITS:
        raise UserError(f"unknown compute units '{units}': choose one of {', '.join(COMPUTE_UNITS)}")
    return units


class CoreMLModel:
    """One loaded Core ML model; `predict` takes and returns numpy arrays by tensor name."""

    def __init__(self, model, path: Path, compute_units: str):
        self._model = model
        self.path = path
        self.compute_units = compute_units

    def predict(self, inputs: dict) -> dict:
        try:
            outputs = self._model.predict(inputs)
        except Exception as exc:  # Core ML reports shape/type mismatches and device failures alike
            raise UserError(f"Core ML prediction with {self.path.name} on {self.compute_units} failed: "
                            f"{type(exc).__name__}: {exc}") from exc
        return {name: np.asarray(value) for name, value in outputs.items()}


class CoreMLRuntime:
    """Loads Core ML models with coremltools; needs macOS (prediction is not available elsewhere)."""

    name = "coreml"

    @staticmethod
    def load(path, compute_units: str = "ALL") -> CoreMLModel:
        from backend.engines.select import coreml_unavailable_reason
        blocked = coreml_unavailable_reason()
        if blocked:
            raise UserError(f"cannot load {Path(path).name}: {blocked}")
        import coremltools as ct

        path = Path(path)
        units = ct.ComputeUnit[check_compute_units(compute_units)]
        try:
            if path.suffix == ".mlmodelc":
                model = ct.models.CompiledMLModel(str(path), compute_units=units)
            else:
                model = ct.models.MLModel(str(path), compute_units=units)
        except Exception as exc:
            raise UserError(f"Core ML could not load {path.name} for {compute_units}: "
                            f"{type(exc).__name__}: {exc}") from exc
        return CoreMLModel(model, path, compute_units)
