"""Memory: what a build will allocate, what the machine has, and the up-front refusal.

A build that cannot fit is refused before any work (ResourceError naming the estimate and what is
available), unless forced (--force, REFFRAME_SKIP_MEMORY_CHECK=1).
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

from . import _native, chunked
from .errors import ResourceError
from .ops import NATIVE_DTYPES


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


SKIP_MEMORY_CHECK_ENV = "REFFRAME_SKIP_MEMORY_CHECK"


def estimate_peak_bytes(
    n: int,
    d: int,
    dtype: torch.dtype,
    backend: str,
    device: torch.device,
    *,
    cluster_size: int = 0,
    eigh_dtype: torch.dtype = torch.float32,
) -> int:
    """Peak bytes a build allocates on `device`, beyond the memory-mapped W itself.

    torch (chunked.py): W is read in place; one chunk of centred fp64 rows, the fp64 d x d
    accumulator and its packed upper triangle, then the fp32 covariance unpacked (about
    15 bytes per d x d entry at most); then the centroid's gathered rows. native: packs of 512 rows
    and an fp64 accumulator for one triangle (~d*d/2 doubles) beside the fp32 covariance. Then the
    eigendecomposition: the covariance, its copy in eigh_dtype, eigenvectors, LAPACK workspace
    (~2 d*d) and three fp32 d x d results. On an accelerator W itself is copied to the device too.
    """
    f32 = 4
    es = torch.empty((), dtype=dtype).element_size()
    eb = torch.empty((), dtype=eigh_dtype).element_size()
    nd, dd = n * d, d * d
    upload = nd * es if device.type != "cpu" else 0
    if backend == "native":
        cov_stage = 2 * 1024 * d * f32 + dd * 8 // 2 + dd * f32
        centroid = 0
    else:
        cov_stage = min(n, chunked.chunk_rows(d)) * d * 8 + 15 * dd
        centroid = cluster_size * d * (es + f32)
    eigh_stage = dd * f32 + 4 * dd * eb + 3 * dd * f32
    return upload + max(cov_stage, eigh_stage, centroid)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now on `device`, or None where it cannot be told.

    CPU (and MPS, which shares it): MemAvailable from /proc/meminfo, capped by a cgroup memory limit
    if one is set; elsewhere os.sysconf. CUDA: torch.cuda.mem_get_info.
    """
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type not in ("cpu", "mps"):
        return None
    avail: int | None = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as fh:
                limit = fh.read().strip()
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, max(0, int(limit) - usage))
        break
    return avail


def check_memory(
    W: torch.Tensor,
    backend: str,
    device: torch.device,
    *,
    name: str = "W",
    cluster_size: int = 0,
    eigh_dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> None:
    """Refuse up front, with the estimate, a build that would not fit in memory.

    Skipped with force=True (CLI: --force) or the environment variable REFFRAME_SKIP_MEMORY_CHECK=1.
    """
    if force or os.environ.get(SKIP_MEMORY_CHECK_ENV, "") not in ("", "0"):
        return
    n, d = W.shape
    need = estimate_peak_bytes(
        n, d, W.dtype, backend, device, cluster_size=cluster_size, eigh_dtype=eigh_dtype
    )
    avail = available_memory(device)
    if avail is None or need <= avail:
        return
    hint = ""
    if backend == "torch" and _native.native_supports(device) and W.dtype in NATIVE_DTYPES:
        native = estimate_peak_bytes(n, d, W.dtype, "native", device, cluster_size=cluster_size, eigh_dtype=eigh_dtype)
        hint = f"use --backend native (needs about {_gb(native)}), " if native < 0.8 * need else ""
    raise ResourceError(
        f"{name}: a {n:,} x {d:,} {str(W.dtype).removeprefix('torch.')} W needs about {_gb(need)} of "
        f"memory with the {backend} backend on {device.type}, only {_gb(avail)} is available; "
        f"{hint}free memory, or pass --force ({SKIP_MEMORY_CHECK_ENV}=1) to try anyway"
    )


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the current address space, so unlike
    ru_maxrss on Linux it does not carry over the parent's peak through fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
