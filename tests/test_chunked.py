"""The chunked pure-torch covariance (chunked.py) against float64: every dtype, awkward shapes, rows
far from zero; its building blocks (column sums, packed Gram partials of row splits, pack/unpack,
finish); determinism; and backend "auto" taking it on a CPU with only the portable kernel set."""

from __future__ import annotations

import pytest
import torch

import refframe
from helpers import cov64, make_far_off_w, make_w, needs_native, rel_fro
from refframe import InputError, chunked, ops, reference
from refframe.synthetic import SyntheticSpec, make_synthetic

ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]

# (N, d): one row, one column, N < d, d around the 384-column panel, N around the chunk length.
SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (40, 200), (300, 383), (257, 385), (1000, 129), (3, 770)]


@pytest.fixture(params=["default", "tiny"])
def blocking(request, monkeypatch):
    """The default chunks and panels, and tiny ones (64-row chunks, 16-column panels) so that small
    matrices cross many chunk and panel boundaries, with remainders."""
    if request.param == "tiny":
        monkeypatch.setattr(chunked, "CHUNK_BYTES", 0)  # chunk_rows: its minimum, 64
        monkeypatch.setattr(chunked, "PANEL_COLUMNS", 16)
    return request.param


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 40.0])
def test_covariance_matches_float64(blocking, dtype, shape, offset):
    W = make_w(*shape, dtype, offset_sigmas=offset)
    mean, cov = chunked.covariance(W)
    mu64, c64 = cov64(W)
    assert mean.dtype == cov.dtype == torch.float32 and cov.shape == (shape[1], shape[1])
    assert torch.equal(cov, cov.T)
    # fp64 sums: what is left is the rounding of the result to fp32 (at most 2^-24 per entry).
    assert rel_fro(cov, c64) < 1e-7
    assert rel_fro(mean, mu64) < 1e-7


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("sigmas", [50.0, 300.0, 1e4])
def test_rows_far_from_zero(blocking, dtype, sigmas):
    if dtype == torch.float16 and sigmas > 300:
        pytest.skip("fp16 cannot hold values 1e4 sd off zero at this scale")
    W = make_far_off_w(1500, 100, dtype, sigmas)
    _, c64 = cov64(W)
    _, cov = chunked.covariance(W)
    assert rel_fro(cov, c64) < 1e-7
    assert rel_fro(cov, c64) <= rel_fro(reference.covariance(W)[1], c64)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_realistic_matrix_error(dtype):
    """The demo's synthetic W (Qwen3-4B's statistics, rogue columns far from zero) at a small shape."""
    W, _ = make_synthetic(SyntheticSpec(n_tokens=20000, dim=512, cluster_size=16, rank=64, total_variance=0.224), dtype)
    _, c64 = cov64(W)
    _, cov = ops.covariance(W, backend="torch")
    assert rel_fro(cov, c64) < 1e-7
    assert rel_fro(cov, c64) < rel_fro(reference.covariance(W)[1], c64)


