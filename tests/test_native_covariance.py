"""Native center_syrk against float64: awkward shapes, all dtypes, strided input, large offsets."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from helpers import (
    DTYPES,
    KERNEL_SETS,
    cov64,
    make_far_off_w,
    make_subnormal_fp16_w,
    make_w,
    needs_native,
    rel_fro,
)
from refframe import covariance, reference

pytestmark = needs_native

# N around the block (128, 256, 512), run (128, 256) and AMX row-pair (32) lengths; d around the
# 16 x 6 (AVX2, portable), 48 x 8 (AVX-512) and 16 x 32 (AMX) tiles and their pack groups.
SHAPES = [
    (1, 1),
    (1, 7),
    (2, 1),
    (3, 100),
    (63, 17),
    (65, 6),
    (127, 8),
    (129, 49),
    (257, 31),
    (511, 16),
    (513, 33),
    (1100, 97),
    (2000, 250),
]

# Sets with the portable set's arithmetic, hence its bits; amx (split bf16 products) and avx512bf16
# (exact bf16 products of bf16 W) have their own.
BITWISE_SETS = ["avx2", "avx512"]


def native_cov(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.refframe.center_syrk(W)


def bf16_plan_columns(W: torch.Tensor) -> int:
    """Columns the avx512bf16 set multiplies for W: d, plus one extra part for each column whose
    |mean| > 3 sd / 4 that is not constant."""
    X = W.double()
    mu = X.mean(0)
    var = X.var(0, unbiased=False)
    centered = (16 * mu * mu > 9 * var) & (var > 0)
    return W.shape[1] + int(centered.sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_center_syrk_matches_float64(kernel, dtype, shape, offset):
    W = make_w(*shape, dtype, offset_sigmas=offset)
    mean, cov = native_cov(W)
    mu64, c64 = cov64(W)
    assert mean.dtype == torch.float64 and cov.dtype == torch.float32
    assert cov.shape == (shape[1], shape[1])
    assert torch.equal(cov, cov.T)
    assert float((mean - mu64).abs().max()) <= 1e-12 * max(1.0, float(mu64.abs().max()))
    if shape[0] == 1:
        assert float(cov.abs().max()) == 0.0
    else:
        # Products of centered fp32 values are exact (AMX: of their bf16 parts, dropping terms below
        # 2^-26 relative) and sums are at most 128 (AMX 256) terms long before fp64, so what remains
        # is the rounding of the centered values and of the fp32 output (~u each): <= 1e-7 once a
        # matrix is large enough for those to average, a few u on tiny ones.
        tol = 1e-7 if shape[0] >= 1000 and shape[1] >= 16 else 3e-7
        assert rel_fro(cov, c64) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_syrk_large_offset_beats_fp32_reference(kernel, dtype):
    W = make_w(4000, 64, dtype, offset_sigmas=60.0)
    _, c64 = cov64(W)
    _, native = covariance(W, backend="native")
    _, torch32 = reference.covariance(W)  # the notebook's fp32 maths
    assert rel_fro(native, c64) < 1e-7
    assert rel_fro(native, c64) <= rel_fro(torch32, c64)


@pytest.mark.parametrize("sigmas", [1e3, 1e5])
def test_center_syrk_huge_offsets_every_column(kernel, sigmas):
    # fp32 columns whose mean sits 1e3-1e5 sigma from zero: the kernel centers on the fp32-rounded
    # mean, and the rank-one term that rounding leaves must be taken out again (at 1e5 sigma it alone
    # would make the error 1e-5).
    X = make_w(4000, 64, torch.float64)
    X += sigmas * 0.02 * (1.0 + torch.arange(64, dtype=torch.float64) / 64)
    W = X.to(torch.float32)
    mu64, c64 = cov64(W)
    mean, native = covariance(W, backend="native")
    assert rel_fro(native, c64) < 1e-7
    assert torch.allclose(mean.double(), mu64, rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sigmas", [8.0, 30.0, 100.0])
def test_center_syrk_many_far_off_columns(kernel, dtype, sigmas):
    # Half the columns sit 8-100 sd off zero, so their bf16/fp16 values lie on a grid that is
    # coarse for their spread. Centered on their fp32 means, the fp32 run sums of their products
    # rounded with a bias (2-7e-7 of the covariance); centered on the means rounded to W's type,
    # x - center is a small multiple of that grid and the sums are exact or nearly so.
    W = make_far_off_w(6000, 96, dtype, sigmas)
    mu64, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert torch.equal(cov, cov.T)
    assert float((mean - mu64).abs().max()) <= 1e-12 * float(mu64.abs().max())
    assert rel_fro(cov, c64) < 1e-7


def test_center_syrk_subnormal_fp16_columns(kernel):
    # fp16 subnormals are spaced 2^-24 apart at any magnitude: the center rule (center.h) must see
    # that spacing, not the one a normal number of that size would have, and center these columns
    # 5-15 sd off zero on their fp16 means, where the products sum exactly.
    W = make_subnormal_fp16_w(6000, 96)
    assert float(W.abs().max()) < 2.0**-14
    mu64, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert rel_fro(cov, c64) < 4e-8  # 1.2e-7 with the spacing of normal numbers


def discrete_w(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("binary"):
        return (torch.rand(n, d, generator=g) < float(kind.split("=")[1])).double()
    if kind == "integers 0..6":
        return torch.randint(0, 7, (n, d), generator=g).double()
    if kind == "integers -3..40":
        return torch.randint(-3, 41, (n, d), generator=g).double()
    # Half the columns 0/1 indicators, half continuous.
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, ::2] = (torch.rand(n, (d + 1) // 2, generator=g) < 0.3).double()
    return X


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["binary p=0.1", "binary p=0.4", "integers 0..6", "integers -3..40", "mixed"])
def test_center_syrk_discrete_columns(kernel, dtype, kind):
    """Columns on a coarse grid of their own (0/1 indicators, small integers): centered on fp32(mean)
    every row carried the same long remainder and the fp32 sums rounded with a bias (6.8-8.5e-7
    for 0/1 columns, 1.1-3.7e-7 for small integers, every dtype); centered on the mean rounded to
    their grid (found in a sample of rows), the products and sums are exact: 1.8-2.8e-8. Half 0/1,
    half continuous: 1.57e-7 before, 3.7-8.7e-8 (the mixed products keep the continuous columns'
    remainder)."""
    W = discrete_w(kind, 20000, 64, 7).to(dtype)
    mu64, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert torch.equal(cov, cov.T)
    assert rel_fro(cov, c64) < (1e-7 if kind == "mixed" else 5e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_syrk_copied_columns(kernel, dtype):
    """Copies, negated copies and doubled copies of continuous columns: their products are sums of
    squares, whose low bits are biased when the values are short; continuous columns stay centered
    on fp32(mean), so these stay at the usual error (a short center gave 0.9-2.2e-7 in bf16)."""
    g = torch.Generator().manual_seed(12)
    y = torch.randn(20000, 16, generator=g, dtype=torch.float64)
    # Known limit: the avx512bf16 set multiplies bf16 W's short values themselves, so a column's
    # products with its copies are fp32 sums of bf16 squares and round low (about 2e-7).
    bound = 3e-7 if kernel == "avx512bf16" and dtype == torch.bfloat16 else 5e-8
    W = torch.cat([y, y, -y, 2 * y], 1).to(dtype)
    _, c64 = cov64(W)
    _, cov = native_cov(W)
    assert rel_fro(cov, c64) < bound
    x = torch.randn(50000, 1, generator=g, dtype=torch.float64)
    W = x.expand(50000, 8).contiguous().to(dtype)
    _, c64 = cov64(W)
    _, cov = native_cov(W)
    assert rel_fro(cov, c64) < max(bound, 6e-8)


def repeated_rows_w(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """W with runs of identical consecutive rows (a vocabulary's padded or reserved tokens)."""
    g = torch.Generator().manual_seed(31)
    n, d = 30000, 100
    X = make_w(n, d, torch.float64, seed=5)
    X += torch.randn(d, generator=g, dtype=torch.float64) * 0.01  # means about sd / 2
    v = make_w(2, d, torch.float64, seed=6)
    if kind == "padded tail":  # the last third of the rows: one row
        X[-n // 3 :] = v[0]
    elif kind == "zero rows":  # zeros: after centering, identical non-zero rows
        X[-n // 20 :] = 0.0
    elif kind == "runs across blocks":
        # Odd starts and ends, runs across the 128/256/512-row blocks and runs, one row in several
        # runs, another of its own, one run below the 8-row minimum.
        for a, b, row in [(127, 140, 0), (255, 3771, 1), (5001, 5010, 0), (9001, 9008, 1), (20479, 24577, 0)]:
            X[a:b] = v[row]
    elif kind == "many distinct rows":  # more repeated rows than are taken out (64)
        for r in range(100):
            X[200 * r : 200 * r + 40] = X[200 * r]
    elif kind == "short runs, then a padded tail":  # 300 different rows in 8-row runs come first
        for r in range(300):
            X[8 * r : 8 * r + 8] = X[8 * r]
        X[-n // 3 :] = v[0]
    elif kind == "one row":
        X[:] = v[0]
    return X.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kind",
    ["padded tail", "zero rows", "runs across blocks", "many distinct rows", "short runs, then a padded tail", "one row"],
)
def test_center_syrk_runs_of_identical_rows(kernel, dtype, kind):
    """Runs of identical rows add the same products again and again, so fp32 run sums of them do not
    cancel their rounding (the padded tail gave 5.9e-7); the driver takes them out of the packs and
    adds them in fp64."""
    W = repeated_rows_w(kind, dtype)
    _, c64 = cov64(W)
    _, cov = native_cov(W)
    assert torch.equal(cov, cov.T)
    if kind == "one row":
        assert float(cov.abs().max()) == 0.0
    else:
        assert rel_fro(cov, c64) < 5e-8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 0.7, 12.0])
def test_center_syrk_variances_are_unbiased(kernel, dtype, offset):
    """Variances of columns within 16 sd of zero come from fp64 sums, not from the fp32 sums of
    squares, whose low bits can be biased (bf16 values are short); the bias stays far below fp32's
    own rounding."""
    W = make_w(40000, 64, dtype, offset_sigmas=offset)
    _, c64 = cov64(W)
    _, cov = native_cov(W)
    rel = (torch.diagonal(cov).double() - torch.diagonal(c64)) / torch.diagonal(c64)
    assert abs(float(rel.mean())) < 1.5e-8
    assert float(rel.abs().max()) < 1e-7


def test_bf16_set_binary_columns_past_the_centering_limit(bf16_set):
    """0/1 columns with p = 0.4 sit 0.82 sd off zero: all centered, more than d / 4 extra columns,
    so the fp32 set runs them; it centers them on their grid and stays exact (it gave 7.6e-7)."""
    import refframe

    W = discrete_w("binary p=0.4", 20000, 64, 9).to(torch.bfloat16)
    _, c64 = cov64(W)
    _, cov = native_cov(W)
    assert refframe.last_cpu_covariance() == ("avx512", 64)
    assert rel_fro(cov, c64) < 5e-8


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_syrk_strided(kernel, dtype):
    base = make_w(1500, 120, dtype, offset_sigmas=20.0)
    views = {
        "row-strided": base[:, 10:90],
        "every-other-row": base[::2],
        "column-strided": base[:, ::2],
        "transposed": base.T.contiguous().T,
    }
    for name, W in views.items():
        _, cov = native_cov(W)
        _, c64 = cov64(W)
        assert rel_fro(cov, c64) < 1e-7, name


@pytest.mark.parametrize("w", ["offsets", "repeated rows"])
def test_center_syrk_deterministic_across_runs_and_threads(kernel, w):
    if w == "offsets":
        W = make_w(3000, 150, torch.bfloat16, offset_sigmas=10.0)
    else:
        W = repeated_rows_w("runs across blocks", torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(native_cov(W)[1])
        results.append(native_cov(W)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("kernel", BITWISE_SETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 47), (300, 48), (300, 97), (777, 250), (129, 1000), "repeated rows"])
def test_fp32_kernel_sets_are_bitwise_identical_to_portable(monkeypatch, kernel, dtype, shape):
    """Each fp32 SIMD set (each with its own tile shape, block length and packing) gives the
    portable set's bits; a set this CPU lacks is skipped."""
    from refframe import _C

    monkeypatch.setenv("REFFRAME_CPU_KERNEL", kernel)
    if _C.cpu_kernel() != kernel:
        pytest.skip(f"this CPU cannot run the {kernel} kernel set")
    if shape == "repeated rows":
        W = repeated_rows_w("runs across blocks", dtype)
    else:
        W = make_w(*shape, dtype, offset_sigmas=30.0)
    fast = native_cov(W)
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "portable")
    assert _C.cpu_kernel() == "portable"
    slow = native_cov(W)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(31, 16), (300, 47), (777, 250), (129, 1000), (2000, 96)])
