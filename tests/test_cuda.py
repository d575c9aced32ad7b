"""CUDA kernels against float64 and against the CPU kernels: awkward shapes, all dtypes, strided input.

Runs only where torch sees a CUDA device and refframe was built with its CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

import refframe
from helpers import DTYPES, cov64, make_far_off_w, make_subnormal_fp16_w, make_w, rel_fro
from refframe import _native, ops

CUDA = torch.device("cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        # Not native_supports(): a kernel that fails its self-check must fail these tests, not skip them.
        not (torch.cuda.is_available() and _native.native_available() and _native._C.WITH_CUDA),
        reason="needs a CUDA device and refframe built with its CUDA kernels",
    ),
]

# Around the 128 x 128 tile and the 16-row step; N < d; one row or one column; enough rows for
# several row splits of the covariance kernel and several pieces of the gather kernel.
SHAPES = [
    (1, 1),
    (1, 7),
    (2, 1),
    (7, 1),
    (3, 100),
    (50, 200),
    (129, 257),
    (300, 130),
    (1000, 128),
    (517, 300),
    (2049, 64),
    (4100, 136),
]

# Views of a (700, 400) matrix: each reads W through a different stride or alignment.
VIEWS = {
    "column stride 3": lambda B: B[::2, 1::3],
    "row stride 400": lambda B: B[:, 8:264],
    "misaligned start": lambda B: B[:, 1:257],
    "column-major": lambda B: B[:300, :64].T.contiguous().T,
}


# The covariance kernels REFFRAME_CUDA_KERNEL chooses between: simt (fp32 FMA, the default) and
# mma (tensor cores, bf16 and fp16 W; fp32 W stays on simt).
CUDA_KERNELS = ["simt", "mma"]


@pytest.fixture(params=CUDA_KERNELS)
def cuda_kernel(request, monkeypatch):
    monkeypatch.setenv("REFFRAME_CUDA_KERNEL", request.param)
    return request.param


def center_syrk(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.refframe.center_syrk(W)


def check_covariance(W: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Exact fp64 mean; covariance within 1e-7 relative Frobenius of float64, exactly symmetric.

    A 1 x 1 covariance is one fp32 number: its own rounding (up to 6e-8) and that of the centered
    values have nothing to average with, so it gets a few u.
    """
    d = W.shape[1]
    assert mean.dtype == torch.float64 and cov.dtype == torch.float32
    assert mean.shape == (d,) and cov.shape == (d, d)
    mean, cov = mean.cpu(), cov.cpu()
    assert torch.equal(cov, cov.T)
    mu64, c64 = cov64(W.cpu())
    assert float((mean - mu64).abs().max()) <= 1e-12 * max(1.0, float(mu64.abs().max()))
    if W.shape[0] == 1:
        assert float(cov.abs().max()) == 0.0
    else:
        assert rel_fro(cov, c64) <= (1e-7 if d > 1 else 3e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_center_syrk_cuda_matches_float64(dtype, shape, offset, cuda_kernel):
    W = make_w(*shape, dtype, offset_sigmas=offset).to(CUDA)
    mean, cov = center_syrk(W)
    assert mean.device == W.device and cov.device == W.device
    check_covariance(W, mean, cov)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", list(VIEWS))
def test_center_syrk_cuda_strided(dtype, view, cuda_kernel):
    W = VIEWS[view](make_w(700, 400, dtype, offset_sigmas=50.0).to(CUDA))
    mean, cov = center_syrk(W)
    check_covariance(W, mean, cov)
    # The strided and the vector loads do the same arithmetic: same bits as on a contiguous copy.
    mean_c, cov_c = center_syrk(W.contiguous())
    assert torch.equal(mean, mean_c) and torch.equal(cov, cov_c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sigmas", [8.0, 30.0, 100.0])
def test_center_syrk_cuda_many_far_off_columns(dtype, sigmas, cuda_kernel):
    # Half the columns far off zero on a coarse bf16/fp16 grid: centered on the mean rounded to W's
    # type (center.h), not on its fp32 rounding, whose 128-row fp32 sums round with a bias.
    W = make_far_off_w(6000, 96, dtype, sigmas).to(CUDA)
    mean, cov = center_syrk(W)
    check_covariance(W, mean, cov)


def test_center_syrk_cuda_subnormal_fp16_columns(cuda_kernel):
    # Subnormal fp16 columns far off zero: center.h must use the subnormal spacing, 2^-24.
    W = make_subnormal_fp16_w(6000, 96).to(CUDA)
    mean, cov = center_syrk(W)
    check_covariance(W, mean, cov)
    _, c64 = cov64(W.cpu())
    assert rel_fro(cov.cpu(), c64) < 4e-8


def test_center_syrk_cuda_is_deterministic(cuda_kernel):
    W = make_w(5000, 300, torch.bfloat16, offset_sigmas=50.0).to(CUDA)
    first = center_syrk(W)
    for _ in range(3):
        again = center_syrk(W)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_choice_is_honoured(dtype, monkeypatch):
    W = make_w(3000, 200, dtype, offset_sigmas=50.0).to(CUDA)
    results = {}
    for kernel in CUDA_KERNELS:
        monkeypatch.setenv("REFFRAME_CUDA_KERNEL", kernel)
        results[kernel] = center_syrk(W)
    assert torch.equal(results["simt"][0], results["mma"][0])  # the same pass 1 and exact mean
    same = torch.equal(results["simt"][1], results["mma"][1])
    # Two kernels summing differently agree to rounding, not in every bit; fp32 W stays on simt.
    assert same == (dtype == torch.float32)
    monkeypatch.setenv("REFFRAME_CUDA_KERNEL", "tensor")
    with pytest.raises(RuntimeError, match="REFFRAME_CUDA_KERNEL must be 'simt' or 'mma', got 'tensor'"):
        center_syrk(W)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [100.0, 1000.0])
def test_mma_kernel_with_a_long_row(dtype, length, monkeypatch):
    # One long row sets the tensor-core kernel's scale of every column (its range), but the split
    # of each value into two fp16 numbers stays exact: a CPU emulation of the kernel gives
    # 2.5-2.6e-8, the fp32 rounding of the result (the CPU kernels give 2.6e-7 at 100x).
    monkeypatch.setenv("REFFRAME_CUDA_KERNEL", "mma")
    X = make_w(30000, 128, torch.float64)
    X[7] *= length
    W = X.to(dtype).to(CUDA)
    mean, cov = center_syrk(W)
    check_covariance(W, mean, cov)
    _, c64 = cov64(W.cpu())
    assert rel_fro(cov.cpu(), c64) < 5e-8


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_syrk_cuda_agrees_with_cpu(dtype, cuda_kernel):
    W = make_w(3000, 200, dtype, offset_sigmas=50.0)
    mean_cpu, cov_cpu = center_syrk(W)
    mean_gpu, cov_gpu = center_syrk(W.to(CUDA))
    torch.testing.assert_close(mean_gpu.cpu(), mean_cpu, rtol=1e-12, atol=1e-15)
    assert rel_fro(cov_gpu.cpu(), cov_cpu) <= 2e-7


def reference_means(W: torch.Tensor, ids: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    X = W.cpu().to(torch.float64)
    ids = ids.cpu().long()
    return torch.stack([X[ids[a:b]].mean(dim=0) for a, b in zip(offsets[:-1], offsets[1:])])


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.cpu().to(torch.float64).reshape(ref.shape)
    return float(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize(
    "shape, count", [((200, 1), 5), ((250, 130), 1), ((250, 257), 100), ((250, 64), 5000)]
)
def test_gather_mean_cuda_matches_float64(dtype, id_dtype, shape, count):
    g = torch.Generator().manual_seed(count)
    W = make_w(*shape, dtype, offset_sigmas=50.0).to(CUDA)
    ids = torch.randint(0, shape[0], (count,), generator=g).to(id_dtype)
    got = torch.ops.refframe.gather_mean(W, ids.to(CUDA))
    assert got.dtype == torch.float32 and got.shape == (shape[1],) and got.device == W.device
    assert max_rel_err(got, reference_means(W, ids, [0, count])) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offsets", [[0, 3, 4, 10], [0, 1, 2050, 2100, 9000], [0, 9000]])
def test_segment_mean_cuda_matches_float64(dtype, offsets):
    g = torch.Generator().manual_seed(len(offsets))
    W = make_w(5000, 70, dtype, offset_sigmas=50.0).to(CUDA)
    ids = torch.randint(0, 5000, (offsets[-1],), generator=g)
    got = torch.ops.refframe.segment_mean(W, ids.to(CUDA), torch.tensor(offsets, device=CUDA))
    assert got.shape == (len(offsets) - 1, 70)
    assert max_rel_err(got, reference_means(W, ids, offsets)) <= 1e-6


@pytest.mark.parametrize("view", list(VIEWS))
def test_gather_mean_cuda_strided(view):
    W = VIEWS[view](make_w(700, 400, torch.bfloat16, offset_sigmas=50.0).to(CUDA))
    ids = torch.randint(0, W.shape[0], (3000,), generator=torch.Generator().manual_seed(1))
    got = torch.ops.refframe.gather_mean(W, ids.to(CUDA))
    assert max_rel_err(got, reference_means(W, ids, [0, 3000])) <= 1e-6
    assert torch.equal(got, torch.ops.refframe.gather_mean(W.contiguous(), ids.to(CUDA)))


def test_cuda_ops_reject_ids_on_another_device():
    W = make_w(10, 4, torch.float32).to(CUDA)
    with pytest.raises(RuntimeError, match="must be on W's device"):
        torch.ops.refframe.gather_mean(W, torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------
# project / radii: coordinates in a frame and distances from its center
#
# The contract: every coordinate within 1e-6 ||W[i] - c|| of float64 ((W64[i] - c64) @ V64 with the
# same fp32 center and basis), also for rows far from the center and columns 40 sd off zero. The
# kernel's own error is far below it (fp32 FMA chains of 64 terms flushed into fp64). A radius
# differs from float64 by the fp32 rounding of each centered value (at most 2^-24 of the radius) and
# of the result: 2e-7 of the radius bounds both.
PROJECT_BOUND = 1e-6
RADII_BOUND = 2e-7

# Around the 32-column step and the 4 / 16 / 64 / 128-column tiles; one row, one column, d < k's tile.
PROJECT_SHAPES = [(1, 1), (1, 7), (7, 1), (7, 129), (129, 300), (300, 7), (2049, 129), (300, 2560), (1, 2560)]
PROJECT_CASES = [(n, d, k) for n, d in PROJECT_SHAPES for k in sorted({1, 3, 64, d}) if k <= d]


def project(W, center, basis, ids=None) -> torch.Tensor:
    return torch.ops.refframe.project(W, center, basis, ids)


def radii(W, center, ids=None) -> torch.Tensor:
    return torch.ops.refframe.radii(W, center, ids)


def frame_w(n: int, d: int, dtype: torch.dtype, *, seed: int = 0) -> torch.Tensor:
    """make_w with three columns 40 sd off zero, and every 10th row 30 times as far from the mean."""
    X = make_w(n, d, torch.float64, seed=seed, offset_sigmas=40.0)
    mu = X.mean(dim=0)
    X[::10] = mu + 30.0 * (X[::10] - mu)
    return X.to(dtype)


def centroid(W: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """fp32 mean of a third of the rows of W (CPU): a cluster's center, as a frame stores it."""
    ids = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(seed))[: max(1, W.shape[0] // 3)]
    return W.to(torch.float64)[ids].mean(dim=0).to(torch.float32)


CENTERS = {
    "centroid": centroid,
    # The 40-sd columns then dominate every row's length.
    "zero": lambda W: torch.zeros(W.shape[1], dtype=torch.float32),
}


def orthonormal_basis(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0].to(torch.float32)


def centered64(W: torch.Tensor, center: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    X = W.cpu().to(torch.float64)
    if ids is not None:
        X = X[ids.cpu().long()]
    return X - center.cpu().to(torch.float64)


def check_projection(P, W, center, basis, ids=None) -> None:
    """P has the shape, dtype and device of the result and is within the contract of float64."""
    Xc = centered64(W, center, ids)
    ref = Xc @ basis.cpu().to(torch.float64)
    assert P.dtype == torch.float32 and P.device == W.device and P.shape == ref.shape
    err = (P.cpu().to(torch.float64) - ref).abs().amax(dim=1)
    scale = Xc.norm(dim=1)
    worst = float((err / scale.clamp_min(1e-300)).max())
    assert bool((err <= PROJECT_BOUND * scale).all()), f"error {worst:.2e} ||W[i] - c||"


def check_radii(R, W, center, ids=None) -> None:
    ref = centered64(W, center, ids).norm(dim=1)
    assert R.dtype == torch.float32 and R.device == W.device and R.shape == ref.shape
    err = (R.cpu().to(torch.float64) - ref).abs()
    assert bool((err <= RADII_BOUND * ref).all()), float((err / ref.clamp_min(1e-300)).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, k", PROJECT_CASES)
@pytest.mark.parametrize("center_kind", list(CENTERS))
def test_project_cuda_matches_float64(dtype, n, d, k, center_kind):
    W = frame_w(n, d, dtype).to(CUDA)
    center, basis = CENTERS[center_kind](W.cpu()), orthonormal_basis(d, k)
    P = project(W, center.to(CUDA), basis.to(CUDA))
    check_projection(P, W, center, basis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", PROJECT_SHAPES)
@pytest.mark.parametrize("center_kind", list(CENTERS))
def test_radii_cuda_matches_float64(dtype, n, d, center_kind):
    W = frame_w(n, d, dtype).to(CUDA)
    center = CENTERS[center_kind](W.cpu())
    check_radii(radii(W, center.to(CUDA)), W, center)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 64, 2560])
def test_project_cuda_at_model_width(dtype, k):
    # Qwen3-4B's width, rogue columns, rows 30x out, a center that is not the mean of all rows.
    W = frame_w(3000, 2560, dtype, seed=1)
    center, basis = centroid(W, seed=1), orthonormal_basis(2560, k, seed=1)
    Wd, cd = W.to(CUDA), center.to(CUDA)
    check_projection(project(Wd, cd, basis.to(CUDA)), Wd, center, basis)
    check_radii(radii(Wd, cd), Wd, center)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", list(VIEWS))
def test_project_cuda_strided(dtype, view):
    W = VIEWS[view](frame_w(700, 400, dtype).to(CUDA))
    center, basis = centroid(W.cpu()), orthonormal_basis(W.shape[1], min(70, W.shape[1]))
    cd, Vd = center.to(CUDA), basis.to(CUDA)
    P, R = project(W, cd, Vd), radii(W, cd)
    check_projection(P, W, center, basis)
    check_radii(R, W, center)
    # Strided and contiguous loads feed the same sums: the same bits.
    assert torch.equal(P, project(W.contiguous(), cd, Vd))
    assert torch.equal(R, radii(W.contiguous(), cd))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("count", [1, 5, 3000])
def test_project_cuda_ids_with_repeats(dtype, id_dtype, count):
    W = frame_w(250, 130, dtype).to(CUDA)
    center, basis = centroid(W.cpu()), orthonormal_basis(130, 20)
    cd, Vd = center.to(CUDA), basis.to(CUDA)
    ids = torch.randint(0, 250, (count,), generator=torch.Generator().manual_seed(count)).to(id_dtype)
    P, R = project(W, cd, Vd, ids.to(CUDA)), radii(W, cd, ids.to(CUDA))
    check_projection(P, W, center, basis, ids)
    check_radii(R, W, center, ids)
    # A row is summed alike wherever it comes from: the rows of ids are those of the whole W.
    rows = ids.long().to(CUDA)
    assert torch.equal(P, project(W, cd, Vd)[rows])
    assert torch.equal(R, radii(W, cd)[rows])


def test_project_cuda_empty_ids():
    W = frame_w(50, 10, torch.bfloat16).to(CUDA)
    center, basis = centroid(W.cpu()).to(CUDA), orthonormal_basis(10, 3).to(CUDA)
    none = torch.empty(0, dtype=torch.int64, device=CUDA)
    assert project(W, center, basis, none).shape == (0, 3)
    assert radii(W, center, none).shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_cuda_coordinates_do_not_depend_on_k(dtype):
    # Every tile shape (k <= 4, 16, 64, more) sums each coordinate in the same order, so a
    # coordinate keeps its bits when basis columns are added; repeated calls give the same bits.
    W = frame_w(1000, 300, dtype).to(CUDA)
    center, basis = centroid(W.cpu()).to(CUDA), orthonormal_basis(300, 200).to(CUDA)
    full = project(W, center, basis)
    for k in (1, 3, 4, 5, 16, 17, 64, 65, 128, 129):
        assert torch.equal(project(W, center, basis[:, :k]), full[:, :k]), k
    assert torch.equal(project(W, center, basis), full)
    assert torch.equal(radii(W, center), radii(W, center))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 64, 300])
def test_project_cuda_agrees_with_cpu(dtype, k):
    W = frame_w(2000, 300, dtype)
    center, basis = centroid(W), orthonormal_basis(300, k)
    ids = torch.randint(0, 2000, (2500,), generator=torch.Generator().manual_seed(k))
    cpu_p, cpu_r = project(W, center, basis, ids), radii(W, center, ids)
    gpu_p = project(W.to(CUDA), center.to(CUDA), basis.to(CUDA), ids.to(CUDA)).cpu()
    gpu_r = radii(W.to(CUDA), center.to(CUDA), ids.to(CUDA)).cpu()
    scale = centered64(W, center, ids).norm(dim=1)
    assert bool(((gpu_p - cpu_p).abs().amax(dim=1).to(torch.float64) <= 2 * PROJECT_BOUND * scale).all())
    assert bool(((gpu_r - cpu_r).abs().to(torch.float64) <= 2 * RADII_BOUND * scale).all())


def project_args() -> dict:
    W = frame_w(50, 8, torch.float32).to(CUDA)
    return {
        "W": W,
        "center": centroid(W.cpu()).to(CUDA),
        "basis": orthonormal_basis(8, 3).to(CUDA),
        "ids": torch.tensor([0, 7, 49], device=CUDA),
    }


@pytest.mark.parametrize("bad", [[0, 50], [-1, 3], [2**40]])
def test_project_cuda_ids_out_of_range_is_an_error_not_a_device_assert(bad):
    a = project_args()
    ids = torch.tensor(bad, device=CUDA)
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, N\) = \[0, 50\)"):
        project(a["W"], a["center"], a["basis"], ids)
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, N\) = \[0, 50\)"):
        radii(a["W"], a["center"], ids)
    # Checked on the host before any launch: the CUDA context is still usable.
    P = project(a["W"], a["center"], a["basis"], a["ids"])
    torch.cuda.synchronize()
    check_projection(P, a["W"], a["center"], a["basis"], a["ids"])


@pytest.mark.parametrize("which", ["center", "basis", "ids"])
def test_project_cuda_rejects_tensors_on_another_device(which):
    a = project_args()
    a[which] = a[which].cpu()
    with pytest.raises(RuntimeError, match=f"{which} must be on W's device"):
        project(a["W"], a["center"], a["basis"], a["ids"])
    if which != "basis":
        with pytest.raises(RuntimeError, match=f"{which} must be on W's device"):
            radii(a["W"], a["center"], a["ids"])


def test_project_cuda_rejects_w_on_the_cpu_with_a_cuda_center():
    a = project_args()
    with pytest.raises(RuntimeError, match="device"):
        project(a["W"].cpu(), a["center"], a["basis"].cpu(), None)
    with pytest.raises(RuntimeError, match="device"):
        radii(a["W"].cpu(), a["center"], None)


# (argument, replacement, message): each a malformed input of project on CUDA.
PROJECT_BAD_INPUTS = [
    ("W", lambda a: a["W"].double(), "W must be bfloat16, float16 or float32, got Double"),
    ("W", lambda a: a["W"][0], r"W must be 2-D \(N, d\), got shape \[8\]"),
    ("center", lambda a: a["center"].double(), "center must be float32, got Double"),
    ("center", lambda a: a["center"][:7], r"center must have shape \(d,\) = \(8,\) .*got \[7\]"),
    ("basis", lambda a: a["basis"].half(), "basis must be float32, got Half"),
    ("basis", lambda a: a["basis"][:7], r"basis must have shape \(d, k\) with d = 8 .*got \[7, 3\]"),
    ("basis", lambda a: a["basis"][:, :0], r"k >= 1 .*got \[8, 0\]"),
    ("ids", lambda a: a["ids"].view(3, 1), r"ids must be 1-D, got shape \[3, 1\]"),
    ("ids", lambda a: a["ids"].float(), "ids must have an integer dtype, got Float"),
]


@pytest.mark.parametrize("arg, replace, message", PROJECT_BAD_INPUTS)
def test_project_cuda_rejects_malformed_inputs(arg, replace, message):
    a = project_args()
    a[arg] = replace(a)
    with pytest.raises(RuntimeError, match=f"project \\(CUDA\\): {message}"):
        project(a["W"], a["center"], a["basis"], a["ids"])


def opcheck_cases():
    W = make_w(300, 130, torch.bfloat16, offset_sigmas=50.0).to(CUDA)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2)).to(CUDA)
    offsets = torch.tensor([0, 10, 40], device=CUDA)
    center = centroid(W.cpu()).to(CUDA)
    basis = orthonormal_basis(130, 5).to(CUDA)
    return {
        "center_syrk": (torch.ops.refframe.center_syrk.default, (W,)),
        "gather_mean": (torch.ops.refframe.gather_mean.default, (W, ids)),
        "segment_mean": (torch.ops.refframe.segment_mean.default, (W, ids, offsets)),
        "project": (torch.ops.refframe.project.default, (W, center, basis, ids)),
        "project without ids": (torch.ops.refframe.project.default, (W, center, basis, None)),
        "radii": (torch.ops.refframe.radii.default, (W, center, ids)),
        "radii without ids": (torch.ops.refframe.radii.default, (W, center, None)),
    }


@pytest.mark.parametrize(
    "op",
    [
        "center_syrk",
        "gather_mean",
        "segment_mean",
        "project",
        "project without ids",
        "radii",
        "radii without ids",
    ],
)
def test_opcheck_cuda(op):
    fn, args = opcheck_cases()[op]
    torch.library.opcheck(fn, args)


@pytest.mark.skipif(not hasattr(refframe, "build_frame"), reason="refframe.build_frame not available")
def test_build_frame_cuda_matches_cpu():
    W = make_w(3000, 96, torch.bfloat16, offset_sigmas=50.0)
    ids = torch.randperm(3000, generator=torch.Generator().manual_seed(3))[:300]
    gpu = refframe.build_frame(W.to(CUDA), ids, backend="native", device="cuda")
    cpu = refframe.build_frame(W, ids, backend="native", device="cpu")

    _, c64 = cov64(W)
    lam64 = torch.linalg.eigvalsh(c64).flip(0)
    lam1 = float(lam64[0])
    centroid64 = W.to(torch.float64)[ids].mean(dim=0)
    eye = torch.eye(W.shape[1], dtype=torch.float64)
    for frame in (gpu, cpu):
        lam = frame.eigenvalues.cpu().to(torch.float64)
        V = frame.eigenvectors.cpu().to(torch.float64)
        assert float((lam - lam64).abs().max()) <= 5e-6 * lam1
        assert float((c64 @ V - V * lam).norm(dim=0).max()) <= 2e-5 * lam1
        assert float((V.T @ V - eye).abs().max()) <= 5e-5
        assert max_rel_err(frame.centroid, centroid64) <= 1e-6
    # The 8 planted directions stand far above the noise: both builds span the same subspace.
    k = 8
    overlap = torch.linalg.svdvals(
        gpu.eigenvectors[:, :k].cpu().double().T @ cpu.eigenvectors[:, :k].double()
    )
    assert float(overlap.min()) >= 1 - 1e-4


def test_native_self_check_passes_on_this_gpu():
    from refframe import _native

    assert _native.native_self_check(CUDA) is None
    assert ops.resolve_backend("auto", CUDA) == "native"


# -- partial sums of shares (sharded builds: refframe.partial, docs/distributed.md) ------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cuts", [[], [4096], [0, 1, 3001, 3001, 5000]], ids=lambda c: f"K{len(c) + 1}")
def test_partial_sums_cuda_match_float64(dtype, cuts):
    from refframe import partial

    W = make_w(6000, 300, dtype, offset_sigmas=3.0)
    W[1000:1200] = W[999]  # a run of identical rows (the CUDA kernels leave none out)
    _, ref = cov64(W)
    b = [0, *cuts, W.shape[0]]
    parts = [W[b[i] : b[i + 1]].to(CUDA) for i in range(len(b) - 1)]
    mean, cov = partial.native_covariance_of_shares(parts, exact=False)
    assert cov.device.type == "cpu"
    assert rel_fro(cov, ref) <= 1e-7
    torch.testing.assert_close(mean, W.double().mean(0), rtol=0, atol=1e-12)
    _, cpu = partial.native_covariance_of_shares([p.cpu() for p in parts], exact=False)
    assert rel_fro(cov, cpu.double()) <= 1e-7  # CUDA and CPU shares follow one plan


def test_partial_sums_cuda_refuse_the_exact_plan():
    from refframe import partial

    W = make_w(100, 16, torch.bfloat16).to(CUDA)
    stats = partial.native_stats(W, 0, 100, False)
    with pytest.raises(RuntimeError, match="pass exact=False"):
        partial.native_partial(W, stats.cpu(), torch.zeros(0, 3, dtype=torch.long), 0, 100, True)


def test_partial_sums_cuda_opcheck():
    from refframe import partial

    W = make_w(300, 17, torch.float16).to(CUDA)
    stats = partial.native_stats(W, 0, 300, False)
    assert stats.shape == (4, 17) and torch.isfinite(stats[3]).all()
    none = torch.zeros(0, 3, dtype=torch.long, device=CUDA)
    torch.library.opcheck(torch.ops.refframe.center_stats, (W, 0, 300, False))
    torch.library.opcheck(torch.ops.refframe.center_syrk_partial, (W, stats, none, 0, 300, False))
