"""The covariance: the chunked torch path against the notebook's maths and the native kernel sets.

    python benchmarks/bench_covariance.py [--n 151936] [--d 2560] [--reps 3] [--sets avx2,avx512] [--json out.json]

W: the synthetic W of `refframe demo` (bf16), saved to a safetensors file and memory-mapped from it,
as `refframe build` reads it. Arms: `notebook` (reference.covariance: fp32 copy, fp32 centred copy,
one fp32 GEMM), `torch` (chunked.covariance, the torch backend) and `native:SET` for each kernel set
named (REFFRAME_CPU_KERNEL; a set this CPU lacks is left out). Times: alternated rounds in one
process, medians and each arm's median per-round ratio to `torch`. Peak RSS: each arm once in a
fresh subprocess that maps W and computes the covariance (VmHWM: W's pages, torch, the arm's own
allocations). Error: each arm's covariance against a float64 one (mean and Gram in fp64, full
products, a chunk of rows at a time), relative Frobenius.
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
from pathlib import Path

import torch

from refframe import _native, chunked, reference
from refframe.bench.common import cpu_model, git_commit, load_average, peak_rss_bytes, time_alternating
from refframe.inputs import load_w
from refframe.synthetic import SyntheticSpec, make_synthetic
from refframe.tensorfile import save_tensors


def covariance_fn(arm: str):
    """The arm's covariance as a function of W (native arms set their kernel set first)."""
    if arm == "notebook":
        return reference.covariance
    if arm == "torch":
        return chunked.covariance
    kernel = arm.split(":", 1)[1]

    def native(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        os.environ["REFFRAME_CPU_KERNEL"] = kernel
        mean64, cov = torch.ops.refframe.center_syrk(W)
        return mean64.float(), cov

    return native


def float64_covariance(W: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """Wc^T Wc / N in float64: the fp64 mean first, then full fp64 products of centred row chunks."""
    n = W.shape[0]
    mean = sum(W[i : i + rows].sum(0, dtype=torch.float64) for i in range(0, n, rows)) / n
    acc = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64)
    for i in range(0, n, rows):
        X = W[i : i + rows].to(torch.float64) - mean
        acc.addmm_(X.T, X)
    return acc / n


def child(w_path: str, arm: str, ref_path: str) -> None:
    """One arm once on a freshly mapped W: its time, peak RSS, and error against the reference."""
    W, _ = load_w(w_path)
    fn = covariance_fn(arm)
    t0 = time.perf_counter()
    _, cov = fn(W)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    ref = torch.load(ref_path)
    err = float((cov.double() - ref).norm() / ref.norm())
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "error": err}))


def run_child(w_path: Path, arm: str, ref_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(w_path), arm, str(ref_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_sets(names: list[str]) -> list[str]:
    """The kernel sets named that this CPU runs (none without the native library)."""
    if not _native.native_available():
        return []
    ok = []
    for name in names:
        os.environ["REFFRAME_CPU_KERNEL"] = name
        if _native.cpu_kernel() == name:
            ok.append(name)
    os.environ.pop("REFFRAME_CPU_KERNEL", None)
    return ok


def time_arms(w_path: Path, ref_path: Path, arms: list[str], reps: int) -> dict[str, list[float]]:
    """Save the float64 reference, then time the arms in alternated rounds on the mapped W."""
    W, _ = load_w(str(w_path))
    torch.save(float64_covariance(W), ref_path)
    times = time_alternating({a: (lambda a=a: covariance_fn(a)(W)) for a in arms}, reps)
    os.environ.pop("REFFRAME_CPU_KERNEL", None)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=151936)
    ap.add_argument("--d", type=int, default=2560)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sets", default="avx2,avx512,avx512bf16", help="native kernel sets, comma-separated ('' for none)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    arms = ["notebook", "torch"] + [f"native:{s}" for s in available_sets([s for s in args.sets.split(",") if s])]
    spec = SyntheticSpec(n_tokens=args.n, dim=args.d, cluster_size=16, rank=min(256, args.d))
    with tempfile.TemporaryDirectory() as tmp:
        w_path, ref_path = Path(tmp) / "W.safetensors", Path(tmp) / "ref.pt"
        save_tensors(w_path, {"W": make_synthetic(spec)[0]})
        times = time_arms(w_path, ref_path, arms, args.reps)
        subs = {a: run_child(w_path, a, ref_path) for a in arms}
    result = {
        "shape": [args.n, args.d],
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "native": _native.native_status(), "commit": git_commit(), "load": load_average()},
        "arms": {
            a: {
                "median_s": statistics.median(times[a]),
                "range_s": [min(times[a]), max(times[a])],
                "ratio_to_torch": statistics.median(x / y for x, y in zip(times[a], times["torch"])),
                **subs[a],
            }
            for a in arms
        },
    }
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def print_table(r: dict) -> None:
    n, d = r["shape"]
    m = r["machine"]
    print(f"covariance of W {n:,} x {d:,} bf16 (memory-mapped); {m['cpu']}, {m['threads']} threads, "
          f"torch {m['torch']}, commit {m['commit']}, load {m['load']}")
    print(f"{'arm':<20}{'median s':>10}{'range s':>16}{'/ torch':>9}{'peak RSS GB':>13}{'error':>10}")
    for a, v in r["arms"].items():
        lo, hi = v["range_s"]
        print(f"{a:<20}{v['median_s']:>10.3f}{f'{lo:.2f}-{hi:.2f}':>16}{v['ratio_to_torch']:>8.2f}x"
              f"{v['peak_rss_bytes'] / 1e9:>13.2f}{v['error']:>10.2e}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