def test_amx_set_is_as_precise_as_portable(monkeypatch, dtype, shape):
    """The AMX set's split-bf16 products give their own bits, but the same mean and an error
    against float64 no worse than the fp32 sets' (within a factor that covers rounding luck)."""
    from refframe import _C

    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "amx")
    if _C.cpu_kernel() != "amx":
        pytest.skip("this CPU cannot run the amx kernel set")
    W = make_w(*shape, dtype, offset_sigmas=30.0)
    mu64, c64 = cov64(W)
    amx = native_cov(W)
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "portable")
    portable = native_cov(W)
    assert torch.equal(amx[0], portable[0])
    assert torch.equal(amx[1], amx[1].T)
    assert rel_fro(amx[1], c64) <= 1.5 * rel_fro(portable[1], c64) + 1e-8


def test_kernel_choice_follows_the_cpu(monkeypatch):
    """Without a request the best set this CPU supports is taken; asking for a lesser set gets it
    (or the best below it that the CPU has); an unknown name changes nothing."""
    from refframe import _C

    monkeypatch.delenv("REFFRAME_CPU_KERNEL", raising=False)
    best = _C.cpu_kernel()
    assert best in KERNEL_SETS
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "no-such-set")
    assert _C.cpu_kernel() == best
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "avx2")
    assert _C.cpu_kernel() == ("portable" if best == "portable" else "avx2")
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "avx512")
    assert _C.cpu_kernel() == ("avx512" if best in ("avx512", "avx512bf16", "amx") else best)
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "avx512bf16")
    if best == "amx":  # every AMX CPU so far has AVX512_BF16, but that is the CPU's to say
        assert _C.cpu_kernel() in ("avx512bf16", "avx512")
    else:
        assert _C.cpu_kernel() == best
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "amx")
    assert _C.cpu_kernel() == best


