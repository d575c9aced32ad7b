"""`refframe verify`: check frame files (format, checksums, maths), against W and the ids if given."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..inputs import load_checkpoint_w, load_ids, load_w, seed_paths
from ..tensorfile import hash_tensor
from ..verify import verify_frame
from .console import say
from .parser import MATRIX_NEEDS_CHECKPOINT


def run(args: argparse.Namespace) -> int:
    files = [Path(f) for f in args.file]
    if args.checkpoint and (args.model_dir or args.w):
        raise InputError("give W once: --checkpoint DIR, --model-dir DIR or --W FILE")
    if args.matrix and not args.checkpoint:
        raise InputError(MATRIX_NEEDS_CHECKPOINT)
    if args.cluster and not (args.model_dir or args.w or args.checkpoint):
        raise InputError(
            "checking the centroid against --cluster needs W too: give --W FILE, --model-dir DIR or --checkpoint DIR"
        )
    if args.cluster and len(files) > 1:
        raise InputError(
            "--cluster checks one frame's centroid: give one frame file with it (several files are checked "
            "against W only)"
        )
    W = ids = None
    w_name, ids_name, against = "W", "cluster ids", ""
    ids_path: Path | None = None
    if args.checkpoint:
        W, where = load_checkpoint_w(args.checkpoint, args.w_key, args.matrix or "unembedding")
        w_name, against = f"{where.path}:{where.key}", f"{where.path} ({where.key}): {where.reason}"
        ids_path = Path(args.cluster) if args.cluster else None
    elif args.model_dir or args.w:
        paths = seed_paths(args.model_dir, args.w, args.cluster, out=files[0])
        W, wk = load_w(paths.w, args.w_key)
        w_name, against = f"{paths.w}:{wk}", str(paths.w)
        # A model folder's cluster file belongs to its one default frame, not to several frames.
        ids_path = paths.cluster if len(files) == 1 else None
    if ids_path is not None:
        ids, ck = load_ids(ids_path, args.cluster_key)
        ids_name = f"{ids_path}:{ck}"
    w_hash = hash_tensor(W) if W is not None and len(files) > 1 else None  # once for all the files
    for path in files:
        say(f"Verifying {path}" + (f" against {against}" if against else ""))
        res = verify_frame(path, W, ids, w_name=w_name, ids_name=ids_name, w_content_hash=w_hash)
        for line in res.checks:
            say(f"  ✓ {line}")
    say("✓ Verification passed" + (f" ({len(files)} files)" if len(files) > 1 else ""))
    return 0
