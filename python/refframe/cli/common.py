"""What several commands share: W taken from --checkpoint, --W or --model-dir; the check of W against
the w_hash a frame recorded (project, plot); the check of an output folder (build, plot)."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch

from ..errors import InputError, OutputError, RefframeWarning
from ..frame import Frame
from ..inputs import load_checkpoint_w, load_w, seed_paths
from ..tensorfile import hash_tensor
from .parser import MATRIX_NEEDS_CHECKPOINT


def w_given(args: argparse.Namespace) -> bool:
    return bool(args.checkpoint or args.w or args.model_dir)


def load_w_arg(args: argparse.Namespace) -> tuple[torch.Tensor, Path, str]:
    """W memory-mapped from --checkpoint, --W or --model-dir, its file and its name for messages."""
    if not w_given(args):
        raise InputError("no W: give --W FILE, --model-dir DIR or --checkpoint DIR")
    if args.checkpoint and (args.w or args.model_dir):
        raise InputError("give W once: --checkpoint DIR, --model-dir DIR or --W FILE")
    matrix = getattr(args, "matrix", None)
    if matrix and not args.checkpoint:
        raise InputError(MATRIX_NEEDS_CHECKPOINT)
    if args.checkpoint:
        W, where = load_checkpoint_w(args.checkpoint, args.w_key, matrix or "unembedding")
        return W, where.path, f"{where.path}:{where.key}"
    paths = seed_paths(args.model_dir, args.w)
    W, key = load_w(paths.w, args.w_key)
    return W, paths.w, f"{paths.w}:{key}"


def check_w_hash(
    W: torch.Tensor, w_name: str, frame: Frame, frame_path: Path, allow_other: bool, action: str = "project it"
) -> str:
    """W's content hash, checked against the one the frame recorded: an error unless allow_other
    (--allow-other-w), which warns instead; `action` ends the error's advice ("... to project it anyway")."""
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
            raise InputError(f"{msg}; pass --allow-other-w to {action} anyway")
        warnings.warn(msg, RefframeWarning, stacklevel=2)
    return w_hash


def check_out_dir(d: Path, create: bool) -> None:
    """An output folder that exists and is writable, or (create) one that can be made."""
    if d.exists():
        if not d.is_dir():
            raise OutputError(f"{d}: output directory is not a directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise OutputError(f"{d}: output directory is not writable")
        return
    if not create:
        raise OutputError(f"{d}: output directory does not exist")
    parent = d.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{d}: output directory cannot be created ({parent} is not a writable directory)")
