"""project / radii: the native ops against the torch expressions a user would write.

    python benchmarks/bench_project.py [--n 151936] [--d 2560] [--reps 5] [--reps-large 3] [--json out.json]

W: random bf16 (N x d, 0.02 randn); center: the mean of its first 4,096 rows; basis: the first k
columns of a QR of a random d x d matrix. Each case runs the native op and the torch expression
(`(W.float() - c) @ V[:, :k]`, `(W.float() - c).norm(dim=1)`) in alternated rounds; medians (and
the range), their ratio, GFLOP/s (2 n d k flops; radii: GB/s of W read) next to this machine's
MKL sgemm rate, and each arm's worst error against float64 on 4,096 rows (per row: the largest
coordinate error over the row's distance from the center; radii: relative). Peak RSS of each arm is
measured in a fresh subprocess that memory-maps W from a safetensors file and runs the arm once:
W's pages, the output and whatever the arm allocates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from refframe import _native  # loads the native ops
from refframe.bench.common import (
    cpu_model,
    gemm_rate,
    git_commit,
    load_average,
    peak_rss_bytes,
    time_alternating,
)
from refframe.inputs import load_w
from refframe.tensorfile import save_tensors

# (case, k): k None is radii, -1 is k = d.
CASES: list[tuple[str, int | None]] = [
    ("project k=3", 3),
    ("project k=64", 64),
    ("project k=d", -1),
    ("radii", None),
]


def make_w(n: int, d: int, chunk: int = 8192) -> torch.Tensor:
    """Random bf16 W, made in row chunks (no full fp32 copy)."""
    g = torch.Generator().manual_seed(0)
    W = torch.empty(n, d, dtype=torch.bfloat16)
    for i in range(0, n, chunk):
        W[i : i + chunk] = (torch.randn(min(chunk, n - i), d, generator=g) * 0.02).to(torch.bfloat16)
    return W


def frame(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    V, _ = torch.linalg.qr(torch.randn(W.shape[1], W.shape[1], generator=g))
    return W[:4096].float().mean(0), V


def arms(
    W: torch.Tensor, center: torch.Tensor, V: torch.Tensor, k: int | None
) -> dict[str, Callable[[], object]]:
    if k is None:
        return {
            "native": lambda: torch.ops.refframe.radii(W, center, None),
            "torch": lambda: (W.float() - center).norm(dim=1),
        }
    Vk = V[:, : (W.shape[1] if k < 0 else k)]
    return {
        "native": lambda: torch.ops.refframe.project(W, center, Vk, None),
        "torch": lambda: (W.float() - center) @ Vk,
    }


def errors(W: torch.Tensor, center: torch.Tensor, V: torch.Tensor, k: int | None) -> dict[str, float]:
    """Worst error of each arm on 4,096 evenly spaced rows against float64: per row, the largest
    coordinate error over the row's distance from the center (radii: relative error)."""
    ids = torch.linspace(0, W.shape[0] - 1, 4096).long()
    X = W[ids].double() - center.double()
    radius = X.norm(dim=1)
    if k is None:
        got = {
            "native": torch.ops.refframe.radii(W, center, ids),
            "torch": (W[ids].float() - center).norm(dim=1),
        }
        return {arm: float(((g.double() - radius).abs() / radius).max()) for arm, g in got.items()}
    Vk = V[:, : (W.shape[1] if k < 0 else k)]
    want = X @ Vk.double()
    got = {"native": torch.ops.refframe.project(W, center, Vk, ids), "torch": (W[ids].float() - center) @ Vk}
    return {arm: float(((g.double() - want).abs().amax(dim=1) / radius).max()) for arm, g in got.items()}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(path: str, case: str, arm: str) -> None:
    W, _ = load_w(path)
    center, V = frame(W)
    fn = arms(W, center, V, dict(CASES)[case])[arm]
    del V
    before = rss_bytes()
    out = fn()
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "before_bytes": before, "out_bytes": out.nbytes}))


def peak_rss(path: Path, case: str, arm: str) -> dict[str, int]:
    """Peak RSS of one run of the arm in a fresh process, its RSS just before the run (interpreter,
    torch, the basis) and the bytes of the result."""
    cmd = [sys.executable, __file__, "--child", str(path), case, arm]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, object]:
    facts: dict[str, object] = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native": _native.native_status(),
        "commit": git_commit(),
        "load": load_average(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        keep = ("Model name", "CPU(s):", "L1d", "L2", "L3", "Flags")
        facts["lscpu"] = [ln for ln in lscpu if ln.strip().startswith(keep)]
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def time_cases(W: torch.Tensor, reps: int, reps_large: int) -> dict[str, dict[str, object]]:
    center, V = frame(W)
    n, d = W.shape
    out: dict[str, dict[str, object]] = {}
    for case, k in CASES:
        times = time_alternating(arms(W, center, V, k), reps_large if k == -1 else reps)
        med = {arm: statistics.median(ts) for arm, ts in times.items()}
        work = 2 * n * d * (d if k == -1 else k) / 1e9 if k is not None else W.numel() * 2 / 1e9
        unit = "GFLOP/s" if k is not None else "GB/s of W"
        err = errors(W, center, V, k)
        out[case] = {"times": times, "median": med, "ratio": med["torch"] / med["native"], "error": err}
        out[case]["rate"] = {arm: work / t for arm, t in med.items()}
        spread = {arm: f"{min(ts):.3f}-{max(ts):.3f}" for arm, ts in times.items()}
        print(
            f"{case:13s} native {med['native']:7.3f} s ({spread['native']})  torch {med['torch']:7.3f} s "
            f"({spread['torch']})  {out[case]['ratio']:5.2f}x  {work / med['native']:6.1f} / "
            f"{work / med['torch']:6.1f} {unit}  error {err['native']:.1e} / {err['torch']:.1e}",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=151936)
    p.add_argument("--d", type=int, default=2560)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--reps-large", type=int, default=3, help="rounds of the k = d case")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    results: dict[str, object] = {"shape": [args.n, args.d], "machine": machine()}
    for line in results["machine"].get("lscpu", []):
        print(
            line
            if not line.startswith("Flags")
            else "Flags: "
            + " ".join(f for f in line.split()[1:] if f.startswith(("avx512", "avx2", "fma", "f16c", "amx")))
        )
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {_native.native_status()}")
    results["gemm_gflops"] = gemm_rate()
    print(f"fp32 GEMM 4096^3: {results['gemm_gflops']['torch']:.0f} GFLOP/s (torch/MKL)", flush=True)
    W = make_w(args.n, args.d)
    results["cases"] = time_cases(W, args.reps, args.reps_large)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "W.safetensors"
        save_tensors(path, {"W": W})
        del W
        rss = {case: {arm: peak_rss(path, case, arm) for arm in ("native", "torch")} for case, _ in CASES}
    results["peak_rss_bytes"] = rss
    w_bytes = args.n * args.d * 2
    for case, per in rss.items():
        extra = {
            arm: (r["peak_rss_bytes"] - r["before_bytes"] - w_bytes - r["out_bytes"]) / 1e9
            for arm, r in per.items()
        }
        print(
            f"{case:13s} peak RSS native {per['native']['peak_rss_bytes'] / 1e9:5.2f} GB  torch "
            f"{per['torch']['peak_rss_bytes'] / 1e9:5.2f} GB  (above the process before it, W and the output: "
            f"{extra['native']:5.2f} / {extra['torch']:5.2f} GB)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
