"""`refframe bench` and `refframe bench --repeated` at the small shape: they run, their JSON has
every row the tables print, and the tables render from it. (Timings are not asserted: benchmarks
report numbers, tests do not judge them.)"""

from __future__ import annotations

import json
import sys

import pytest

from refframe.bench import kernels as bench
from refframe.bench import repeated as bench_repeated
from refframe.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_bench_small_json(capsys):
    assert main(["bench", "--small", "--reps", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["shape"] == [16384, 512] and r["reps"] == 1
    for stage in ("covariance", "eigh", "centroid", "build_frame"):
        assert stage in r["stages"]
        for per in r["stages"][stage].values():
            assert _positive(per["median"]) and per["spread"] >= 0
    assert set(r["gemm_gflops"]) == {"torch", "numpy"} and all(map(_positive, r["gemm_gflops"].values()))
    assert all(_positive(v["peak_rss_bytes"]) for v in r["peak_rss"].values())
    assert _positive(r["stages"]["covariance"]["notebook"]["median"]) and _positive(r["torch_vs_notebook"])
    assert r["machine"]["covariance_auto"].startswith(("native (", "torch (chunked): "))
    numpy_row = r["peers"]["numpy_syrk"]
    assert _positive(numpy_row["median"]) and numpy_row["copy_seconds"] >= 0
    if "native" in r["stages"]["covariance"]:
        assert _positive(r["speedup"]["covariance"]) and _positive(numpy_row["paired_ratio_median"])
        ran = r["machine"]["cpu_covariance"]
        assert ran["kernel_set"] in r["machine"]["native"] and ran["columns_multiplied"] >= 512
    table = bench.format_table(r)
    assert "covariance" in table and "numpy Xc.T @ Xc" in table and "peak RSS" in table
    assert "notebook" in table and "backend auto's covariance: " in table
    if "native" in r["stages"]["covariance"]:
        assert f"the covariance ran kernel set {r['machine']['cpu_covariance']['kernel_set']} on" in table


def test_bench_repeated_small_json(capsys):
    assert bench_repeated.main(["--small", "--reps", "1", "--k-reps", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert _positive(r["hashing"]["gbps"]) and _positive(r["hit_vs_miss"])
    assert set(r["clusters"]) == {"1", "16", "64"} and set(r["clusters_nofsync"]) == {"1", "64"}
    assert r["k_ratio"]["1"] == 1.0 and _positive(r["k_ratio"]["64"])
    for row in (r["miss"], r["hit"], r["hit_k64"], r["k64_replace"], r["clusters"]["64"]):
        assert _positive(row["wall"]) and _positive(row["save"])
    table = bench_repeated.format_table(r)
    for text in ("cache hit build", "K = 64 clusters, one PCA (no cache)", "--no-fsync", "replacing"):
        assert text in table


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo on the loopback device 'lo'")
def test_bench_distributed_small_json(capsys, monkeypatch):
    from refframe.bench import distributed as bench_distributed

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert bench_distributed.main(["--ranks", "2", "--small", "--reps", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ranks"] == 2 and len(r["single_seconds"]) == len(r["sharded"]) == 1
    sharded = r["sharded"][0]
    assert _positive(sharded["seconds"]) and _positive(sharded["reduce_seconds"])
    assert len(sharded["rank_peak_rss_gb"]) == 2 and all(_positive(v) for v in sharded["rank_peak_rss_gb"])
    assert len(r["cli"]["rank_peak_rss_gb"]) == 2 and _positive(r["ratio_sharded_over_single_median"])
    assert "2 ranks x 1 thread" in bench_distributed.format_table(r)
