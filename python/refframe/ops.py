"""The ops, covariance, gather_mean, segment_mean, project and radii.

Each op validates its inputs once (checks.py), then runs the native kernel (refframe._C, see
_native.py) where backends.py chooses it, else the
pure-torch path: the chunked fp64 covariance (chunked.py), the other ops as reference.py computes
them.
"""

from __future__ import annotations

import torch

from . import _native, chunked, reference
from .backends import (
    NATIVE_DTYPES,
    covariance_backend,
    covariance_path,
    covariance_runs_native,
    resolve_backend,
)
from .checks import check_ids, check_offsets, check_w
from .errors import BackendError, InputError

# The choice of backend (backends.py), re-exported for the ops' callers.
__all__ = ["NATIVE_DTYPES", "covariance_backend", "covariance_path", "resolve_backend"]


def covariance(
    W: torch.Tensor,
    *,
    backend: str = "auto",
    group: object = None,
    row_offset: int | None = None,
    n_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean (fp32, (d,)) and population covariance Wc^T Wc / N (fp32, (d, d)) of W (N, d),
    on W's device.

    The native path reads W (bf16, fp16 or fp32) in place, takes an exact fp64 mean and accumulates
    in fp64; the torch path (chunked.py) converts and centres W a chunk of rows at a time in fp64 and
    sums their products in fp64 through torch's BLAS. See covariance_backend for "auto".

    group (a torch.distributed process group; or W a DTensor sharded on dim 0): W holds this rank's
    rows of the whole, ranks in order; every rank gets the whole's mean and covariance, on the CPU
    (docs/distributed.md). row_offset: where this rank's rows start in the whole (default: after
    the previous ranks'); n_rows: how many of W's rows are real (the rest, at the end, are padding).
    """
    shard = _shard(W, group, row_offset, n_rows, "covariance", backend)
    if shard is not None:
        from . import distributed

        mean64, cov = distributed.covariance(shard)
        return mean64.to(torch.float32), cov
    check_w(W, min_rows=1, op="covariance")
    if covariance_runs_native(W, backend):
        mean64, cov = torch.ops.refframe.center_syrk(W)
        return mean64.to(torch.float32), cov
    return chunked.covariance(W)


def _shard(
    W: object,
    group: object,
    row_offset: int | None,
    n_rows: int | None,
    op: str,
    backend: str,
    checks: object = None,
) -> object:
    """This rank's distributed.Shard where W is split between processes, else None (no
    torch.distributed import for a single-process call)."""
    if group is None and type(W).__name__ != "DTensor":
        if row_offset is not None or n_rows is not None:
            raise InputError(f"{op}: row_offset and n_rows describe a share of W and need a group")
        return None
    from . import distributed

    return distributed.shard_of(
        W, group, row_offset=row_offset, n_rows=n_rows, op=op, backend=backend, checks=checks
    )


def _device_ids(ids: object, W: torch.Tensor, op: str, *, allow_empty: bool = False) -> torch.Tensor:
    """ids checked before any kernel sees them, then moved to W's device: the CUDA kernels assert on
    a bad id, which would leave the CUDA context unusable, and a list or an out-of-range id gets the
    same ClusterIdsError on every device."""
    check_w(W, min_rows=1, min_columns=0, op=op)  # a mean of no columns is empty, not an error
    return check_ids(ids, W.shape[0], f"{op}: ids", allow_empty=allow_empty).to(W.device)


def gather_mean(
    W: torch.Tensor,
    ids: torch.Tensor,
    *,
    backend: str = "auto",
    group: object = None,
    row_offset: int | None = None,
    n_rows: int | None = None,
) -> torch.Tensor:
    """Mean of the rows W[ids] as fp32 (d,); the native path accumulates in fp64 without copying rows.
    With a group (or a DTensor W), ids are rows of the whole W, the same on every rank (covariance)."""
    if group is not None or type(W).__name__ == "DTensor":
        return _sharded_segment_mean(W, ids, None, backend, group, row_offset, n_rows, "gather_mean")[0]
    ids = _device_ids(ids, W, "gather_mean")
    if resolve_backend(backend, W.device) == "native":
        return torch.ops.refframe.gather_mean(W, ids)
    return reference.gather_mean(W, ids)


def segment_mean(
    W: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    *,
    backend: str = "auto",
    group: object = None,
    row_offset: int | None = None,
    n_rows: int | None = None,
) -> torch.Tensor:
    """Means of K row segments W[ids[offsets[k]:offsets[k+1]]] as fp32 (K, d), in one pass. With a
    group (or a DTensor W), ids are rows of the whole W, the same on every rank (covariance)."""
    if group is not None or type(W).__name__ == "DTensor":
        return _sharded_segment_mean(W, ids, offsets, backend, group, row_offset, n_rows, "segment_mean")
    ids = _device_ids(ids, W, "segment_mean", allow_empty=True)  # the offsets say what is empty
    if resolve_backend(backend, W.device) == "native":
        if W.device.type != "cpu":
            check_offsets(offsets, ids.numel())
        return torch.ops.refframe.segment_mean(W, ids, offsets.to(W.device))
    return reference.segment_mean(W, ids, offsets)


def _sharded_segment_mean(
    W: object,
    ids: object,
    offsets: torch.Tensor | None,
    backend: str,
    group: object,
    row_offset: int | None,
    n_rows: int | None,
    op: str,
) -> torch.Tensor:
    """segment_mean of a W split between ranks (offsets None: one segment of every id). ids and
    offsets are checked with the ranks' other inputs (an error on one rank is every rank's) and
    must be the same on every rank; ids are checked against the whole's rows once it is known."""
    from . import distributed

    got: dict[str, torch.Tensor] = {}

    def checks() -> tuple:
        got["ids"] = check_ids(ids, 2**62, f"{op}: ids", allow_empty=offsets is not None)
        got["offsets"] = torch.tensor([0, got["ids"].numel()]) if offsets is None else offsets
        check_offsets(got["offsets"], got["ids"].numel())
        return got["ids"], got["offsets"]

    shard = _shard(W, group, row_offset, n_rows, op, backend, checks=checks)
    check_ids(got["ids"], shard.total, f"{op}: ids", allow_empty=True)
    return distributed.segment_mean(shard, got["ids"], got["offsets"])


