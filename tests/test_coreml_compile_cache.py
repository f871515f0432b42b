"""A Core ML package is compiled once per content hash, by every load path (runtime, reduce-memory, new process).

Compiling needs macOS; here the compiler and the loader coremltools would call are replaced by counting
fakes, and everything around them (hashing, the cache folder, the runtime's choice of loader and hints)
runs for real.
"""
import os
import sys
import types
from pathlib import Path

import pytest

from backend.engines.coreml import compile_cache
from backend.types import UserError


def make_package(folder: Path, weights: bytes = b"w" * 1000) -> Path:
    package = folder / "Stable_Diffusion_version_tiny_unet.mlpackage"
    (package / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (package / "Manifest.json").write_text("{}")
    (package / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"spec")
    (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(weights)
    return package


class CountingCompiler:
    def __init__(self):
        self.calls = []

    def __call__(self, package: str, destination: str) -> str:
        self.calls.append(package)
        assert destination.endswith(".mlmodelc")  # what coremltools' compile_model requires
        Path(destination).mkdir(parents=True)
        (Path(destination) / "model.mil").write_text("program")
        return destination


def test_a_package_is_compiled_once_and_reused(tmp_path):
    package, compiler = make_package(tmp_path / "res"), CountingCompiler()
    first = compile_cache.compiled_model(package, compiler, root=tmp_path / "cache")
    second = compile_cache.compiled_model(package, compiler, root=tmp_path / "cache")
    assert first == second and first.is_dir() and first.name == package.stem + ".mlmodelc"
    assert len(compiler.calls) == 1
    assert not list(first.parent.glob(".*"))  # no unfinished folder left


def test_the_same_package_elsewhere_reuses_the_compile_and_a_changed_one_recompiles(tmp_path):
    compiler, root = CountingCompiler(), tmp_path / "cache"
    a = compile_cache.compiled_model(make_package(tmp_path / "a"), compiler, root=root)
    b = compile_cache.compiled_model(make_package(tmp_path / "b"), compiler, root=root)  # same bytes
    assert a == b and len(compiler.calls) == 1
    changed = make_package(tmp_path / "c", weights=b"v" * 1000)
    assert compile_cache.compiled_model(changed, compiler, root=root) != a and len(compiler.calls) == 2


def test_the_hash_is_remembered_by_file_signature(tmp_path, monkeypatch):
    package, root = make_package(tmp_path / "res"), tmp_path / "cache"
    digest = compile_cache.package_hash(package, root)
    monkeypatch.setattr(compile_cache.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert compile_cache.package_hash(package, root) == digest
    weight = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    weight.write_bytes(b"x" * 1000)
    os.utime(weight, ns=(1, 1))
    monkeypatch.undo()
    assert compile_cache.package_hash(package, root) != digest


def test_an_interrupted_compile_is_not_used(tmp_path):
    package, root = make_package(tmp_path / "res"), tmp_path / "cache"

    def failing(source, destination):
        Path(destination).mkdir(parents=True)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        compile_cache.compiled_model(package, failing, root=root)
    compiler = CountingCompiler()
    assert (compile_cache.compiled_model(package, compiler, root=root) / "model.mil").is_file()
    assert len(compiler.calls) == 1


def fake_coremltools(compiler, loads):
    """The parts of coremltools the runtime calls, for a machine without Core ML."""
    class CompiledMLModel:
        def __init__(self, path, compute_units=None, optimization_hints=None):
            loads.append((Path(path), compute_units.name, optimization_hints))

        def predict(self, inputs):
            return {"out": next(iter(inputs.values()))}

    strategy = types.SimpleNamespace(FastPrediction="FastPrediction")
    units = types.SimpleNamespace(**{n: types.SimpleNamespace(name=n) for n in
                                     ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")})
    unit_enum = type("ComputeUnit", (), {"__class_getitem__": classmethod(lambda cls, k: getattr(units, k))})
    return types.SimpleNamespace(
        ComputeUnit=unit_enum, SpecializationStrategy=strategy,
        models=types.SimpleNamespace(CompiledMLModel=CompiledMLModel,
                                     utils=types.SimpleNamespace(compile_model=compiler)))


def test_the_runtime_loads_packages_compiled_once_with_the_fast_prediction_hint(tmp_path, monkeypatch):
    from backend.engines import machine
    from backend.engines.coreml.runtime import CoreMLRuntime
    compiler, loads = CountingCompiler(), []
    monkeypatch.setitem(sys.modules, "coremltools", fake_coremltools(compiler, loads))
    monkeypatch.setattr(machine, "coreml_unavailable_reason", lambda: None)  # as on an Apple Silicon Mac
    monkeypatch.setenv("SILICON_DIFFUSION_HOME", str(tmp_path / "home"))
    package = make_package(tmp_path / "res")
    for units in ("CPU_AND_GPU", "CPU_AND_NE", "CPU_AND_GPU"):  # e.g. switching units, reduce-memory reloads
        model = CoreMLRuntime.load(package, units)
        assert model.fast_prediction
    assert len(compiler.calls) == 1
    assert [u for _, u, _ in loads] == ["CPU_AND_GPU", "CPU_AND_NE", "CPU_AND_GPU"]
    assert all(p.suffix == ".mlmodelc" and str(p).startswith(str(tmp_path / "home" / "coreml-compiled"))
               for p, _, _ in loads)
    assert all(h == {"specializationStrategy": "FastPrediction"} for _, _, h in loads)


def test_the_runtime_refuses_off_macos_in_one_sentence(tmp_path):
    from backend.engines.coreml.runtime import CoreMLRuntime
    if sys.platform == "darwin":
        pytest.skip("this is a Mac")
    with pytest.raises(UserError, match="Core ML prediction needs macOS"):
        CoreMLRuntime.load(make_package(tmp_path), "ALL")
