"""The one build pipeline: validated inputs -> PCA (from the cache or computed) -> centroids -> frames.

    frame = refframe.build_frame(W, ids)                                        # one cluster, no cache
    frames = refframe.build_frames(W, {"animals": ids_a, "colours": ids_b})   # dict name -> Frame
    frame = refframe.build_frame_cached(W, ids)                                 # one cluster, cached PCA

Every entry point (these three, `refframe build` and the benchmarks) validates its inputs once
(checks.py) and calls `build`: the backend and device are resolved, a build that cannot fit in
memory is refused before any work, W is identified by its content hash (when a cache or the frame's
metadata needs it), the PCA (mean, eigenpairs) is read from the cache or computed once, and the K
centroids come from ONE segment_mean call over the concatenated ids (native: fp64 accumulation, one
pass over the rows touched; torch: reference.segment_mean).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _native, errors, ops, tensorfile
from .atomic import atomic_write_files
from .cache import PCACache, cache_disabled_by_env, numerics_tag
from .checks import check_ids, check_w, nonfinite_error
from .errors import (
    BackendError,
    ClusterIdsError,
    NumericalError,
    RefframeError,
    RefframeWarning,
    ResourceError,
)
from .frame import KEY_EIGENVALUES, KEY_EIGENVECTORS, Frame, fix_signs, frame_file_chunks, frame_tensors
from .interrupt import run_interruptible
from .layout import BACKENDS, DEFAULT_FILENAME
from .progress import QUIET, Progress
from .resources import check_memory

ClusterArg = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


@dataclass(frozen=True)
class Options:
    """How the PCA is computed: backend ("auto", "native", "torch"), device ("auto": CUDA, else MPS,
    else CPU), eigh precision, and force (skip the up-front memory check)."""

    backend: str = "auto"
    device: str | torch.device = "auto"
    eigh_dtype: torch.dtype = torch.float32
    force: bool = False


@dataclass
class BuildResult:
    """Frames by cluster name, the W hash, and how the PCA was obtained."""

    frames: dict[str, Frame]
    w_hash: str
    cache: str  # "hit", "miss" or "off"
    hash_how: str  # "stat" (index, W not read), "hashed", "given", or "" (W not hashed)
    timings: dict[str, float] = field(default_factory=dict)
    cache_entry: Path | None = None
    pca_backend: str = ""
    pca_device: str = ""
    pca_path: str = ""  # the covariance's path and why (ops.covariance_path), when computed here


# -- backend and device ----------------------------------------------------------------------------


def resolve_device(device: str | torch.device, backend: str) -> torch.device:
    """ "auto" follows the seed: CUDA if available, else MPS, else CPU (CPU when native is forced and
    the build has no native kernels for the accelerator)."""
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise BackendError(f"unknown device {device!r}; use auto, cpu, cuda or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("device 'cuda' requested but torch sees no CUDA device")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise BackendError("device 'mps' requested but MPS is not available")
        return dev
    if torch.cuda.is_available():
        dev = torch.device("cuda")
    elif torch.backends.mps.is_available():
        dev = torch.device("mps")
    else:
        dev = torch.device("cpu")
    if backend == "native" and not _native.native_supports(dev):
        dev = torch.device("cpu")
    return dev


def plan(
    W: torch.Tensor, backend: str, device: str | torch.device, name: str = "W"
) -> tuple[str, torch.device]:
    """The backend and device a build of W will use ("auto" resolved), or a BackendError."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dev = resolve_device(device, backend)
    used = ops.resolve_backend(backend, dev)
    if used == "native" and W.dtype not in ops.NATIVE_DTYPES:
        if backend == "native":
            raise BackendError(
                f"{name}: backend 'native' reads bfloat16, float16 or float32, not "
                f"{str(W.dtype).removeprefix('torch.')}; use backend 'torch' (--backend torch)"
            )
        used = "torch"
    return used, dev


# -- the PCA ---------------------------------------------------------------------------------------

