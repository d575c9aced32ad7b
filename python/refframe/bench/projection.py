"""Viewing tokens from a frame, timed: refframe.project at k = 3, 64 and d, and refframe.radii,
native against refframe's torch path and against the torch expression a user would write
(`(W.float() - c) @ V[:, :k]`, `(W.float() - c).norm(dim=1)`), alternated; and the peak RSS of
each, native and the user's expression, in a fresh subprocess on W memory-mapped from disk."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import _native
from ..frame import Frame, load_frame, save_frame
from ..inputs import load_w
from ..projection import project, radii
from ..tensorfile import save_tensors
from .common import median_spread, peak_rss_bytes, time_alternating

ARMS = ("native", "torch", "expression")


def cases(d: int) -> dict[str, int | None]:
    """name -> k of each projection case (None: radii)."""
    return {"project_k3": min(3, d), "project_k64": min(64, d), f"project_k{d}": d, "radii": None}


def run_case(W: torch.Tensor, frame: Frame, k: int | None, arm: str) -> torch.Tensor:
    if arm == "expression":
        Xc = W.float() - frame.centroid
        return Xc.norm(dim=1) if k is None else Xc @ frame.eigenvectors[:, :k]
    backend = "native" if arm == "native" else "torch"
    return radii(W, frame, backend=backend) if k is None else project(W, frame, k, backend=backend)


def time_cases(W: torch.Tensor, frame: Frame, reps: int, log: Callable[[str], None]) -> dict[str, dict]:
    """Medians and spreads of each case per arm, and the speedups of native."""
    arms = [a for a in ARMS if a != "native" or _native.has_op("project")]
    out: dict[str, dict] = {}
    for name, k in cases(W.shape[1]).items():
        log(f"Timing {name} (alternating {', '.join(arms)}) ...")
        ts = time_alternating({a: (lambda a=a, k=k: run_case(W, frame, k, a)) for a in arms}, reps)
        row: dict = {a: dict(zip(("median", "spread"), median_spread(v))) for a, v in ts.items()}
        if "native" in row:
            row["speedup_vs_expression"] = row["expression"]["median"] / row["native"]["median"]
            row["speedup_vs_torch"] = row["torch"]["median"] / row["native"]["median"]
        out[name] = row
    return out


def peak_rss_cases(w_path: Path, frame_path: Path, d: int) -> dict[str, dict]:
    """Peak RSS and time of each case, native and the user's expression, each in its own process."""
    arms = ["expression"] + (["native"] if _native.has_op("project") else [])
    out: dict[str, dict] = {}
    for name, k in cases(d).items():
        for arm in arms:
            cmd = [sys.executable, "-m", "refframe.bench.projection", "--child", str(w_path), str(frame_path)]
            cmd += [str(k or 0), arm]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out.setdefault(name, {})[arm] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def child_main(w_path: str, frame_path: str, k: int, arm: str) -> None:
    """One case on W memory-mapped from w_path; prints seconds, peak RSS and the baseline RSS (a
    process with torch imported and W mapped, before the work) as JSON."""
    W, _ = load_w(w_path)
    frame = load_frame(frame_path)
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    result = run_case(W, frame, k or None, arm)
    dt = time.perf_counter() - t0
    out_bytes = result.numel() * result.element_size()
    print(json.dumps({"seconds": dt, "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": base, "output_bytes": out_bytes}))


def save_inputs(W: torch.Tensor, frame: Frame, folder: Path) -> tuple[Path, Path]:
    w_path, frame_path = folder / "W.safetensors", folder / "frame.safetensors"
    save_tensors(w_path, {"W": W})
    save_frame(frame, frame_path)
    return w_path, frame_path


def format_rows(r: dict) -> list[str]:
    """The table of `refframe bench`'s projection section."""
    lines = ["", f"{'view':<16}{'native':>16}{'torch path':>16}{'expression':>16}{'vs expr.':>10}"]
    for name, row in r["timings"].items():
        cells = [f"{row[a]['median']:.3f} s" if a in row else "-" for a in ARMS]
        sp = row.get("speedup_vs_expression")
        lines.append(f"{name:<16}" + "".join(f"{c:>16}" for c in cells) + f"{(f'{sp:.2f}x' if sp else '-'):>10}")
    if "peak_rss" in r:
        lines.append("peak RSS (own subprocess, W memory-mapped; beyond torch + mapped W; output size):")
        for name, per in r["peak_rss"].items():
            cells = [
                f"{arm} {v['peak_rss_bytes'] / 1e9:.2f} GB (+{(v['peak_rss_bytes'] - v['baseline_rss_bytes']) / 1e9:.2f})"
                for arm, v in per.items()
            ]
            out_gb = next(iter(per.values()))["output_bytes"] / 1e9
            lines.append(f"  {name:<14}" + ", ".join(cells) + f"; output {out_gb:.2f} GB")
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit("usage: refframe bench (the projection rows)")
