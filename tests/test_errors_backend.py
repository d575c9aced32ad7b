"""Errors, backends and memory: a float64 W and the native backend, a failure or an overflow inside
the computation, and a W too large for the memory available (refused before any work, unless
overridden); the memory estimate itself."""

from __future__ import annotations

import pytest
import torch

import refframe
import refframe.resources as resources
from helpers import D, N, build_args, cli, expect_build_error, make_w
from refframe import BackendError, NumericalError, ResourceError

# ---------------------------------------------------------------------------------------------
# backends and failures inside the computation


def test_covariance_overflow_of_a_finite_w():
    W = make_w(N, D, torch.float32) * 1e25
    with pytest.raises(NumericalError, match="covariance overflows although W is finite"):
        refframe.build_frame(W, torch.tensor([0]), backend="torch")


def test_float64_w_falls_back_to_torch_or_names_the_backend():
    W = make_w(N, D, torch.float64)
    frame = refframe.build_frame(W, torch.tensor([0, 1]), device="cpu")
    assert frame.backend == "torch"
    if refframe.native_available():
        with pytest.raises(
            BackendError, match="backend 'native' reads bfloat16, float16 or float32, not float64"
        ):
            refframe.build_frame(W, torch.tensor([0, 1]), backend="native", device="cpu")


def test_failure_inside_torch_becomes_one_line(model, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge\nmore detail")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(NumericalError, match="the eigendecomposition failed"):
        refframe.build_frame(make_w(N, D, torch.float32), torch.tensor([0]))
    expect_build_error(capsys, model, "W.safetensors:W: the eigendecomposition failed (linalg.eigh")

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch.linalg, "eigh", oom)
    expect_build_error(capsys, model, "W.safetensors:W: out of memory while computing the eigendecomposition")


# ---------------------------------------------------------------------------------------------
# a W too large for memory


def test_too_large_for_memory_refused_before_any_work(model, capsys, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device: 10_000)

    def no_work(*args, **kwargs):
        raise AssertionError("no work may start before the memory check")

    monkeypatch.setattr(refframe.tensorfile, "hash_tensor", no_work)
    monkeypatch.setattr(refframe.ops, "covariance", no_work)
    err = expect_build_error(
        capsys,
        model,
        "W.safetensors:W: a 300 x 16 float32 W needs about",
        "with the torch backend on cpu, only 0.0 MB is available",
        "--force",
    )
    assert "REFFRAME_SKIP_MEMORY_CHECK=1" in err
    with pytest.raises(ResourceError, match="needs about"):
        refframe.build_frame(make_w(N, D, torch.float32), torch.tensor([0]), backend="torch")


def test_memory_check_can_be_overridden(model, capsys, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device: 10_000)
    rc, err = cli(capsys, *build_args(model), "--force")
    assert rc == 0, err
    monkeypatch.setenv("REFFRAME_SKIP_MEMORY_CHECK", "1")
    refframe.build_frame(make_w(N, D, torch.float32), torch.tensor([0]))


def test_memory_estimate():
    cpu = torch.device("cpu")
    n, d = 151_936, 2_560
    torch_bf16 = resources.estimate_peak_bytes(n, d, torch.bfloat16, "torch", cpu)
    native_bf16 = resources.estimate_peak_bytes(n, d, torch.bfloat16, "native", cpu)
    torch_f32 = resources.estimate_peak_bytes(n, d, torch.float32, "torch", cpu)
    # Both read W in place: only d x d work (the eigendecomposition's is the largest), whatever W's dtype.
    assert native_bf16 < 20 * d * d * 8 and torch_bf16 < 20 * d * d * 8
    assert torch_f32 == torch_bf16
    avail = resources.available_memory(cpu)
    assert avail is None or avail > 0