# Covariances up to this size (3/4 of it in float64, which LAPACK takes about twice as long over)
# are decomposed on the calling thread (a few seconds at most on a 2-core machine); larger ones in a
# worker thread, so that Ctrl-C need not wait for LAPACK.
EIGH_ON_CALLER_MAX_D = 4096


def pca(
    W: torch.Tensor,
    *,
    backend: str = "auto",
    device: str | torch.device = "auto",
    eigh_dtype: torch.dtype = torch.float32,
    timings: dict[str, float] | None = None,
    name: str = "W",
    force: bool = False,
    cluster_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, torch.device]:
    """Mean, descending eigenvalues and sign-fixed eigenvectors of W's covariance (fp32, CPU).

    Returns (mean, eigenvalues, eigenvectors, backend used, device used); the backend is the
    covariance's (ops.covariance_backend: "auto" on a CPU with only the portable kernel set takes
    the chunked torch path). Refuses up front a W that
    would not fit in memory (ResourceError; force=True skips the check); NaN or Inf in W raise
    NonFiniteError with their count and first row (found by a chunked scan, only once the mean or
    covariance came out non-finite).
    """
    check_w(W, name)
    _, dev = plan(W, backend, device, name)
    used = ops.covariance_backend(W, backend, dev)[0]
    check_memory(W, used, dev, name=name, cluster_size=cluster_size, eigh_dtype=eigh_dtype, force=force)
    timings = {} if timings is None else timings
    stage = ["copying W to the device"]
    try:
        mean, cov = _covariance(W, used, dev, timings, name, stage)
        stage[0] = "computing the eigendecomposition"
        t0 = _now(dev)
        evals, evecs = _eigh(cov, dev, eigh_dtype)
        timings["eigh"] = _now(dev) - t0
    except RefframeError:
        raise
    except (RuntimeError, MemoryError) as exc:
        raise _compute_error(exc, name, stage[0]) from exc
    return mean.to("cpu"), evals, evecs, used, dev


def _covariance(
    W: torch.Tensor, backend: str, dev: torch.device, timings: dict[str, float], name: str, stage: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """W's mean and covariance on `dev` (W copied there first if needed); non-finite results raise."""
    t0 = _now(dev)
    Wd = W if W.device == dev else W.to(dev)
    t1 = _now(dev)
    if Wd is not W:
        timings["to_device"] = t1 - t0
    stage[0] = f"computing the covariance ({backend} backend)"
    mean, cov = run_interruptible(dev, ops.covariance, Wd, backend=backend, cancellable=True)
    timings["covariance"] = _now(dev) - t1
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(cov).all())):
        del Wd, mean, cov
        raise nonfinite_error(W, name)
    return mean, cov


