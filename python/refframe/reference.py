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
