"""The seed notebook's maths in pure torch: the reference and the fallback path.

fp32 centering, covariance Wc^T Wc / N (population), unweighted centroid. Runs on any device torch
supports (CPU, CUDA, MPS).
"""

from __future__ import annotations

import torch


def covariance(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean (fp32, (d,)) and population covariance (fp32, (d, d)) of W, as the seed computes them."""
    Wf = W.to(torch.float32)
    mean = Wf.mean(dim=0)
    Wc = Wf - mean
    cov = (Wc.T @ Wc) / Wf.shape[0]
    return mean, cov


def gather_mean(W: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Unweighted mean of the rows W[ids] in fp32, as the seed computes the cluster centroid."""
    return W[ids.to(device=W.device, dtype=torch.long)].to(torch.float32).mean(dim=0)


def segment_mean(W: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Means of the row segments W[ids[offsets[k]:offsets[k+1]]], one row per segment, fp32 (K, d)."""
    ids = ids.to(device=W.device, dtype=torch.long)
    bounds = offsets.tolist()
    rows = [W[ids[a:b]].to(torch.float32).mean(dim=0) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.stack(rows)


# Viewing tokens from a frame: what a user writes by hand, taken a block of rows at a time so that
# the fallback never holds an fp32 copy of the whole of W.
ROW_BLOCK_BYTES = 64 << 20


def _row_blocks(W: torch.Tensor, ids: torch.Tensor | None):
    n = W.shape[0] if ids is None else ids.numel()
    step = max(1, ROW_BLOCK_BYTES // max(1, 4 * W.shape[1]))
    for r0 in range(0, n, step):
        yield r0, (W[r0 : r0 + step] if ids is None else W[ids[r0 : r0 + step].to(W.device, torch.long)])


def project(W: torch.Tensor, center: torch.Tensor, basis: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """(W[ids] - center) @ basis in fp32, fp32 (n, k); all rows when ids is None."""
    n = W.shape[0] if ids is None else ids.numel()
    out = torch.empty((n, basis.shape[1]), dtype=torch.float32, device=W.device)
    for r0, rows in _row_blocks(W, ids):
        torch.matmul(rows.to(torch.float32) - center, basis, out=out[r0 : r0 + rows.shape[0]])
    return out


def radii(W: torch.Tensor, center: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """||W[i] - center|| for the rows (all when ids is None), summed in fp64 where the device has it."""
    acc = torch.float32 if W.device.type == "mps" else torch.float64  # MPS has no fp64
    n = W.shape[0] if ids is None else ids.numel()
    out = torch.empty((n,), dtype=torch.float32, device=W.device)
    c = center.to(acc)
    for r0, rows in _row_blocks(W, ids):
        out[r0 : r0 + rows.shape[0]] = torch.linalg.vector_norm(rows.to(acc) - c, dim=1).to(torch.float32)
    return out
