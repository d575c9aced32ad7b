"""Side-by-side timings: native kernels against the pure-torch path, in one process.

Stages are timed in rounds whose order rotates (native, torch; torch, native; ...) so all backends
see the same machine state; the notebook's maths (reference.covariance: fp32 copies, one fp32
GEMM) and numpy's syrk on a ready centered copy join the covariance rounds.
Medians and the native speedup are reported, with the covariance's GFLOP/s (N*d*(d+1) flops for
one triangle) next to this machine's measured fp32 GEMM rate. Peak
memory is measured per backend in a fresh subprocess (ru_maxrss) that builds a whole frame from W
memory-mapped from disk, as `refframe build` does. numpy's syrk and scikit-learn's PCA fit are
reference rows when those packages are installed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import _native, ops, reference
from ..build import build_frame
from ..inputs import load_w
from ..synthetic import SyntheticSpec, make_synthetic
from . import projection
from .common import (
    FULL,
    SMALL,
    cpu_model,
    gemm_rate,
    git_commit,
    median_spread,
    peak_rss_bytes,
    time_alternating,
)


def child_main(w_path: str, backend: str, ids_n: int) -> None:
    """Build one frame from a memory-mapped W and print time and peak RSS as JSON."""
    W, _ = load_w(w_path)
    ids = torch.arange(0, W.shape[0], max(1, W.shape[0] // ids_n))[:ids_n]
    t0 = time.perf_counter()
    build_frame(W, ids, backend=backend, device="cpu")
    dt = time.perf_counter() - t0
    print(json.dumps({"backend": backend, "seconds": dt, "peak_rss_bytes": peak_rss_bytes()}))


def peak_rss(w_path: Path, backend: str, ids_n: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "refframe.bench.kernels", "--child", str(w_path), backend, str(ids_n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(spec: SyntheticSpec, reps: int, log: Callable[[str], None]) -> dict[str, object]:
    n, d = spec.n_tokens, spec.dim
    log(f"Generating synthetic W {n:,} x {d:,} bf16 ...")
    W, ids = make_synthetic(spec)
    results: dict[str, object] = {
        "shape": [n, d],
        "dtype": "bfloat16",
        "cluster_size": int(ids.numel()),
        "reps": reps,
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "native": _native.native_status(),
            "commit": git_commit(),
        },
    }
    backends = ["native", "torch"] if _native.native_available() else ["torch"]
    log("Measuring the fp32 GEMM ceiling ...")
    results["gemm_gflops"] = gemm_rate()
    stages, peers = _time_stages(W, ids, backends, reps, results, log)
    results["stages"] = {
        stage: {b: dict(zip(("median", "spread"), median_spread(ts))) for b, ts in per.items()}
        for stage, per in stages.items()
    }
    results["peers"] = peers
    _summarise(results, n * d * (d + 1))
    frame = build_frame(W, ids, backend=backends[0], device="cpu")
    results["projection"] = {"timings": projection.time_cases(W, frame, reps, log)}
    W = None  # free it before the subprocesses measure their own peak
    log("Measuring peak RSS of a whole build per backend, and of each view (fresh subprocesses) ...")
    with tempfile.TemporaryDirectory() as tmp:
        w_path, frame_path = projection.save_inputs(make_synthetic(spec)[0], frame, Path(tmp))
        results["peak_rss"] = {b: peak_rss(w_path, b, spec.cluster_size) for b in backends}
        results["projection"]["peak_rss"] = projection.peak_rss_cases(w_path, frame_path, d)
    results["covariance_seconds_torch"] = results["stages"]["covariance"]["torch"]["median"]
    return results


def _time_stages(
    W: torch.Tensor, ids: torch.Tensor, backends: list[str], reps: int, results: dict, log: Callable[[str], None]
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, float]]]:
    """Times of each stage per backend, alternated, and the peers' rows (numpy, scikit-learn)."""
    stages: dict[str, dict[str, list[float]]] = {}
    # numpy's syrk on a ready, centered fp32 copy joins the covariance rounds, so its ratio to the
    # native kernel is measured under the same machine state (this machine's speed drifts).
    Xc, copy_seconds = _numpy_copy(W, log)
    arms: dict[str, Callable[[], object]] = {b: (lambda b=b: ops.covariance(W, backend=b)) for b in backends}
    arms["notebook"] = lambda: reference.covariance(W)
    if Xc is not None:
        arms["numpy_syrk"] = lambda: Xc.T @ Xc
    log("Timing covariance (alternating " + ", ".join(arms) + ") ...")
    cov_times = time_alternating(arms, reps)
    numpy_times = cov_times.pop("numpy_syrk", None)
    Xc = None
    stages["covariance"] = cov_times
    results["machine"]["covariance_auto"] = ops.covariance_path(W, "auto")
    _, cov = ops.covariance(W, backend=backends[0])
    last = _native.last_cpu_covariance()
    if last is not None and backends[0] == "native":
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
    return stages, peers


