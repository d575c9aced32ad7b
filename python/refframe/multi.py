"""Many frames from one PCA: K clusters of one W in one pass, with the PCA cache.

    frames = refframe.build_frames(W, {"animals": ids_a, "colours": ids_b})   # dict name -> Frame
    frame = refframe.build_frame_cached(W, ids)                                 # one cluster

The PCA (mean, eigenpairs) is computed once per W, or read from the cache (refframe.cache) when W's
content was seen before; the K centroids come from ONE call of the segment-mean op over the
concatenated ids with CSR offsets (native: fp64 accumulation, one pass over the rows touched).
With backend="torch" the same call runs reference.segment_mean, the pure-torch equivalent.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import io as _io
from . import ops
from .cache import PCACache, cache_disabled_by_env, numerics_tag
from .errors import ClusterIdsError, RefframeError, RefframeWarning
from .frame import Frame, _compute_error, check_ids, check_memory, check_w, pca, plan
from .framefile import KEY_EIGENVALUES, KEY_EIGENVECTORS, frame_file_chunks, frame_tensors
from .io import atomic_write_files, hash_tensor
from .names import DEFAULT_FILENAME
from .progress import QUIET, Progress

ClusterArg = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def cluster_offsets(ids_list: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(concatenated int64 ids, CSR offsets (K + 1,)) of K id tensors."""
    sizes = torch.tensor([0] + [int(t.numel()) for t in ids_list], dtype=torch.int64)
    ids = torch.cat([t.reshape(-1).to("cpu", torch.int64) for t in ids_list])
    return ids, torch.cumsum(sizes, 0)


def segment_centroids(
    W: torch.Tensor, ids_list: Sequence[torch.Tensor], *, backend: str = "auto"
) -> torch.Tensor:
    """Centroids of K clusters of rows of W as fp32 (K, d), from one segment-mean call."""
    ids, offsets = cluster_offsets(ids_list)
    return ops.segment_mean(W, ids, offsets, backend=backend)


@dataclass
class BuildResult:
    """Frames by cluster name, the W hash, and how the PCA was obtained."""

    frames: dict[str, Frame]
    w_hash: str
    cache: str  # "hit", "miss" or "off"
    hash_how: str  # "stat" (index, W not read), "hashed", or "given"
    timings: dict[str, float] = field(default_factory=dict)
    cache_entry: Path | None = None
    pca_backend: str = ""
    pca_device: str = ""


SOURCE_CHUNK_BYTES = 64 << 20


