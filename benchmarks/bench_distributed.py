"""Sharded covariance: K ranks x 1 thread against 1 process x K threads, on the same W file.

    python benchmarks/bench_distributed.py [--W FILE] [--ranks K] [--reps R] [--json OUT]

Without --W, a synthetic W of Qwen3-4B's shape (151,936 x 2,560 bf16) is written to a temporary
folder. Each rep runs, in alternating order, one process with K threads (refframe.covariance of the
memory-mapped W) and K ranks with one thread each over gloo on loopback (each maps the file and
takes torch.chunk's share of the rows; timed from the API call after a barrier to the result on
every rank, process start-up not counted). The ranks also time one fixed-order reduction of a
d (d + 1) / 2 fp64 triangle after a barrier (the partial sums' exchange), and report their peak RSS
(VmHWM, torch included). First, `refframe build` under torchrun with K ranks runs once, each rank
reporting its peak RSS (VmHWM and ru_maxrss; Linux carries ru_maxrss over from the parent through
fork and exec, VmHWM is the rank's own). Pages of W are in the page cache for every contender (a
first read warms them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def _rank(rank: int, k: int, init: str, path: str, q) -> None:
    os.environ.update(LOOPBACK)
    torch.set_num_threads(1)
    import torch.distributed as dist

    import refframe
    from refframe import distributed
    from refframe.inputs import load_w

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=k, timeout=timedelta(seconds=600))
    W, _ = load_w(path)
    step = -(-W.shape[0] // k)
    mine = W[rank * step : (rank + 1) * step]
    dist.barrier()
    t0 = time.perf_counter()
    refframe.covariance(mine, group=dist.group.WORLD)
    t_cov = time.perf_counter() - t0
    d = W.shape[1]
    shard = distributed.shard_of(mine, dist.group.WORLD)
    tri = torch.randn(d * (d + 1) // 2, dtype=torch.float64)
    dist.barrier()
    t0 = time.perf_counter()
    distributed.sum_in_rank_order(shard, tri, "benchmark")
    t_red = time.perf_counter() - t0
    from refframe.bench.common import peak_rss_bytes

    q.put((rank, t_cov, t_red, peak_rss_bytes() / 1e9))
    dist.destroy_process_group()


def sharded_run(k: int, path: str) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        init = "file://" + str(Path(tmp) / "rendezvous")
        procs = [ctx.Process(target=_rank, args=(r, k, init, path, q)) for r in range(k)]
        for p in procs:
            p.start()
        got = [q.get(timeout=900) for _ in procs]
        for p in procs:
            p.join()
    return {
        "seconds": max(g[1] for g in got),
        "reduce_seconds": max(g[2] for g in got),
        "rank_peak_rss_gb": [g[3] for g in sorted(got)],
    }


def single_run(k: int, path: str) -> float:
    code = (
        "import sys, time, torch, refframe\n"
        "from refframe.inputs import load_w\n"
        f"torch.set_num_threads({k})\n"
        "W, _ = load_w(sys.argv[1])\n"
        "t0 = time.perf_counter(); refframe.covariance(W); print(time.perf_counter() - t0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cli_rank() -> int:
    """Run as a torchrun rank: `refframe build` with the remaining arguments, then this rank's peak
    RSS (GB) on stderr: VmHWM (this process's own address space) and ru_maxrss."""
    from refframe.bench.common import peak_rss_bytes
    from refframe.cli import main as cli_main

    code = cli_main(sys.argv[2:])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    print(
        f"peak-rss rank {os.environ.get('RANK')} {peak_rss_bytes() / 1e9:.3f} {maxrss:.3f}", file=sys.stderr
    )
    return code


def cli_rss(k: int, path: str, ids_path: str) -> dict:
    """Each rank's peak RSS (GB: VmHWM, ru_maxrss) in `torchrun ... refframe build` with k ranks, and
    the command's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={k}",
            __file__,
            "--cli-rank",
            "build",
            "--W",
            path,
            "--cluster",
            ids_path,
            "--out",
            str(Path(tmp) / "f.safetensors"),
            "--no-cache",
            "--no-fsync",
        ]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env={**os.environ, **LOOPBACK}, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    ranks = {}
    for line in out.stderr.splitlines():
        if line.startswith("peak-rss rank"):
            _, _, r, hwm, maxrss = line.split()
            ranks[int(r)] = {"vmhwm_gb": float(hwm), "ru_maxrss_gb": float(maxrss)}
    return {"ranks": [ranks[r] for r in sorted(ranks)], "wall_seconds": wall}


def synthetic(folder: Path) -> tuple[str, str]:
    """The synthetic W and its cluster, written by a subprocess (so this process stays small)."""
    code = (
        "import sys\nfrom safetensors.torch import save_file\nfrom refframe.synthetic import make_synthetic\n"
        "W, ids = make_synthetic()\n"
        "save_file({'W': W}, sys.argv[1] + '/W.safetensors')\n"
        "save_file({'cluster_token_ids': ids}, sys.argv[1] + '/ids.safetensors')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return str(folder / "W.safetensors"), str(folder / "ids.safetensors")


def main() -> int:
    if sys.argv[1:2] == ["--cli-rank"]:
        return cli_rank()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--W", help="a safetensors file with key W (default: a synthetic Qwen3-4B-shaped W)")
    ap.add_argument("--cluster", help="cluster ids file for the CLI run (with --W)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, ids_path = (args.W, args.cluster) if args.W else synthetic(Path(tmp))
        rss_cli = cli_rss(args.ranks, path, ids_path) if ids_path else None  # first: nothing else ran yet
        single_run(args.ranks, path)  # warms the page cache
        singles, shardeds = [], []
        for rep in range(args.reps):
            for which in ("single", "sharded") if rep % 2 == 0 else ("sharded", "single"):
                if which == "single":
                    singles.append(single_run(args.ranks, path))
                else:
                    shardeds.append(sharded_run(args.ranks, path))
                print(which, singles[-1] if which == "single" else shardeds[-1], flush=True)
    ratios = [s["seconds"] / t for s, t in zip(shardeds, singles)]
    result = {
        "machine": {"cpu": _cpu(), "kernel": refframe_kernel(), "torch": torch.__version__},
        "ranks": args.ranks,
        "single_seconds": singles,
        "sharded": shardeds,
        "ratio_sharded_over_single_median": statistics.median(ratios),
        "cli": rss_cli,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def refframe_kernel() -> str:
    from refframe import _native

    return _native.cpu_kernel()


if __name__ == "__main__":
    sys.exit(main())
