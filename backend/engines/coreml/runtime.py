"""The one place that calls Core ML: load a model for a set of compute units, run a prediction.

`CoreMLRuntime.load(path, compute_units)` returns an object with
`predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]`; the engine (engine.py) knows nothing
else about Core ML. Every model is loaded compiled (`ct.models.CompiledMLModel`): an `.mlmodelc` as it is,
an `.mlpackage` through compile_cache.py (compiled once per package hash, never once per load), with
Core ML's FastPrediction specialization hint (coremltools 8+ on macOS 15+; without it where coremltools
refuses hints, and the loaded model says so). Anything with the same `load` / `predict` contract can stand in for
this class (the engine's tests run MLX or torch behind it on Linux).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.engines import machine
from backend.types import UserError

#: coremltools' ct.ComputeUnit names, in the order the app lists them
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
#: what a user may ask for: a unit, or "auto" (the units the resources' attention is made for)
UNIT_CHOICES = ("auto",) + COMPUTE_UNITS
#: Apple's pairing (ml-stable-diffusion README: ORIGINAL for cpuAndGPU on Mac, SPLIT_EINSUM for
#: cpuAndNeuralEngine on iPhone and iPad; swift-coreml-diffusers' AttentionVariant.defaultComputeUnits)
UNITS_FOR_ATTENTION = {"original": "CPU_AND_GPU", "split_einsum": "CPU_AND_NE", "split_einsum_v2": "CPU_AND_NE"}


def check_compute_units(units: str) -> str:
    if units not in UNIT_CHOICES:
        raise UserError(f"unknown compute units '{units}': choose one of {', '.join(UNIT_CHOICES)}")
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
        blocked = machine.coreml_unavailable_reason()
        if blocked:
            raise UserError(f"cannot load {Path(path).name}: {blocked}")
        import coremltools as ct
        from backend.engines.coreml.compile_cache import compiled_model

        path = Path(path)
        if check_compute_units(compute_units) == "auto":
            raise UserError("the engine resolves compute units 'auto' before loading")
        units = ct.ComputeUnit[compute_units]
        try:
            if path.suffix == ".mlpackage":
                path = compiled_model(path, ct.models.utils.compile_model)
            hints = {"specializationStrategy": ct.SpecializationStrategy.FastPrediction}
            try:
                model = ct.models.CompiledMLModel(str(path), compute_units=units, optimization_hints=hints)
                hinted = True
            except Exception:  # coremltools refuses any hint before macOS 15
                model, hinted = ct.models.CompiledMLModel(str(path), compute_units=units), False
        except Exception as exc:
            raise UserError(f"Core ML could not load {path.name} for {compute_units}: "
                            f"{type(exc).__name__}: {exc}") from exc
        loaded = CoreMLModel(model, path, compute_units)
        loaded.fast_prediction = hinted
        return loaded