@pytest.fixture
def bf16_set(monkeypatch):
    from refframe import _C

    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "avx512bf16")
    if _C.cpu_kernel() != "avx512bf16":
        pytest.skip("this CPU cannot run the avx512bf16 kernel set")

    def with_set(name: str, W: torch.Tensor):
        monkeypatch.setenv("REFFRAME_CPU_KERNEL", name)
        try:
            return native_cov(W)
        finally:
            monkeypatch.setenv("REFFRAME_CPU_KERNEL", "avx512bf16")

    return with_set


# d around the 48-column panels, with centered columns whose two extra columns start a new panel,
# share one with W's last columns, or are all there is of it.
@pytest.mark.parametrize("shape", [(3000, 96), (3000, 100), (2001, 49), (1500, 300), (513, 24)])
@pytest.mark.parametrize("centered", [1, 3])
def test_bf16_set_centers_offset_columns_exactly(bf16_set, shape, centered):
    """bf16 W with a few columns 50 sigma off zero: those are centered and split into parts (extra
    columns of the product), the rest multiplied as they are; both within 1e-7 of float64, the
    diagonal included, and the mean the other sets' bits."""
    n, d = shape
    W = make_w(n, d, torch.float64)
    W[:, :centered] += 1.0 + torch.arange(centered, dtype=torch.float64)
    W = W.to(torch.bfloat16)
    mu64, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert torch.equal(cov, cov.T)
    assert rel_fro(cov, c64) < 1e-7
    assert rel_fro(torch.diagonal(cov), torch.diagonal(c64)) < 1e-7
    fallback = bf16_set("avx512", W)
    assert torch.equal(mean, fallback[0])
    assert not torch.equal(cov, fallback[1])  # the exact path ran, not the fallback
    # The offset columns' own block, which an uncentered fp32 sum would get wrong by ~1e-4.
    assert rel_fro(cov[:centered], c64[:centered]) < 1e-7


