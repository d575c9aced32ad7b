"""A reference frame and its file: the centroid and W's PCA basis, saved in the seed's format.

The file holds exactly the seed notebook's three fp32 tensors (cluster_centroid, W_eigenvalues,
W_eigenvectors) and string metadata: provenance, the sign convention, a checksum of each tensor
(tensor_hashes) and one of the other metadata entries (metadata_hash), which verify checks.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from .atomic import atomic_write_files
from .layout import __version__
from .tensorfile import SafetensorsFile, hash_tensor, safetensors_chunks


@dataclass
class VarianceReport:
    """How the variance of W spreads over its principal components."""

    total: float
    top: list[tuple[float, float]]  # (eigenvalue, % of total variance) of the leading PCs
    cumulative: dict[int, float]  # number of PCs -> % of total variance they hold

    def lines(self) -> list[str]:
        out = [f"Top {len(self.top)} eigenvalues:"]
        out += [f"  PC{i + 1}: {v:.6f} ({p:.2f}% variance)" for i, (v, p) in enumerate(self.top)]
        out.append("Cumulative variance:")
        out += [f"  First {k} PCs: {p:.2f}%" for k, p in self.cumulative.items()]
        return out


@dataclass
class Frame:
    """A reference frame: the cluster centroid and the PCA basis of W (all fp32, on the CPU).

    eigenvalues are in descending order; column i of eigenvectors is PC i, with its sign fixed so
    that its largest-magnitude component is positive.
    """

    centroid: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    mean: torch.Tensor | None  # column mean of W (not stored in the file)
    n_tokens: int
    cluster_size: int
    backend: str = "torch"
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.eigenvalues.shape[0])

    def variance_report(self, top: int = 10, cumulative: tuple[int, ...] = (10, 100)) -> VarianceReport:
        ev = self.eigenvalues.to(torch.float64)
        total = float(ev.sum())
        pct = (ev / total * 100.0) if total > 0 else torch.zeros_like(ev)
        cum = torch.cumsum(pct, 0)
        return VarianceReport(
            total=total,
            top=[(float(ev[i]), float(pct[i])) for i in range(min(top, self.dim))],
            # only counts below d: "the first 100 PCs hold 100%" says nothing when d <= 100
            cumulative={k: float(cum[k - 1]) for k in cumulative if 0 < k < self.dim},
        )


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude component (first one on ties) is positive."""
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, idx.unsqueeze(0)))
    signs[signs == 0] = 1
    return vectors * signs


KEY_CENTROID = "cluster_centroid"
KEY_EIGENVALUES = "W_eigenvalues"
KEY_EIGENVECTORS = "W_eigenvectors"
FRAME_KEYS = (KEY_CENTROID, KEY_EIGENVALUES, KEY_EIGENVECTORS)
FORMAT = "refframe-frame/1"
SIGN_CONVENTION = "largest-magnitude component of each eigenvector is positive"
TENSOR_HASHES = "tensor_hashes"
METADATA_HASH = "metadata_hash"


