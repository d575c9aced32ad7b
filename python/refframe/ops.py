"""The three ops, covariance, gather_mean and segment_mean, and the choice of backend.

Each op validates its inputs once (checks.py), then runs the native kernel (refframe._C, see
_native.py) where it exists for the tensor's device and passed its self-check there, else the
pure-torch reference (reference.py).
"""

from __future__ import annotations

import torch

from . import _native, reference
from .checks import check_ids, check_offsets, check_w
from .errors import BackendError
from .layout import BACKENDS

# The dtypes the native kernels read; others (e.g. fp64) take the torch path.
NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" / "native" / "torch" to the backend that runs on `device`."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    why = _native.unavailable_reason(device)
    if backend == "native" and why is not None:
        raise BackendError(f"backend 'native' cannot run on {device.type}: {why}")
    if backend == "auto":
        return "native" if why is None else "torch"
    return backend


def covariance(W: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean (fp32, (d,)) and population covariance Wc^T Wc / N (fp32, (d, d)) of W (N, d).

    The native path reads W (bf16, fp16 or fp32) in place, takes an exact fp64 mean and accumulates
    in fp64; the torch path is the seed's fp32 computation.
    """
    check_w(W, min_rows=1, op="covariance")
    if resolve_backend(backend, W.device) == "native":
        mean64, cov = torch.ops.refframe.center_syrk(W)
        return mean64.to(torch.float32), cov
    return reference.covariance(W)


def _device_ids(ids: object, W: torch.Tensor, op: str, *, allow_empty: bool = False) -> torch.Tensor:
    """ids checked before any kernel sees them, then moved to W's device: the CUDA kernels assert on
    a bad id, which would leave the CUDA context unusable, and a list or an out-of-range id gets the
    same ClusterIdsError on every device."""
    check_w(W, min_rows=1, min_columns=0, op=op)  # a mean of no columns is empty, not an error
    return check_ids(ids, W.shape[0], f"{op}: ids", allow_empty=allow_empty).to(W.device)


def gather_mean(W: torch.Tensor, ids: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Mean of the rows W[ids] as fp32 (d,); the native path accumulates in fp64 without copying rows."""
    ids = _device_ids(ids, W, "gather_mean")
    if resolve_backend(backend, W.device) == "native":
        return torch.ops.refframe.gather_mean(W, ids)
    return reference.gather_mean(W, ids)


def segment_mean(
    W: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Means of K row segments W[ids[offsets[k]:offsets[k+1]]] as fp32 (K, d), in one pass."""
    ids = _device_ids(ids, W, "segment_mean", allow_empty=True)  # the offsets say what is empty
    if resolve_backend(backend, W.device) == "native":
        if W.device.type != "cpu":
            check_offsets(offsets, ids.numel())
        return torch.ops.refframe.segment_mean(W, ids, offsets.to(W.device))
    return reference.segment_mean(W, ids, offsets)