def test_bf16_set_constant_columns_need_no_parts(bf16_set):
    """Constant columns (padding, one-hot features) are centered exactly to zero and need no parts,
    so ten of them in 40 columns (more than d / 4) still take the exact path."""
    W = make_w(1500, 40, torch.float64)
    W[:, 5:15] = 0.375
    W[:, 20] += 2.0  # and one column far from zero, which does need parts
    W = W.to(torch.bfloat16)
    _, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert not torch.equal(cov, bf16_set("avx512", W)[1])  # the exact path ran
    assert rel_fro(cov, c64) < 1e-7
    assert float(cov[5:15].abs().max()) == 0.0 and float(cov[:, 5:15].abs().max()) == 0.0
    assert torch.all(mean[5:15] == 0.375)


@pytest.mark.parametrize("sigmas", [2.0, 4.0, 12.0, 30.0])
def test_bf16_set_many_columns_near_zero_take_two_parts(bf16_set, sigmas):
    """A fifth of the columns 2-30 sd off zero (a matrix with a strong common direction): each is
    centered on its mean rounded to bf16 and split into two exact parts (one extra column), so the
    exact path still runs, within 1e-7 of float64, the diagonal included."""
    import refframe

    n, d = 4000, 120
    W = make_w(n, d, torch.float64, seed=int(sigmas))
    W -= W.mean(0)  # only the moved columns are centered: 24 extra parts, within the limit of 30
    sign = torch.where(torch.arange(24) % 2 == 0, 1.0, -1.0).to(torch.float64)
    W[:, ::5] += sigmas * W[:, ::5].std(0) * sign
    W = W.to(torch.bfloat16)
    mu64, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert refframe.last_cpu_covariance() == ("avx512bf16", d + 24)
    assert torch.equal(cov, cov.T)
    assert rel_fro(cov, c64) < 1e-7
    assert rel_fro(torch.diagonal(cov), torch.diagonal(c64)) < 1e-7
    assert torch.equal(mean, bf16_set("avx512", W)[0])


