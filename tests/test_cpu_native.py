"""cpu_native: the attention's exp with row sums, compiled at first use with the system's C compiler and cached."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from backend.engines.mlx import cpu_native

needs_compiler = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
                                    reason="no C compiler here")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A new build into a home of its own (the module keeps the loaded function per process)."""
    monkeypatch.setenv("SILICON_DIFFUSION_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_native, "_function", None)
    return tmp_path


@needs_compiler
def test_exp_rows_matches_float64_on_strided_rows_and_is_cached(fresh):
    exp_rows = cpu_native.exp_rows()
    assert exp_rows is not None
    built = list((fresh / "native").glob("attention-*.so"))
    assert len(built) == 1 and not list((fresh / "native").glob("tmp*"))  # the work folder is gone
    rng = np.random.default_rng(0)
    wide = (rng.standard_normal((37, 300)) * 8).astype(np.float32)
    wide[3, 5], wide[4, 7] = -np.inf, -200.0  # a causal mask's -inf, and far below fp32's range: ~0
    block = wide[:, 10:279]  # rows 300 floats apart, 269 of them each: not a multiple of the vector width
    expected = np.exp(block.astype(np.float64))
    untouched = wide[:, :10].copy()
    sums = np.full(37, np.nan, np.float32)
    exp_rows(block, sums)
    np.testing.assert_allclose(block, expected, rtol=5e-6, atol=1e-37)
    np.testing.assert_allclose(sums, expected.sum(axis=1), rtol=5e-6)
    np.testing.assert_array_equal(wide[:, :10], untouched)
    stamp = built[0].stat().st_mtime_ns
    cpu_native._function = None  # as a new process would: the cached library is loaded, not compiled again
    assert cpu_native.exp_rows() is not None and built[0].stat().st_mtime_ns == stamp


@needs_compiler
def test_exp_rows_refuses_what_it_cannot_read(fresh):
    exp_rows = cpu_native.exp_rows()
    with pytest.raises(ValueError, match="adjacent"):
        exp_rows(np.zeros((4, 6), np.float32).T, np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="adjacent"):
        exp_rows(np.zeros((4, 6)), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="sums"):
        exp_rows(np.zeros((4, 6), np.float32), np.zeros(3, np.float32))


def test_without_a_working_compiler_or_when_turned_off_there_is_no_native_exp(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert cpu_native.exp_rows() is None
    assert not (fresh / "native").exists() or not list((fresh / "native").glob("*.so"))
    monkeypatch.delenv("CC")
    monkeypatch.setattr(cpu_native, "_function", None)
    monkeypatch.setenv("SILICON_DIFFUSION_NATIVE", "0")
    assert cpu_native.exp_rows() is None
