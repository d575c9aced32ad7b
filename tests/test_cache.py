"""The PCA cache: hits are bitwise equal to misses and skip the covariance, the stat fast path skips
hashing, a changed W invalidates, damaged entries are rebuilt, concurrent writers are safe."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import refframe
import refframe.cache as cache_mod
import refframe.tensorfile as rio
from helpers import make_w
from refframe import RefframeWarning, ops
from refframe.cache import PCACache, default_cache_dir, numerics_tag
from refframe.cli import main

N, D = 1500, 40
FRAME = "1.6a_cluster_reference_frame.safetensors"


@pytest.fixture
def cache_on(monkeypatch, tmp_path):
    """The cache switched on (conftest switches it off for every other test), in tmp_path/cache."""
    monkeypatch.delenv("REFFRAME_NO_CACHE", raising=False)
    d = tmp_path / "cache"
    monkeypatch.setenv("REFFRAME_CACHE_DIR", str(d))
    return d


def write_w(path: Path, W: torch.Tensor, *, age_s: float = 3600.0) -> Path:
    """Save W; age_s back-dates its mtime so the stat fast path may trust it (racy-git rule)."""
    save_file({"W": W.contiguous()}, path)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    W = make_w(N, D, torch.bfloat16, offset_sigmas=10.0)
    write_w(d / "W.safetensors", W)
    save_file({"cluster_token_ids": torch.arange(3, N, 11)}, d / "1.4h_cluster_tokens.safetensors")
    return d


def no_covariance(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the covariance must not be computed on a cache hit")

    monkeypatch.setattr(ops, "covariance", boom)


class HashCounter:
    def __init__(self, monkeypatch, module=rio):
        self.calls = 0
        real = rio.hash_tensor

        def counting(t, *args, **kwargs):
            if t.dim() == 2 and t.shape[0] == N:  # W, not the frame tensors
                self.calls += 1
            return real(t, *args, **kwargs)

        monkeypatch.setattr(module, "hash_tensor", counting)


# ---------------------------------------------------------------------------------------------
# hits and misses


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cli_hit_is_bitwise_equal_and_skips_covariance(model, cache_on, monkeypatch, capsys, backend):
    assert main(["build", "--model-dir", str(model), "--backend", backend]) == 0
    assert "PCA computed" in capsys.readouterr().out
    first = load_file(model / FRAME)
    (model / FRAME).rename(model / "first.safetensors")
    no_covariance(monkeypatch)
    assert main(["build", "--model-dir", str(model), "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "PCA read from the cache" in out and "(PCA cache hit)" in out
    second = load_file(model / FRAME)
    assert sorted(first) == sorted(second)
    for k in first:
        assert torch.equal(first[k], second[k]), k
    meta = refframe.load_frame(model / FRAME).metadata
    assert meta["pca_cache"] == "hit"
    assert main(["verify", str(model / FRAME), "--model-dir", str(model)]) == 0


def test_api_hit_for_a_new_cluster(model, cache_on, monkeypatch):
    W = rio.read_tensor(model / "W.safetensors", "W")
    a, b = torch.arange(0, N, 5), torch.tensor([7, 8, 9, 400, 1499])
    miss = refframe.build_frame_cached(W, a, source=(model / "W.safetensors", "W"))
    assert miss.metadata["pca_cache"] == "miss"
    no_covariance(monkeypatch)
    hit = refframe.build_frame_cached(W, b, source=(model / "W.safetensors", "W"))
    assert hit.metadata["pca_cache"] == "hit"
    assert torch.equal(hit.eigenvectors, miss.eigenvectors)
    assert torch.equal(hit.eigenvalues, miss.eigenvalues)
    assert torch.equal(hit.mean, miss.mean)
    assert torch.equal(hit.centroid, ops.gather_mean(W, b))
    assert hit.metadata["w_hash"] == rio.hash_tensor(W)
    assert "covariance" not in hit.timings and "cache_read" in hit.timings


def test_cache_is_backend_independent_but_not_eigh_dtype_independent(model, cache_on, monkeypatch):
    W = rio.read_tensor(model / "W.safetensors", "W")
    ids = torch.arange(10)
    refframe.build_frame_cached(W, ids, backend="torch")
    calls = []
    real = ops.covariance
    monkeypatch.setattr(ops, "covariance", lambda *a, **k: calls.append(1) or real(*a, **k))
    f = refframe.build_frame_cached(W, ids, backend="auto")
    assert calls == [] and f.backend == "torch"  # the entry records who computed it
    f64 = refframe.build_frame_cached(W, ids, eigh_dtype=torch.float64)
    assert calls == [1] and f64.metadata["pca_cache"] == "miss"
    assert numerics_tag(torch.float64) != numerics_tag(torch.float32)
    assert len(list((cache_on / "pca").glob("*.safetensors"))) == 2


def test_no_cache_and_cache_dir_flags(model, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("REFFRAME_NO_CACHE", raising=False)
    default = tmp_path / "default-cache"
    monkeypatch.setenv("REFFRAME_CACHE_DIR", str(default))
    assert main(["build", "--model-dir", str(model), "--no-cache"]) == 0
    assert not default.exists()
    assert "PCA cache" not in capsys.readouterr().out
    other = tmp_path / "explicit"
    assert main(["build", "--model-dir", str(model), "--cache-dir", str(other)]) == 0
    assert len(list((other / "pca").iterdir())) == 1 and not default.exists()
    # REFFRAME_NO_CACHE=1 turns the default cache off; an explicit --cache-dir still uses one
    monkeypatch.setenv("REFFRAME_NO_CACHE", "1")
    assert main(["build", "--model-dir", str(model)]) == 0
    assert not default.exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("REFFRAME_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "refframe"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "refframe"
    monkeypatch.setenv("REFFRAME_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"


# ---------------------------------------------------------------------------------------------
# the stat fast path


def test_stat_fast_path_avoids_rehashing(model, cache_on, monkeypatch, capsys):
    counter = HashCounter(monkeypatch)
    assert main(["build", "--model-dir", str(model)]) == 0
    assert counter.calls == 1
    for _ in range(2):
        assert main(["build", "--model-dir", str(model)]) == 0
        assert "W hash from the cache index" in capsys.readouterr().out
    assert counter.calls == 1
    index = json.loads((cache_on / "index.json").read_text())
    (rec,) = index["files"].values()
    assert rec["hash"] == rio.hash_tensor(rio.read_tensor(model / "W.safetensors", "W"))


def test_content_hash_api(model, tmp_path):
    cache = PCACache(tmp_path / "c")
    W = rio.read_tensor(model / "W.safetensors", "W")
    first = cache.content_hash(W, model / "W.safetensors", "W")
    again = cache.content_hash(W, model / "W.safetensors", "W")
    assert (first.how, again.how) == ("hashed", "stat")
    assert first.w_hash == again.w_hash == rio.hash_tensor(W)
    assert cache.content_hash(W).how == "hashed"  # no file: always hashed
    # another tensor key of the same file is another record
    assert cache.lookup_stat(model / "W.safetensors", "other") is None


def test_fresh_file_is_racy_and_rehashed(model, cache_on, monkeypatch):
    write_w(model / "W.safetensors", make_w(N, D, torch.bfloat16, offset_sigmas=10.0), age_s=0)
    counter = HashCounter(monkeypatch)
    for _ in range(2):
        assert main(["build", "--model-dir", str(model)]) == 0
    assert counter.calls == 2  # modified "just now": the index cannot vouch for it yet


@pytest.mark.parametrize("change", ["normalised", "slice", "other", "last_row", "unsampled_row", "float32"])
def test_api_source_that_is_not_this_w_is_ignored(model, cache_on, change):
    # source=(file, key) is only a hint to skip hashing: a W that is not that file's tensor gets its
    # own PCA (with a warning), and the file's index record is left alone.
    src = (model / "W.safetensors", "W")
    W = rio.read_tensor(*src)
    ids = torch.arange(0, 1000, 7)
    refframe.build_frame_cached(W, ids, source=src)  # the file's PCA is now cached and indexed
    if change == "normalised":
        W2 = (W.float() / W.float().norm(dim=1, keepdim=True)).to(W.dtype)
    elif change == "slice":
        W2 = W[:1000]
    elif change == "other":
        W2 = make_w(N, D, torch.bfloat16, seed=9)
    elif change == "last_row":
        W2 = W.clone()
        W2[N - 1] += 1
    elif change == "unsampled_row":  # one row in the middle of the first chunk
        W2 = W.clone()
        W2[1] *= 1000
    else:
        W2 = W.float()
    with pytest.warns(RefframeWarning, match="is not this W"):
        got = refframe.build_frame_cached(W2, ids, source=src)
    want = refframe.build_frame(W2, ids)
    assert got.metadata["pca_cache"] == "miss"
    assert got.metadata["w_hash"] == rio.hash_tensor(W2)
    assert torch.allclose(got.eigenvalues, want.eigenvalues, rtol=1e-5, atol=1e-12)
    assert torch.equal(got.centroid, want.centroid)
    assert PCACache(cache_on).lookup_stat(*src) == rio.hash_tensor(W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file's own tensor still takes the stat path, silently
        assert refframe.build_frame_cached(W, ids, source=src).metadata["pca_cache"] == "hit"


def test_touched_w_is_rehashed_and_still_hits(model, cache_on, monkeypatch):
    counter = HashCounter(monkeypatch)
    assert main(["build", "--model-dir", str(model)]) == 0
    t = time.time() - 600
    os.utime(model / "W.safetensors", (t, t))  # touched: same bytes, new mtime
    no_covariance(monkeypatch)
    assert main(["build", "--model-dir", str(model)]) == 0
    assert counter.calls == 2
    assert refframe.load_frame(model / FRAME).metadata["pca_cache"] == "hit"


def test_w_edited_in_place_with_its_mtime_restored_is_rehashed(model, cache_on, monkeypatch):
    # Same size, same inode, mtime put back: only the ctime (which no user call can reset) shows it.
    counter = HashCounter(monkeypatch)
    assert main(["build", "--model-dir", str(model)]) == 0
    p = model / "W.safetensors"
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.seek(st.st_size - 2)
        last = f.read(2)
        f.seek(st.st_size - 2)
        f.write(bytes([last[0] ^ 0x40, last[1]]))  # one value of W's last row changes
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(p).st_size, os.stat(p).st_mtime_ns, os.stat(p).st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert main(["build", "--model-dir", str(model)]) == 0
    assert counter.calls == 2
    assert refframe.load_frame(model / FRAME).metadata["pca_cache"] == "miss"


def test_modified_w_invalidates(model, cache_on, monkeypatch):
    assert main(["build", "--model-dir", str(model)]) == 0
    before = load_file(model / FRAME)
    W2 = make_w(N, D, torch.bfloat16, seed=5, offset_sigmas=10.0)  # same shape and size, new values
    write_w(model / "W.safetensors", W2, age_s=1200)
    calls = []
    real = ops.covariance
    monkeypatch.setattr(ops, "covariance", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["build", "--model-dir", str(model)]) == 0
    assert calls == [1]
    after = load_file(model / FRAME)
    assert not torch.equal(before["W_eigenvalues"], after["W_eigenvalues"])
    assert refframe.load_frame(model / FRAME).metadata["w_hash"] == rio.hash_tensor(W2)


# ---------------------------------------------------------------------------------------------
# damaged entries and index


def entry_file(cache_dir: Path) -> Path:
    (p,) = list((cache_dir / "pca").glob("*.safetensors"))
    return p


def flip_byte(p: Path, key: str) -> None:
    f = rio.SafetensorsFile(p)
    _, _, begin, end = f.entries[key]
    buf = bytearray(p.read_bytes())
    buf[f.data_offset + (begin + end) // 2] ^= 0x10
    p.write_bytes(bytes(buf))


@pytest.mark.parametrize(
    "damage",
    ["flip-eigenvectors", "flip-mean", "truncate", "empty", "garbage", "wrong-metadata"],
)
def test_damaged_entry_warns_and_is_rebuilt(model, cache_on, monkeypatch, damage):
    W = rio.read_tensor(model / "W.safetensors", "W")
    ids = torch.arange(0, N, 3)
    good = refframe.build_frame_cached(W, ids)
    p = entry_file(cache_on)
    if damage == "flip-eigenvectors":
        flip_byte(p, "eigenvectors")
    elif damage == "flip-mean":
        flip_byte(p, "mean")
    elif damage == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "garbage":
        p.write_bytes(b"not a safetensors file at all" * 10)
    else:
        f = rio.SafetensorsFile(p)
        save_file(
            {k: f.tensor(k).clone() for k in f.keys()}, p, metadata={**f.metadata, "numerics": "pca-v0"}
        )
    calls = []
    real = ops.covariance
    monkeypatch.setattr(ops, "covariance", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.warns(RefframeWarning, match="PCA cache entry .* is damaged .*recomputing"):
        again = refframe.build_frame_cached(W, ids)
    assert calls == [1] and again.metadata["pca_cache"] == "miss"
    assert torch.equal(again.eigenvectors, good.eigenvectors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = refframe.build_frame_cached(W, ids)  # the entry was rewritten
    assert calls == [1] and third.metadata["pca_cache"] == "hit"


def test_damaged_entry_via_cli_is_one_warning_line(model, cache_on, capsys):
    assert main(["build", "--model-dir", str(model)]) == 0
    flip_byte(entry_file(cache_on), "eigenvalues")
    capsys.readouterr()
    assert main(["build", "--model-dir", str(model)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("refframe: warning: PCA cache entry") and "checksum" in err[0]


def test_corrupt_index_warns_and_rehashes(model, cache_on, monkeypatch, capsys):
    counter = HashCounter(monkeypatch)
    assert main(["build", "--model-dir", str(model)]) == 0
    (cache_on / "index.json").write_text('{"format": "refframe-stat-index/1", "files": [')
    capsys.readouterr()
    assert main(["build", "--model-dir", str(model)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refframe: warning: PCA cache index" in err[0] and "is corrupt" in err[0]
    assert counter.calls == 2
    json.loads((cache_on / "index.json").read_text())  # rewritten whole


def test_unwritable_cache_only_warns(model, tmp_path, monkeypatch):
    monkeypatch.delenv("REFFRAME_NO_CACHE", raising=False)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    W = rio.read_tensor(model / "W.safetensors", "W")
    with pytest.warns(RefframeWarning, match="could not write the PCA cache entry"):
        f = refframe.build_frame_cached(W, torch.arange(5), cache_dir=blocker)
    assert f.metadata["pca_cache"] == "miss"
    assert torch.equal(f.eigenvectors, refframe.build_frame(W, torch.arange(5)).eigenvectors)


# ---------------------------------------------------------------------------------------------
# concurrency


def _writer(cache_dir: str, w_path: str, rounds: int, seed: int) -> None:
    """One process: hash through the index, then store the same entry again and again."""
    warnings.simplefilter("error")  # a damaged entry or index seen by a writer fails the test
    f = rio.SafetensorsFile(w_path)
    W = f.tensor("W")
    cache = PCACache(cache_dir)
    tag = numerics_tag()
    g = torch.Generator().manual_seed(0)  # both processes store identical tensors
    mean, evals, evecs = (
        torch.randn(D, generator=g),
        torch.randn(D, generator=g),
        torch.randn(D, D, generator=g),
    )
    for i in range(rounds):
        h = cache.content_hash(W, w_path, "W").w_hash
        p = cache.entry_path(h, tag)
        if p.exists() and i % 2 == seed % 2:
            p.unlink(missing_ok=True)  # force real rewrites, interleaved with the other process
        cache.store(h, tag, mean, evals, evecs, backend="torch", device="cpu")
        got = cache.load(h, tag, d=D)
        assert got is None or torch.equal(got.eigenvectors, evecs)
        cache.record_stat(w_path, f"key{seed}-{i}", os.stat(w_path), h, time.time_ns())


def test_concurrent_writers_leave_a_valid_cache(model, tmp_path):
    cache_dir = tmp_path / "shared-cache"
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_writer, args=(str(cache_dir), str(model / "W.safetensors"), 12, s))
        for s in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = PCACache(cache_dir)
    W = rio.read_tensor(model / "W.safetensors", "W")
    h = rio.hash_tensor(W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = cache.load(h, numerics_tag(), d=D)
    assert entry is not None
    index = json.loads((cache_dir / "index.json").read_text())["files"]
    assert len(index) == 1 + 2 * 12  # every record of both processes survived the read-modify-write
    assert not [p for p in cache_dir.rglob("*.tmp")]


def test_index_keeps_a_bounded_number_of_records(model, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "INDEX_LIMIT", 5)
    cache = PCACache(tmp_path / "c")
    st = os.stat(model / "W.safetensors")
    for i in range(8):
        cache.record_stat(model / "W.safetensors", f"k{i}", st, "xxh3_128:" + "0" * 32, i)
    files = json.loads((tmp_path / "c" / "index.json").read_text())["files"]
    assert sorted(json.loads(k)[1] for k in files) == ["k3", "k4", "k5", "k6", "k7"]