@pytest.mark.parametrize("sigmas", [100.0, 700.0])
def test_bf16_set_columns_far_off_zero_stay_exact(bf16_set, sigmas):
    """Columns hundreds of sd off zero hold values on bf16's coarse grid there; centered on the mean
    rounded to bf16 they are small multiples of its spacing and their products sum exactly (centered
    on the fp32 mean, every row kept the same fp32 remainder and the block's sums rounded with a
    bias: 1.7e-7 at 700 sd)."""
    import refframe

    n, d = 20000, 48
    g = torch.Generator().manual_seed(int(sigmas))
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    far = torch.arange(0, d, 8)
    X[:, far] += sigmas
    W = X.to(torch.bfloat16)
    mu64, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert refframe.last_cpu_covariance() == ("avx512bf16", d + len(far))
    block = (slice(None), far)
    assert rel_fro(cov[far][:, far], c64[far][:, far]) < 6e-8
    assert rel_fro(cov[block], c64[block]) < 6e-8
    assert rel_fro(cov, c64) < 6e-8


def test_bf16_set_centers_columns_three_quarters_of_an_sd_off_zero(bf16_set):
    """An uncentered column's products with another have a mean of their own, so their fp32 run
    sums round more as the means grow (4x at 0.9 sd when every column is there, without drift
    cancellation); columns more than 3 sd / 4 off zero are centered (one extra part each). Left
    uncentered and without drift cancellation, this block's error was 4.4e-8."""
    import refframe

    n, d, k = 20000, 64, 16
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = X @ (torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64))
    X = X / X.std(0)
    X -= X.mean(0)
    X[:, :k] += torch.linspace(0.8, 0.95, k, dtype=torch.float64)
    W = X.to(torch.bfloat16)
    mu64, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert refframe.last_cpu_covariance() == ("avx512bf16", d + k)
    assert rel_fro(cov[:k, :k], c64[:k, :k]) < 3e-8
    assert rel_fro(cov, c64) < 3e-8


