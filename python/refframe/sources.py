"""Locating W and the cluster ids on disk: the seed's directory layout or explicit files and keys."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, KeyNotFoundError
from .io import SafetensorsFile, key_list
from .names import CLUSTER_FILENAME, CLUSTER_KEY, DEFAULT_FILENAME, W_FILENAME, W_KEY


@dataclass
class Paths:
    w: Path
    cluster: Path | None
    out: Path | None
    model_name: str


def seed_paths(
    model_dir: str | os.PathLike[str] | None,
    w: str | os.PathLike[str] | None = None,
    cluster: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
) -> Paths:
    """Resolve the seed layout (DIR/W.safetensors, DIR/1.4h_cluster_tokens.safetensors ->
    DIR/1.6a_cluster_reference_frame.safetensors); explicit files override each part."""
    if model_dir is not None:
        d = Path(model_dir)
        try:
            exists, is_dir = d.exists(), d.is_dir()
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{d}: model directory cannot be read ({getattr(exc, 'strerror', None) or exc})"
            ) from None
        if not exists:
            raise InputError(f"{d}: model directory does not exist")
        if not is_dir:
            raise InputError(f"{d}: not a directory (--model-dir expects the folder holding {W_FILENAME})")
        w = w or d / W_FILENAME
        cluster = cluster or d / CLUSTER_FILENAME
        out = out or d / DEFAULT_FILENAME
        model_name = model_name or d.resolve().name
    if w is None:
        raise InputError("no input: give --model-dir DIR, or --W FILE (and --cluster FILE)")
    w = Path(w)
    return Paths(
        w=w,
        cluster=Path(cluster) if cluster is not None else None,
        out=Path(out) if out is not None else None,
        model_name=model_name or w.resolve().parent.name,
    )


def _pick_key(f: SafetensorsFile, key: str | None, default: str, what: str, fits, option: str) -> str:
    if key is not None:
        f.info(key)  # raises KeyNotFoundError listing the keys present
        return key
    if default in f.entries:
        return default
    candidates = [k for k in f.keys() if fits(*f.info(k))]
    if len(candidates) == 1:
        return candidates[0]
    have = key_list(f.keys())
    if not candidates:
        raise KeyNotFoundError(
            f"{f.path}: key {default!r} not found and no other {what} (keys present: {have})"
        )
    raise KeyNotFoundError(
        f"{f.path}: key {default!r} not found and several candidates for {what}: "
        f"{key_list(candidates)}; choose one with {option}"
    )


def load_w(path: str | os.PathLike[str], key: str | None = None) -> tuple[torch.Tensor, str]:
    """W as a memory-mapped tensor, and the key it was read from."""
    f = SafetensorsFile(path)
    k = _pick_key(
        f,
        key,
        W_KEY,
        "2-D floating-point tensor",
        lambda dt, sh: dt.is_floating_point and len(sh) == 2,
        "--W-key",
    )
    return f.tensor(k), k


def load_ids(path: str | os.PathLike[str], key: str | None = None) -> tuple[torch.Tensor, str]:
    """Cluster token ids from a safetensors file, and the key they were read from."""
    f = SafetensorsFile(path)
    k = _pick_key(
        f,
        key,
        CLUSTER_KEY,
        "1-D integer tensor",
        lambda dt, sh: not dt.is_floating_point and dt != torch.bool and len(sh) == 1,
        "--cluster-key",
    )
    return f.tensor(k), k