def _eigh(cov: torch.Tensor, dev: torch.device, eigh_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues in descending order and sign-fixed eigenvectors, fp32 on the CPU (eigh runs on
    CUDA where the covariance is, else on the CPU, as the seed does on MPS)."""
    eig_dev = dev if dev.type == "cuda" else torch.device("cpu")
    C = cov.to(eig_dev, eigh_dtype)
    limit = EIGH_ON_CALLER_MAX_D if C.dtype != torch.float64 else EIGH_ON_CALLER_MAX_D * 3 // 4
    if C.shape[0] <= limit:
        # Short enough to wait for on Ctrl-C. On the calling thread LAPACK's eigh runs about
        # 1.5x faster than in a worker: a second thread's OpenMP team makes libgomp throttle
        # its spin-waits, and eigh is thousands of short parallel regions.
        evals, evecs = torch.linalg.eigh(C)
    else:
        evals, evecs = run_interruptible(eig_dev, torch.linalg.eigh, C)
    del C
    evals = torch.flip(evals, dims=[0]).to("cpu", torch.float32)
    evecs = fix_signs(torch.flip(evecs, dims=[1]).to("cpu", torch.float32))
    return evals, evecs.contiguous()


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _compute_error(exc: BaseException, name: str, stage: str) -> RefframeError:
    if _is_oom(exc):
        return ResourceError(
            f"{name}: out of memory while {stage}; free memory or use --backend native / --device cpu"
        )
    if isinstance(exc, torch.linalg.LinAlgError):
        return NumericalError(f"{name}: the eigendecomposition failed ({_first_line(exc)})")
    return BackendError(f"{name}: failed while {stage}: {_first_line(exc)}")


# -- the pipeline ----------------------------------------------------------------------------------


def build(
    W: torch.Tensor,
    clusters: dict[str, torch.Tensor],
    options: Options = Options(),
    *,
    name: str = "W",
    cache: PCACache | None = None,
    source: tuple[str | os.PathLike[str], str] | None = None,
    w_hash: str | None = None,
    hash_w: bool = True,
    progress: Progress = QUIET,
    log: Callable[[str], None] | None = None,
) -> BuildResult:
    """Frames of checked int64 cluster ids of a checked W (checks.check_w / check_ids), sharing one PCA.

    cache: where the PCA is looked up and stored (None: computed, not stored). source=(file, key):
    the safetensors file W is memory-mapped from, so an unchanged file is known by its stat without
    hashing W. w_hash: W's content hash if known. hash_w=False (and no cache): W is not hashed and
    the frames' metadata records neither w_hash nor pca_cache. log: one line per step (the CLI's
    report); progress: the display of the long stages.
    """
    say = log or (lambda _s: None)
    timings: dict[str, float] = {}
    used, dev = plan(W, options.backend, options.device, name)
    max_cluster = max(int(v.numel()) for v in clusters.values())
    tag = numerics_tag(options.eigh_dtype)
    # A build that will compute the PCA is refused before any work if it cannot fit in memory; a
    # W whose unchanged file already leads to a cache entry needs no such memory.
    known = cache.lookup_stat(*source) if cache is not None and source is not None and w_hash is None else None
    memory_checked = not (known is not None and cache is not None and cache.entry_path(known, tag).exists())
    if memory_checked:
        cov_used = ops.covariance_backend(W, options.backend, dev)[0]
        check_memory(
            W, cov_used, dev, name=name, cluster_size=max_cluster, eigh_dtype=options.eigh_dtype, force=options.force
        )
    if w_hash is not None:
        how = "given"
    elif cache is not None or hash_w:
        w_hash, how = _content_hash(W, cache, source, known is not None, progress, timings, say)
    else:
        w_hash, how = "", ""
    pca_result = _cached_pca(W, w_hash, tag, cache, timings, say) if cache is not None else None
    if pca_result is None:
        pca_result = _computed_pca(W, options, w_hash, tag, cache, name, memory_checked, max_cluster, progress, timings, say)
    mean, evals, evecs, pca_backend, pca_device, entry_path = pca_result
    status = "off" if cache is None else ("hit" if "cache_read" in timings else "miss")
    centroids = _centroids(W, clusters, used, name, timings)
    metadata = {"w_hash": w_hash, "pca_cache": status} if how else {}
    pca = (mean, evals, evecs, pca_backend, pca_device)
    frames = _frames(clusters, centroids, pca, int(W.shape[0]), timings, metadata)
    path = ops.covariance_path(W, options.backend, dev) if "covariance" in timings else ""
    return BuildResult(frames, w_hash, status, how, timings, entry_path, pca_backend, pca_device, path)


def _frames(
    clusters: dict[str, torch.Tensor],
    centroids: torch.Tensor,
    pca: tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, str],
    n_tokens: int,
    timings: dict[str, float],
    metadata: dict[str, str],
) -> dict[str, Frame]:
    """One Frame per cluster around the shared PCA (mean, eigenvalues, eigenvectors, backend, device)."""
    mean, evals, evecs, backend, device = pca
    return {
        k: Frame(
            centroid=centroids[i].clone(),
            eigenvalues=evals,
            eigenvectors=evecs,
            mean=mean,
            n_tokens=n_tokens,
            cluster_size=int(ids.numel()),
            backend=backend,
            device=device,
            timings=timings,
            metadata=dict(metadata),
        )
        for i, (k, ids) in enumerate(clusters.items())
    }
def build_sharded(
    shard: Any,
    clusters: dict[str, torch.Tensor],
    options: Options = Options(),
    *,
    name: str = "W",
    w_hash: str = "",
    release: Callable[[], None] | None = None,
    progress: Progress = QUIET,
    log: Callable[[str], None] | None = None,
) -> BuildResult:
    """Frames of a W split between the ranks of a group (distributed.Shard; cluster ids checked
    against the whole's rows), the same on every rank: the centroids and the covariance from the
    ranks' partial sums, then the eigh on rank 0, broadcast. No PCA cache; w_hash (the whole file's,
    when the caller hashed it) goes into the frames' metadata. release(): called once W's rows are
    summed, before the exchange of the sums and the eigh (the CLI lets the file's pages go)."""
    from . import distributed

    say = log or (lambda _s: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ids, offsets = cluster_offsets(list(clusters.values()))
    centroids = distributed.segment_mean(shard, ids, offsets)
    timings["centroids"] = time.perf_counter() - t0
    say(f"Computing PCA over {shard.size} ranks ({shard.backend} partial sums, this rank's {shard.W.shape[0]:,} rows)...")

    def poll() -> tuple[int, int] | None:  # this rank's rows done by the native CPU kernel
        return None if "covariance" in timings else _native.covariance_progress()

    with progress.stage(lambda: "eigendecomposition" if "covariance" in timings else "covariance", poll):
        mean64, cov = _sharded_covariance(shard, name, timings, release)
        evals, evecs = _sharded_eigh(shard, cov, options.eigh_dtype, timings)
    say(f"✓ PCA computed (backend {shard.backend}, {shard.size} ranks)")
    metadata = {"w_hash": w_hash, "pca_cache": "off"} if w_hash else {}
    pca = (mean64.to(torch.float32), evals, evecs, shard.backend, "cpu")
    frames = _frames(clusters, centroids, pca, shard.total, timings, metadata)
    path = f"{shard.backend} partial sums of {shard.size} ranks" + (" (chunked)" if shard.backend == "torch" else "")
    return BuildResult(frames, w_hash, "off", "given" if w_hash else "", timings, None, shard.backend, "cpu", path)


def _content_hash(
    W: torch.Tensor,
    cache: PCACache | None,
    source: tuple[str | os.PathLike[str], str] | None,
    known: bool,
    progress: Progress,
    timings: dict[str, float],
    say: Callable[[str], None],
) -> tuple[str, str]:
    """(W's content hash, how it was found: "stat" or "hashed"), from the cache's index when W's
    file is unchanged (no progress line needed), else by hashing W's bytes."""
    t0 = time.perf_counter()
    nbytes = W.numel() * W.element_size()
    if known and cache is not None and source is not None:
        hr = cache.content_hash(W, *source)
        w_hash, how = hr.w_hash, hr.how
    else:
        with progress.stage(f"hashing W ({nbytes / 1e9:.2f} GB)") as st:
            if cache is not None:
                hr = cache.content_hash(W, *(source or (None, "")), progress=st.update)
                w_hash, how = hr.w_hash, hr.how
            else:
                w_hash, how = tensorfile.hash_tensor(W, progress=st.update), "hashed"
    timings["stat" if how == "stat" else "hash"] = dt = time.perf_counter() - t0
    if how == "hashed":
        size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
        say(f"W hashed: {size} in {dt:.3f} s ({nbytes / 1e9 / max(dt, 1e-9):.1f} GB/s)")
    else:
        say("W hash from the cache index (file unchanged, not re-read)")
    return w_hash, how


PCAResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, str, "Path | None"]


def _cached_pca(
    W: torch.Tensor, w_hash: str, tag: str, cache: PCACache, timings: dict[str, float], say: Callable[[str], None]
) -> PCAResult | None:
    """The PCA of this W from the cache (None on a miss)."""
    t0 = time.perf_counter()
    entry = cache.load(w_hash, tag, d=int(W.shape[1]))
    if entry is None:
        return None
    timings["cache_read"] = time.perf_counter() - t0
    say(f"✓ PCA read from the cache (computed by backend {entry.backend}, device {entry.device}): {entry.path}")
    return entry.mean, entry.eigenvalues, entry.eigenvectors, entry.backend, entry.device, entry.path


def _computed_pca(
    W: torch.Tensor,
    options: Options,
    w_hash: str,
    tag: str,
    cache: PCACache | None,
    name: str,
    memory_checked: bool,
    max_cluster: int,
    progress: Progress,
    timings: dict[str, float],
    say: Callable[[str], None],
) -> PCAResult:
    """The PCA computed (with a progress display of the covariance's rows), then stored in the cache."""
    say("Computing PCA...")

    def label() -> str:
        return "eigendecomposition" if "covariance" in timings else "covariance"

    def poll() -> tuple[int, int] | None:  # rows done by the native CPU kernel
        return None if "covariance" in timings else _native.covariance_progress()

    with progress.stage(label, poll):
        mean, evals, evecs, used, dev = pca(
            W,
            backend=options.backend,
            device=options.device,
            eigh_dtype=options.eigh_dtype,
            timings=timings,
            name=name,
            force=options.force or memory_checked,  # checked already, unless a damaged entry misled
            cluster_size=max_cluster,
        )
    say(f"✓ PCA computed (backend {used}, device {dev}; covariance: {ops.covariance_path(W, options.backend, dev)})")
    entry_path = None
    if cache is not None:
        t0 = time.perf_counter()
        info = {"n_tokens": str(W.shape[0]), "d": str(W.shape[1]), "source": name}
        entry_path = cache.store(w_hash, tag, mean, evals, evecs, backend=used, device=str(dev), info=info)
        timings["cache_write"] = time.perf_counter() - t0
        if entry_path is not None:
            say(f"  cached as {entry_path}")
    return mean, evals, evecs, used, str(dev), entry_path


def _sharded_covariance(
    shard: Any, name: str, timings: dict[str, float], release: Callable[[], None] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole W's mean and covariance from the ranks' partial sums (Ctrl-C need not wait)."""
    from . import distributed

    t0 = time.perf_counter()
    try:
        mean64, cov = run_interruptible(
            torch.device("cpu"), distributed.covariance, shard, name, release, cancellable=True
        )
    except (RuntimeError, MemoryError) as exc:
        raise _compute_error(exc, name, "computing the covariance") from exc
    timings["covariance"] = time.perf_counter() - t0
    if not bool(torch.isfinite(cov).all()):
        raise NumericalError(f"{name}: the covariance overflows although W is finite; rescale W")
    return mean64, cov


def _sharded_eigh(
    shard: Any, cov: torch.Tensor, eigh_dtype: torch.dtype, timings: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigendecomposition on rank 0, broadcast to every rank."""
    from . import distributed

    distributed.use_device(shard)
    t0 = time.perf_counter()
    d = cov.shape[0]
    evals, evecs = torch.empty(d), torch.empty(d, d)
    failure = None
    if shard.rank == 0:
        try:
            evals, evecs = _eigh(cov, torch.device("cpu"), eigh_dtype)
        except (RuntimeError, MemoryError) as exc:  # every rank learns of it, none waits for the eigenpairs
            err = _compute_error(exc, "W", "computing the eigendecomposition")
            failure = (type(err).__name__, str(err))
    word = distributed.gather_objects(shard.group, shard.rank, failure, "sharing the eigendecomposition")[0]
    if word is not None:
        raise getattr(errors, word[0], NumericalError)(f"rank 0: {word[1]}")
    evals = distributed.broadcast(shard, evals, "sharing the eigendecomposition")
    evecs = distributed.broadcast(shard, evecs, "sharing the eigendecomposition")
    timings["eigh"] = time.perf_counter() - t0
    return evals, evecs


def _centroids(
    W: torch.Tensor, clusters: dict[str, torch.Tensor], used: str, name: str, timings: dict[str, float]
) -> torch.Tensor:
    """The K centroids as fp32 (K, d) on the CPU, from one segment_mean call over the concatenated
    ids: natively where the PCA ran natively and W's own device has native kernels."""
    t0 = time.perf_counter()
    backend = "native" if used == "native" and _native.native_supports(W.device) else "torch"
    try:
        C = segment_centroids(W, list(clusters.values()), backend=backend).to("cpu")
    except (RuntimeError, MemoryError) as exc:
        raise _compute_error(exc, name, "computing the centroids") from exc
    timings["centroids"] = time.perf_counter() - t0
    return C


def segment_centroids(W: torch.Tensor, ids_list: Sequence[torch.Tensor], *, backend: str = "auto") -> torch.Tensor:
    """Centroids of K clusters of rows of W as fp32 (K, d), from one segment-mean call."""
    ids, offsets = cluster_offsets(ids_list)
    return ops.segment_mean(W, ids, offsets, backend=backend)


def cluster_offsets(ids_list: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(concatenated int64 ids, CSR offsets (K + 1,)) of K id tensors."""
    sizes = torch.tensor([0] + [int(t.numel()) for t in ids_list], dtype=torch.int64)
    ids = torch.cat([t.reshape(-1).to("cpu", torch.int64) for t in ids_list])
    return ids, torch.cumsum(sizes, 0)


# -- the API entry points --------------------------------------------------------------------------


def build_frame(
    W: torch.Tensor,
    ids: torch.Tensor,
    *,
    backend: str = "auto",
    device: str | torch.device = "auto",
    eigh_dtype: torch.dtype = torch.float32,
    name: str = "W",
    ids_name: str = "cluster ids",
    force: bool = False,
    group: Any = None,
    row_offset: int | None = None,
    n_rows: int | None = None,
) -> Frame:
    """PCA of W (N, d) and the centroid of the rows W[ids]: the seed notebook's reference frame.

    backend: "native" (fused kernels), "torch" (the seed's pure-torch maths) or "auto" (native where
    it exists for the device). device: "auto" (CUDA, else MPS, else CPU), or an explicit device.
    eigh_dtype: torch.float64 for eigenvalues accurate relative to themselves, not only to lambda_1.
    name / ids_name: how W and the ids are named in error messages (e.g. "W.safetensors:W").
    force: skip the up-front memory check. No cache: W is not hashed (see build_frame_cached).

    group (a torch.distributed process group; or W a DTensor sharded on dim 0): W holds this rank's
    rows of the whole, ranks in order, and ids are rows of the whole; every rank gets the same
    frame. row_offset / n_rows: where this rank's rows start, and how many of them are real (the
    rest, at the end, are padding). See refframe.covariance.

    Raises InputError (and subclasses) for a malformed W or ids, ResourceError for a W that does not
    fit in memory, BackendError for a backend or device that cannot run here, DistributedError when
    a rank is lost.
    """
    options = Options(backend, device, eigh_dtype, force)
    if group is not None or type(W).__name__ == "DTensor":
        sharded = _sharded_build(W, {"cluster": ids}, options, group, row_offset, n_rows, name, "")
        return sharded.frames["cluster"]
    check_w(W, name)
    ids64 = check_ids(ids, W.shape[0], ids_name, warn_duplicates=True).to("cpu")
    return build(W, {"cluster": ids64}, options, name=name, hash_w=False).frames["cluster"]


def _sharded_build(
    W: Any,
    clusters: ClusterArg,
    options: Options,
    group: Any,
    row_offset: int | None,
    n_rows: int | None,
    name: str,
    w_hash: str,
) -> BuildResult:
    """build_sharded after the ranks have exchanged their inputs; ids checked against the whole."""
    from . import distributed

    named: dict[str, torch.Tensor] = {}

    def checks() -> tuple:  # run with the ranks' exchange of their inputs; the same on every rank
        named.update({k: check_ids(v, 2**62, f"cluster {k!r}") for k, v in _named(clusters).items()})
        if not named:
            raise ClusterIdsError("clusters: no cluster given (pass {name: ids} with at least one entry)")
        return tuple(x for k, v in named.items() for x in (k, v))

    shard = distributed.shard_of(
        W, group, row_offset=row_offset, n_rows=n_rows, op=name, backend=options.backend, checks=checks
    )
    named = {k: check_ids(v, shard.total, f"cluster {k!r}", warn_duplicates=True) for k, v in named.items()}
    return build_sharded(shard, named, options, name=name, w_hash=w_hash)


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
    group: Any = None,
    row_offset: int | None = None,
    n_rows: int | None = None,
) -> dict[str, Frame]:
    """One frame per cluster from a single PCA of W; the PCA comes from the cache when possible.

    clusters: {name: ids} (or a list of id tensors, named "0", "1", ...). cache_dir: the cache
    directory (default: refframe.cache.default_cache_dir()); use_cache=False neither reads nor
    writes it (None: on unless the environment sets REFFRAME_NO_CACHE=1). source=(file, key): the
    safetensors file and key W is memory-mapped from, so an unchanged file is recognised by its stat
    without hashing W. w_hash: W's content hash if known.
    Each frame's metadata holds "w_hash" and "pca_cache" (hit/miss/off); frame.timings the stages.
    group, row_offset, n_rows: a W split between ranks, as in build_frame; there is no file to hash,
    so the cache is off and the frames record the given w_hash only.
    """
    if group is not None or type(W).__name__ == "DTensor":
        options = Options(backend, device, eigh_dtype, force)
        return _sharded_build(W, clusters, options, group, row_offset, n_rows, name, w_hash or "").frames
    check_w(W, name)
    named = {
        k: check_ids(v, W.shape[0], f"cluster {k!r}", warn_duplicates=True).to("cpu")
        for k, v in _named(clusters).items()
    }
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
    options = Options(backend, device, eigh_dtype, force)
    cache = PCACache(cache_dir) if caching else None
    return build(W, named, options, name=name, cache=cache, source=source, w_hash=w_hash).frames


def build_frame_cached(W: torch.Tensor, ids: torch.Tensor, **kwargs) -> Frame:
    """build_frame with the PCA cache (same keyword arguments as build_frames)."""
    return build_frames(W, {"cluster": ids}, **kwargs)["cluster"]


def _named(clusters: ClusterArg) -> dict[str, torch.Tensor]:
    if isinstance(clusters, Mapping):
        return {str(k): v for k, v in clusters.items()}
    if isinstance(clusters, torch.Tensor):
        return {"0": clusters}
    return {str(i): v for i, v in enumerate(clusters)}


SOURCE_CHUNK_BYTES = 64 << 20


def source_mismatch(W: torch.Tensor, source: tuple[str | os.PathLike[str], str]) -> str | None:
    """Why W is not the tensor `key` of the safetensors file `path` (None when it is).

    source is only a hint that lets an unchanged file skip hashing, so it must never change a result:
    the file's tensor must have W's dtype and shape and the same bytes, compared in row chunks of
    SOURCE_CHUNK_BYTES (one read of the file): a W that is not the file's tensor would otherwise get
    the file's cached PCA, or have its hash recorded for the file."""
    path, key = source
    try:
        f = tensorfile.SafetensorsFile(path)
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


# -- writing ---------------------------------------------------------------------------------------


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
    """Write frames that share one PCA, all or none (atomic.atomic_write_files): if any file cannot
    be written, none of the paths changes. The checksums of the shared eigenpairs are computed once.
    durable=False skips the fsyncs; `progress(done, total)` follows the files as they complete."""
    if not items:
        return []
    tensors = frame_tensors(items[0][0])
    shared = {k: tensorfile.hash_tensor(tensors[k]) for k in (KEY_EIGENVALUES, KEY_EIGENVECTORS)}
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
