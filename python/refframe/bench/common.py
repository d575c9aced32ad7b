"""What the benchmarks share: the two shapes, alternated timing, and facts about the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..resources import peak_rss_bytes  # noqa: F401 (the benches' measure of memory, kept importable here)
from ..synthetic import SyntheticSpec

FULL = SyntheticSpec()
SMALL = SyntheticSpec(n_tokens=16384, dim=512, cluster_size=256, rank=64, total_variance=0.224)


def median_spread(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), (max(xs) - min(xs)) if len(xs) > 1 else 0.0


def time_alternating(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Run each function once to warm up, then `reps` rounds of all of them. The order rotates from
    one round to the next, so no function always runs right after the same other one (e.g. after
    the pure-torch path has freed its 3 GB of copies)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def gemm_rate(n: int = 4096) -> dict[str, float]:
    """fp32 GEMM GFLOP/s of torch (MKL) and numpy (its BLAS) on n^3, best of 3."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    rates = {}
    for name, fn in (("torch", lambda: a @ b), ("numpy", lambda: an @ bn)):
        fn()
        best = min(_timed(fn) for _ in range(3))
        rates[name] = 2 * n**3 / best / 1e9
    return rates


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"




def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