def frame_metadata(
    frame: Frame, *, model_name: str = "", source_dtype: str = "", w_hash: str = ""
) -> dict[str, str]:
    """The string metadata written beside the tensors."""
    meta = {
        "format": FORMAT,
        "model_name": model_name,
        "n_tokens": str(frame.n_tokens),
        "d": str(frame.dim),
        "cluster_size": str(frame.cluster_size),
        "source_dtype": source_dtype,
        "w_hash": w_hash,
        "backend": frame.backend,
        "device": frame.device,
        "eigenvector_signs": SIGN_CONVENTION,
        "refframe_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(frame.metadata)
    # Values given here win over those a loaded frame carries from its file.
    given = {"model_name": model_name, "source_dtype": source_dtype, "w_hash": w_hash}
    meta.update({k: v for k, v in given.items() if v})
    return meta


def frame_tensors(frame: Frame) -> dict[str, torch.Tensor]:
    """The three tensors of the file, float32 on the CPU."""
    return {
        KEY_CENTROID: frame.centroid.detach().to("cpu", torch.float32).contiguous(),
        KEY_EIGENVALUES: frame.eigenvalues.detach().to("cpu", torch.float32).contiguous(),
        KEY_EIGENVECTORS: frame.eigenvectors.detach().to("cpu", torch.float32).contiguous(),
    }


def parse_tensor_hashes(value: str) -> dict[str, str] | None:
    """{key: hash} from a `tensor_hashes` metadata value, or None if it is malformed (plain data:
    nothing in it is followed or evaluated)."""
    out: dict[str, str] = {}
    for part in value.split(","):
        key, sep, digest = part.partition("=")
        if not sep or not key or not digest.startswith("xxh3_128:"):
            return None
        out[key] = digest
    return out


def hash_metadata(meta: dict[str, str]) -> str:
    """Checksum (xxh3-128) of every metadata entry but `metadata_hash` itself, in key order."""
    h = xxhash.xxh3_128()
    for k in sorted(meta):
        if k != METADATA_HASH:
            h.update(json.dumps([k, meta[k]], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
    return "xxh3_128:" + h.hexdigest()


def frame_file_chunks(
    frame: Frame,
    *,
    model_name: str = "",
    source_dtype: str = "",
    w_hash: str = "",
    checksums: dict[str, str] | None = None,
) -> list:
    """The bytes of the frame's file, as io.safetensors_chunks gives them (views, not copies).

    The metadata records a checksum of each tensor (`tensor_hashes`) and one of the other metadata
    entries (`metadata_hash`) that verify_frame checks;
    `checksums` may hold some of them already computed (frames sharing one PCA share those)."""
    tensors = frame_tensors(frame)
    known = checksums or {}
    meta = frame_metadata(frame, model_name=model_name, source_dtype=source_dtype, w_hash=w_hash)
    meta[TENSOR_HASHES] = ",".join(f"{k}={known.get(k) or hash_tensor(tensors[k])}" for k in FRAME_KEYS)
    meta[METADATA_HASH] = hash_metadata(meta)
    return safetensors_chunks(tensors, meta)


def save_frame(
    frame: Frame,
    path: str | os.PathLike[str],
    *,
    model_name: str = "",
    source_dtype: str = "",
    w_hash: str = "",
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    checksums: dict[str, str] | None = None,
    durable: bool = True,
) -> Path:
    """Write the frame atomically: the previous file at `path` survives any failure intact.

    `inputs`: files the frame was built from; writing over one of them is refused (OutputError).
    `checksums`: see frame_file_chunks. durable=False skips the fsync (atomic.atomic_write_files).
    """
    chunks = frame_file_chunks(
        frame, model_name=model_name, source_dtype=source_dtype, w_hash=w_hash, checksums=checksums
    )
    atomic_write_files([(path, chunks)], inputs, durable=durable)
    return Path(path).expanduser()


def load_frame(path: str | os.PathLike[str]) -> Frame:
    """Read a frame file (tensors copied out of the file, metadata kept in `frame.metadata`)."""
    f = SafetensorsFile(path)
    centroid = f.tensor(KEY_CENTROID).clone()
    evals = f.tensor(KEY_EIGENVALUES).clone()
    evecs = f.tensor(KEY_EIGENVECTORS).clone()
    meta = dict(f.metadata)

    def _int(key: str, default: int) -> int:
        try:
            return int(meta.get(key, default))
        except ValueError:
            return default

    return Frame(
        centroid=centroid,
        eigenvalues=evals,
        eigenvectors=evecs,
        mean=None,
        n_tokens=_int("n_tokens", 0),
        cluster_size=_int("cluster_size", 0),
        backend=meta.get("backend", ""),
        device=meta.get("device", ""),
        metadata=meta,
    )
