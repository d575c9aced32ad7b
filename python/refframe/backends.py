"""The choice of backend: which path each op takes on a device, and why.

"auto" runs the native kernels where they exist for the tensor's device, passed their self-check
there (_native.py) and read its dtype; the covariance also avoids the CPU kernel sets that are
slower than the chunked torch path's BLAS.
"""

from __future__ import annotations

import torch

from . import _native
from .errors import BackendError
from .layout import BACKENDS

# The dtypes the native kernels read; others (e.g. fp64) take the torch path.
NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# CPU kernel sets whose covariance backend="auto" leaves to the chunked torch path. Measured on a
# 2-core AMD EPYC (Zen 4), 30,000 x 1,024 bf16: portable 17x the chunked path's time; avx2, avx512
# and avx512bf16 0.2-0.3x. (backend="native" still runs any set.)
SLOW_COVARIANCE_KERNELS = ("portable",)


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


def covariance_backend(W: torch.Tensor, backend: str, device: torch.device | None = None) -> tuple[str, str]:
    """("native" or "torch", why) for W's covariance on `device` (W's own by default). "auto" runs
    the native kernels where they exist for the device and read W's dtype, except on a CPU whose
    kernel set is in SLOW_COVARIANCE_KERNELS (slower there than the chunked torch path's BLAS).
    backend="native" where it cannot run is a BackendError."""
    dev = W.device if device is None else device
    if resolve_backend(backend, dev) == "torch":
        return "torch", "backend torch requested" if backend == "torch" else str(
            _native.unavailable_reason(dev)
        )
    if W.dtype not in NATIVE_DTYPES:
        if backend == "native":
            raise BackendError(
                f"backend 'native' cannot run covariance: it reads bfloat16, float16 or float32, not {W.dtype}"
            )
        return (
            "torch",
            f"the native kernels read bfloat16, float16 or float32, not {str(W.dtype).removeprefix('torch.')}",
        )
    kernel = _native.cpu_kernel() if dev.type == "cpu" else ""
    if backend == "auto" and kernel in SLOW_COVARIANCE_KERNELS:
        return "torch", f"the {kernel} kernel set is slower than the BLAS here"
    return "native", f"kernel set {kernel}" if kernel else f"{dev.type} kernels"


def covariance_path(W: torch.Tensor, backend: str, device: torch.device | None = None) -> str:
    """One phrase naming the covariance's path and why, for reports: "native (kernel set avx2)",
    "torch (chunked): the portable kernel set is slower than the BLAS here"."""
    used, why = covariance_backend(W, backend, device)
    return f"native ({why})" if used == "native" else f"torch (chunked): {why}"


def covariance_runs_native(W: torch.Tensor, backend: str) -> bool:
    """Whether covariance(W, backend=backend) runs the native kernel (covariance_backend)."""
    return covariance_backend(W, backend)[0] == "native"