def _summarise(results: dict, flops: int) -> None:
    """GFLOP/s of the covariance and the native speedups against torch and the peers."""
    st = results["stages"]
    peers = results["peers"]
    results["covariance_gflops"] = {b: flops / v["median"] / 1e9 for b, v in st["covariance"].items()}
    results["torch_vs_notebook"] = st["covariance"]["torch"]["median"] / st["covariance"]["notebook"]["median"]
    cov_native = st["covariance"].get("native", {}).get("median")
    if not cov_native:
        return
    results["speedup"] = {
        stage: per["torch"]["median"] / per["native"]["median"]
        for stage, per in st.items()
        if "native" in per and "torch" in per
    }
    if "numpy_syrk" in peers:
        results["speedup"]["covariance_vs_numpy_syrk"] = peers["numpy_syrk"]["median"] / cov_native
    if "sklearn_fit" in peers:
        results["speedup"]["build_vs_sklearn_fit"] = peers["sklearn_fit"]["median"] / st["build_frame"]["native"]["median"]


def _numpy_copy(W: torch.Tensor, log: Callable[[str], None]) -> tuple[object | None, float]:
    """The centered fp32 copy numpy's syrk works on (None without numpy), and the time to make it."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return None, 0.0
    log("Making the centered fp32 copy for numpy's syrk ...")
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
    med, spread = median_spread(numpy_times)
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
    med, spread = median_spread(ts)
    peers["sklearn_fit"] = {"median": med, "spread": spread}
    return peers


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
        f"backend auto's covariance: {m['covariance_auto']}; torch is the chunked fp64 path, notebook the "
        "notebook's fp32 maths (reference.covariance)",
        "",
        f"{'stage':<14}{'native':>18}{'torch':>18}{'notebook':>18}{'speedup':>10}",
    ]
    for stage, per in r["stages"].items():
        cells = []
        for b in ("native", "torch", "notebook"):
            v = per.get(b)
            cells.append(f"{v['median']:.3f} s ({v['spread']:.2f})" if v else "-")
        sp = r.get("speedup", {}).get(stage)
        lines.append(f"{stage:<14}{cells[0]:>18}{cells[1]:>18}{cells[2]:>18}{(f'{sp:.2f}x' if sp else '-'):>10}")
    g = r["covariance_gflops"]
    ceiling = r["gemm_gflops"]
    lines += [
        "",
        "covariance rate: "
        + ", ".join(f"{b} {v:.0f} GFLOP/s" for b, v in g.items())
        + f" (one triangle, N*d*(d+1) flops); fp32 GEMM ceiling here: torch {ceiling['torch']:.0f}, "
        f"numpy {ceiling['numpy']:.0f} GFLOP/s",
    ]
    lines.append(f"covariance time, chunked torch path / notebook's maths: {r['torch_vs_notebook']:.2f}x")
    peers = r.get("peers", {})
    if "numpy_syrk" in peers:
        p = peers["numpy_syrk"]
        lines.append(
            f"numpy Xc.T @ Xc (syrk) on a ready centered fp32 copy, in the covariance rounds: {p['median']:.3f} s "
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
    if "projection" in r:
        lines += projection.format_rows(r["projection"])
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`refframe bench` (args: small, reps, json)."""
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
