"""One validator per kind of input (W, ids, segment offsets), and the scan for non-finite values.

Each validator takes the caller's rule as a parameter (a build needs N >= 2 rows, an op N >= 1; a
mean may have d = 0 columns) and raises a one-line InputError (or subclass) naming the input.
"""

from __future__ import annotations

import warnings

import torch

from .errors import (
    ClusterIdsError,
    InputError,
    NonFiniteError,
    NumericalError,
    RefframeError,
    RefframeWarning,
)


def check_w(W: object, name: str = "W", *, min_rows: int = 2, min_columns: int = 1, op: str | None = None) -> None:
    """W must be a 2-D floating-point torch.Tensor with at least `min_rows` rows (a build: 2, for a
    covariance; an op: 1) and `min_columns` columns (a mean: 0).

    Messages name W by `name` (a build: the file and key it came from); with `op` (an op called
    from Python) they say what the op needs instead: "gather_mean: W must be 2-D (N, d), ..."."""
    problem = _matrix_problem(W, min_rows, min_columns)
    if problem is not None:
        raise InputError(_OP_MESSAGES[problem](op, W) if op else _BUILD_MESSAGES[problem](name, W))


def _matrix_problem(W: object, min_rows: int, min_columns: int) -> str | None:
    if not isinstance(W, torch.Tensor):
        return "type"
    if W.dim() != 2:
        return "dim"
    if not W.dtype.is_floating_point:
        return "dtype"
    if W.shape[1] < min_columns:
        return "columns"
    if W.shape[0] < min_rows:
        return "rows"
    return None


def _dtype_name(W: torch.Tensor) -> str:
    return str(W.dtype).removeprefix("torch.")


_BUILD_MESSAGES = {
    "type": lambda name, W: f"{name}: expected a torch.Tensor, got {type(W).__name__}",
    "dim": lambda name, W: f"{name}: expected a 2-D matrix (tokens x dims), got shape {tuple(W.shape)}",
    "dtype": lambda name, W: f"{name}: expected a floating-point dtype (bf16, fp16, fp32), got {_dtype_name(W)}",
    "columns": lambda name, W: f"{name}: has d = 0 columns (shape {tuple(W.shape)})",
    "rows": lambda name, W: f"{name}: needs at least 2 rows (tokens) for a covariance, got {W.shape[0]}",
}
_OP_MESSAGES = {
    "type": lambda op, W: f"{op}: W must be a torch.Tensor (N, d), got {type(W).__name__}",
    "dim": lambda op, W: f"{op}: W must be 2-D (N, d), got shape {tuple(W.shape)}",
    "dtype": lambda op, W: f"{op}: W must be floating point (bfloat16, float16, float32), got {W.dtype}",
    "columns": lambda op, W: f"{op}: W must have at least one row and one column, got shape {tuple(W.shape)}",
    "rows": lambda op, W: f"{op}: W must have at least one row and one column, got shape {tuple(W.shape)}",
}


def check_ids(
    ids: object,
    n: int,
    name: str = "cluster ids",
    *,
    allow_empty: bool = False,
    warn_duplicates: bool = False,
) -> torch.Tensor:
    """ids as a 1-D int64 tensor, checked where they are (usually the CPU) against N rows: integer
    dtype, 1-D, non-empty unless allowed, every id in [0, N). A list or numpy array is accepted.

    warn_duplicates: repeated ids get a RefframeWarning (a build counts each as often as it appears,
    as the seed notebook's W[ids].mean(0) does)."""
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ClusterIdsError(f"{name}: not a tensor of integer ids ({first})") from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ClusterIdsError(f"{name}: expected an integer dtype, got {str(ids.dtype).removeprefix('torch.')}")
    if ids.dim() != 1:
        raise ClusterIdsError(f"{name}: expected a 1-D tensor, got shape {tuple(ids.shape)}")
    if ids.numel() == 0 and not allow_empty:
        raise ClusterIdsError(f"{name}: empty; a centroid needs at least one id")
    wraps = ids.dtype == getattr(torch, "uint64", None)  # values >= 2**63 turn negative in int64
    ids = ids.to(torch.int64)  # compared as int64: a uint8 tensor would wrap the bound
    bad = (ids < 0) | (ids >= n)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        value = int(ids[first]) + (2**64 if wraps and int(ids[first]) < 0 else 0)
        raise ClusterIdsError(f"{name}: {int(bad.sum())} id(s) outside [0, {n}); first: ids[{first}] = {value}")
    if warn_duplicates:
        _warn_duplicates(ids, name)
    return ids


