"""Whole frames against a float64 eigendecomposition of the same input (the issue's acceptance bounds)."""

from __future__ import annotations

import pytest
import torch

import refframe
from helpers import DTYPES, cov64, make_w
from refframe.frame import fix_signs

BACKENDS = ["torch"] + (["native"] if refframe.native_available() else [])


def frame_errors(frame: refframe.Frame, W: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    _, C = cov64(W)
    lam64 = torch.linalg.eigvalsh(C).flip(0)
    l1 = float(lam64[0])
    lam = frame.eigenvalues.to(torch.float64)
    V = frame.eigenvectors.to(torch.float64)
    c64 = W.to(torch.float64)[ids].mean(0)
    return {
        "eigenvalues": float((lam - lam64).abs().max()) / l1,
        "residual": float((C @ V - V * lam).norm(dim=0).max()) / l1,
        "orthogonality": float((V.T @ V - torch.eye(V.shape[1], dtype=torch.float64)).abs().max()),
        "centroid": float((frame.centroid.to(torch.float64) - c64).norm() / c64.norm()),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3000, 64), (800, 257), (100, 300)])
def test_frame_within_acceptance_bounds(backend, dtype, shape):
    W = make_w(*shape, dtype, offset_sigmas=30.0)
    ids = torch.arange(5, shape[0], 7)
    frame = refframe.build_frame(W, ids, backend=backend, device="cpu")
    err = frame_errors(frame, W, ids)
    assert err["eigenvalues"] <= 5e-6
    assert err["residual"] <= 2e-5
    assert err["orthogonality"] <= 5e-5
    assert err["centroid"] <= 1e-6
    assert torch.all(frame.eigenvalues[:-1] >= frame.eigenvalues[1:])
    assert frame.backend == backend


def test_eigh_float64_option_gives_small_eigenvalues_accurately():
    W = make_w(2000, 40, torch.float32)
    f32 = refframe.build_frame(W, torch.tensor([1, 2]), device="cpu")
    f64 = refframe.build_frame(W, torch.tensor([1, 2]), device="cpu", eigh_dtype=torch.float64)
    _, C = cov64(W)
    lam64 = torch.linalg.eigvalsh(C).flip(0)
    rel32 = ((f32.eigenvalues.double() - lam64).abs() / lam64).max()
    rel64 = ((f64.eigenvalues.double() - lam64).abs() / lam64).max()
    assert rel64 <= rel32 and rel64 < 1e-6


def test_sign_convention():
    V = torch.tensor([[0.6, -0.8], [-0.8, -0.6]])
    fixed = fix_signs(V)
    assert torch.equal(fixed, torch.tensor([[-0.6, 0.8], [0.8, 0.6]]))
    W = make_w(500, 20, torch.float32)
    frame = refframe.build_frame(W, torch.tensor([0]), device="cpu")
    idx = frame.eigenvectors.abs().argmax(0)
    assert torch.all(frame.eigenvectors.gather(0, idx[None]) > 0)


@pytest.mark.skipif(not refframe.native_available(), reason="native library not built")
def test_backends_agree():
    W = make_w(1500, 48, torch.bfloat16)
    ids = torch.tensor([3, 9, 27, 81, 243])
    a = refframe.build_frame(W, ids, backend="native", device="cpu")
    b = refframe.build_frame(W, ids, backend="torch", device="cpu")
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=0, atol=1e-6 * float(a.eigenvalues[0]))
    # Leading PCs have clear gaps: compare them as vectors (signs are fixed by convention).
    assert torch.allclose(a.eigenvectors[:, :3], b.eigenvectors[:, :3], atol=1e-3)
    assert torch.allclose(a.centroid, b.centroid, rtol=1e-6, atol=1e-7)


def test_variance_report_matches_eigenvalues():
    W = make_w(400, 120, torch.float32)
    frame = refframe.build_frame(W, torch.tensor([1]), device="cpu")
    rep = frame.variance_report()
    ev = frame.eigenvalues.double()
    assert rep.total == pytest.approx(float(ev.sum()))
    assert rep.top[0][1] == pytest.approx(float(ev[0] / ev.sum() * 100))
    assert rep.cumulative[10] == pytest.approx(float(ev[:10].sum() / ev.sum() * 100))
    assert rep.cumulative[100] == pytest.approx(float(ev[:100].sum() / ev.sum() * 100))


def test_unknown_backend_and_native_on_unsupported_device():
    W = make_w(10, 3, torch.float32)
    with pytest.raises(refframe.BackendError, match="unknown backend"):
        refframe.covariance(W, backend="fast")
    with pytest.raises(refframe.BackendError, match="unknown device"):
        refframe.build_frame(W, torch.tensor([0]), device="tpu9")


def test_variance_report_lists_only_counts_below_d():
    ev = torch.linspace(8.0, 1.0, 16)
    frame = refframe.Frame(
        centroid=torch.zeros(16), eigenvalues=ev, eigenvectors=torch.eye(16), mean=None, n_tokens=50, cluster_size=3
    )
    rep = frame.variance_report()
    assert list(rep.cumulative) == [10]
    assert rep.cumulative[10] == pytest.approx(float(ev[:10].sum() / ev.sum() * 100))
    assert not any("100 PCs" in line for line in rep.lines())


def test_long_computations_are_interruptible_on_the_cpu():
    # Ctrl-C during a long native call must not wait for it: the call runs in a worker thread and
    # the main thread waits in short steps (a cancellable covariance is also asked to stop).
    import signal
    import threading
    import time

    from refframe.interrupt import compute_running
    from refframe.interrupt import run_interruptible as _interruptible

    assert _interruptible(torch.device("cpu"), lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        _interruptible(torch.device("cpu"), lambda: 1 / 0)

    release = threading.Event()
    threading.Timer(0.2, signal.raise_signal, (signal.SIGINT,)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _interruptible(torch.device("cpu"), release.wait, 30, cancellable=True)
    assert time.monotonic() - t0 < 5
    assert compute_running()  # still waiting: the command line then exits without joining it
    release.set()
    deadline = time.monotonic() + 5
    while compute_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not compute_running()


@pytest.mark.parametrize("limit, on_caller", [(4096, True), (8, False)])
def test_cpu_eigh_runs_on_the_calling_thread_up_to_the_size_limit(monkeypatch, limit, on_caller):
    # Small covariances are decomposed on the calling thread (LAPACK is faster there: one OpenMP
    # team); larger ones in the interruptible worker thread.
    import threading

    from refframe import build as frame_mod

    threads: list[threading.Thread] = []
    real = torch.linalg.eigh

    def recording_eigh(C, *args, **kwargs):
        threads.append(threading.current_thread())
        return real(C, *args, **kwargs)

    monkeypatch.setattr(frame_mod, "EIGH_ON_CALLER_MAX_D", limit)
    monkeypatch.setattr(torch.linalg, "eigh", recording_eigh)
    W = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    f = refframe.build_frame(W, torch.arange(5), backend="torch", device="cpu")
    assert len(threads) == 1
    assert (threads[0] is threading.main_thread()) == on_caller
    evals = torch.linalg.eigvalsh(torch.cov(W.T.double(), correction=0)).flip(0)
    assert torch.allclose(f.eigenvalues.double(), evals, rtol=1e-5, atol=1e-7)
