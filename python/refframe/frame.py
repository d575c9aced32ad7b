"""Building a cluster-centric reference frame: PCA of W plus the centroid of a cluster of rows."""

from __future__ import annotations

import atexit
import os
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import ops
from .errors import (
    BackendError,
    InputError,
    NonFiniteError,
    NumericalError,
    RefframeError,
    RefframeWarning,
    ResourceError,
)


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
    if backend == "native" and not ops.native_supports(dev):
        dev = torch.device("cpu")
    return dev


def check_w(W: torch.Tensor, name: str = "W") -> None:
    """W must be a 2-D floating-point tensor with N >= 2 rows and d >= 1 columns (InputError)."""
    if not isinstance(W, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise InputError(f"{name}: expected a 2-D matrix (tokens x dims), got shape {tuple(W.shape)}")
    if not W.dtype.is_floating_point:
        raise InputError(
            f"{name}: expected a floating-point dtype (bf16, fp16, fp32), got "
            f"{str(W.dtype).removeprefix('torch.')}"
        )
    if W.shape[1] == 0:
        raise InputError(f"{name}: has d = 0 columns (shape {tuple(W.shape)})")
    if W.shape[0] < 2:
        raise InputError(f"{name}: needs at least 2 rows (tokens) for a covariance, got {W.shape[0]}")


def check_ids(ids: torch.Tensor, n: int, name: str = "cluster ids") -> torch.Tensor:
    """Validate cluster ids against N rows; returns them as int64 on the CPU.

    Duplicate ids are accepted with a RefframeWarning and counted as often as they appear (the seed
    notebook's W[ids].mean(0) does the same).
    """
    ids = ops.validate_ids(ids, n, name).to("cpu")
    dup = duplicate_ids(ids)
    if dup is not None:
        count, pos = dup
        warnings.warn(
            f"{name}: {count} duplicate id(s) ({ids.numel()} ids, {ids.numel() - count} distinct), first: "
            f"ids[{pos}] = {int(ids[pos])}; each is counted as often as it appears, as the seed notebook does",
            RefframeWarning,
            stacklevel=2,
        )
    return ids


def duplicate_ids(ids: torch.Tensor) -> tuple[int, int] | None:
    """(number of repeated entries, position of the first repeat) of a 1-D int64 tensor, or None."""
    if ids.numel() < 2:
        return None
    order = torch.sort(ids, stable=True).indices
    srt = ids[order]
    repeat = srt[1:] == srt[:-1]
    if not bool(repeat.any()):
        return None
    positions = order[1:][repeat]
    return int(repeat.sum()), int(positions.min())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def find_nonfinite(W: torch.Tensor, chunk_bytes: int = 64 << 20) -> tuple[int, int]:
    """(number of NaN/Inf values, first row holding one; -1 if none), scanning W in row chunks so
    that no copy of W is made (at most a chunk's worth of flags at a time)."""
    rows = max(1, chunk_bytes // max(1, W.shape[1] * W.element_size()))
    count, first = 0, -1
    for i in range(0, W.shape[0], rows):
        bad = ~torch.isfinite(W[i : i + rows])
        c = int(bad.sum())
        if c and first < 0:
            first = i + int(bad.any(dim=1).nonzero()[0, 0])
        count += c
    return count, first


def nonfinite_error(W: torch.Tensor, name: str = "W") -> RefframeError:
    """The error to raise once a statistic of W came out NaN or Inf: which values of W are not
    finite, or, when all are, that the arithmetic overflowed."""
    count, first = find_nonfinite(W)
    if count:
        return NonFiniteError(
            f"{name}: {count} NaN/Inf value(s) in W, first in row {first}; fix or drop those rows"
        )
    amax = max((float(W[i : i + 4096].abs().max()) for i in range(0, W.shape[0], 4096)), default=0.0)
    return NumericalError(
        f"{name}: the covariance overflows although W is finite (largest |value| {amax:.3g}); rescale W"
    )


NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SKIP_MEMORY_CHECK_ENV = "REFFRAME_SKIP_MEMORY_CHECK"


def estimate_peak_bytes(
    n: int,
    d: int,
    dtype: torch.dtype,
    backend: str,
    device: torch.device,
    *,
    cluster_size: int = 0,
    eigh_dtype: torch.dtype = torch.float32,
) -> int:
    """Peak bytes a build allocates on `device`, beyond the memory-mapped W itself.

    torch: an fp32 copy of W (unless W is fp32), the centred copy and the d x d covariance, then the
    centroid's gathered rows. native: W is read in place; packs of 512 rows and an fp64 accumulator
    for one triangle (~d*d/2 doubles) beside the fp32 covariance. Then the eigendecomposition: the
    covariance, its copy in eigh_dtype, eigenvectors, LAPACK workspace (~2 d*d) and three fp32 d x d
    results. On an accelerator W itself is copied to the device too.
    """
    f32 = 4
    es = torch.empty((), dtype=dtype).element_size()
    eb = torch.empty((), dtype=eigh_dtype).element_size()
    nd, dd = n * d, d * d
    upload = nd * es if device.type != "cpu" else 0
    if backend == "native":
        cov_stage = 2 * 1024 * d * f32 + dd * 8 // 2 + dd * f32
        centroid = 0
    else:
        cov_stage = (0 if dtype == torch.float32 else nd * f32) + nd * f32 + dd * f32
        centroid = cluster_size * d * (es + f32)
    eigh_stage = dd * f32 + 4 * dd * eb + 3 * dd * f32
    return upload + max(cov_stage, eigh_stage, centroid)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now on `device`, or None where it cannot be told.

    CPU (and MPS, which shares it): MemAvailable from /proc/meminfo, capped by a cgroup memory limit
    if one is set; elsewhere os.sysconf. CUDA: torch.cuda.mem_get_info.
    """
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type not in ("cpu", "mps"):
        return None
    avail: int | None = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as fh:
                limit = fh.read().strip()
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, max(0, int(limit) - usage))
        break
    return avail


def check_memory(
    W: torch.Tensor,
    backend: str,
    device: torch.device,
    *,
    name: str = "W",
    cluster_size: int = 0,
    eigh_dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> None:
    """Refuse up front, with the estimate, a build that would not fit in memory.

    Skipped with force=True (CLI: --force) or the environment variable REFFRAME_SKIP_MEMORY_CHECK=1.
    """
    if force or os.environ.get(SKIP_MEMORY_CHECK_ENV, "") not in ("", "0"):
        return
    n, d = W.shape
    need = estimate_peak_bytes(
        n, d, W.dtype, backend, device, cluster_size=cluster_size, eigh_dtype=eigh_dtype
    )
    avail = available_memory(device)
    if avail is None or need <= avail:
        return
    hint = ""
    if backend == "torch" and ops.native_supports(device) and W.dtype in NATIVE_DTYPES:
        hint = "use --backend native (needs far less), "
    raise ResourceError(
        f"{name}: a {n:,} x {d:,} {str(W.dtype).removeprefix('torch.')} W needs about {_gb(need)} of "
        f"memory with the {backend} backend on {device.type}, only {_gb(avail)} is available; "
        f"{hint}free memory, or pass --force ({SKIP_MEMORY_CHECK_ENV}=1) to try anyway"
    )


def plan(
    W: torch.Tensor, backend: str, device: str | torch.device, name: str = "W"
) -> tuple[str, torch.device]:
    """The backend and device a build of W will use ("auto" resolved), or a BackendError."""
    if backend not in ops.BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(ops.BACKENDS)}")
    dev = resolve_device(device, backend)
    used = ops.resolve_backend(backend, dev)
    if used == "native" and W.dtype not in NATIVE_DTYPES:
        if backend == "native":
            raise BackendError(
                f"{name}: backend 'native' reads bfloat16, float16 or float32, not "
                f"{str(W.dtype).removeprefix('torch.')}; use backend 'torch' (--backend torch)"
            )
        used = "torch"
    return used, dev


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


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

    Returns (mean, eigenvalues, eigenvectors, backend used, device used). Refuses up front a W that
    would not fit in memory (ResourceError; force=True skips the check); NaN or Inf in W raise
    NonFiniteError with their count and first row (found by a chunked scan, only once the mean or
    covariance came out non-finite).
    """
    check_w(W, name)
    used, dev = plan(W, backend, device, name)
    check_memory(W, used, dev, name=name, cluster_size=cluster_size, eigh_dtype=eigh_dtype, force=force)
    timings = {} if timings is None else timings

    stage = "copying W to the device"
    try:
        t0 = _now(dev)
        Wd = W if W.device == dev else W.to(dev)
        t1 = _now(dev)
        if Wd is not W:
            timings["to_device"] = t1 - t0
        stage = f"computing the covariance ({used} backend)"
        mean, cov = _interruptible(dev, ops.covariance, Wd, backend=used, cancellable=True)
        t2 = _now(dev)
        timings["covariance"] = t2 - t1
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(cov).all())):
            del Wd, mean, cov
            raise nonfinite_error(W, name)

        stage = "computing the eigendecomposition"
        eig_dev = dev if dev.type == "cuda" else torch.device("cpu")
        C = cov.to(eig_dev, eigh_dtype)
        limit = EIGH_ON_CALLER_MAX_D if C.dtype != torch.float64 else EIGH_ON_CALLER_MAX_D * 3 // 4
        if C.shape[0] <= limit:
            # Short enough to wait for on Ctrl-C. On the calling thread LAPACK's eigh runs about
            # 1.5x faster than in a worker: a second thread's OpenMP team makes libgomp throttle
            # its spin-waits, and eigh is thousands of short parallel regions.
            evals, evecs = torch.linalg.eigh(C)
        else:
            evals, evecs = _interruptible(eig_dev, torch.linalg.eigh, C)
        del C
        evals = torch.flip(evals, dims=[0]).to("cpu", torch.float32)
        evecs = fix_signs(torch.flip(evecs, dims=[1]).to("cpu", torch.float32))
        timings["eigh"] = _now(dev) - t2
    except RefframeError:
        raise
    except (RuntimeError, MemoryError) as exc:
        raise _compute_error(exc, name, stage) from exc
    return mean.to("cpu"), evals, evecs.contiguous(), used, dev


