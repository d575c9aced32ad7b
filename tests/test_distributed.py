"""Sharded builds between real processes (gloo, loopback only): the API with a plain tensor and a
group, with a DTensor, the CLI under torchrun, and the faults, against one process's results."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_workers as dw
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import refframe
from refframe import _native
from refframe.tensorfile import SafetensorsFile

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loopback device 'lo' is Linux's"),
]

NATIVE = _native.native_available()
BACKENDS = ["native", "torch"] if NATIVE else ["torch"]


def one_process(W: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    """The single-process results, with one thread as the ranks have (eigh's bits depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mean, cov = refframe.covariance(W, backend=backend)
        frame = refframe.build_frame(W, dw.IDS, backend=backend)
    finally:
        torch.set_num_threads(threads)
    return {
        "mean": mean,
        "cov": cov,
        "eigenvalues": frame.eigenvalues,
        "eigenvectors": frame.eigenvectors,
        "centroid": frame.centroid,
    }


def ok_results(results: dict, k: int) -> list[dict]:
    assert sorted(results) == list(range(k)), results
    bad = {r: v for r, (s, v) in results.items() if s != "ok"}
    assert not bad, bad
    return [results[r][1] for r in range(k)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cuts", [[4096], [0, 3001]], ids=["K2-aligned", "K3-uneven-empty"])
def test_api_ranks_agree_with_one_process(backend, cuts):
    k = len(cuts) + 1
    W = dw.make_matrix()
    ref = one_process(W, backend)
    results, codes = dw.launch(dw.frame_of_share, k, cuts, torch.bfloat16, backend)
    ranks = ok_results(results, k)
    assert codes == [0] * k
    for r in ranks[1:]:  # every rank holds the same frame, bit for bit
        for key in r:
            assert torch.equal(torch.as_tensor(r[key]), torch.as_tensor(ranks[0][key])), key
    got = ranks[0]
    assert got["n_tokens"] == W.shape[0]
    torch.testing.assert_close(got["centroid"], W[dw.IDS].double().mean(0).float(), rtol=0, atol=1e-7)
    assert torch.equal(got["centroid"], got["frame_centroid"])
    assert torch.equal(got["frames_centroids"][0], got["centroid"])  # build_frames: one PCA, two clusters
    torch.testing.assert_close(
        got["frames_centroids"][1], W[dw.IDS_B].double().mean(0).float(), rtol=0, atol=1e-7
    )
    assert torch.equal(got["frames_eigenvalues"], got["eigenvalues"])
    assert torch.allclose(got["mean"], ref["mean"], rtol=0, atol=1e-7)
    if cuts == [4096] and backend == "native":  # shares on 4,096-row boundaries: one process's bits
        assert torch.equal(got["cov"], ref["cov"])
        assert torch.equal(got["eigenvectors"], ref["eigenvectors"])
    scale = float(ref["cov"].abs().max())
    torch.testing.assert_close(got["cov"], ref["cov"], rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(got["eigenvalues"], ref["eigenvalues"], rtol=0, atol=2e-6 * scale)


def test_runs_are_repeatable():
    a, _ = dw.launch(dw.frame_of_share, 3, [100, 4150], torch.float16, "auto")
    b, _ = dw.launch(dw.frame_of_share, 3, [100, 4150], torch.float16, "auto")
    for key in ("cov", "eigenvectors", "centroid"):
        assert torch.equal(a[0][1][key], b[0][1][key])


def test_padding_rows_left_out():
    W = dw.make_matrix()
    _, ref = refframe.covariance(W)
    results, _ = dw.launch(dw.frame_of_padded_share, 2, 128)
    got = ok_results(results, 2)[0]
    scale = float(ref.abs().max())
    torch.testing.assert_close(got["cov"], ref, rtol=0, atol=2e-6 * scale)


def test_dtensor_sharded_on_rows():
    W = dw.make_matrix()
    ref = one_process(W, "auto")
    results, _ = dw.launch(dw.frame_of_dtensor, 2)
    got = ok_results(results, 2)
    assert torch.equal(got[0]["eigenvectors"], got[1]["eigenvectors"])
    torch.testing.assert_close(got[0]["eigenvalues"], ref["eigenvalues"], rtol=0, atol=1e-9)
    torch.testing.assert_close(got[0]["centroid"], ref["centroid"], rtol=0, atol=1e-7)


def test_dtensor_on_a_2d_mesh_replicated_along_one_dimension():
    W = dw.make_matrix()
    ref = one_process(W, "auto")
    results, _ = dw.launch(dw.frame_of_dtensor_2d, 4)
    got = ok_results(results, 4)
    for r in got[1:]:
        assert torch.equal(r["eigenvectors"], got[0]["eigenvectors"])
    torch.testing.assert_close(got[0]["eigenvalues"], ref["eigenvalues"], rtol=0, atol=1e-9)
    torch.testing.assert_close(got[0]["centroid"], ref["centroid"], rtol=0, atol=1e-7)


def test_dtensor_sharded_on_columns_is_refused():
    results, _ = dw.launch(dw.dtensor_on_columns, 2)
    for status, (kind, message) in results.values():
        assert status == "error" and kind == "InputError"
        assert "must be sharded on dim 0 (rows)" in message


@pytest.mark.parametrize(
    "fault, kind, message",
    [
        ("nan", "NonFiniteError", "1 NaN/Inf value(s) in W, first in row 4510"),
        ("ids", "ClusterIdsError", "9000"),
        ("columns", "InputError", "W's number of columns differs between ranks: rank 0: 48, rank 1: 40"),
        ("die", "DistributedError", "lost contact with the other ranks"),
        ("float ids", "ClusterIdsError", "rank 1: cluster 'cluster': expected an integer dtype"),
        ("clusters", "InputError", "the cluster ids (or names, or offsets) differs between ranks"),
        ("offset", "InputError", "rank 1's row_offset 1000000 lies outside the whole's 9000 rows"),
        ("eigh", "NumericalError", "rank 0: W: the eigendecomposition failed (failed to converge)"),
    ],
)
def test_a_fault_on_one_rank_is_an_error_on_every_rank(fault, kind, message):
    t0 = time.perf_counter()
    results, codes = dw.launch(dw.faulty_build, 2, fault, timeout=90)
    assert time.perf_counter() - t0 < 50  # seconds, not the collective timeout (60 s here)
    survivors = [0] if fault == "die" else [0, 1]
    for r in survivors:
        status, (got_kind, got_message) = results[r]
        assert status == "error" and got_kind == kind, results[r]
        assert message in got_message
        assert "\n" not in got_message
    if fault == "die":
        assert codes[1] == 3


# -- the CLI under torchrun -------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    save_file({"W": dw.make_matrix(n=8192)}, d / "W.safetensors")  # torch.chunk's halves: 4,096 rows each
    save_file({"cluster_token_ids": CLI_IDS}, d / "1.4h_cluster_tokens.safetensors")
    return d


CLI_IDS = torch.arange(5, 8192, 13)


def loopback_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, **dw.LOOPBACK, "OMP_NUM_THREADS": "1", "REFFRAME_NO_CACHE": "1", **extra}


def torchrun(k: int, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={k}",
        "-m",
        "refframe",
        *args,
    ]
    return subprocess.run(cmd, env=loopback_env(), capture_output=True, text=True, timeout=240, **kw)


def test_cli_under_torchrun_writes_one_process_frame(model_dir, tmp_path):
    single = tmp_path / "single.safetensors"
    sharded = tmp_path / "sharded.safetensors"
    one = subprocess.run(
        [sys.executable, "-m", "refframe", "build", "--model-dir", str(model_dir), "--out", str(single)],
        env=loopback_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr
    run = torchrun(2, "build", "--model-dir", str(model_dir), "--out", str(sharded))
    assert run.returncode == 0, run.stderr + run.stdout
    assert "2 ranks (gloo)" in run.stdout
    a, b = SafetensorsFile(single), SafetensorsFile(sharded)
    for key in a.keys():
        assert torch.equal(a.tensor(key), b.tensor(key)), key
    assert a.metadata["w_hash"] == b.metadata["w_hash"] != ""
    refframe.verify_frame(sharded, dw.make_matrix(n=8192), CLI_IDS)  # raises on a failed check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_missing_file_on_one_rank_fails_every_rank(model_dir, tmp_path):
    port = str(free_port())
    procs = []
    for rank in range(2):
        w = model_dir / ("W.safetensors" if rank == 0 else "missing.safetensors")
        env = loopback_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_PORT=port)
        cmd = [
            sys.executable,
            "-m",
            "refframe",
            "build",
            "--W",
            str(w),
            "--cluster",
            str(model_dir / "1.4h_cluster_tokens.safetensors"),
            "--out",
            str(tmp_path / "f.safetensors"),
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 1
        assert "rank 1: " in err and "missing.safetensors" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.safetensors").exists()


def test_cli_sigterm_mid_build_writes_nothing(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    save_file({"W": torch.randn(200_000, 384).to(torch.bfloat16)}, d / "W.safetensors")
    save_file({"cluster_token_ids": torch.arange(100)}, d / "1.4h_cluster_tokens.safetensors")
    out = tmp_path / "f.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "refframe",
        "build",
        "--model-dir",
        str(d),
        "--out",
        str(out),
        "--backend",
        "torch",
    ]
    p = subprocess.Popen(cmd, env=loopback_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    for line in p.stdout:
        if "Computing PCA" in line:
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert not out.exists()
    assert not list(tmp_path.glob("**/*.tmp*"))


# -- letting W's pages go -----------------------------------------------------------------------------


def write_safetensors(path: Path, W: torch.Tensor, misalign: bool) -> None:
    """W (bf16) as key "W", its data at an odd file offset when misalign (readers then copy it)."""
    import json
    import struct

    raw = W.contiguous().view(torch.uint8).numpy().tobytes()
    header = json.dumps(
        {"W": {"dtype": "BF16", "shape": list(W.shape), "data_offsets": [0, len(raw)]}}
    ).encode()
    header += b" " * ((-len(header)) % 8 + (1 if misalign else 0))
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw)


@pytest.mark.parametrize("misalign", [False, True], ids=["mapped", "copied"])
def test_letting_pages_go_never_loses_data(tmp_path, misalign):
    from refframe.tensorfile import SafetensorsFile, file_mapped, hash_tensor, release_pages

    W = torch.randn(4096, 64).to(torch.bfloat16)
    write_safetensors(tmp_path / "W.safetensors", W, misalign)
    T = SafetensorsFile(tmp_path / "W.safetensors").tensor("W")
    assert torch.equal(T, W)
    assert file_mapped(T) is (not misalign)
    assert hash_tensor(T, chunk_bytes=1 << 16, drop_pages=True) == hash_tensor(W)
    assert release_pages(T) is (not misalign)  # a copy in anonymous memory is never touched
    assert torch.equal(T, W)  # a mapped view reads its pages from the file again
    assert not release_pages(W.clone())
