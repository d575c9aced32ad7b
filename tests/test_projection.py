"""Tokens seen from a frame: refframe.project / radii / nearest against float64, on both backends,
and `refframe project` (round trip, ids, k, the W check, bad input)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import refframe
from helpers import DTYPES, assert_one_line_error, built_model, cli, make_w
from refframe import InputError
from refframe.tensorfile import SafetensorsFile

BACKENDS = ["torch", "auto"]


def reference(W: torch.Tensor, frame: refframe.Frame, k: int, ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W64[ids] - c64) @ V64[:, :k] and ||W64[ids] - c64|| from the frame's own fp32 values."""
    X = W.to(torch.float64) if ids is None else W[ids].to(torch.float64)
    Xc = X - frame.centroid.to(torch.float64)
    return Xc @ frame.eigenvectors[:, :k].to(torch.float64), Xc.norm(dim=1)


def rogue_w(n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """make_w with three columns 40 sigma off zero (the centroid carries the offset too)."""
    return make_w(n, d, dtype, offset_sigmas=40.0)


@pytest.fixture(scope="module")
def frames():
    out = {}
    for dtype in DTYPES:
        for kind, make in (("plain", make_w), ("rogue", rogue_w)):
            W = make(700, 33, dtype)
            out[(dtype, kind)] = (W, refframe.build_frame(W, torch.arange(0, 700, 7), backend="torch"))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["plain", "rogue"])
@pytest.mark.parametrize("k", [1, 3, 17, 33])
def test_project_and_radii_match_float64(frames, backend, dtype, kind, k):
    W, frame = frames[(dtype, kind)]
    ref, rad = reference(W, frame, k)
    got = refframe.project(W, frame, k, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (700, k)
    # every coordinate within 1e-6 of its row's distance to the centroid
    assert float(((got.double() - ref).abs() / rad[:, None]).max()) <= 1e-6
    r = refframe.radii(W, frame, backend=backend)
    assert r.dtype == torch.float32 and r.shape == (700,)
    assert float(((r.double() - rad).abs() / rad).max()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_project_selected_rows_and_all_axes(frames, backend):
    W, frame = frames[(torch.bfloat16, "plain")]
    ids = torch.tensor([5, 0, 699, 5, 123])  # any order, repeats kept
    ref, rad = reference(W, frame, 33, ids)
    got = refframe.project(W, frame, ids=ids, backend=backend)  # k None: all d axes
    assert got.shape == (5, 33)
    assert float(((got.double() - ref).abs() / rad[:, None]).max()) <= 1e-6
    assert torch.equal(refframe.radii(W, frame, ids, backend=backend), refframe.radii(W, frame, backend=backend)[ids])
    assert refframe.project(W, frame, 3, torch.tensor([], dtype=torch.int64), backend=backend).shape == (0, 3)
    assert torch.equal(refframe.project(W, frame, 3, [5, 0], backend=backend), refframe.project(W, frame, 3, ids[:2], backend=backend))


def test_nearest_by_count_and_radius_ties_by_id():
    W = torch.zeros(10, 4)
    W[:, 0] = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 0.5, 2.0, 9.0, 1.0, 4.0])
    frame = refframe.build_frame(W, torch.tensor([0]), backend="torch")  # centroid = row 0 = (3, 0, 0, 0)
    ids, dist = refframe.nearest(W, frame, n=4)
    assert ids.tolist() == [0, 2, 6, 9] and dist.tolist() == [0.0, 1.0, 1.0, 1.0]
    ids, dist = refframe.nearest(W, frame, radius=2.0)
    assert ids.tolist() == [0, 2, 6, 9, 1, 3, 4, 8] and dist.tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    assert refframe.nearest(W, frame, radius=0.0)[0].tolist() == [0]
    assert refframe.nearest(W, frame, n=10)[0].numel() == 10


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda W, f: refframe.project(W, f, 0), "k must be an integer from 1 to d = 33, got 0"),
        (lambda W, f: refframe.project(W, f, 34), "k must be an integer from 1 to d = 33, got 34"),
        (lambda W, f: refframe.project(W[:, :5], f, 3), "W has d = 5 columns, the frame has d = 33"),
        (lambda W, f: refframe.project(W, "frame.safetensors", 3), "frame must be a refframe.Frame"),
        (lambda W, f: refframe.project(W, f, 3, torch.tensor([700])), "1 id(s) outside [0, 700)"),
        (lambda W, f: refframe.radii(W.to(torch.int32), f), "W must be floating point"),
        (lambda W, f: refframe.nearest(W, f), "give exactly one of n"),
        (lambda W, f: refframe.nearest(W, f, n=3, radius=1.0), "give exactly one of n"),
        (lambda W, f: refframe.nearest(W, f, n=0), "n must be an integer from 1 to N = 700, got 0"),
        (lambda W, f: refframe.nearest(W, f, n=701), "n must be an integer from 1 to N = 700, got 701"),
        (lambda W, f: refframe.nearest(W, f, radius=-1.0), "radius must be a distance >= 0"),
    ],
)
def test_bad_input_is_one_line(frames, call, message):
    W, frame = frames[(torch.float32, "plain")]
    with pytest.raises(InputError, match=None) as info:
        call(W, frame)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_ops_level_inputs_are_checked():
    W = make_w(50, 6, torch.float32)
    with pytest.raises(InputError, match=r"center must be a floating-point tensor of shape \(6,\)"):
        refframe.ops.project(W, torch.zeros(5), torch.eye(6))
    with pytest.raises(InputError, match=r"basis must be a tensor of shape \(6, k\)"):
        refframe.ops.project(W, torch.zeros(6), torch.eye(5))