# Covariances up to this size (3/4 of it in float64, which LAPACK takes about twice as long over)
# are decomposed on the calling thread (see pca: a few seconds at most on a 2-core machine); larger
# ones in a worker thread, so that Ctrl-C need not wait for LAPACK.
EIGH_ON_CALLER_MAX_D = 4096

_PENDING: dict[threading.Event, dict] = {}  # workers still computing -> their box (holds "key")


def compute_running() -> bool:
    """Whether a computation left behind by an interrupt still runs in a worker thread (the command
    line then ends the process without waiting for it)."""
    return any(not done.is_set() for done in list(_PENDING))


@atexit.register
def _finish_workers() -> None:
    """At interpreter exit (a script stopped by Ctrl-C), let abandoned workers finish first: a thread
    still inside torch or LAPACK when the interpreter shuts down would abort the process."""
    for done, box in list(_PENDING.items()):
        ops.cancel_covariance(box.get("key"))
        done.wait()


def _interruptible(device: torch.device, fn, *args, cancellable: bool = False, **kwargs):
    """fn(*args, **kwargs); on the CPU, called from the main thread, it runs in a worker thread
    while the main thread waits in short steps, so Ctrl-C (and the CLI's SIGTERM/SIGHUP) interrupt
    the wait at once instead of after a long native call returns. cancellable: fn is the native
    covariance, asked on an interrupt to stop at its next row block (LAPACK's eigh cannot be stopped
    and runs on in the background). GPU work stays on the calling thread: its current device and
    stream are per thread."""
    if device.type != "cpu" or threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: dict[str, object] = {}
    grad = torch.is_grad_enabled()
    done = threading.Event()  # not Thread.is_alive(): an interrupted join() can leave it wrong
    started = threading.Event()

    def work() -> None:
        box["key"] = ops.thread_key()
        started.set()
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            ops.clear_cancel(box["key"])
            done.set()
            _PENDING.pop(done, None)

    _PENDING[done] = box
    try:
        threading.Thread(target=work, name="refframe-compute", daemon=True).start()
    except BaseException:
        _PENDING.pop(done, None)
        raise
    try:
        while not done.wait(0.1):
            pass
    except BaseException:
        if cancellable:
            started.wait(1.0)
            ops.cancel_covariance(box.get("key"))  # type: ignore[arg-type]
            done.wait(0.5)  # a cancelled covariance stops within one row block
        raise
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def _compute_error(exc: BaseException, name: str, stage: str) -> RefframeError:
    if _is_oom(exc):
        return ResourceError(
            f"{name}: out of memory while {stage}; free memory or use --backend native / --device cpu"
        )
    if isinstance(exc, torch.linalg.LinAlgError):
        return NumericalError(f"{name}: the eigendecomposition failed ({_first_line(exc)})")
    return BackendError(f"{name}: failed while {stage}: {_first_line(exc)}")


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
) -> Frame:
    """PCA of W (N, d) and the centroid of the rows W[ids]: the seed notebook's reference frame.

    backend: "native" (fused kernels), "torch" (the seed's pure-torch maths) or "auto" (native where
    it exists for the device). device: "auto" (CUDA, else MPS, else CPU), or an explicit device.
    eigh_dtype: torch.float64 for eigenvalues accurate relative to themselves, not only to lambda_1.
    name / ids_name: how W and the ids are named in error messages (e.g. "W.safetensors:W").
    force: skip the up-front memory check.

    Raises InputError (and subclasses) for a malformed W or ids, ResourceError for a W that does not
    fit in memory, BackendError for a backend or device that cannot run here.
    """
    check_w(W, name)
    ids64 = check_ids(ids, W.shape[0], ids_name)
    timings: dict[str, float] = {}
    mean, evals, evecs, used, dev = pca(
        W,
        backend=backend,
        device=device,
        eigh_dtype=eigh_dtype,
        timings=timings,
        name=name,
        force=force,
        cluster_size=int(ids64.numel()),
    )
    t0 = time.perf_counter()
    centroid_backend = "native" if used == "native" and ops.native_supports(W.device) else "torch"
    try:
        centroid = ops.gather_mean(W, ids64, backend=centroid_backend).to("cpu")
    except (RuntimeError, MemoryError) as exc:
        raise _compute_error(exc, name, "computing the centroid") from exc
    timings["centroid"] = time.perf_counter() - t0
    return Frame(
        centroid=centroid,
        eigenvalues=evals,
        eigenvectors=evecs,
        mean=mean,
        n_tokens=int(W.shape[0]),
        cluster_size=int(ids64.numel()),
        backend=used,
        device=str(dev),
        timings=timings,
    )
