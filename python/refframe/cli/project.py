"""`refframe project`: the coordinates of tokens in a frame and their distances to its centroid,
written as a safetensors file (coords (n, k), radius (n,), ids (n,)) with metadata naming the frame
(its checksums) and W (its content hash)."""

from __future__ import annotations

import argparse
import datetime as _dt
import time
import warnings
from pathlib import Path

import torch

from ..atomic import check_output_path
from ..build import resolve_device
from ..checks import check_ids, check_w
from ..errors import InputError, RefframeWarning
from ..frame import METADATA_HASH, TENSOR_HASHES, Frame, load_frame
from ..inputs import load_checkpoint_w, load_ids, load_w, seed_paths
from ..layout import __version__
from ..progress import Progress
from ..projection import project, radii
from ..tensorfile import hash_tensor, save_tensors
from ..verify import verify_frame
from .console import say

FORMAT = "refframe-projection/1"


def run(args: argparse.Namespace) -> int:
    frame_path, out = Path(args.frame), Path(args.out)
    W, w_path, w_name = _load_w(args)
    ids_path = Path(args.ids) if args.ids else None
    check_output_path(out, inputs=[frame_path, w_path, ids_path])
    verify_frame(frame_path)  # format, checksums, orthonormal axes: a damaged frame stops here
    frame = load_frame(frame_path)
    check_w(W, w_name, min_rows=1)
    if W.shape[1] != frame.dim:
        raise InputError(f"{w_name} has d = {W.shape[1]} columns, the frame {frame_path} has d = {frame.dim}")
    k = frame.dim if args.k is None else args.k
    if not 1 <= k <= frame.dim:
        raise InputError(f"--k must be from 1 to d = {frame.dim}, got {k}")
    ids, ids_label = _load_ids(ids_path, args.ids_key, int(W.shape[0]))
    w_hash = _check_w_hash(W, w_name, frame, frame_path, args.allow_other_w)
    say(f"refframe {__version__}: projecting {ids.numel():,} of {W.shape[0]:,} tokens of {w_name} onto {k} axes of {frame_path}")
    dev = resolve_device(args.device, args.backend)
    Wd = W if dev.type == "cpu" else W.to(dev)
    t0 = time.perf_counter()
    with Progress().stage(f"projecting onto {k} axes"):
        sel = None if ids_path is None else ids.to(dev)
        coords = project(Wd, frame, k, sel, backend=args.backend).to("cpu")
        radius = radii(Wd, frame, sel, backend=args.backend).to("cpu")
    t_proj = time.perf_counter() - t0
    meta = _metadata(frame, frame_path, w_name, w_hash, k, ids_label)
    save_tensors(out, {"coords": coords, "radius": radius, "ids": ids}, meta, inputs=[frame_path, w_path, ids_path])
    say(f"✓ {ids.numel():,} tokens x {k} coordinates in {t_proj:.2f} s; radius: min {float(radius.min()) if radius.numel() else 0:.6g}, median {float(radius.median()) if radius.numel() else 0:.6g}")
    say(f"✓ Saved to {out} ({out.stat().st_size / 1024 / 1024:.1f} MB)")
    return 0


def _load_w(args: argparse.Namespace) -> tuple[torch.Tensor, Path, str]:
    """W memory-mapped from --checkpoint, --W or --model-dir, its file and its name for messages."""
    given = [bool(args.checkpoint), bool(args.w), bool(args.model_dir)]
    if sum(given) == 0:
        raise InputError("no W: give --W FILE, --model-dir DIR or --checkpoint DIR")
    if args.checkpoint and (args.w or args.model_dir):
        raise InputError("give W once: --checkpoint DIR, --model-dir DIR or --W FILE")
    if args.checkpoint:
        W, where = load_checkpoint_w(args.checkpoint, args.w_key)
        return W, where.path, f"{where.path}:{where.key}"
    paths = seed_paths(args.model_dir, args.w)
    W, key = load_w(paths.w, args.w_key)
    return W, paths.w, f"{paths.w}:{key}"


def _load_ids(path: Path | None, key: str | None, n: int) -> tuple[torch.Tensor, str]:
    """The token ids to project (all N when no file is given) and where they came from."""
    if path is None:
        return torch.arange(n, dtype=torch.int64), "all"
    raw, k = load_ids(path, key, "--ids-key")
    return check_ids(raw, n, f"{path}:{k}", allow_empty=True).to("cpu"), f"{path}:{k}"


def _check_w_hash(W: torch.Tensor, w_name: str, frame: Frame, frame_path: Path, allow_other: bool) -> str:
    """W's content hash, checked against the one the frame recorded (an error unless allow_other)."""
    w_hash = hash_tensor(W)
    recorded = frame.metadata.get("w_hash", "")
    if not recorded:
        warnings.warn(
            f"{frame_path} records no w_hash (built without hashing W): {w_name} cannot be checked against it",
            RefframeWarning,
            stacklevel=2,
        )
    elif recorded != w_hash:
        msg = f"{w_name} is not the matrix {frame_path} was built from (its content hash differs from the frame's w_hash)"
        if not allow_other:
            raise InputError(f"{msg}; pass --allow-other-w to project it anyway")
        warnings.warn(msg, RefframeWarning, stacklevel=2)
    return w_hash


def _metadata(frame: Frame, frame_path: Path, w_name: str, w_hash: str, k: int, ids_label: str) -> dict[str, str]:
    return {
        "format": FORMAT,
        "frame": str(frame_path),
        "frame_tensor_hashes": frame.metadata.get(TENSOR_HASHES, ""),
        "frame_metadata_hash": frame.metadata.get(METADATA_HASH, ""),
        "frame_w_hash": frame.metadata.get("w_hash", ""),
        "model_name": frame.metadata.get("model_name", ""),
        "w_source": w_name,
        "w_hash": w_hash,
        "k": str(k),
        "ids_source": ids_label,
        "refframe_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