# ---------------------------------------------------------------------------------------------
# refframe project


@pytest.fixture
def built(tmp_path):
    return built_model(tmp_path, 600, 24, 11)


def test_cli_project_round_trip(built, tmp_path, capsys):
    out = tmp_path / "coords.safetensors"
    rc, _ = cli(capsys, "project", str(built["frame"]), "--model-dir", str(built["model"]), "--k", "5", "--out", str(out))
    assert rc == 0
    got = load_file(out)
    frame = refframe.load_frame(built["frame"])
    ref, rad = reference(built["W"], frame, 5)
    assert got["coords"].shape == (600, 5) and got["radius"].shape == (600,)
    assert torch.equal(got["ids"], torch.arange(600))
    assert float(((got["coords"].double() - ref).abs() / rad[:, None]).max()) <= 1e-6
    assert float(((got["radius"].double() - rad).abs() / rad).max()) <= 1e-6
    meta = SafetensorsFile(out).metadata
    assert meta["format"] == "refframe-projection/1" and meta["k"] == "5"
    assert meta["w_hash"] == frame.metadata["w_hash"] == meta["frame_w_hash"]
    assert meta["frame_tensor_hashes"] == frame.metadata["tensor_hashes"]


def test_cli_project_selected_ids_all_axes(built, tmp_path, capsys):
    sel = tmp_path / "sel.safetensors"
    save_file({"tokens": torch.tensor([7, 3, 599])}, sel)
    out = tmp_path / "coords.safetensors"
    args = ["project", str(built["frame"]), "--W", str(built["model"] / "W.safetensors"), "--ids", str(sel), "--out", str(out)]
    assert cli(capsys, *args)[0] == 0
    got = load_file(out)
    assert got["coords"].shape == (3, 24) and got["ids"].tolist() == [7, 3, 599]
    assert SafetensorsFile(out).metadata["ids_source"] == f"{sel}:tokens"


