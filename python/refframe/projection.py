"""The vocabulary seen from a frame: coordinates along W's principal axes around the cluster's
centroid, distances to the centroid, and the tokens nearest it.

    coords = refframe.project(W, frame, k=3)             # fp32 (N, 3): (W - centroid) @ V[:, :3]
    r = refframe.radii(W, frame)                         # fp32 (N,): ||W[i] - centroid||
    ids, dist = refframe.nearest(W, frame, n=100)        # the 100 tokens nearest the centroid

W is read in place (bf16, fp16 or fp32, memory-mapped or on a GPU); the frame's fp32 centroid and
eigenvectors are the centre and the axes (ops.project, ops.radii).
"""

from __future__ import annotations

import torch

from . import ops
from .errors import InputError
from .frame import Frame


def project(
    W: torch.Tensor, frame: Frame, k: int | None = None, ids: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Coordinates of the rows W[ids] (all rows when ids is None) in the frame: (W[ids] - centroid)
    @ eigenvectors[:, :k] as fp32 (n, k); k None means all d axes."""
    d = _check_frame(W, frame, "project")
    k = d if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise InputError(f"project: k must be an integer from 1 to d = {d}, got {k!r}")
    return ops.project(W, frame.centroid, frame.eigenvectors[:, :k], ids, backend=backend)


def radii(W: torch.Tensor, frame: Frame, ids: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Full-dimensional distances ||W[i] - centroid|| of the rows (all when ids is None), fp32 (n,)."""
    _check_frame(W, frame, "radii")
    return ops.radii(W, frame.centroid, ids, backend=backend)


def nearest(
    W: torch.Tensor, frame: Frame, n: int | None = None, *, radius: float | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens nearest the frame's centroid: (ids int64, distances fp32), nearest first, ties by
    id. Exactly one of n (that many tokens) and radius (every token within that distance)."""
    if (n is None) == (radius is None):
        raise InputError("nearest: give exactly one of n (a number of tokens) and radius (a distance)")
    N = int(W.shape[0]) if isinstance(W, torch.Tensor) and W.dim() == 2 else 0
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max(N, 1)):
        raise InputError(f"nearest: n must be an integer from 1 to N = {N}, got {n!r}")
    if radius is not None and not (isinstance(radius, (int, float)) and radius >= 0):
        raise InputError(f"nearest: radius must be a distance >= 0, got {radius!r}")
    dist = radii(W, frame, backend=backend).to("cpu")
    order = torch.sort(dist, stable=True).indices  # stable: equal distances stay in id order
    if n is not None:
        order = order[:n]
    else:
        order = order[: int((dist <= radius).sum())]
    return order, dist[order]


def _check_frame(W: object, frame: object, op: str) -> int:
    """d of a frame that fits W (same number of columns), or a one-line InputError."""
    if not isinstance(frame, Frame):
        raise InputError(f"{op}: frame must be a refframe.Frame (refframe.load_frame(path)), got {type(frame).__name__}")
    d = frame.dim
    if isinstance(W, torch.Tensor) and W.dim() == 2 and W.shape[1] != d:
        raise InputError(f"{op}: W has d = {W.shape[1]} columns, the frame has d = {d}")
    return d
