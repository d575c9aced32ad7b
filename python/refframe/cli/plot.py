"""`refframe plot`: a frame's figures as PNG files in --out-dir: spectrum.png always; with W also
radial_profile.png (distances to the centroid) and planes.png (the PC1/PC2 and PC1/PC3 planes), the
cluster marked when its ids are given (--cluster, or a --model-dir folder's cluster file).

Everything is checked before any work: matplotlib, the output folder and files, the frame (verified
as `refframe project` does), W and its hash against the frame's w_hash, the ids. Each figure is
rendered to bytes, then every file is written atomically and named on stdout."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import plot
from ..atomic import atomic_write_bytes, check_output_path
from ..checks import check_ids, check_w
from ..errors import InputError, OutputError
from ..frame import Frame, load_frame
from ..inputs import load_ids
from ..layout import CLUSTER_FILENAME, __version__
from ..progress import Progress
from ..verify import verify_frame
from .common import check_out_dir, check_w_hash, load_w_arg, w_given
from .console import say

SPECTRUM, RADIAL, PLANES = "spectrum.png", "radial_profile.png", "planes.png"


def run(args: argparse.Namespace) -> int:
    plot.require_matplotlib()
    if not 10 <= args.dpi <= 1200:
        raise InputError(f"--dpi must be from 10 to 1200, got {args.dpi}")
    frame_path, out_dir = Path(args.frame), Path(args.out_dir)
    has_w = w_given(args)
    W, w_path, w_name = load_w_arg(args) if has_w else (None, None, "")
    cluster_path = _cluster_path(args)
    names = [SPECTRUM, RADIAL, PLANES] if has_w else [SPECTRUM]
    outputs = [out_dir / name for name in names]
    inputs = [frame_path, w_path, cluster_path]
    check_out_dir(out_dir, create=True)
    if out_dir.is_dir():
        for p in outputs:
            check_output_path(p, inputs)
    verify_frame(frame_path)  # format, checksums, orthonormal axes: a damaged frame stops here
    frame = load_frame(frame_path)
    ids = None
    if W is not None:
        check_w(W, w_name, min_rows=1)
        if W.shape[1] != frame.dim:
            raise InputError(f"{w_name} has d = {W.shape[1]} columns, the frame {frame_path} has d = {frame.dim}")
        if cluster_path is not None:
            raw, key = load_ids(cluster_path, args.cluster_key)
            ids = check_ids(raw, int(W.shape[0]), f"{cluster_path}:{key}").to("cpu")
        check_w_hash(W, w_name, frame, frame_path, args.allow_other_w, action="plot it")
    _announce(args, frame, frame_path, w_name, ids, cluster_path)
    pngs = _render(frame, W, ids, args.dpi)
    _write(args, out_dir, pngs, inputs)
    return 0


def _cluster_path(args: argparse.Namespace) -> Path | None:
    """--cluster, else a --model-dir folder's cluster file when it has one (as `refframe build`)."""
    if args.cluster:
        return Path(args.cluster)
    if args.model_dir and not args.checkpoint:
        default = Path(args.model_dir) / CLUSTER_FILENAME
        if default.is_file():
            return default
    return None


def _announce(
    args: argparse.Namespace, frame: Frame, frame_path: Path, w_name: str, ids: torch.Tensor | None, cluster: Path | None
) -> None:
    say(f"refframe {__version__}: plotting {frame_path} ({frame.metadata.get('model_name') or 'no model name'}, d = {frame.dim:,})")
    if not w_name:
        unused = "; --cluster is not used without W" if args.cluster else ""
        say(
            f"no W given: only the spectrum can be drawn ({RADIAL} and {PLANES} need W: --W FILE, "
            f"--model-dir DIR or --checkpoint DIR){unused}"
        )
    elif ids is None:
        say(f"W: {w_name}; no cluster ids (--cluster FILE): the cluster is not marked")
    else:
        say(f"W: {w_name}; cluster: {ids.numel():,} tokens from {cluster}")


def _render(frame: Frame, W: torch.Tensor | None, ids: torch.Tensor | None, dpi: int) -> dict[str, bytes]:
    """Each figure's PNG bytes, by file name."""
    pngs = {}
    with Progress().stage("drawing the figures"):
        pngs[SPECTRUM] = plot.to_png(plot.spectrum(frame), dpi)
        if W is not None:
            pngs[RADIAL] = plot.to_png(plot.radial_profile(W, frame, ids), dpi)
            if frame.dim >= 2:
                axes = ((1, 2), (1, 3)) if frame.dim >= 3 else ((1, 2),)
                pngs[PLANES] = plot.to_png(plot.planes(W, frame, ids, axes), dpi)
    if W is not None and PLANES not in pngs:
        say(f"d = {frame.dim}: a frame with one axis has no plane to draw, {PLANES} is not written")
    return pngs


def _write(args: argparse.Namespace, out_dir: Path, pngs: dict[str, bytes], inputs: list) -> None:
    """Create the folder if needed, write each file atomically and name it."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: output directory cannot be created ({exc.strerror or exc})") from None
    args.outputs_planned, args.outputs_written = len(pngs), 0
    for name, data in pngs.items():
        path = out_dir / name
        atomic_write_bytes(path, [data], inputs)
        args.outputs_written += 1
        say(f"✓ Wrote {path} ({len(data) / 1024:.0f} KB)")