def test_cli_project_refuses_another_w_unless_allowed(built, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_file({"W": make_w(600, 24, torch.bfloat16, seed=9)}, other)
    out = tmp_path / "coords.safetensors"
    args = ["project", str(built["frame"]), "--W", str(other), "--k", "2", "--out", str(out)]
    rc, err = cli(capsys, *args)
    assert_one_line_error(rc, err, "is not the matrix", "--allow-other-w")
    assert not out.exists()
    rc, err = cli(capsys, *args, "--allow-other-w")
    assert rc == 0 and "warning" in err and out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no W: give --W FILE, --model-dir DIR or --checkpoint DIR"),
        (["--W", "{model}/W.safetensors", "--k", "25"], "--k must be from 1 to d = 24, got 25"),
        (["--W", "{model}/W.safetensors", "--ids", "{model}/W.safetensors"], "not found and no other 1-D integer tensor"),
        (["--W", "{model}/nope.safetensors"], "nope.safetensors: no such file"),
    ],
)
def test_cli_project_bad_input_is_one_line(built, tmp_path, capsys, extra, message):
    out = tmp_path / "coords.safetensors"
    args = [a.format(model=built["model"]) for a in extra]
    rc, err = cli(capsys, "project", str(built["frame"]), *args, "--out", str(out))
    assert_one_line_error(rc, err, message)
    assert not out.exists()


def test_cli_project_never_replaces_an_input_or_reads_a_damaged_frame(built, tmp_path, capsys):
    w = built["model"] / "W.safetensors"
    before = w.read_bytes()
    rc, err = cli(capsys, "project", str(built["frame"]), "--W", str(w), "--out", str(w))
    assert_one_line_error(rc, err, "output path is the input file")
    assert w.read_bytes() == before
    damaged = tmp_path / "damaged.safetensors"
    raw = bytearray(built["frame"].read_bytes())
    raw[-3] ^= 1  # one bit of the eigenvectors
    damaged.write_bytes(bytes(raw))
    rc, err = cli(capsys, "project", str(damaged), "--W", str(w), "--out", str(tmp_path / "c.safetensors"))
    assert_one_line_error(rc, err, "does not match the checksum")


def test_cli_project_takes_a_checkpoint_matrix(built, tmp_path, capsys):
    # a gpt2-style tied checkpoint whose embedding is the model folder's W
    ckpt = tmp_path / "gpt2"
    ckpt.mkdir()
    save_file({"transformer.wte.weight": built["W"]}, ckpt / "model.safetensors")
    out = tmp_path / "coords.safetensors"
    args = ["project", str(built["frame"]), "--checkpoint", str(ckpt), "--k", "2", "--out", str(out)]
    assert cli(capsys, *args, "--matrix", "embedding")[0] == 0
    assert SafetensorsFile(out).metadata["w_source"].endswith(":transformer.wte.weight")
    rc, err = cli(capsys, "project", str(built["frame"]), "--W", str(built["model"] / "W.safetensors"), "--matrix", "embedding", "--out", str(out))
    assert_one_line_error(rc, err, "--matrix")


def test_auto_leaves_project_to_torch_on_the_portable_set(monkeypatch):
    # Without AVX2 the native project kernel is plain C++ loops, slower than the platform's BLAS:
    # "auto" takes the torch path there, and backend="native" still runs the portable kernel.
    from refframe import _native, ops, reference

    if not _native.has_op("project"):
        pytest.skip("the native library has no project op")
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "portable")
    assert _native.cpu_kernel() == "portable"
    W = make_w(300, 40, torch.bfloat16)
    c = torch.zeros(40)
    V = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))[0].float()[:, :5].contiguous()
    assert torch.equal(ops.project(W, c, V), reference.project(W, c, V))
    assert torch.equal(ops.project(W, c, V, backend="native"), torch.ops.refframe.project(W, c, V, None))
    assert ops._runs_native("radii", W, "auto")  # radii reads W once either way: native stays
    monkeypatch.setenv("REFFRAME_CPU_KERNEL", "avx2")
    if _native.cpu_kernel() == "avx2":
        assert ops._runs_native("project", W, "auto")
