"""Shared test fixtures; the plain helpers (matrices, references) are in helpers.py."""

from __future__ import annotations

import pytest

from helpers import KERNEL_SETS


@pytest.fixture(params=KERNEL_SETS)
def kernel(request, monkeypatch):
    """Runs a test with each CPU kernel set in turn; a set this CPU cannot run is skipped."""
    from refframe import _C

    monkeypatch.setenv("REFFRAME_CPU_KERNEL", request.param)
    if _C.cpu_kernel() != request.param:
        pytest.skip(f"this CPU cannot run the {request.param} kernel set")
    return request.param


@pytest.fixture(autouse=True)
def _no_pca_cache(monkeypatch, tmp_path_factory):
    """Builds in tests compute their PCA (REFFRAME_NO_CACHE=1) unless a test turns the cache on
    itself (tests/test_cache.py); the cache directory is never the user's."""
    monkeypatch.setenv("REFFRAME_NO_CACHE", "1")
    monkeypatch.setenv("REFFRAME_CACHE_DIR", str(tmp_path_factory.mktemp("pca-cache")))
