"""`refframe project`: the coordinates of tokens in a frame and their distances to its centroid,
written as a safetensors file (coords (n, k), radius (n,), ids (n,)) with metadata naming the frame
(its checksums) and W (its content hash)."""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from pathlib import Path

import torch

from ..atomic import check_output_path
from ..build import resolve_device
from ..checks import check_ids, check_w
from ..errors import InputError
from ..frame import METADATA_HASH, TENSOR_HASHES, Frame, load_frame
from ..inputs import load_ids
from ..layout import __version__
from ..progress import Progress
from ..projection import project, radii
from ..tensorfile import save_tensors
from ..verify import verify_frame
from .common import check_w_hash, load_w_arg
from .console import say

FORMAT = "refframe-projection/1"


def run(args: argparse.Namespace) -> int:
    frame_path, out = Path(args.frame), Path(args.out)
    W, w_path, w_name = load_w_arg(args)
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
    w_hash = check_w_hash(W, w_name, frame, frame_path, args.allow_other_w)
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


def _load_ids(path: Path | None, key: str | None, n: int) -> tuple[torch.Tensor, str]:
    """The token ids to project (all N when no file is given) and where they came from."""
    if path is None:
        return torch.arange(n, dtype=torch.int64), "all"
    raw, k = load_ids(path, key, "--ids-key")
    return check_ids(raw, n, f"{path}:{k}", allow_empty=True).to("cpu"), f"{path}:{k}"


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