def project(
    W: torch.Tensor,
    center: torch.Tensor,
    basis: torch.Tensor,
    ids: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """(W[ids] - center) @ basis as fp32 (n, k): rows of W (all when ids is None) in the coordinates
    of the k columns of basis (d, k) around center (d,). The native path reads W in place, centers on
    the fly and sums in fp64 (each coordinate within 1e-6 of the row's distance to center)."""
    center, basis, ids = _frame_inputs(W, center, basis, ids, "project")
    if _runs_native("project", W, backend):
        return torch.ops.refframe.project(W, center, basis, ids)
    return reference.project(W, center, basis, ids)


def radii(
    W: torch.Tensor, center: torch.Tensor, ids: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """||W[i] - center|| as fp32 (n,) for the rows of W (all when ids is None), summed in fp64."""
    center, _, ids = _frame_inputs(W, center, None, ids, "radii")
    if _runs_native("radii", W, backend):
        return torch.ops.refframe.radii(W, center, ids)
    return reference.radii(W, center, ids)


def _runs_native(op: str, W: torch.Tensor, backend: str) -> bool:
    """Whether `op` runs natively on W: the backend resolves to native, the library has the op, and
    it reads W's dtype. backend="native" where it cannot is a BackendError. "auto" leaves project to
    the torch path on a CPU with only the portable kernel set (no AVX2: ARM, old x86), where plain
    C++ loops are slower than the platform's BLAS; backend="native" still runs them."""
    if resolve_backend(backend, W.device) != "native":
        return False
    if (
        backend == "auto"
        and op == "project"
        and W.device.type == "cpu"
        and _native.cpu_kernel() == "portable"
    ):
        return False
    if _native.has_op(op) and W.dtype in NATIVE_DTYPES:
        return True
    if backend == "native":
        what = (
            "has no native kernel"
            if not _native.has_op(op)
            else f"reads bfloat16, float16 or float32, not {W.dtype}"
        )
        raise BackendError(f"backend 'native' cannot run {op}: it {what}")
    return False


def _frame_inputs(
    W: torch.Tensor, center: object, basis: object, ids: object, op: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """center fp32 (d,) and basis fp32 (d, k) on W's device, and ids checked: one-line InputErrors."""
    check_w(W, min_rows=0, op=op)
    d = W.shape[1]
    if not isinstance(center, torch.Tensor) or center.shape != (d,) or not center.dtype.is_floating_point:
        got = tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__
        raise InputError(
            f"{op}: center must be a floating-point tensor of shape ({d},) (W's columns), got {got}"
        )
    if basis is not None:
        if (
            not isinstance(basis, torch.Tensor)
            or basis.dim() != 2
            or basis.shape[0] != d
            or basis.shape[1] < 1
        ):
            got = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
            raise InputError(f"{op}: basis must be a tensor of shape ({d}, k) with k >= 1, got {got}")
        basis = basis.to(W.device, torch.float32).contiguous()
    if ids is not None:
        ids = check_ids(ids, W.shape[0], f"{op}: ids", allow_empty=True).to(W.device)
    return center.to(W.device, torch.float32).contiguous(), basis, ids