def _warn_duplicates(ids: torch.Tensor, name: str) -> None:
    dup = duplicate_ids(ids.to("cpu"))
    if dup is not None:
        count, pos = dup
        warnings.warn(
            f"{name}: {count} duplicate id(s) ({ids.numel()} ids, {ids.numel() - count} distinct), first: "
            f"ids[{pos}] = {int(ids[pos])}; each is counted as often as it appears, as the seed notebook does",
            RefframeWarning,
            stacklevel=3,
        )


def duplicate_ids(ids: torch.Tensor) -> tuple[int, int] | None:
    """(number of repeated entries, position of the first repeat) of a 1-D int64 tensor, or None."""
    if ids.numel() < 2:
        return None
    order = torch.sort(ids, stable=True).indices
    srt = ids[order]
    repeat = srt[1:] == srt[:-1]
    if not bool(repeat.any()):
        return None
    positions = order[1:][repeat]
    return int(repeat.sum()), int(positions.min())


def check_offsets(offsets: torch.Tensor, num_ids: int) -> None:
    """The CPU kernel's checks of segment offsets (K + 1 CSR offsets of K non-empty segments of
    `num_ids` ids), made on the host before a GPU sees them: the CUDA kernels assert on bad offsets,
    which would leave the CUDA context unusable."""
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(
            f"segment_mean: offsets must be 1-D with at least 2 entries (K+1 for K segments), got shape "
            f"{tuple(offsets.shape)}"
        )
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"segment_mean: offsets must have an integer dtype, got {offsets.dtype}")
    off = offsets.to("cpu", torch.int64)
    if int(off[0]) != 0 or int(off[-1]) != num_ids:
        raise ValueError(
            f"segment_mean: offsets must start at 0 and end at len(ids) = {num_ids}, got "
            f"{int(off[0])} and {int(off[-1])}"
        )
    steps = off[1:] - off[:-1]
    if bool((steps <= 0).any()):
        s = int((steps <= 0).nonzero()[0, 0])
        raise ValueError(
            f"segment_mean: segment {s} is empty or offsets decrease (offsets[{s}] = {int(off[s])}, "
            f"offsets[{s + 1}] = {int(off[s + 1])})"
        )


def find_nonfinite(W: torch.Tensor, chunk_bytes: int = 64 << 20) -> tuple[int, int]:
    """(number of NaN/Inf values, first row holding one; -1 if none), scanning W in row chunks so
    that no copy of W is made (at most a chunk's worth of flags at a time)."""
    rows = max(1, chunk_bytes // max(1, W.shape[1] * W.element_size()))
    count, first = 0, -1
    for i in range(0, W.shape[0], rows):
        bad = ~torch.isfinite(W[i : i + rows])
        c = int(bad.sum())
        if c and first < 0:
            first = i + int(bad.any(dim=1).nonzero()[0, 0])
        count += c
    return count, first


def nonfinite_error(W: torch.Tensor, name: str = "W") -> RefframeError:
    """The error to raise once a statistic of W came out NaN or Inf: which values of W are not
    finite, or, when all are, that the arithmetic overflowed."""
    count, first = find_nonfinite(W)
    if count:
        return NonFiniteError(
            f"{name}: {count} NaN/Inf value(s) in W, first in row {first}; fix or drop those rows"
        )
    amax = max((float(W[i : i + 4096].abs().max()) for i in range(0, W.shape[0], 4096)), default=0.0)
    return NumericalError(
        f"{name}: the covariance overflows although W is finite (largest |value| {amax:.3g}); rescale W"
    )
