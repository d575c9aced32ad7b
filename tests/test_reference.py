"""The notebook's maths (reference.py) against float64, on several shapes and all dtypes; the
centroid through backend torch. (The torch backend's covariance, chunked.py: test_chunked.py.)"""

from __future__ import annotations

import pytest
import torch

from helpers import DTYPES, cov64, make_w, rel_fro
from refframe import gather_mean, reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1), (50, 3), (300, 64), (1000, 129), (40, 200)])
@pytest.mark.parametrize("offset", [0.0, 40.0])
def test_reference_covariance_matches_float64(dtype, shape, offset):
    W = make_w(*shape, dtype, offset_sigmas=offset)
    mean, cov = reference.covariance(W)
    mu64, c64 = cov64(W)
    assert mean.dtype == cov.dtype == torch.float32
    assert cov.shape == (shape[1], shape[1])
    assert rel_fro(mean, mu64) < 1e-6
    # fp32 two-pass: a few times the ~2-4e-7 floor; offsets are removed before the product.
    assert rel_fro(cov, c64) < 2e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_centroid(dtype):
    W = make_w(500, 33, dtype)
    ids = torch.tensor([0, 7, 499, 250, 7], dtype=torch.int32)
    got = gather_mean(W, ids, backend="torch")
    want = W.to(torch.float64)[ids.long()].mean(dim=0)
    assert rel_fro(got, want) < 1e-6


def test_reference_segment_mean():
    W = make_w(100, 10, torch.float32)
    ids = torch.tensor([1, 2, 3, 50, 60])
    got = reference.segment_mean(W, ids, torch.tensor([0, 3, 5]))
    assert torch.allclose(got[0], W[[1, 2, 3]].mean(0))
    assert torch.allclose(got[1], W[[50, 60]].mean(0))
