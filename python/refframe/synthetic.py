"""Synthetic unembedding matrices with the statistics of Qwen3-4B's, for the demo and the tests.

W = mu + Z diag(s) B^T + sigma * G: a power-law spectrum in a random k-dimensional subspace over an
isotropic floor, a global mean with two "rogue" dimensions far from zero, and a planted tight cluster
of tokens around a common center. With the defaults (151936 x 2560, k = 256) it reproduces the seed
notebook's numbers: PC1 ~0.0105 (~0.9% of a total variance ~1.12), first 10 PCs ~2.6%, first 100 ~10%,
cluster centroid norm ~0.37.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QWEN3_4B_SHAPE = (151936, 2560)
QWEN3_4B_CLUSTER = 2212


@dataclass(frozen=True)
class SyntheticSpec:
    n_tokens: int = QWEN3_4B_SHAPE[0]
    dim: int = QWEN3_4B_SHAPE[1]
    cluster_size: int = QWEN3_4B_CLUSTER
    rank: int = 256
    total_variance: float = 1.12
    seed: int = 0

    @classmethod
    def small(cls) -> SyntheticSpec:
        return cls(n_tokens=8192, dim=256, cluster_size=64, rank=32, total_variance=0.112)


def spectrum(spec: SyntheticSpec) -> tuple[torch.Tensor, float]:
    """Per-factor variances s_i^2 (rank,) and the isotropic floor sigma^2, scaled to the spec."""
    scale = spec.total_variance / 1.12
    i = torch.arange(1, spec.rank + 1, dtype=torch.float64)
    s2 = 0.0028 * (i / 2) ** -0.64 * scale
    s2[0] = 0.0101 * scale
    floor = max(spec.total_variance - float(s2.sum()), 0.25 * spec.total_variance) / spec.dim
    return s2, floor


def make_synthetic(
    spec: SyntheticSpec = SyntheticSpec(), dtype: torch.dtype = torch.bfloat16, chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (N, d) in `dtype`, cluster ids (cluster_size,) int64), deterministic for a given seed."""
    n, d, k = spec.n_tokens, spec.dim, min(spec.rank, spec.dim)
    gen = torch.Generator().manual_seed(spec.seed)
    s2, floor = spectrum(spec)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=gen))
    factors = (basis * s2[:k].sqrt().to(torch.float32)).T.contiguous()  # (k, d)
    sigma = floor**0.5

    rms = (spec.total_variance / d) ** 0.5
    mu = torch.randn(d, generator=gen) * 0.15 * rms
    mu[torch.randperm(d, generator=gen)[:2]] = torch.tensor([10.0, -8.0]) * rms
    offset = torch.randn(d, generator=gen)
    center = mu + offset * (0.2 * (spec.total_variance / 1.12) ** 0.5 / float(offset.norm()))
    ids = torch.randperm(n, generator=gen)[: spec.cluster_size].sort().values

    W = torch.empty(n, d, dtype=dtype)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        block = torch.randn(m, k, generator=gen) @ factors
        block += torch.randn(m, d, generator=gen) * sigma
        W[i : i + m] = (block + mu).to(dtype)
    tight = torch.randn(spec.cluster_size, d, generator=gen) * (0.15 * rms)
    W[ids] = (center + tight).to(dtype)
    return W, ids
