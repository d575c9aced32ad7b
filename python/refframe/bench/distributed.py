"""Sharded covariance: K ranks x 1 thread against 1 process x K threads, on the same W file.

    refframe bench --distributed K [--small] [--reps R] [--json]
    python benchmarks/bench_distributed.py [--ranks K] [--small] [--reps R] [--W FILE --cluster FILE] [--json]

W: a synthetic W of Qwen3-4B's shape (151,936 x 2,560 bf16; --small: 8,192 x 256) written to a
temporary folder by a subprocess (so that this process stays small), or --W. Each round runs, in
alternating order, one process with K threads (refframe.covariance of the memory-mapped W) and K
ranks with one thread each over gloo on loopback (each maps the file and takes torch.chunk's share
of the rows; timed from the API call after a barrier to the result on every rank, process start-up
not counted). The ranks also time one fixed-order reduction of a d (d + 1) / 2 fp64 triangle after
a barrier (the partial sums' exchange) and report their peak RSS. First, `refframe build` under
torchrun with K ranks runs once and reports each rank's peak RSS. Peak RSS is VmHWM (the process's
own address space, torch included; Linux's ru_maxrss carries the parent's peak over through fork
and exec). Pages of W are in the page cache for every contender (a first read warms them).

Targets (2 ranks, full shape): within 1.15x of one process; reduction < 0.2 s; CLI rank <= 0.8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ..resources import peak_rss_bytes
from .common import cpu_model

LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def _rank(rank: int, k: int, init: str, path: str, q: Any) -> None:
    """One rank: the covariance of its rows, then the reduction of a triangle; its times and peak."""
    os.environ.update(LOOPBACK)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from .. import distributed, ops
    from ..inputs import load_w

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=k, timeout=timedelta(seconds=900))
    W, _ = load_w(path)
    step = -(-W.shape[0] // k)
    mine = W[rank * step : (rank + 1) * step]
    dist.barrier()
    t0 = time.perf_counter()
    ops.covariance(mine, group=dist.group.WORLD)
    t_cov = time.perf_counter() - t0
    d = W.shape[1]
    shard = distributed.shard_of(mine, dist.group.WORLD)
    tri = torch.randn(d * (d + 1) // 2, dtype=torch.float64)
    dist.barrier()
    t0 = time.perf_counter()
    distributed.sum_in_rank_order(shard, tri, "benchmark")
    q.put((rank, t_cov, time.perf_counter() - t0, peak_rss_bytes() / 1e9))
    dist.destroy_process_group()


def sharded_run(k: int, path: str) -> dict:
    """The covariance over k ranks: the slowest rank's time, the reduction's, each rank's peak."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        init = "file://" + str(Path(tmp) / "rendezvous")
        procs = [ctx.Process(target=_rank, args=(r, k, init, path, q)) for r in range(k)]
        for p in procs:
            p.start()
        got = sorted(q.get(timeout=900) for _ in procs)
        for p in procs:
            p.join()
    return {
        "seconds": max(g[1] for g in got),
        "reduce_seconds": max(g[2] for g in got),
        "rank_peak_rss_gb": [g[3] for g in got],
    }


