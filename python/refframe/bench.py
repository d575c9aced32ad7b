"""Side-by-side timings: native kernels against the pure-torch path, in one process.

Stages are timed in rounds whose order rotates (native, torch; torch, native; ...) so all backends
see the same machine state; numpy's syrk on a ready centred copy joins the covariance rounds.
Medians and the native speedup are reported, with the covariance's GFLOP/s (N*d*(d+1) flops for
one triangle) next to this machine's measured fp32 GEMM rate. Peak
memory is measured per backend in a fresh subprocess (ru_maxrss) that builds a whole frame from W
memory-mapped from disk, as `refframe build` does. numpy's syrk and scikit-learn's PCA fit are
reference rows when those packages are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import ops
from .frame import build_frame
from .io import save_tensors
from .sources import load_w
from .synthetic import SyntheticSpec, make_synthetic

FULL = SyntheticSpec()
SMALL = SyntheticSpec(n_tokens=16384, dim=512, cluster_size=256, rank=64, total_variance=0.224)


def _median_spread(xs: list[float]) -> tuple[float, float]:
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


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the current address space, so unlike
    ru_maxrss on Linux it does not carry over the parent's peak through fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def child_main(w_path: str, backend: str, ids_n: int) -> None:
    """Build one frame from a memory-mapped W and print time and peak RSS as JSON."""
    W, _ = load_w(w_path)
    ids = torch.arange(0, W.shape[0], max(1, W.shape[0] // ids_n))[:ids_n]
    t0 = time.perf_counter()
    build_frame(W, ids, backend=backend, device="cpu")
    dt = time.perf_counter() - t0
    print(json.dumps({"backend": backend, "seconds": dt, "peak_rss_bytes": _peak_rss_bytes()}))


def peak_rss(w_path: Path, backend: str, ids_n: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "refframe.bench", "--child", str(w_path), backend, str(ids_n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(spec: SyntheticSpec, reps: int, log: Callable[[str], None]) -> dict[str, object]:
    n, d = spec.n_tokens, spec.dim
    flops = n * d * (d + 1)
    log(f"Generating synthetic W {n:,} x {d:,} bf16 ...")
    W, ids = make_synthetic(spec)
    results: dict[str, object] = {
        "shape": [n, d],
        "dtype": "bfloat16",
        "cluster_size": int(ids.numel()),
        "reps": reps,
        "machine": {
            "cpu": _cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "native": ops.native_status(),
            "commit": _git_commit(),
        },
    }
    have_native = ops.native_available()
    log("Measuring the fp32 GEMM ceiling ...")
    results["gemm_gflops"] = gemm_rate()

    stages: dict[str, dict[str, list[float]]] = {}
    backends = ["native", "torch"] if have_native else ["torch"]
    # numpy's syrk on a ready, centred fp32 copy joins the covariance rounds, so its ratio to the
    # native kernel is measured under the same machine state (this machine's speed drifts).
    Xc, copy_seconds = _numpy_copy(W, log)
    arms: dict[str, Callable[[], object]] = {b: (lambda b=b: ops.covariance(W, backend=b)) for b in backends}
    if Xc is not None:
        arms["numpy_syrk"] = lambda: Xc.T @ Xc
    log("Timing covariance (alternating " + ", ".join(arms) + ") ...")
    cov_times = time_alternating(arms, reps)
    numpy_times = cov_times.pop("numpy_syrk", None)
    Xc = None
    stages["covariance"] = cov_times
    _, cov = ops.covariance(W, backend=backends[0])
    last = ops.last_cpu_covariance()
    if last is not None:
        results["machine"]["cpu_covariance"] = {"kernel_set": last[0], "columns_multiplied": last[1]}
    log("Timing eigh, centroid and the whole build ...")
    stages["eigh"] = time_alternating({"torch": lambda: torch.linalg.eigh(cov)}, reps)
    stages["centroid"] = time_alternating(
        {b: (lambda b=b: ops.gather_mean(W, ids, backend=b)) for b in backends}, reps
    )
    stages["build_frame"] = time_alternating(
        {b: (lambda b=b: build_frame(W, ids, backend=b, device="cpu")) for b in backends}, max(1, reps // 2)
    )

    peers = _peers(W, reps, log, numpy_times, stages["covariance"].get("native"), copy_seconds)
    results["stages"] = {
        stage: {b: dict(zip(("median", "spread"), _median_spread(ts))) for b, ts in per.items()}
        for stage, per in stages.items()
    }
    results["peers"] = peers
    cov_native = results["stages"]["covariance"].get("native", {}).get("median")
    cov_torch = results["stages"]["covariance"]["torch"]["median"]
    results["covariance_gflops"] = {
        b: flops / v["median"] / 1e9 for b, v in results["stages"]["covariance"].items()
    }
    if cov_native:
        results["speedup"] = {
            stage: per["torch"]["median"] / per["native"]["median"]
            for stage, per in results["stages"].items()
            if "native" in per and "torch" in per
        }
        if "numpy_syrk" in peers:
            results["speedup"]["covariance_vs_numpy_syrk"] = peers["numpy_syrk"]["median"] / cov_native
        if "sklearn_fit" in peers:
            results["speedup"]["build_vs_sklearn_fit"] = (
                peers["sklearn_fit"]["median"] / results["stages"]["build_frame"]["native"]["median"]
            )
    W = None  # free it before the subprocesses measure their own peak
    log("Measuring peak RSS of a whole build per backend (fresh subprocesses) ...")
    with tempfile.TemporaryDirectory() as tmp:
        w_path = Path(tmp) / "W.safetensors"
        save_tensors(w_path, {"W": make_synthetic(spec)[0]})
        results["peak_rss"] = {b: peak_rss(w_path, b, spec.cluster_size) for b in backends}
    results["covariance_seconds_torch"] = cov_torch
    return results


def _numpy_copy(W: torch.Tensor, log: Callable[[str], None]) -> tuple[object | None, float]:
    """The centred fp32 copy numpy's syrk works on (None without numpy), and the time to make it."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return None, 0.0
    log("Making the centred fp32 copy for numpy's syrk ...")
    t0 = time.perf_counter()
    Xc = (W.to(torch.float32) - W.to(torch.float32).mean(0)).numpy()
    return Xc, time.perf_counter() - t0


