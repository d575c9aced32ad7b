"""Building a cluster-centric reference frame: PCA of W plus the centroid of a cluster of rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import ops
from .errors import BackendError, ClusterIdsError, InputError


@dataclass
class VarianceReport:
    """How the variance of W spreads over its principal components."""

    total: float
    top: list[tuple[float, float]]  # (eigenvalue, % of total variance) of the leading PCs
    cumulative: dict[int, float]  # number of PCs -> % of total variance they hold

    def lines(self) -> list[str]:
        out = [f"Top {len(self.top)} eigenvalues:"]
        out += [f"  PC{i + 1}: {v:.6f} ({p:.2f}% variance)" for i, (v, p) in enumerate(self.top)]
        out.append("Cumulative variance:")
        out += [f"  First {k} PCs: {p:.2f}%" for k, p in self.cumulative.items()]
        return out


@dataclass
class Frame:
    """A reference frame: the cluster centroid and the PCA basis of W (all fp32, on the CPU).

    eigenvalues are in descending order; column i of eigenvectors is PC i, with its sign fixed so
    that its largest-magnitude component is positive.
    """

    centroid: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    mean: torch.Tensor | None  # column mean of W (not stored in the file)
    n_tokens: int
    cluster_size: int
    backend: str = "torch"
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.eigenvalues.shape[0])

    def variance_report(self, top: int = 10, cumulative: tuple[int, ...] = (10, 100)) -> VarianceReport:
        ev = self.eigenvalues.to(torch.float64)
        total = float(ev.sum())
        pct = (ev / total * 100.0) if total > 0 else torch.zeros_like(ev)
        cum = torch.cumsum(pct, 0)
        return VarianceReport(
            total=total,
            top=[(float(ev[i]), float(pct[i])) for i in range(min(top, self.dim))],
            cumulative={k: float(cum[min(k, self.dim) - 1]) for k in cumulative},
        )


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude component (first one on ties) is positive."""
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, idx.unsqueeze(0)))
    signs[signs == 0] = 1
    return vectors * signs


def resolve_device(device: str | torch.device, backend: str) -> torch.device:
    """ "auto" follows the seed: CUDA if available, else MPS, else CPU (CPU when native is forced and
    the build has no native kernels for the accelerator)."""
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise BackendError(f"unknown device {device!r}; use auto, cpu, cuda or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("device 'cuda' requested but torch sees no CUDA device")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise BackendError("device 'mps' requested but MPS is not available")
        return dev
    if torch.cuda.is_available():
        dev = torch.device("cuda")
    elif torch.backends.mps.is_available():
        dev = torch.device("mps")
    else:
        dev = torch.device("cpu")
    if backend == "native" and not ops.native_supports(dev):
        dev = torch.device("cpu")
    return dev


def check_w(W: torch.Tensor, name: str = "W") -> None:
    if not isinstance(W, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise InputError(f"{name}: expected a 2-D matrix (tokens x dims), got shape {tuple(W.shape)}")
    if not W.dtype.is_floating_point:
        raise InputError(f"{name}: expected a floating-point dtype (bf16, fp16, fp32), got {W.dtype}")
    if W.shape[1] == 0:
        raise InputError(f"{name}: has d = 0 columns")
    if W.shape[0] < 2:
        raise InputError(f"{name}: needs at least 2 rows (tokens) for a covariance, got {W.shape[0]}")


def check_ids(ids: torch.Tensor, n: int, name: str = "cluster ids") -> torch.Tensor:
    """Validate cluster ids against N rows; returns them as int64 on the CPU."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ClusterIdsError(f"{name}: expected an integer dtype, got {ids.dtype}")
    if ids.dim() != 1:
        raise ClusterIdsError(f"{name}: expected a 1-D tensor, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ClusterIdsError(f"{name}: empty; a centroid needs at least one id")
    ids = ids.to("cpu", torch.int64)
    bad = (ids < 0) | (ids >= n)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ClusterIdsError(
            f"{name}: {int(bad.sum())} id(s) outside [0, {n}); first: ids[{first}] = {int(ids[first])}"
        )
    return ids


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def pca(
    W: torch.Tensor,
    *,
    backend: str = "auto",
    device: str | torch.device = "auto",
    eigh_dtype: torch.dtype = torch.float32,
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, torch.device]:
    """Mean, descending eigenvalues and sign-fixed eigenvectors of W's covariance (fp32, CPU).

    Returns (mean, eigenvalues, eigenvectors, backend used, device used).
    """
    check_w(W)
    if backend not in ops.BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(ops.BACKENDS)}")
    dev = resolve_device(device, backend)
    used = ops.resolve_backend(backend, dev)
    timings = {} if timings is None else timings

    t0 = _now(dev)
    Wd = W if W.device == dev else W.to(dev)
    t1 = _now(dev)
    if Wd is not W:
        timings["to_device"] = t1 - t0
    mean, cov = ops.covariance(Wd, backend=used)
    t2 = _now(dev)
    timings["covariance"] = t2 - t1

    eig_dev = dev if dev.type == "cuda" else torch.device("cpu")
    evals, evecs = torch.linalg.eigh(cov.to(eig_dev, eigh_dtype))
    evals = torch.flip(evals, dims=[0]).to("cpu", torch.float32)
    evecs = fix_signs(torch.flip(evecs, dims=[1]).to("cpu", torch.float32))
    timings["eigh"] = _now(dev) - t2
    return mean.to("cpu"), evals, evecs.contiguous(), used, dev


def build_frame(
    W: torch.Tensor,
    ids: torch.Tensor,
    *,
    backend: str = "auto",
    device: str | torch.device = "auto",
    eigh_dtype: torch.dtype = torch.float32,
) -> Frame:
    """PCA of W (N, d) and the centroid of the rows W[ids]: the seed notebook's reference frame.

    backend: "native" (fused kernels), "torch" (the seed's pure-torch maths) or "auto" (native where
    it exists for the device). device: "auto" (CUDA, else MPS, else CPU), or an explicit device.
    eigh_dtype: torch.float64 for eigenvalues accurate relative to themselves, not only to lambda_1.
    """
    check_w(W)
    ids64 = check_ids(ids, W.shape[0])
    timings: dict[str, float] = {}
    mean, evals, evecs, used, dev = pca(
        W, backend=backend, device=device, eigh_dtype=eigh_dtype, timings=timings
    )
    t0 = time.perf_counter()
    centroid_backend = "native" if used == "native" and ops.native_supports(W.device) else "torch"
    centroid = ops.gather_mean(W, ids64, backend=centroid_backend).to("cpu")
    timings["centroid"] = time.perf_counter() - t0
    return Frame(
        centroid=centroid,
        eigenvalues=evals,
        eigenvectors=evecs,
        mean=mean,
        n_tokens=int(W.shape[0]),
        cluster_size=int(ids64.numel()),
        backend=used,
        device=str(dev),
        timings=timings,
    )
