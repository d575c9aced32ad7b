"""Native gather_mean / segment_mean against torch and float64."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import DTYPES, make_w, needs_native, rel_fro
from refframe import ClusterIdsError, InputError, gather_mean, segment_mean

pytestmark = needs_native

SHAPES = [(1, 1), (7, 3), (1000, 257), (300, 2560), (64, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_gather_mean_matches_float64(dtype, shape, id_dtype):
    n, d = shape
    W = make_w(n, d, dtype, offset_sigmas=30.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(n, 255), (min(3 * n, 500),), generator=g).to(id_dtype)
    got = gather_mean(W, ids, backend="native")
    want = W.to(torch.float64)[ids.long()].mean(dim=0)
    assert got.dtype == torch.float32 and got.shape == (d,)
    assert rel_fro(got, want) < 1e-7  # fp64 accumulation: only the final fp32 rounding remains
    assert rel_fro(got, gather_mean(W, ids, backend="torch")) < 2e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_mean_non_contiguous(dtype):
    base = make_w(200, 96, dtype)
    for W in (base[:, ::3], base.T.contiguous().T, base[10:150:2]):
        ids = torch.tensor([0, 5, 17, 5, W.shape[0] - 1])
        want = W.to(torch.float64)[ids].mean(dim=0)
        assert rel_fro(gather_mean(W, ids, backend="native"), want) < 1e-7


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_gather_mean_bounds_checked(backend):
    W = make_w(10, 4, torch.float32)
    with pytest.raises(ClusterIdsError, match=r"2 id\(s\) outside \[0, 10\); first: ids\[1\] = 10"):
        gather_mean(W, torch.tensor([0, 10, -1]), backend=backend)
    with pytest.raises(ClusterIdsError, match="integer dtype"):
        gather_mean(W, torch.tensor([0.0]), backend=backend)
    with pytest.raises(ClusterIdsError, match="empty"):
        gather_mean(W, torch.tensor([], dtype=torch.long), backend=backend)
    with pytest.raises(InputError, match="2-D"):
        gather_mean(W[0], torch.tensor([0]), backend=backend)
    assert gather_mean(torch.zeros(5, 0), torch.tensor([1, 2]), backend=backend).shape == (0,)  # no columns
    # a list (or numpy array) of ids is taken as build_frame takes it
    assert torch.equal(gather_mean(W, [1, 2, 3], backend=backend), gather_mean(W, torch.tensor([1, 2, 3]), backend=backend))


def test_kernels_check_their_own_inputs():
    # Below the Python layer the ops still refuse bad input (a RuntimeError from TORCH_CHECK).
    W = make_w(10, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"2 id\(s\) outside \[0, 10\)"):
        torch.ops.refframe.gather_mean(W, torch.tensor([0, 10, -1]))
    with pytest.raises(RuntimeError, match="integer dtype"):
        torch.ops.refframe.gather_mean(W, torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match="empty"):
        torch.ops.refframe.gather_mean(W, torch.tensor([], dtype=torch.long))


def test_covariance_rejects_what_no_backend_takes():
    from refframe import covariance

    for bad, why in ((torch.zeros(5), "2-D"), (torch.zeros(3, 4, dtype=torch.int32), "floating point"), ([[1.0]], "torch.Tensor")):
        with pytest.raises(InputError, match=why):
            covariance(bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_mean_matches_reference(dtype):
    W = make_w(500, 70, dtype)
    ids = torch.randint(0, 500, (300,), generator=torch.Generator().manual_seed(2))
    offsets = torch.tensor([0, 1, 100, 101, 300])
    got = segment_mean(W, ids, offsets, backend="native")
    X = W.to(torch.float64)
    want = torch.stack([X[ids[a:b]].mean(0) for a, b in zip(offsets[:-1], offsets[1:])])
    assert got.shape == (4, 70)
    assert rel_fro(got, want) < 1e-7
    assert rel_fro(got, segment_mean(W, ids, offsets, backend="torch")) < 2e-6


def test_segment_mean_rejects_bad_offsets():
    W = make_w(10, 4, torch.float32)
    with pytest.raises(RuntimeError, match="start at 0 and end at len"):
        segment_mean(W, torch.tensor([1, 2]), torch.tensor([0, 1]), backend="native")
    with pytest.raises(RuntimeError, match="segment 0 is empty"):
        segment_mean(W, torch.tensor([1, 2]), torch.tensor([0, 0, 2]), backend="native")


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([0, 2, 2, 5], "segment 1 is empty"),
        ([0, 3, 2, 5], "segment 1 is empty or offsets decrease"),
        ([1, 3, 5], "must start at 0 and end at len(ids) = 5"),
        ([0, 3, 6], "must start at 0 and end at len(ids) = 5"),
        ([0], "at least 2 entries"),
        ([[0, 5]], "at least 2 entries"),
        ([0.0, 5.0], "integer dtype"),
    ],
)
def test_offsets_checked_on_the_host_before_a_gpu_sees_them(offsets, message):
    # The CUDA kernels assert on bad offsets (which would poison the CUDA context), so the Python
    # layer checks them first, with the CPU kernel's rules.
    from refframe import checks

    with pytest.raises(ValueError, match=re.escape(message)):
        checks.check_offsets(torch.tensor(offsets), 5)
    checks.check_offsets(torch.tensor([0, 2, 5]), 5)  # a valid one passes


def test_opcheck_gather_and_segment_mean():
    W = make_w(40, 24, torch.bfloat16)
    ids = torch.tensor([3, 1, 39])
    torch.library.opcheck(torch.ops.refframe.gather_mean.default, (W, ids))
    torch.library.opcheck(torch.ops.refframe.segment_mean.default, (W, ids, torch.tensor([0, 2, 3])))