def single_run(k: int, path: str) -> float:
    """The covariance in one fresh process with k threads."""
    code = (
        "import sys, time, torch, refframe\n"
        "from refframe.inputs import load_w\n"
        f"torch.set_num_threads({k})\n"
        "W, _ = load_w(sys.argv[1])\n"
        "t0 = time.perf_counter(); refframe.covariance(W); print(time.perf_counter() - t0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cli_run(k: int, path: str, ids_path: str) -> dict:
    """`torchrun ... -m refframe build` with k ranks: the wall time and each rank's peak RSS (GB),
    from the line the build prints."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", "-m",
               "refframe", "build", "--W", path, "--cluster", ids_path, "--out", str(Path(tmp) / "f.safetensors"),
               "--no-cache", "--no-fsync"]  # fmt: skip
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env={**os.environ, **LOOPBACK}, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    line = next(x for x in out.stdout.splitlines() if x.startswith("Peak memory per rank:"))
    peaks = [float(v) for v in line.split(":", 1)[1].replace("GB", "").split(",")]
    return {"wall_seconds": wall, "rank_peak_rss_gb": peaks}


def synthetic(folder: Path, small: bool) -> tuple[str, str]:
    """The synthetic W and its cluster, written by a subprocess."""
    spec = "SyntheticSpec.small()" if small else "SyntheticSpec()"
    code = (
        "import sys\nfrom safetensors.torch import save_file\n"
        "from refframe.synthetic import SyntheticSpec, make_synthetic\n"
        f"W, ids = make_synthetic({spec})\n"
        "save_file({'W': W}, sys.argv[1] + '/W.safetensors')\n"
        "save_file({'cluster_token_ids': ids}, sys.argv[1] + '/ids.safetensors')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return str(folder / "W.safetensors"), str(folder / "ids.safetensors")


def run(k: int, reps: int, path: str, ids_path: str, log) -> dict:
    """The CLI run, then `reps` alternated rounds of one process and k ranks."""
    from .. import _native

    cli = cli_run(k, path, ids_path)
    single_run(k, path)  # warms the page cache
    singles: list[float] = []
    shardeds: list[dict] = []
    for rep in range(reps):
        for which in ("single", "sharded") if rep % 2 == 0 else ("sharded", "single"):
            if which == "single":
                singles.append(single_run(k, path))
                log(f"round {rep + 1}: 1 process x {k} threads {singles[-1]:.3f} s")
            else:
                shardeds.append(sharded_run(k, path))
                log(f"round {rep + 1}: {k} ranks x 1 thread {shardeds[-1]['seconds']:.3f} s")
    ratios = [s["seconds"] / t for s, t in zip(shardeds, singles)]
    return {
        "machine": {"cpu": cpu_model(), "kernel": _native.cpu_kernel(), "torch": torch.__version__},
        "ranks": k,
        "single_seconds": singles,
        "sharded": shardeds,
        "ratio_sharded_over_single_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "cli": cli,
    }


def format_table(r: dict) -> str:
    k, sh = r["ranks"], r["sharded"]
    m = r["machine"]
    return "\n".join(
        [
            f"{m['cpu']}, kernel set {m['kernel']}, torch {m['torch']}",
            f"covariance, 1 process x {k} threads: {min(r['single_seconds']):.3f}-{max(r['single_seconds']):.3f} s",
            f"covariance, {k} ranks x 1 thread:    {min(s['seconds'] for s in sh):.3f}-"
            f"{max(s['seconds'] for s in sh):.3f} s (median ratio {r['ratio_sharded_over_single_median']:.2f}x, "
            f"rounds {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}x)",
            f"reduction of the partial sums: {min(s['reduce_seconds'] for s in sh):.3f}-"
            f"{max(s['reduce_seconds'] for s in sh):.3f} s",
            f"peak RSS per rank, API: {min(min(s['rank_peak_rss_gb']) for s in sh):.2f}-"
            f"{max(max(s['rank_peak_rss_gb']) for s in sh):.2f} GB; CLI build: "
            + ", ".join(f"{v:.2f}" for v in r["cli"]["rank_peak_rss_gb"])
            + " GB",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="alternated rounds (default 3)")
    ap.add_argument("--small", action="store_true", help="a small synthetic W (8,192 x 256)")
    ap.add_argument("--W", help="a safetensors file with key W (default: a synthetic W)")
    ap.add_argument("--cluster", help="its cluster ids file (with --W)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    if args.ranks < 1 or (args.W is None) != (args.cluster is None):
        ap.error("--ranks must be at least 1, and --W and --cluster go together")
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    with tempfile.TemporaryDirectory() as tmp:
        path, ids_path = (args.W, args.cluster) if args.W else synthetic(Path(tmp), args.small)
        r = run(args.ranks, max(1, args.reps), path, ids_path, log)
    print(json.dumps(r, indent=1) if args.json else format_table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
