"""Shared pytest fixtures: the optimized BLAS is loaded first, tiny diffusers pipelines are built once."""
import backend  # noqa: F401  (loads OpenBLAS before anything imports mlx)

import pytest

from tests.tiny_models import FAMILIES, save_pipeline


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """{family: (diffusers_pipeline, folder)} for every tiny family, built on first use."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = save_pipeline(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]
    return get


@pytest.fixture(params=FAMILIES)
def tiny_family(request, tiny_pipelines):
    return request.param, *tiny_pipelines(request.param)
