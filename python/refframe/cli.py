"""The `refframe` command: build, verify, demo, bench."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .errors import RefframeError
from .frame import Frame, build_frame, check_ids, check_w
from .framefile import save_frame
from .io import check_output_path, hash_tensor, save_tensors
from .ops import native_status
from .sources import CLUSTER_FILENAME, W_FILENAME, load_ids, load_w, seed_paths
from .synthetic import SyntheticSpec, make_synthetic
from .verify import verify_frame

EIGH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def say(*args: object) -> None:
    print(*args, flush=True)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1024 / 1024:.1f} MB"


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", help=f"folder in the seed's layout ({W_FILENAME}, {CLUSTER_FILENAME})")
    p.add_argument("--W", dest="w", help="safetensors file holding W (overrides --model-dir)")
    p.add_argument("--cluster", help="safetensors file holding the cluster token ids")
    p.add_argument("--W-key", dest="w_key", help="key of W in its file (default: W)")
    p.add_argument("--cluster-key", help="key of the ids in their file (default: cluster_token_ids)")


def report_frame(frame: Frame) -> None:
    say("")
    for line in frame.variance_report().lines():
        say(line)
    c = frame.centroid
    say("")
    say(f"✓ Cluster centroid of {frame.cluster_size:,} tokens")
    say(f"  Norm: {float(torch.linalg.vector_norm(c)):.6f}")
    say(f"  First 10 components: {c[:10].numpy()}")


def run_build(
    w_path: Path,
    ids_path: Path,
    out: Path,
    *,
    w_key: str | None = None,
    cluster_key: str | None = None,
    model_name: str = "",
    backend: str = "auto",
    device: str = "auto",
    eigh_dtype: str = "float32",
) -> Frame:
    """Load, build, save; print the seed's report and the time of each stage."""
    check_output_path(out)
    t0 = time.perf_counter()
    W, wk = load_w(w_path, w_key)
    check_w(W, f"{w_path}:{wk}")
    ids, ck = load_ids(ids_path, cluster_key)
    ids = check_ids(ids, W.shape[0], f"{ids_path}:{ck}")
    t_load = time.perf_counter() - t0
    n, d = W.shape
    say(f"Loaded W: {tuple(W.shape)} {str(W.dtype).removeprefix('torch.')} from {w_path}")
    say(f"  {n:,} tokens in {d:,} dimensions; {ids.numel():,} cluster tokens")
    t0 = time.perf_counter()
    w_hash = hash_tensor(W)
    t_hash = time.perf_counter() - t0
    say("Computing PCA...")
    frame = build_frame(W, ids, backend=backend, device=device, eigh_dtype=EIGH_DTYPES[eigh_dtype])
    say(f"✓ PCA computed (backend {frame.backend}, device {frame.device})")
    report_frame(frame)
    t0 = time.perf_counter()
    save_frame(
        frame,
        out,
        model_name=model_name,
        source_dtype=str(W.dtype).removeprefix("torch."),
        w_hash=w_hash,
    )
    t_save = time.perf_counter() - t0
    say("")
    say(f"✓ Saved to {out}")
    say(f"  Size: {_mb(out.stat().st_size)}")
    stages = {"load": t_load, "hash": t_hash, **frame.timings, "save": t_save}
    say(
        "Stage times: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
        + f"; total {sum(stages.values()):.2f} s"
    )
    frame.timings = stages
    return frame


def run_verify(path: Path, w_path: Path | None, ids_path: Path | None, w_key=None, cluster_key=None) -> None:
    W = load_w(w_path, w_key)[0] if w_path is not None else None
    ids = load_ids(ids_path, cluster_key)[0] if ids_path is not None and w_path is not None else None
    say(f"Verifying {path}" + (f" against {w_path}" if w_path else ""))
    res = verify_frame(path, W, ids)
    for line in res.checks:
        say(f"  ✓ {line}")
    say("✓ Verification passed")