def moderate_mean_w(n: int, d: int, seed: int, sigmas) -> torch.Tensor:
    """Correlated fp64 columns with unit sd, column j moved sigmas[j % len(sigmas)] sd off zero
    (signs alternating)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = X @ (torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64))
    X = X / X.std(0)
    X -= X.mean(0)
    s = torch.tensor(sigmas, dtype=torch.float64).repeat(d // len(sigmas) + 1)[:d]
    sign = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0).to(torch.float64)
    return X + s * sign


@pytest.mark.parametrize("sigmas", [0.55, 0.7])
def test_bf16_set_cancels_the_drift_of_uncentered_columns(bf16_set, sigmas):
    """Every column sd / 2 to 3 sd / 4 off zero: none is centered (no extra columns, so no fallback
    to the fp32 set), and the run sums' drift, mb_i mb_j per row, is cancelled every 32 rows. Without
    the cancellation this W measured 3.5e-8 at 0.55 sd and 4.9e-8 at 0.7 sd; with it 2.5e-8 and
    2.4e-8."""
    import refframe

    n, d = 20000, 64
    W = moderate_mean_w(n, d, 5, [sigmas]).to(torch.bfloat16)
    assert bf16_plan_columns(W) == d
    _, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert refframe.last_cpu_covariance() == ("avx512bf16", d)
    assert torch.equal(cov, cov.T)
    assert rel_fro(cov, c64) < 3e-8
    assert rel_fro(torch.diagonal(cov), torch.diagonal(c64)) < 5e-8


# N around the 32-row groups of the cancelling step and the 256-row runs (none at N < 32), d
# around the 48 x 8 tiles, and columns of every kind: near zero (no cancelling value), moderate
# (cancelled), past 3 sd / 4 (centered, with a part), 40 sd off, constant.
@pytest.mark.parametrize("shape", [(31, 9), (33, 12), (257, 50), (1037, 61), (4001, 100), (20011, 57)])
def test_bf16_set_mixed_column_kinds_awkward_shapes(bf16_set, shape):
    import refframe

    n, d = shape
    W = moderate_mean_w(n, d, n + d, [0.1, 0.6, 0.4, 0.7, 1.2, 0.65, 0.3, 0.05])
    W[:, 2] += 40.0
    W[:, 3] = 0.375
    W = W.to(torch.bfloat16)
    _, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert refframe.last_cpu_covariance() == ("avx512bf16", bf16_plan_columns(W))
    assert torch.equal(cov, cov.T)
    assert rel_fro(cov, c64) < 1e-7  # 2.2-6.3e-8; the avx512 set: 3.9e-8 - 1.4e-7
    assert torch.equal(mean, bf16_set("avx512", W)[0])


def test_bf16_set_drift_cancellation_is_deterministic_across_threads(bf16_set):
    W = moderate_mean_w(3001, 130, 11, [0.6, 0.2, 0.7, 1.0]).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(native_cov(W))
    finally:
        torch.set_num_threads(threads)
    for mean, cov in outs[1:]:
        assert torch.equal(mean, outs[0][0]) and torch.equal(cov, outs[0][1])


def test_last_cpu_covariance_names_the_set_that_ran(bf16_set):
    import refframe

    W = make_w(600, 100, torch.float64)
    W[:, :3] += 2.0
    refframe.covariance(W.to(torch.bfloat16), backend="native")
    assert bf16_plan_columns(W.to(torch.bfloat16)) >= 103  # the three moved columns, and any others
    assert refframe.last_cpu_covariance() == ("avx512bf16", bf16_plan_columns(W.to(torch.bfloat16)))
    refframe.covariance(W.to(torch.float16), backend="native")
    assert refframe.last_cpu_covariance() == ("avx512", 100)


def test_last_cpu_covariance_any_cpu():
    import refframe
    from refframe import _C

    refframe.covariance(make_w(50, 9, torch.bfloat16), backend="native")
    name, columns = refframe.last_cpu_covariance()
    assert name in KERNEL_SETS and columns >= 9
    assert name == _C.cpu_kernel() or (_C.cpu_kernel() == "avx512bf16" and name == "avx512")


def test_bf16_set_diagonal_is_unbiased(bf16_set):
    """Squares of bf16 numbers have biased low bits, so fp32 sums of them round low (by ~1.5e-7 of
    the sum at 128 rows a run); the set takes the diagonal from fp64 sums of squares instead."""
    W = make_w(40000, 64, torch.bfloat16)
    _, c64 = cov64(W)
    _, cov = native_cov(W)
    rel = (torch.diagonal(cov).double() - torch.diagonal(c64)) / torch.diagonal(c64)
    assert abs(float(rel.mean())) < 2e-8
    assert float(rel.abs().max()) < 2e-7


@pytest.mark.parametrize("scale", [1e-16, 1e-8, 1e8, 1e16])
def test_bf16_set_any_magnitude(bf16_set, scale):
    """Each column is scaled by a power of two before its products (vdpbf16ps flushes subnormal
    inputs and sums to zero), so W keeps its precision at any magnitude whose covariance fp32 holds
    (at 1e-16 the covariance is ~1e-35, near the smallest normal fp32)."""
    W = (make_w(3000, 70, torch.float64) * scale).to(torch.bfloat16)
    mu64, c64 = cov64(W)
    mean, cov = native_cov(W)
    assert torch.isfinite(cov).all()
    assert rel_fro(cov, c64) < 1e-7
    assert float((mean - mu64).abs().max()) <= 1e-12 * float(mu64.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_bf16_set_falls_back_to_avx512(bf16_set, dtype):
    """fp16 and fp32 W, and bf16 W with more than d / 4 extra columns (here every column sits far
    from zero), are done by the avx512 set: its bits exactly."""
    W = make_w(700, 80, torch.float64) + 5.0
    W = W.to(dtype)
    ours = native_cov(W)
    theirs = bf16_set("avx512", W)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_bf16_set_non_finite_input_falls_back(bf16_set):
    W = make_w(300, 40, torch.float64)
    W[5, 7] = float("inf")
    W[9, 20] = float("nan")
    W = W.to(torch.bfloat16)
    ours = native_cov(W)
    theirs = bf16_set("avx512", W)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0, equal_nan=True)


def test_center_syrk_rejects_bad_input():
    with pytest.raises(RuntimeError, match="2-D"):
        native_cov(torch.zeros(3))
    with pytest.raises(RuntimeError, match="bfloat16, float16 or float32"):
        native_cov(torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="at least one row"):
        native_cov(torch.zeros(0, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_center_syrk(dtype):
    W = make_w(70, 20, dtype)
    torch.library.opcheck(torch.ops.refframe.center_syrk.default, (W,))


@pytest.mark.skipif(not os.environ.get("REFFRAME_FULL"), reason="full Qwen3-4B shape: set REFFRAME_FULL=1")
def test_center_syrk_full_shape():
    from refframe.synthetic import make_synthetic

    W, _ = make_synthetic()
    _, cov = native_cov(W)
    acc = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64)
    s = torch.zeros(W.shape[1], dtype=torch.float64)
    for i in range(0, W.shape[0], 8192):
        s += W[i : i + 8192].to(torch.float64).sum(0)
    mu = s / W.shape[0]
    for i in range(0, W.shape[0], 8192):
        X = W[i : i + 8192].to(torch.float64) - mu
        acc += X.T @ X
    assert rel_fro(cov, acc / W.shape[0]) < 1e-7


def test_covariance_progress_counts_rows_of_the_running_call():
    import threading
    import time

    from refframe import _native

    assert _native.covariance_progress() is None  # nothing running
    W = make_w(40_000, 512, torch.bfloat16)
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            p = _native.covariance_progress()
            if p is not None:
                seen.append(p)
            time.sleep(0.001)

    t = threading.Thread(target=poll)
    t.start()
    try:
        for _ in range(3):  # a few calls, so the poller surely sees one running
            covariance(W, backend="native")
    finally:
        stop.set()
        t.join()
    assert seen, "the poller never saw a covariance running"
    assert all(total == 40_000 and 0 <= done <= total for done, total in seen)
    assert any(done > 0 for done, _ in seen)
    assert _native.covariance_progress() is None  # reset when the call ends


def test_self_check_passes_on_the_cpu_kernels(monkeypatch):
    from refframe import _native

    monkeypatch.setattr(_native, "_SELF_CHECKS", {})
    assert _native.native_self_check(torch.device("cpu")) is None


def test_self_check_key_names_the_cuda_kernel(monkeypatch):
    # Each CUDA covariance kernel gets its own self-check (REFFRAME_CUDA_KERNEL is read per call).
    from refframe import _native

    monkeypatch.delenv("REFFRAME_CUDA_KERNEL", raising=False)
    assert _native._device_key(torch.device("cuda:1")) == "cuda:1 (simt kernel)"
    monkeypatch.setenv("REFFRAME_CUDA_KERNEL", "mma")
    assert _native._device_key(torch.device("cuda:1")) == "cuda:1 (mma kernel)"
    assert _native._device_key(torch.device("cpu")) == "cpu"


def test_self_check_catches_wrong_or_failing_kernels(monkeypatch):
    import refframe
    from refframe import _native

    real = torch.ops.refframe.center_syrk

    def slightly_off(W):
        mean, cov = real(W)
        return mean, cov * (1 + 1e-5)

    def broken(W):
        raise RuntimeError("no kernel image is available for execution on the device")

    for fake, fragment in ((slightly_off, "bfloat16: covariance error 1.0e-05"), (broken, "RuntimeError: no kernel")):
        monkeypatch.setattr(_native, "_SELF_CHECKS", {})
        monkeypatch.setattr(torch.ops.refframe, "center_syrk", fake)
        with pytest.warns(refframe.RefframeWarning, match="failed their self-check on cpu"):
            reason = _native.native_self_check(torch.device("cpu"))
        assert reason is not None and fragment in reason


def test_gpu_without_a_passing_self_check_uses_torch(monkeypatch):
    """A GPU whose native kernels fail the self-check (here: this CPU-only torch has no CUDA at all,
    so the check cannot even launch) gets the pure-torch path under auto, and a clear error when
    the native backend is asked for."""
    import refframe
    from refframe import BackendError, _native, ops

    class FakeLib:
        WITH_CUDA = 1

        @staticmethod
        def cpu_kernel():
            return "avx2"

    monkeypatch.setattr(_native, "_C", FakeLib)
    monkeypatch.setattr(_native, "_SELF_CHECKS", {})
    cuda = torch.device("cuda")
    with pytest.warns(refframe.RefframeWarning, match="failed their self-check"):
        assert ops.resolve_backend("auto", cuda) == "torch"
    with pytest.raises(BackendError, match="backend 'native' cannot run on cuda: its self-check failed there"):
        ops.resolve_backend("native", cuda)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "native"


def _start_covariance(W, box):
    """center_syrk(W) in a new thread; box gets the thread's cancel key and, if it fails, "error"."""
    from refframe import _native

    def run():
        box["key"] = _native.thread_key()
        try:
            torch.ops.refframe.center_syrk(W)
        except RuntimeError as exc:
            box["error"] = str(exc)
        finally:
            _native.clear_cancel(box["key"])

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_for_progress(done, timeout_s=30.0):
    """Polls until done(covariance_progress()) holds (or time runs out); returns whether it did."""
    from refframe import _native

    deadline = time.monotonic() + timeout_s
    while not done(_native.covariance_progress()) and time.monotonic() < deadline:
        time.sleep(0.0005)
    return done(_native.covariance_progress())


