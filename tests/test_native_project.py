"""Native project / radii on CPU against float64: kernel sets x dtypes x awkward shapes.

The contract: every coordinate of (W[ids] - c) @ V within 1e-6 ||W[i] - c|| of float64 on the same
fp32 center and basis values (also for rows far from the centroid and columns far off zero), every
radius within 2e-7 relative, and the same bits for any thread count. k picks the path
(project.cpp): lanes along d (dot) up to the set's dot_max_k (40 on avx512, 8 on avx2), register
tiles above.
"""

from __future__ import annotations

import re

import pytest
import torch

from helpers import DTYPES, make_w, needs_native

pytestmark = needs_native

# (N, d) around the tiles (6 or 2 rows), dot groups (4 rows), blocks (192 or 48 rows) and 16-lane /
# 64-term chunks.
SHAPES = [(1, 1), (5, 7), (1000, 7), (5, 300), (1000, 300), (97, 1100)]
KS = [1, 3, 17, 64, "d"]
BOUND = 1e-6


def frame_of(W: torch.Tensor, k: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A centroid (the fp32 mean of W's first rows) and the first k columns of a random orthogonal
    fp32 basis, as a non-contiguous view (V[:, :k])."""
    g = torch.Generator().manual_seed(seed)
    d = W.shape[1]
    center = W[: max(1, W.shape[0] // 3)].double().mean(0).float()
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return center, Q.float()[:, :k]


def reference(W, center, basis, ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 coordinates and radii of the rows W[ids] (all rows for None)."""
    X = W.double() if ids is None else W.double()[ids]
    Xc = X - center.double()
    return Xc @ basis.double(), Xc.norm(dim=1)


def worst(got: torch.Tensor, want: torch.Tensor, radius: torch.Tensor) -> float:
    """Largest |got - want| of a row over that row's distance from the center (a row at distance 0
    must come out exactly 0)."""
    err = (got.double() - want).abs().reshape(want.shape[0], -1).amax(dim=1)
    if bool((err[radius == 0] > 0).any()):
        return float("inf")
    return float((err / radius.clamp_min(1e-300)).max()) if err.numel() else 0.0


def check(W, k, ids=None, *, seed=0) -> float:
    center, basis = frame_of(W, k, seed=seed)
    got = torch.ops.refframe.project(W, center, basis, ids)
    want, radius = reference(W, center, basis, ids)
    n = W.shape[0] if ids is None else len(ids)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    return worst(got, want, radius)


def check_radii(W, ids=None) -> float:
    center, _ = frame_of(W, 1)
    got = torch.ops.refframe.radii(W, center, ids)
    _, radius = reference(W, center, center[:, None], ids)
    assert got.dtype == torch.float32 and got.shape == radius.shape
    return worst(got, radius, radius)


def with_threads(n: int, fn):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", KS)
def test_project_matches_float64(kernel, dtype, shape, k):
    n, d = shape
    k = d if k == "d" else k
    if k > d:
        pytest.skip("k > d")
    W = make_w(n, d, dtype, offset_sigmas=40.0)  # three columns 40 sd off zero
    repeats = torch.tensor([n - 1, 0, n // 2, 0, n - 1, n - 1])
    for ids in (None, repeats):
        assert check(W, k, ids) <= BOUND


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_radii_match_float64(kernel, dtype, shape):
    n, d = shape
    W = make_w(n, d, dtype, offset_sigmas=40.0)
    for ids in (None, torch.tensor([n - 1, 0, n - 1, n // 2])):
        assert check_radii(W, ids) <= 2e-7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 64, 300])
def test_rows_far_from_the_centroid(kernel, dtype, k):
    """Every seventh row 1000x longer, and every other column moved 40 sd off zero."""
    X = make_w(1000, 300, torch.float64, offset_sigmas=40.0)
    X[::7] *= 1000.0
    X[:, ::2] += 40 * 0.02
    W = X.to(dtype)
    assert check(W, k) <= BOUND
    assert check_radii(W) <= 2e-7


@pytest.mark.parametrize("k", [3, 64, 300])
def test_rows_along_an_axis(kernel, k):
    """Rows that lie along a basis vector: one coordinate carries the whole length, the longest fp32
    sums a coordinate can have."""
    W = make_w(600, 300, torch.float32)
    center, basis = frame_of(W, k)
    W = (center + 3.0 * torch.randn(600, 1, dtype=torch.float64) * basis[:, :1].double().T).float()
    got = torch.ops.refframe.project(W, center, basis, None)
    want, radius = reference(W, center, basis)
    assert worst(got, want, radius) <= BOUND


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 40, 300])
def test_project_strided_w(kernel, dtype, k):
    base = make_w(700, 620, dtype, offset_sigmas=40.0)
    views = {
        "row-strided": base[:, 10:310],
        "every-other-row": base[::2, :300],
        "column-strided": base[:, ::2][:, :300],
        "transposed": base.T.contiguous().T[:, :300],
    }
    for name, W in views.items():
        assert check(W, k) <= BOUND, name
        assert check_radii(W) <= 2e-7, name


@pytest.mark.parametrize("k", [1, 3, 17, 64, 300])
def test_same_bits_for_any_thread_count(kernel, k):
    W = make_w(2000, 300, torch.bfloat16, offset_sigmas=40.0)
    center, basis = frame_of(W, k)
    ids = torch.arange(1999, -1, -3)
    for args in ((W, center, basis, None), (W[:100], center, basis, None), (W, center, basis, ids)):
        results = [with_threads(n, lambda a=args: torch.ops.refframe.project(*a)) for n in (1, 2, 3)]
        assert all(torch.equal(results[0], r) for r in results[1:])
    radii = [with_threads(n, lambda: torch.ops.refframe.radii(W, center, ids)) for n in (1, 2, 3)]
    assert all(torch.equal(radii[0], r) for r in radii[1:])


@pytest.mark.parametrize("k", [1, 3, 17, 64, 300])
def test_a_row_gets_the_same_bits_in_any_selection(kernel, k):
    """A row's coordinates do not depend on the rows around it."""
    W = make_w(500, 300, torch.float16, offset_sigmas=40.0)
    center, basis = frame_of(W, k)
    every = torch.ops.refframe.project(W, center, basis, None)
    ids = torch.tensor([499, 3, 3, 250, 0])
    assert torch.equal(torch.ops.refframe.project(W, center, basis, ids), every[ids])
    assert torch.equal(
        torch.ops.refframe.radii(W, center, ids), torch.ops.refframe.radii(W, center, None)[ids]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_avx512bf16_and_amx_use_the_avx512_kernels(monkeypatch, dtype):
    from refframe import _C

    W = make_w(300, 200, dtype, offset_sigmas=40.0)
    center, basis = frame_of(W, 70)
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "avx512")
    if _C.cpu_kernel() != "avx512":
        pytest.skip("this CPU cannot run the avx512 kernel set")
    want = [torch.ops.refframe.project(W, center, basis[:, :k], None) for k in (3, 70)]
    want.append(torch.ops.refframe.radii(W, center, None))
    for other in ("avx512bf16", "amx"):
        monkeypatch.setenv("REFFRAME_CPU_KERNEL", other)
        if _C.cpu_kernel() == other:
            got = [torch.ops.refframe.project(W, center, basis[:, :k], None) for k in (3, 70)]
            got.append(torch.ops.refframe.radii(W, center, None))
            assert all(torch.equal(a, b) for a, b in zip(got, want)), other


def test_empty_selections():
    W = make_w(10, 6, torch.bfloat16)
    center, basis = frame_of(W, 4)
    none = torch.tensor([], dtype=torch.long)
    assert torch.ops.refframe.project(W, center, basis, none).shape == (0, 4)
    assert torch.ops.refframe.radii(W, center, none).shape == (0,)
    assert torch.ops.refframe.project(W[:0], center, basis, None).shape == (0, 4)
    assert torch.ops.refframe.radii(W[:0], center, None).shape == (0,)
    assert torch.equal(torch.ops.refframe.radii(W[:, :0], center[:0], None), torch.zeros(10))


def test_non_finite_values_stay_in_their_row():
    W = make_w(100, 40, torch.float32)
    W[7, 3] = float("nan")
    W[9, 0] = float("inf")
    center, basis = frame_of(W[10:], 5)
    got = torch.ops.refframe.project(W, center, basis, None)
    radii = torch.ops.refframe.radii(W, center, None)
    assert got[7].isnan().all() and radii[7].isnan() and radii[9].isinf()
    assert torch.isfinite(got[10:]).all() and torch.isfinite(radii[10:]).all()


def test_opcheck_project_and_radii():
    W = make_w(60, 24, torch.bfloat16)
    center, basis = frame_of(W, 5)
    ids = torch.tensor([3, 1, 59, 3])
    for i in (ids, None):
        torch.library.opcheck(torch.ops.refframe.project.default, (W, center, basis.contiguous(), i))
        torch.library.opcheck(torch.ops.refframe.radii.default, (W, center, i))


def _bad_inputs():
    W = make_w(10, 4, torch.float32)
    c, V = frame_of(W, 2)
    return [
        ((W[0], c, V, None), "project: W must be 2-D (N, d), got shape [4] (Float on cpu)"),
        ((W.int(), c, V, None), "project: W must be bfloat16, float16 or float32, got Int of shape [10, 4]"),
        (
            (W, c[:3], V, None),
            "project: center must have shape (d,) = (4,) for W of shape [10, 4], got shape [3]",
        ),
        ((W, c.double(), V, None), "project: center must be float32, got Double of shape [4]"),
        (
            (W, c, V[:3], None),
            "project: basis must have shape (d, k) with d = 4 (W's columns) and 1 <= k <= 4, got shape [3, 2]",
        ),
        ((W, c, V[:, :0], None), "1 <= k <= 4, got shape [4, 0]"),
        ((W, c, torch.eye(4, 5), None), "1 <= k <= 4, got shape [4, 5]"),
        ((W, c, V.half(), None), "project: basis must be float32, got Half of shape [4, 2]"),
        ((W, c, V, torch.tensor([0, 10, -1])), "project: 2 id(s) outside [0, 10); first: ids[1] = 10"),
        ((W, c, V, torch.tensor([[0]])), "project: ids must be 1-D, got shape [1, 1]"),
        ((W, c, V, torch.tensor([0.0])), "project: ids must have an integer dtype, got Float"),
        ((W, c[:3], None), "radii: center must have shape (d,) = (4,) for W of shape [10, 4], got shape [3]"),
        ((W.bool(), c, None), "radii: W must be bfloat16, float16 or float32, got Bool"),
        ((W, c, torch.tensor([10])), "radii: 1 id(s) outside [0, 10); first: ids[0] = 10"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_kernels_check_their_inputs(case):
    args, message = _bad_inputs()[case]
    op = torch.ops.refframe.project if len(args) == 4 else torch.ops.refframe.radii
    with pytest.raises(RuntimeError, match=re.escape(message)):
        op(*args)