def cmd_build(args: argparse.Namespace) -> int:
    paths = seed_paths(args.model_dir, args.w, args.cluster, args.out, args.model_name)
    if paths.cluster is None:
        raise RefframeError("no cluster ids: give --cluster FILE (or --model-dir DIR)")
    if paths.out is None:
        raise RefframeError("no output path: give --out FILE (or --model-dir DIR)")
    say(f"refframe {__version__}: {native_status()}")
    run_build(
        paths.w,
        paths.cluster,
        paths.out,
        w_key=args.w_key,
        cluster_key=args.cluster_key,
        model_name=paths.model_name,
        backend=args.backend,
        device=args.device,
        eigh_dtype=args.eigh_dtype,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    w_path = ids_path = None
    if args.model_dir or args.w:
        paths = seed_paths(args.model_dir, args.w, args.cluster, out=args.file)
        w_path, ids_path = paths.w, paths.cluster
    run_verify(Path(args.file), w_path, ids_path, args.w_key, args.cluster_key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    spec = SyntheticSpec.small() if args.small else SyntheticSpec(seed=args.seed)
    if args.small:
        spec = SyntheticSpec(**{**spec.__dict__, "seed": args.seed})
    name = f"synthetic-{spec.n_tokens}x{spec.dim}-seed{spec.seed}"
    model_dir = Path(args.dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    say(f"refframe {__version__}: {native_status()}")
    w_path, ids_path = model_dir / W_FILENAME, model_dir / CLUSTER_FILENAME
    if w_path.exists() and ids_path.exists():
        say(f"Reusing synthetic W and cluster in {model_dir}")
    else:
        say(
            f"Generating a synthetic W ({spec.n_tokens:,} x {spec.dim:,}, bf16) with a planted cluster of "
            f"{spec.cluster_size:,} tokens in {model_dir} ..."
        )
        t0 = time.perf_counter()
        W, ids = make_synthetic(spec)
        save_tensors(w_path, {"W": W}, {"generator": "refframe.synthetic", "spec": repr(spec)})
        save_tensors(ids_path, {"cluster_token_ids": ids})
        del W
        say(f"  done in {time.perf_counter() - t0:.1f} s")
    out = model_dir / "1.6a_cluster_reference_frame.safetensors"
    say("")
    run_build(w_path, ids_path, out, model_name=name, backend=args.backend, device=args.device)
    say("")
    run_verify(out, w_path, ids_path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refframe", description="Cluster-centric reference frames of token embedding matrices."
    )
    parser.add_argument("--version", action="version", version=f"refframe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="compute the PCA of W and the cluster centroid, save the frame")
    _add_source_args(b)
    b.add_argument("--out", help="output file (default: DIR/1.6a_cluster_reference_frame.safetensors)")
    b.add_argument("--model-name", help="model name stored in the file's metadata (default: the folder name)")
    b.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
    b.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, mps")
    b.add_argument("--eigh-dtype", default="float32", choices=sorted(EIGH_DTYPES))
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("verify", help="check a frame file (format, maths, and against its source if given)")
    v.add_argument("file")
    _add_source_args(v)
    v.set_defaults(func=cmd_verify)

    dm = sub.add_parser("demo", help="build and verify a frame of a synthetic W of Qwen3-4B's shape")
    dm.add_argument("--small", action="store_true", help="a small W (8192 x 256) that runs in seconds")
    dm.add_argument("--dir", default="refframe-demo", help="where the synthetic model folder goes")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
    dm.add_argument("--device", default="auto")
    dm.set_defaults(func=cmd_demo)

    bn = sub.add_parser("bench", help="time native against pure torch, side by side")
    bn.add_argument("--small", action="store_true", help="a small shape instead of Qwen3-4B's")
    bn.add_argument("--reps", type=int, default=3)
    bn.add_argument("--json", action="store_true", help="machine-readable output")
    bn.set_defaults(func=cmd_bench)
    return parser


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(args.func(args) or 0)
    except RefframeError as exc:
        if args.debug:
            raise
        print(f"refframe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("refframe: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