def _peers(
    W: torch.Tensor,
    reps: int,
    log: Callable[[str], None],
    numpy_times: list[float] | None,
    native_times: list[float] | None,
    copy_seconds: float,
) -> dict[str, dict[str, float]]:
    peers: dict[str, dict[str, float]] = {}
    if numpy_times is None:
        return peers
    med, spread = _median_spread(numpy_times)
    peers["numpy_syrk"] = {"median": med, "spread": spread, "copy_seconds": copy_seconds}
    if native_times:
        # per-round ratios: each pair of runs saw the same machine state
        peers["numpy_syrk"]["paired_ratio_median"] = statistics.median(
            a / b for a, b in zip(numpy_times, native_times)
        )
    try:
        from sklearn.decomposition import PCA
    except ImportError:
        return peers
    log("Timing scikit-learn PCA(svd_solver='covariance_eigh').fit on the fp32 copy ...")
    X = W.to(torch.float32).numpy()
    ts = time_alternating({"sk": lambda: PCA(svd_solver="covariance_eigh").fit(X)}, max(1, reps // 2))["sk"]
    med, spread = _median_spread(ts)
    peers["sklearn_fit"] = {"median": med, "spread": spread}
    return peers


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def format_table(r: dict) -> str:
    n, d = r["shape"]
    m = r["machine"]
    lines = [
        f"refframe bench: W {n:,} x {d:,} {r['dtype']}, cluster {r['cluster_size']:,}, {r['reps']} reps, "
        f"medians (spread)",
        f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, commit {m['commit']}",
        f"path: {m['native']}"
        + (
            f"; the covariance ran kernel set {m['cpu_covariance']['kernel_set']} on "
            f"{m['cpu_covariance']['columns_multiplied']:,} columns"
            if "cpu_covariance" in m
            else ""
        ),
        "",
        f"{'stage':<14}{'native':>18}{'torch':>18}{'speedup':>10}",
    ]
    for stage, per in r["stages"].items():
        cells = []
        for b in ("native", "torch"):
            v = per.get(b)
            cells.append(f"{v['median']:.3f} s ({v['spread']:.2f})" if v else "-")
        sp = r.get("speedup", {}).get(stage)
        lines.append(f"{stage:<14}{cells[0]:>18}{cells[1]:>18}{(f'{sp:.2f}x' if sp else '-'):>10}")
    g = r["covariance_gflops"]
    ceiling = r["gemm_gflops"]
    lines += [
        "",
        "covariance rate: "
        + ", ".join(f"{b} {v:.0f} GFLOP/s" for b, v in g.items())
        + f" (one triangle, N*d*(d+1) flops); fp32 GEMM ceiling here: torch {ceiling['torch']:.0f}, "
        f"numpy {ceiling['numpy']:.0f} GFLOP/s",
    ]
    peers = r.get("peers", {})
    if "numpy_syrk" in peers:
        p = peers["numpy_syrk"]
        lines.append(
            f"numpy Xc.T @ Xc (syrk) on a ready centred fp32 copy, in the covariance rounds: {p['median']:.3f} s "
            f"({p['spread']:.2f}) (+{p['copy_seconds']:.2f} s to make the copy)"
        )
    if "sklearn_fit" in peers:
        lines.append(f"scikit-learn PCA(covariance_eigh).fit on an fp32 copy: {peers['sklearn_fit']['median']:.3f} s")
    for key, label in (
        ("covariance_vs_numpy_syrk", "native covariance vs numpy syrk"),
        ("build_vs_sklearn_fit", "native build vs scikit-learn fit"),
    ):
        if key in r.get("speedup", {}):
            extra = ""
            if key == "covariance_vs_numpy_syrk" and "paired_ratio_median" in peers.get("numpy_syrk", {}):
                extra = f" (median of per-round ratios: {peers['numpy_syrk']['paired_ratio_median']:.2f}x)"
            lines.append(f"{label}: {r['speedup'][key]:.2f}x{extra}")
    lines.append("")
    lines.append("peak RSS of a whole build from a memory-mapped W (own subprocess):")
    for b, v in r["peak_rss"].items():
        lines.append(f"  {b:<8}{v['peak_rss_bytes'] / 1e9:.2f} GB  ({v['seconds']:.2f} s)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.repeated:
        from .bench_repeated import main as repeated_main

        return repeated_main([*(["--small"] if args.small else []), *(["--json"] if args.json else [])])
    spec = SMALL if args.small else FULL
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    r = run(spec, args.reps, log)
    print(json.dumps(r, indent=2) if args.json else format_table(r))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("usage: refframe bench [--small] [--reps N] [--json]")