def test_gram_partial_of_no_rows_is_zero(blocking):
    for d in (1, 5, 40):
        tri = chunked.gram_partial(torch.empty(0, d, dtype=torch.bfloat16), torch.randn(d, dtype=torch.float64))
        assert tri.dtype == torch.float64 and tri.device.type == "cpu"
        assert torch.equal(tri, torch.zeros(d * (d + 1) // 2, dtype=torch.float64))
    assert torch.equal(chunked.column_sums(torch.empty(0, 3)), torch.zeros(3, dtype=torch.float64))


def test_gram_partial_is_the_packed_centred_gram(blocking):
    W = make_w(300, 50, torch.bfloat16, offset_sigmas=5.0)
    c = torch.randn(50, dtype=torch.float64) * 0.01
    X = W.to(torch.float64) - c
    tri = chunked.gram_partial(W, c)
    assert tri.shape == (50 * 51 // 2,)
    assert torch.allclose(tri, chunked.pack_upper(X.T @ X), rtol=1e-12, atol=0)
    assert torch.allclose(chunked.column_sums(W), W.to(torch.float64).sum(0), rtol=1e-13, atol=1e-13)


# Row splits, as boundaries in [0, N]; repeated boundaries make empty pieces.
SPLITS = [[], [150], [0, 100, 100], [10, 20, 20, 90, 200, 299, 300]]


@pytest.mark.parametrize("bounds", SPLITS, ids=lambda b: f"{len(b) + 1}-pieces")
def test_partial_sums_of_row_splits_add_up(blocking, bounds):
    W = make_w(300, 70, torch.float16, offset_sigmas=30.0)
    edges = [0, *bounds, 300]
    pieces = [W[a:b] for a, b in zip(edges[:-1], edges[1:])]
    sums = sum(chunked.column_sums(p) for p in pieces)
    whole_sums = chunked.column_sums(W)
    assert torch.allclose(sums, whole_sums, rtol=1e-13, atol=0)
    c = whole_sums / 300
    tri = sum(chunked.gram_partial(p, c) for p in pieces)
    whole = chunked.gram_partial(W, c)
    assert float((tri - whole).abs().max()) <= 1e-13 * float(whole.abs().max())
    mean, cov = chunked.finish(tri, c, 300)
    assert rel_fro(cov, cov64(W)[1]) < 1e-7


@pytest.mark.parametrize("d", [1, 2, 3, 16, 385])
def test_pack_unpack_round_trip(d):
    A = torch.randn(d, d, dtype=torch.float64)
    S = A + A.T
    tri = chunked.pack_upper(S)
    assert tri.shape == (d * (d + 1) // 2,)
    assert torch.equal(chunked.unpack_upper(tri, d), S)
    t = torch.randn(d * (d + 1) // 2)
    assert torch.equal(chunked.pack_upper(chunked.unpack_upper(t, d)), t)


def test_pack_order_is_row_major_upper():
    full = torch.arange(16.0).reshape(4, 4)
    assert chunked.pack_upper(full).tolist() == [0, 1, 2, 3, 5, 6, 7, 10, 11, 15]
    assert chunked.unpack_upper(torch.arange(1.0, 4.0), 2).tolist() == [[1, 2], [2, 3]]


def test_finish_divides_once_and_mirrors():
    d, n = 6, 7
    tri = torch.randn(d * (d + 1) // 2, dtype=torch.float64)
    mean64 = torch.randn(d, dtype=torch.float64)
    mean, cov = chunked.finish(tri, mean64, n)
    assert mean.dtype == cov.dtype == torch.float32 and torch.equal(mean, mean64.float())
    assert torch.equal(cov, chunked.unpack_upper((tri / n).float(), d)) and torch.equal(cov, cov.T)


def test_same_bits_twice(blocking):
    W = make_w(700, 400, torch.bfloat16, offset_sigmas=10.0)
    c = chunked.column_sums(W) / 700
    assert torch.equal(chunked.gram_partial(W, c), chunked.gram_partial(W, c))
    a, b = chunked.covariance(W), chunked.covariance(W.clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_strided_w():
    W = make_w(400, 90, torch.float32).T.contiguous().T  # column-major
    assert rel_fro(chunked.covariance(W)[1], cov64(W)[1]) < 1e-7
    V = make_w(400, 180, torch.bfloat16)[:, ::2]
    assert rel_fro(chunked.covariance(V)[1], cov64(V)[1]) < 1e-7


def test_backend_torch_runs_the_chunked_path():
    W = make_w(500, 33, torch.bfloat16, offset_sigmas=5.0)
    got, want = ops.covariance(W, backend="torch"), chunked.covariance(W)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ops.covariance_path(W, "torch") == "torch (chunked): backend torch requested"


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: chunked.column_sums(torch.zeros(5)), "column_sums: W must be 2-D"),
        (lambda: chunked.gram_partial(torch.zeros(4, 3), torch.zeros(2, dtype=torch.float64)), "center64 must be"),
        (lambda: chunked.gram_partial(torch.zeros(4, 3), [0.0, 0.0, 0.0]), "center64 must be"),
        (lambda: chunked.finish(torch.zeros(5, dtype=torch.float64), torch.zeros(3), 4), "packed triangle"),
        (lambda: chunked.finish(torch.zeros(6, dtype=torch.float64), torch.zeros(3), 0), "at least one row"),
        (lambda: chunked.pack_upper(torch.zeros(2, 3)), "square"),
        (lambda: chunked.unpack_upper(torch.zeros(5), 3), "packed triangle of 6 values"),
        (lambda: chunked.covariance(torch.zeros(0, 3)), "covariance: W must have at least one row"),
    ],
)
def test_bad_inputs_are_one_line_errors(call, fragment):
    with pytest.raises(InputError, match=fragment) as info:
        call()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# backend "auto" on a CPU with only the portable kernel set


@needs_native
def test_auto_takes_the_chunked_path_on_the_portable_set(monkeypatch):
    from refframe import _native

    W = make_w(300, 40, torch.bfloat16, offset_sigmas=5.0)
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "portable")
    assert _native.cpu_kernel() == "portable"
    reason = "the portable kernel set is slower than the BLAS here"
    assert ops.covariance_backend(W, "auto") == ("torch", reason)
    assert ops.covariance_path(W, "auto") == f"torch (chunked): {reason}"
    got, want = ops.covariance(W), chunked.covariance(W)
    assert torch.equal(got[1], want[1])
    # backend="native" still runs the portable kernel
    assert ops.covariance_backend(W, "native") == ("native", "kernel set portable")
    _, cov = ops.covariance(W, backend="native")
    assert refframe.last_cpu_covariance()[0] == "portable" and rel_fro(cov, want[1]) < 1e-6
    frame = refframe.build_frame(W, torch.arange(10), device="cpu")
    assert frame.backend == "torch"


@needs_native
def test_auto_keeps_the_native_kernels_on_faster_sets(monkeypatch):
    from refframe import _native

    W = make_w(300, 40, torch.bfloat16)
    monkeypatch.setattr(_native, "cpu_kernel", lambda: "avx2")
    assert ops.covariance_backend(W, "auto") == ("native", "kernel set avx2")
    monkeypatch.setattr(_native, "cpu_kernel", lambda: "portable")
    assert ops.covariance_backend(W, "auto")[0] == "torch"
    assert ops.covariance_backend(W.double(), "auto") == (
        "torch",
        "the native kernels read bfloat16, float16 or float32, not float64",
    )


@needs_native
def test_build_says_which_covariance_path_ran(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from refframe.cli import main

    save_file({"W": make_w(300, 16, torch.bfloat16)}, tmp_path / "W.safetensors")
    save_file({"cluster_token_ids": torch.arange(0, 300, 7)}, tmp_path / "1.4h_cluster_tokens.safetensors")
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "portable")
    assert main(["build", "--model-dir", str(tmp_path), "--no-cache", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "covariance: torch (chunked): the portable kernel set is slower than the BLAS here" in out
    monkeypatch.delenv("REFFRAME_CPU_KERNEL")
    assert main(["build", "--model-dir", str(tmp_path), "--no-cache", "--device", "cpu", "--backend", "native"]) == 0
    assert "covariance: native (kernel set " in capsys.readouterr().out


def test_chunked_covariance_stops_at_its_next_chunk_when_interrupted():
    """An interrupt asks the worker thread's chunked covariance to stop (interrupt.cancel_requested),
    as the native kernel stops at its next row block; the worker then ends instead of running on."""
    import threading

    from refframe import interrupt

    W = make_w(20_000, 64, torch.bfloat16)
    got: dict[str, str] = {}

    def work() -> None:
        interrupt._CANCELLED.add(threading.get_ident())
        try:
            chunked.covariance(W)
        except RuntimeError as exc:
            got["error"] = str(exc)
        finally:
            interrupt._CANCELLED.discard(threading.get_ident())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert got["error"] == "covariance: cancelled"
    assert not interrupt.cancel_requested()  # only the interrupted thread is asked
    assert chunked.covariance(W)[1].shape == (64, 64)