def source_mismatch(W: torch.Tensor, source: tuple[str | os.PathLike[str], str]) -> str | None:
    """Why W is not the tensor `key` of the safetensors file `path` (None when it is).

    source is only a hint that lets an unchanged file skip hashing, so it must never change a result:
    the file's tensor must have W's dtype and shape and the same bytes, compared in row chunks of
    SOURCE_CHUNK_BYTES (one read of the file): a W that is not the file's tensor would otherwise get
    the file's cached PCA, or have its hash recorded for the file."""
    path, key = source
    try:
        f = _io.SafetensorsFile(path)
        dtype, shape = f.info(key)
        if dtype != W.dtype or shape != tuple(W.shape):
            return f"the file's tensor is {dtype} {list(shape)}, W is {W.dtype} {list(W.shape)}"
        T = f.tensor(key)
        step = max(1, SOURCE_CHUNK_BYTES // max(1, W.shape[1] * W.element_size()))
        for r0 in range(0, W.shape[0], step):
            a, b = T[r0 : r0 + step].contiguous(), W[r0 : r0 + step].to("cpu").contiguous()
            if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                return f"rows {r0}-{min(W.shape[0], r0 + step) - 1} differ"
    except (RefframeError, OSError) as exc:  # unreadable: the hint is unusable, not an error
        return f"cannot read it: {exc}"
    return None


def _named(clusters: ClusterArg) -> dict[str, torch.Tensor]:
    if isinstance(clusters, Mapping):
        return {str(k): v for k, v in clusters.items()}
    if isinstance(clusters, torch.Tensor):
        return {"0": clusters}
    return {str(i): v for i, v in enumerate(clusters)}


def build_frames(
    W: torch.Tensor,
    clusters: ClusterArg,
    *,
    backend: str = "auto",
    device: str | torch.device = "auto",
    eigh_dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool | None = None,
    source: tuple[str | os.PathLike[str], str] | None = None,
    w_hash: str | None = None,
    name: str = "W",
    force: bool = False,
) -> dict[str, Frame]:
    """One frame per cluster from a single PCA of W; the PCA comes from the cache when possible.

    clusters: {name: ids} (or a list of id tensors, named "0", "1", ...). cache_dir: the cache
    directory (default: refframe.cache.default_cache_dir()); use_cache=False neither reads nor
    writes it (None: on unless the environment sets REFFRAME_NO_CACHE=1). source=(file, key): the safetensors file and key W is memory-mapped from, so an
    unchanged file is recognised by its stat without hashing W. w_hash: W's content hash if known.
    Each frame's metadata holds "w_hash" and "pca_cache" (hit/miss/off); frame.timings the stages.
    """
    check_w(W, name)
    named = {k: check_ids(v, W.shape[0], f"cluster {k!r}") for k, v in _named(clusters).items()}
    if not named:
        raise ClusterIdsError("clusters: no cluster given (pass {name: ids} with at least one entry)")
    caching = use_cache if use_cache is not None else not cache_disabled_by_env()
    if source is not None and caching and w_hash is None:
        why = source_mismatch(W, source)
        if why is not None:
            warnings.warn(
                f"source {os.fspath(source[0])}:{source[1]} is not this W ({why}); W is hashed instead",
                RefframeWarning,
                stacklevel=2,
            )
            source = None
    return build_validated(
        W,
        named,
        backend=backend,
        device=device,
        eigh_dtype=eigh_dtype,
        cache=PCACache(cache_dir) if caching else None,
        source=source,
        w_hash=w_hash,
        name=name,
        force=force,
    ).frames


def build_frame_cached(W: torch.Tensor, ids: torch.Tensor, **kwargs) -> Frame:
    """build_frame with the PCA cache (same keyword arguments as build_frames)."""
    return build_frames(W, {"cluster": ids}, **kwargs)["cluster"]


def build_validated(
    W: torch.Tensor,
    clusters: dict[str, torch.Tensor],
    *,
    backend: str = "auto",
    device: str | torch.device = "auto",
    eigh_dtype: torch.dtype = torch.float32,
    cache: PCACache | None = None,
    source: tuple[str | os.PathLike[str], str] | None = None,
    w_hash: str | None = None,
    name: str = "W",
    force: bool = False,
    progress: Progress = QUIET,
    log: Callable[[str], None] | None = None,
    hash_fn: Callable[..., str] | None = None,
) -> BuildResult:
    """build_frames on a checked W and checked int64 ids (the CLI validates and reports first).

    hash_fn: the content hash function (default io.hash_tensor, looked up at call time)."""
    say = log or (lambda _s: None)
    timings: dict[str, float] = {}
    used, dev = plan(W, backend, device, name)
    tag = numerics_tag(eigh_dtype)
    max_cluster = max(int(v.numel()) for v in clusters.values())
    # A build that will compute the PCA is refused before any work if it cannot fit in memory; a
    # W whose unchanged file already leads to a cache entry needs no such memory.
    known = (
        cache.lookup_stat(*source) if cache is not None and source is not None and w_hash is None else None
    )
    memory_checked = not (known is not None and cache.entry_path(known, tag).exists())
    if memory_checked:
        check_memory(W, used, dev, name=name, cluster_size=max_cluster, eigh_dtype=eigh_dtype, force=force)

    t0 = time.perf_counter()
    nbytes = W.numel() * W.element_size()
    if w_hash is not None:
        how = "given"
    elif known is not None and cache is not None and source is not None:  # no progress line needed
        hr = cache.content_hash(W, *source, hash_fn=hash_fn)
        w_hash, how = hr.w_hash, hr.how
    else:
        with progress.stage(f"hashing W ({nbytes / 1e9:.2f} GB)") as st:
            if cache is not None:
                hr = cache.content_hash(W, *(source or (None, "")), progress=st.update, hash_fn=hash_fn)
                w_hash, how = hr.w_hash, hr.how
            else:
                w_hash, how = (hash_fn or _io.hash_tensor)(W, progress=st.update), "hashed"
    timings["stat" if how == "stat" else "hash"] = time.perf_counter() - t0
    if how == "hashed":
        dt = timings["hash"]
        size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
        say(f"W hashed: {size} in {dt:.3f} s ({nbytes / 1e9 / max(dt, 1e-9):.1f} GB/s)")
    elif how == "stat":
        say("W hash from the cache index (file unchanged, not re-read)")

    entry = None
    if cache is not None:
        t0 = time.perf_counter()
        entry = cache.load(w_hash, tag, d=int(W.shape[1]))
        if entry is not None:
            timings["cache_read"] = time.perf_counter() - t0
    if entry is not None:
        mean, evals, evecs = entry.mean, entry.eigenvalues, entry.eigenvectors
        pca_backend, pca_device, status, entry_path = entry.backend, entry.device, "hit", entry.path
        say(
            f"✓ PCA read from the cache (computed by backend {pca_backend}, device {pca_device}): {entry_path}"
        )
    else:
        status = "miss" if cache is not None else "off"
        say("Computing PCA...")

        def label() -> str:
            return "eigendecomposition" if "covariance" in timings else "covariance"

        def poll() -> tuple[int, int] | None:  # rows done by the native CPU kernel
            return None if "covariance" in timings else ops.covariance_progress()

        with progress.stage(label, poll):
            mean, evals, evecs, used_b, used_dev = pca(
                W,
                backend=backend,
                device=device,
                eigh_dtype=eigh_dtype,
                timings=timings,
                name=name,
                force=force or memory_checked,  # checked above, unless a damaged entry misled
                cluster_size=max_cluster,
            )
        pca_backend, pca_device, entry_path = used_b, str(used_dev), None
        say(f"✓ PCA computed (backend {pca_backend}, device {pca_device})")
        if cache is not None:
            t0 = time.perf_counter()
            entry_path = cache.store(
                w_hash,
                tag,
                mean,
                evals,
                evecs,
                backend=pca_backend,
                device=pca_device,
                info={"n_tokens": str(W.shape[0]), "d": str(W.shape[1]), "source": name},
            )
            timings["cache_write"] = time.perf_counter() - t0
            if entry_path is not None:
                say(f"  cached as {entry_path}")

    t0 = time.perf_counter()
    centroid_backend = "native" if used == "native" and ops.native_supports(W.device) else "torch"
    names = list(clusters)
    try:
        C = segment_centroids(W, [clusters[k] for k in names], backend=centroid_backend).to("cpu")
    except (RuntimeError, MemoryError) as exc:
        raise _compute_error(exc, name, "computing the centroids") from exc
    timings["centroids"] = time.perf_counter() - t0

    frames = {
        k: Frame(
            centroid=C[i].clone(),
            eigenvalues=evals,
            eigenvectors=evecs,
            mean=mean,
            n_tokens=int(W.shape[0]),
            cluster_size=int(clusters[k].numel()),
            backend=pca_backend,
            device=pca_device,
            timings=timings,
            metadata={"w_hash": w_hash, "pca_cache": status},
        )
        for i, k in enumerate(names)
    }
    return BuildResult(frames, w_hash, status, how, timings, entry_path, pca_backend, pca_device)


def frame_path(out_dir: str | os.PathLike[str], cluster_name: str | None) -> Path:
    """Where a frame goes: the seed's name for a lone cluster (cluster_name None), else
    OUT_DIR/1.6a_cluster_reference_frame.<cluster_name>.safetensors."""
    if cluster_name is None:
        return Path(out_dir) / DEFAULT_FILENAME
    stem = DEFAULT_FILENAME.removesuffix(".safetensors")
    return Path(out_dir) / f"{stem}.{cluster_name}.safetensors"


def save_frames(
    items: Sequence[tuple[Frame, str | os.PathLike[str]]],
    *,
    model_name: str = "",
    source_dtype: str = "",
    w_hash: str = "",
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    durable: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write frames that share one PCA, all or none (io.atomic_write_files): if any file cannot be
    written, none of the paths changes. The checksums of the shared eigenpairs are computed once.
    durable=False skips the fsyncs; `progress(done, total)` follows the files as they complete."""
    if not items:
        return []
    tensors = frame_tensors(items[0][0])
    shared = {k: hash_tensor(tensors[k]) for k in (KEY_EIGENVALUES, KEY_EIGENVECTORS)}
    files = [
        (
            path,
            frame_file_chunks(
                frame, model_name=model_name, source_dtype=source_dtype, w_hash=w_hash, checksums=shared
            ),
        )
        for frame, path in items
    ]
    atomic_write_files(files, inputs, durable=durable, progress=progress)
    return [Path(path) for _, path in items]
