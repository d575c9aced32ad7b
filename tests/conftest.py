"""Shared test fixtures; the plain helpers (matrices, references, checks) are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import KERNEL_SETS, D, N, make_w
from refframe.cli import main


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


@pytest.fixture
def model(tmp_path: Path) -> dict[str, Path]:
    """A small W (N x D = 300 x 16 fp32), 20 cluster ids, and a built frame beside them, for the
    tests/test_errors_*.py files. (test_cache.py and test_multi.py define a `model` of their own.)"""
    d = tmp_path / "model"
    d.mkdir()
    W = make_w(N, D, torch.float32, offset_sigmas=5.0)
    save_file({"W": W}, d / "W.safetensors")
    save_file({"cluster_token_ids": torch.arange(3, N, 15)}, d / "ids.safetensors")
    out = d / "frame.safetensors"
    args = ["--W", str(d / "W.safetensors"), "--cluster", str(d / "ids.safetensors")]
    assert main(["build", *args, "--out", str(out), "--backend", "torch", "--device", "cpu"]) == 0
    return {"dir": d, "W": d / "W.safetensors", "ids": d / "ids.safetensors", "out": out}
