"""`refframe demo`: a synthetic W of Qwen3-4B's shape with a planted cluster, built and verified."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .._native import native_status
from ..errors import OutputError
from ..layout import CLUSTER_FILENAME, DEFAULT_FILENAME, W_FILENAME, __version__
from ..synthetic import SyntheticSpec, make_synthetic
from ..tensorfile import save_tensors
from .build import run as run_build
from .console import say
from .parser import build_parser
from .verify import run as run_verify


def run(args: argparse.Namespace) -> int:
    spec = SyntheticSpec.small() if args.small else SyntheticSpec(seed=args.seed)
    if args.small:
        spec = SyntheticSpec(**{**spec.__dict__, "seed": args.seed})
    name = f"synthetic-{spec.n_tokens}x{spec.dim}-seed{spec.seed}"
    model_dir = Path(args.dir) / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{model_dir}: cannot create the demo folder ({exc.strerror or exc})") from None
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
    say("")
    # --no-cache: the demo shows the whole build, not a PCA read back from an earlier demo's cache.
    build = ["build", "--model-dir", str(model_dir), "--backend", args.backend, "--device", args.device, "--no-cache"]
    run_build(build_parser().parse_args(build))
    say("")
    run_verify(build_parser().parse_args(["verify", str(model_dir / DEFAULT_FILENAME), "--model-dir", str(model_dir)]))
    return 0