def test_covariance_can_be_cancelled_between_row_blocks():
    # An interrupted build asks its running kernel to stop; it raises at its next row block.
    from refframe import _native

    box = {}
    t = _start_covariance(torch.randn(400_000, 256).to(torch.bfloat16), box)
    _wait_for_progress(lambda p: p is not None or not t.is_alive())
    _native.cancel_covariance(box["key"])
    t.join()
    assert "center_syrk: cancelled" in box.get("error", "finished")
    assert _native.covariance_progress() is None  # counters reset however the call ended


def test_cancel_reaches_only_its_own_thread_and_can_come_first():
    from refframe import _native

    W = make_w(2000, 40, torch.float32)
    me = _native.thread_key()
    _native.cancel_covariance(me ^ 1)  # another thread's request leaves this call alone
    assert torch.isfinite(torch.ops.refframe.center_syrk(W)[1]).all()
    _native.clear_cancel(me ^ 1)
    _native.cancel_covariance(me)  # a request made before the call starts is honoured
    with pytest.raises(RuntimeError, match="center_syrk: cancelled"):
        torch.ops.refframe.center_syrk(W)
    _native.clear_cancel(me)  # withdrawn: the next call runs
    assert torch.isfinite(torch.ops.refframe.center_syrk(W)[1]).all()


