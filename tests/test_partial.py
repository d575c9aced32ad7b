"""Sums, then finish (refframe.partial): the native partial sums of W's rows split into shares,
combined in share order, against one process's center_syrk and a float64 reference.

Shares of one tensor in one process; tests/test_distributed.py runs the same steps between processes.
"""

from __future__ import annotations

import pytest
import torch

from helpers import DTYPES, cov64, make_w, rel_fro
from refframe import _native, partial

pytestmark = pytest.mark.skipif(not _native.has_op("center_syrk_partial"), reason="no native library")

N_ROWS = 9000


def w_with_runs(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A W far from zero, with runs of identical rows (one across a 4,096 boundary, one of zeros at
    the end, short ones) for the shares to split."""
    W = make_w(N_ROWS, 70, torch.float64, seed=seed, offset_sigmas=3.0)
    W[4000:4200] = W[3999]
    W[6000:6005] = W[5999]
    W[7001:7050] = W[3999]
    W[-300:] = 0
    return W.to(dtype)


def shares_of(W: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    b = [0, *cuts, W.shape[0]]
    return [W[b[i] : b[i + 1]] for i in range(len(b) - 1)]


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


# K = 1, 2, 3, 7: shares at multiples of 4,096, uneven, empty, cut inside runs of identical rows.
ALIGNED = [[], [4096], [4096, 8192]]
UNALIGNED = [[3001], [100, 4100, 4101], [0, 1, 4150, 4150, 6003, 8800], [7, 4005, 4199, 6002, 7020, 8900]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cuts", ALIGNED, ids=lambda c: f"K{len(c) + 1}-aligned")
def test_shares_on_4096_boundaries_match_one_process(kernel, dtype, cuts):
    W = w_with_runs(dtype)
    mean0, cov0 = torch.ops.refframe.center_syrk(W)
    mean, cov = partial.native_covariance_of_shares(shares_of(W, cuts))
    assert torch.equal(mean, mean0)
    assert max_ulp(cov, cov0) <= 1
    if not cuts:
        assert torch.equal(cov, cov0)  # one share: the fused op's steps, bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cuts", UNALIGNED, ids=lambda c: f"K{len(c) + 1}")
def test_any_shares_keep_single_process_accuracy(kernel, dtype, cuts):
    W = w_with_runs(dtype)
    _, ref = cov64(W)
    _, cov0 = torch.ops.refframe.center_syrk(W)
    mean, cov = partial.native_covariance_of_shares(shares_of(W, cuts))
    err, err0 = rel_fro(cov, ref), rel_fro(cov0, ref)
    assert err <= 1e-7
    assert err <= 1.5 * err0 + 1e-9
    assert torch.allclose(mean, W.double().mean(0), rtol=0, atol=1e-12)


def test_shares_are_deterministic():
    W = w_with_runs(torch.bfloat16, seed=3)
    a = partial.native_covariance_of_shares(shares_of(W, UNALIGNED[2]))
    b = partial.native_covariance_of_shares(shares_of(W, UNALIGNED[2]))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_exact_set_off_gives_the_fp32_sets_plan():
    """Ranks on different CPUs run with exact=False: the fp32 sets' plan, the same accuracy."""
    W = w_with_runs(torch.bfloat16)
    _, ref = cov64(W)
    _, cov = partial.native_covariance_of_shares(shares_of(W, [4096]), exact=False)
    assert rel_fro(cov, ref) <= 1e-7


def test_runs_joined_across_shares_and_selected():
    W = w_with_runs(torch.float32)
    cuts = [4100, 4150]  # the run 4000..4199 of W[3999] lies in three shares
    parts = shares_of(W, cuts)
    shares = partial.Shares.of_counts([p.shape[0] for p in parts])
    tables = [partial.native_runs(p) for p in parts]
    runs = partial.select_runs(tables, shares)
    # W[3999]'s row: 3999..4199 (201 rows) and 7001..7049 (49): 250 rows, selected (index 0); the
    # zero rows (300) are the other selected row; the run of 6 rows at 5999 is too short.
    assert runs[0].tolist() == [[3999, 4100, 0]]
    assert runs[1].tolist() == [[0, 50, 0]]
    assert runs[2].tolist() == [[0, 50, 0], [2851, 2900, 0], [4550, 4850, 1]]


def test_few_rows_in_runs_are_not_selected():
    W = make_w(2000, 8, torch.float32)
    W[100:110] = W[99]  # 11 rows: a run, but fewer than MIN_COUNT rows in runs
    shares = partial.Shares.of_counts([2000])
    assert partial.select_runs([partial.native_runs(W)], shares)[0].shape == (0, 3)


def test_empty_share_gives_zero_sums():
    W = make_w(100, 9, torch.bfloat16)
    empty = W[:0]
    stats = partial.native_stats(empty, 0, 100, True)
    assert stats.shape == (4, 9) and torch.equal(stats[:3], torch.zeros(3, 9))
    assert torch.isinf(stats[3]).all()
    whole = partial.native_stats(W, 0, 100, True)
    sums = partial.native_partial(empty, whole, torch.zeros(0, 3, dtype=torch.long), 0, 100, True)
    assert sums.shape == (45,) and not sums.any()


@pytest.mark.parametrize(
    "op, args, message",
    [
        ("center_stats", lambda W, s: (W, 90, 100, True), "do not lie in a whole of 100 rows"),
        (
            "center_syrk_partial",
            lambda W, s: (W, s[:, :3], torch.zeros(0, 3, dtype=torch.long), 0, 100, True),
            "stats must be float64 of shape",
        ),
        (
            "center_syrk_partial",
            lambda W, s: (W, s, torch.tensor([[5, 3, 0]]), 0, 100, True),
            "runs must be ordered, disjoint ranges",
        ),
        (
            "center_syrk_partial",
            lambda W, s: (W, s, torch.tensor([[0, 9, 0]]), 0, 100, True),
            "holds different rows",
        ),
        (
            "center_syrk_finish",
            lambda W, s: (torch.zeros(7, dtype=torch.float64), s, 100, torch.float32, True),
            "sums must be float64 of shape",
        ),
        (
            "center_syrk_finish",
            lambda W, s: (torch.zeros(45, dtype=torch.float64), s, 100, torch.int32, True),
            "dtype must be",
        ),
    ],
)
def test_partial_ops_reject_bad_arguments(op, args, message):
    W = make_w(100, 9, torch.float32)
    stats = partial.native_stats(W, 0, 100, True)
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.refframe, op)(*args(W, stats))


def test_partial_ops_opcheck():
    W = make_w(300, 17, torch.bfloat16)
    stats = partial.native_stats(W, 0, 300, True)
    none = torch.zeros(0, 3, dtype=torch.long)
    torch.library.opcheck(torch.ops.refframe.center_stats, (W, 0, 300, True))
    torch.library.opcheck(torch.ops.refframe.center_row_runs, (W,))
    torch.library.opcheck(torch.ops.refframe.center_syrk_partial, (W, stats, none, 0, 300, True))
    sums = partial.native_partial(W, stats, none, 0, 300, True)
    torch.library.opcheck(torch.ops.refframe.center_syrk_finish, (sums, stats, 300, torch.bfloat16, True))
