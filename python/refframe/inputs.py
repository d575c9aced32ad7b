"""Finding the inputs on disk: the seed's folder layout, W and cluster-id files, and Hugging Face
checkpoints.

Seed layout: a model folder holds W.safetensors (key W) and 1.4h_cluster_tokens.safetensors (key
cluster_token_ids); --W / --cluster and their keys override. A cluster file holding several 1-D
integer tensors (and no cluster_token_ids) gives one cluster per tensor, named by its key.

Checkpoints: W straight from a Hugging Face style safetensors checkpoint folder, memory-mapped. A
checkpoint is either one `model.safetensors` or shards listed in `model.safetensors.index.json`,
whose "weight_map" says which shard file holds which tensor. W is the model's unembedding (e.g.
`lm_head.weight`), or with `matrix="embedding"` its input embedding (e.g. `model.embed_tokens.weight`);
a model with tied embeddings stores only the embedding, which then stands in for the unembedding
(both are (vocab, hidden), the orientation of W). Which keys those are depends on the model family,
read from config.json or recognised from the key names (families.py). `key=` (CLI: --W-key) picks
any tensor. Only the header of the one shard that holds the tensor is parsed and only that tensor is
mapped: the rest of the model is never read.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import check_ids
from .errors import CheckpointError, InputError, KeyNotFoundError, RefframeWarning
from .families import choose_key
from .layout import CLUSTER_FILENAME, CLUSTER_KEY, DEFAULT_FILENAME, W_FILENAME, W_KEY
from .tensorfile import SafetensorsFile, key_list, short_repr


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


def load_ids(
    path: str | os.PathLike[str], key: str | None = None, option: str = "--cluster-key"
) -> tuple[torch.Tensor, str]:
    """Cluster token ids from a safetensors file, and the key they were read from (`option`: the
    command-line option that names the key, for messages)."""
    f = SafetensorsFile(path)
    k = _pick_key(
        f,
        key,
        CLUSTER_KEY,
        "1-D integer tensor",
        lambda dt, sh: not dt.is_floating_point and dt != torch.bool and len(sh) == 1,
        option,
    )
    return f.tensor(k), k


# -- cluster files --------------------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")


def cluster_name(text: str) -> str:
    """A cluster name usable in a file name: other characters become '_'."""
    name = _SAFE.sub("_", text).strip(".")
    return name or "cluster"


def read_clusters(
    files: list[Path], key: str | None, n: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """{name: checked int64 ids} and {name: 'file:key'} from the cluster files."""
    found: list[tuple[str, torch.Tensor, str]] = []
    for p in files:
        if key is None:
            f = SafetensorsFile(p)
            cands = [
                k
                for k in f.keys()
                if (lambda dt, sh: not dt.is_floating_point and dt != torch.bool and len(sh) == 1)(*f.info(k))
            ]
            if CLUSTER_KEY not in f.entries and len(cands) > 1:
                found += [(k, f.tensor(k), f"{p}:{k}") for k in cands]
                continue
        ids, ck = load_ids(p, key)
        found.append((p.name.removesuffix(".safetensors"), ids, f"{p}:{ck}"))
    clusters: dict[str, torch.Tensor] = {}
    labels: dict[str, str] = {}
    for raw_name, ids, label in found:
        name = cluster_name(raw_name)
        if name in clusters:
            raise InputError(
                f"two clusters are named {name!r} ({labels[name]} and {label}); frames are named after "
                "their cluster, so rename one file or key"
            )
        clusters[name] = check_ids(ids, n, label, warn_duplicates=True).to("cpu")
        labels[name] = label
    return clusters, labels


# -- Hugging Face checkpoints ---------------------------------------------------------------------

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass
class CheckpointMatrix:
    """Where the matrix lives: the (shard) file, the tensor key, and how it was chosen."""

    directory: Path
    path: Path  # the safetensors file holding the tensor
    key: str
    tied: bool  # True when the input embedding stands in for a missing unembedding
    model_name: str
    sharded: bool
    family: str = ""  # the family of families.FAMILIES whose keys were used; "" with an explicit key
    reason: str = ""  # why this key, for the report, e.g. "gpt2 checkpoint (config.json model_type), ..."


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return (p / INDEX_FILE).is_file() or (p / SINGLE_FILE).is_file()


def model_name_of(directory: Path) -> str:
    """The folder's name; for a Hugging Face hub cache snapshot (models--ORG--NAME/snapshots/SHA),
    ORG--NAME."""
    d = directory.resolve() if directory.exists() else directory
    parts = d.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--")
    return d.name


def _read_config(directory: Path) -> dict | None:
    """config.json as a dict, or None when there is none; one that cannot be read is ignored, with a
    warning (the family is then recognised from the key names)."""
    p = directory / CONFIG_FILE
    if not p.is_file():
        return None
    why = "not a JSON object"
    try:
        size = p.stat().st_size
        if size > MAX_INDEX_BYTES:
            why = f"too large for a model config, {size} bytes"
        else:
            data = json.loads(p.read_bytes().decode("utf-8"))
            if isinstance(data, dict):
                return data
    except OSError as exc:
        why = f"cannot be read: {exc.strerror or exc}"
    except (UnicodeDecodeError, ValueError, RecursionError):
        why = "not valid JSON"
    warnings.warn(
        f"{p}: {why}; it is ignored and the model family is recognised from the key names",
        RefframeWarning,
        stacklevel=3,
    )
    return None


def _read_index(directory: Path) -> dict[str, str]:
    p = directory / INDEX_FILE
    try:
        size = p.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{p}: too large for a checkpoint index ({size} bytes)")
        data = json.loads(p.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{p}: not a valid checkpoint index (not JSON)") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(
            f'{p}: not a valid checkpoint index (no "weight_map" of tensor name -> shard file)'
        )
    if not wm:
        raise CheckpointError(f"{p}: the index lists no tensors")
    return wm


def _shard_path(directory: Path, shard: str, key: str) -> Path:
    # A shard name is a plain file name inside the checkpoint folder, never a path to follow.
    if not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
        raise CheckpointError(
            f"{directory / INDEX_FILE}: shard name {short_repr(shard)} for {short_repr(key)} is not a "
            "file name in the checkpoint folder"
        )
    p = directory / shard
    if not p.exists():
        raise CheckpointError(
            f"{p}: missing shard (model.safetensors.index.json puts {short_repr(key)} there); "
            "the checkpoint download is incomplete"
        )
    return p


def locate(
    directory: str | os.PathLike[str], key: str | None = None, matrix: str = "unembedding"
) -> CheckpointMatrix:
    """Find the unembedding matrix (or the embedding, or `key`) in a checkpoint folder, reading only
    headers and config.json."""
    d = Path(directory).expanduser()
    if not d.exists():
        raise InputError(f"{d}: checkpoint folder does not exist")
    if not d.is_dir():
        raise InputError(f"{d}: not a directory (--checkpoint expects a Hugging Face model folder)")
    name = model_name_of(d)
    if (d / INDEX_FILE).exists():
        wm = _read_index(d)
        c = choose_key(list(wm), _read_config(d) if key is None else None, key, matrix, str(d / INDEX_FILE))
        path = _shard_path(d, wm[c.key], c.key)
        f = SafetensorsFile(path)
        if c.key not in f.entries:
            raise KeyNotFoundError(
                f"{path}: key {short_repr(c.key)} not found although {INDEX_FILE} puts it in this shard "
                f"(keys present: {key_list(f.keys())})"
            )
        return CheckpointMatrix(d, path, c.key, c.tied, name, True, c.family, c.reason)
    if (d / SINGLE_FILE).exists():
        path = d / SINGLE_FILE
        f = SafetensorsFile(path)
        c = choose_key(f.keys(), _read_config(d) if key is None else None, key, matrix, str(path))
        return CheckpointMatrix(d, path, c.key, c.tied, name, False, c.family, c.reason)
    others = sorted(p.name for p in d.glob("*.safetensors"))
    torch_bins = sorted(p.name for p in d.glob("*.bin"))
    if others:
        hint = f"found {key_list(others, limit=5)} but no {INDEX_FILE}; pass a file with --W FILE --W-key KEY"
    elif torch_bins:
        hint = (
            f"found only {key_list(torch_bins, limit=5)}: only safetensors checkpoints are read (no pickle)"
        )
    elif (d / "snapshots").is_dir():  # the Hugging Face hub cache's models--ORG--NAME folder
        snaps = sorted(p.name for p in (d / "snapshots").iterdir() if p.is_dir())
        hint = (
            f"this is a hub cache folder; give one of its snapshots, e.g. {d / 'snapshots' / snaps[0]}"
            if snaps
            else "this is a hub cache folder with no snapshot downloaded"
        )
    else:
        hint = "no safetensors files in it"
    raise CheckpointError(f"{d}: not a safetensors checkpoint: no {SINGLE_FILE} or {INDEX_FILE} ({hint})")


def load_checkpoint_w(
    directory: str | os.PathLike[str], key: str | None = None, matrix: str = "unembedding"
) -> tuple[torch.Tensor, CheckpointMatrix]:
    """The matrix as a memory-mapped tensor (nothing else of the model is read), and where it is:
    `key` if given, else the model's unembedding, or its embedding with matrix="embedding"."""
    where = locate(directory, key, matrix)
    W = SafetensorsFile(where.path).tensor(where.key)
    return W, where