def test_an_abandoned_call_leaves_a_newer_calls_progress_alone():
    # A cancelled (abandoned) call that ends while a newer one runs must not reset its progress.
    from refframe import _native

    def total_is(n):
        return lambda p: (p or (0, 0))[1] == n

    old, new = {}, {}
    W_old = torch.randn(300_000, 512).to(torch.bfloat16)  # about a second each, on a core each
    W_new = torch.randn(200_000, 512).to(torch.bfloat16)
    t_old = _start_covariance(W_old, old)
    assert _wait_for_progress(total_is(300_000))
    t_new = _start_covariance(W_new, new)
    assert _wait_for_progress(total_is(200_000))
    _native.cancel_covariance(old["key"])
    t_old.join()
    assert "cancelled" in old["error"]
    assert t_new.is_alive() and (_native.covariance_progress() or (0, 0))[1] == 200_000
    _native.cancel_covariance(new["key"])
    t_new.join()
    assert _native.covariance_progress() is None


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None)
    @given(
        n=st.integers(1, 1500),
        d=st.integers(1, 130),
        centered=st.integers(0, 130),
        sigmas=st.sampled_from([1.5, 5.0, 50.0]),
        log_scale=st.integers(-12, 12),
        constant=st.booleans(),
        dtype=st.sampled_from(DTYPES),
        seed=st.integers(0, 2**16),
    )
    def test_center_syrk_random_plans(n, d, centered, sigmas, log_scale, constant, dtype, seed):
        """Whatever the mix of columns near and far from zero (so whichever plan the exact bf16 set
        makes, or its fallback), the magnitude, a constant column or the dtype: within the small-shape
        bound of float64, with the best set this CPU has."""
        W = make_w(n, d, torch.float64, seed=seed)
        k = min(centered, d)
        W[:, :k] += sigmas * 0.04
        if constant:
            W[:, d // 2] = 0.75
        if dtype == torch.float16:  # finite and mostly normal in fp16 (largest 65504, smallest normal 6e-5)
            log_scale = max(-2, min(2, log_scale))
        W = (W * 10.0**log_scale).to(dtype)
        mu64, c64 = cov64(W)
        mean, cov = native_cov(W)
        assert torch.equal(cov, cov.T)
        assert float((mean - mu64).abs().max()) <= 1e-12 * max(1e-300, float(mu64.abs().max()))
        if n == 1:
            assert float(cov.abs().max()) == 0.0
        else:
            # Sums of few rows, or few entries, do not average their roundings: up to ~50 u there.
            # Many columns tens of sigma off zero need no allowance (center.h): 300 random plans
            # of this kind at n >= 1000 and d >= 16 stayed below 1.2e-7.
            large = n >= 1000 and d >= 16
            assert rel_fro(cov, c64) < (2e-7 if large else 3e-6)
