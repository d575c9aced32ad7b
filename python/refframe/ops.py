"""Native operators and backend dispatch.

Loads the compiled library (refframe._C) if it exists and was built against the running torch;
otherwise warns once, says how to rebuild, and every op runs the pure-torch reference instead.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import reference
from .errors import BackendError, ClusterIdsError, InputError, RefframeWarning

BACKENDS = ("auto", "native", "torch")
REBUILD_HINT = "rebuild it with: pip install --no-build-isolation --force-reinstall --no-deps ."


def _load_native() -> tuple[object | None, str]:
    if os.environ.get("REFFRAME_DISABLE_NATIVE"):
        return None, "disabled by REFFRAME_DISABLE_NATIVE"
    try:
        from . import _C  # type: ignore[attr-defined]
    except (ImportError, OSError) as exc:
        return None, f"the native library could not be loaded ({exc})"
    built = getattr(_C, "TORCH_VERSION", "?")
    if built != torch.__version__:
        return (
            None,
            f"the native library was built against torch {built}, running torch {torch.__version__}",
        )
    return _C, ""


_C, _NATIVE_REASON = _load_native()
if _C is None and not os.environ.get("REFFRAME_DISABLE_NATIVE"):
    warnings.warn(
        f"refframe: {_NATIVE_REASON}; using the pure-torch path. To get the native kernels, {REBUILD_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )

if _C is not None:

    @torch.library.register_fake("refframe::gather_mean")
    def _gather_mean_fake(W: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return W.new_empty((W.shape[1],), dtype=torch.float32)

    @torch.library.register_fake("refframe::segment_mean")
    def _segment_mean_fake(W: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return W.new_empty((offsets.shape[0] - 1, W.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("refframe::center_syrk")
    def _center_syrk_fake(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = W.shape[1]
        return W.new_empty((d,), dtype=torch.float64), W.new_empty((d, d), dtype=torch.float32)


def native_available() -> bool:
    """True when the compiled kernels are loaded and match the running torch."""
    return _C is not None


def native_status() -> str:
    """One line saying which path runs and why."""
    if _C is None:
        return f"pure torch ({_NATIVE_REASON})"
    cuda = "CPU + CUDA" if _C.WITH_CUDA else "CPU"
    return f"native {cuda} kernels (cpu kernel: {_C.cpu_kernel()}), torch {torch.__version__}"


def last_cpu_covariance() -> tuple[str, int] | None:
    """(kernel set, columns multiplied) of the last native CPU covariance in this process, or None
    before any (or without the native library). The set is the one that really ran: avx512bf16 hands
    fp16/fp32 W, non-finite W and W with more than d / 8 columns to split to avx512; the columns are
    d, plus two per column that avx512bf16 split into parts."""
    if _C is None:
        return None
    return _C.last_cpu_covariance()


def native_supports(device: torch.device) -> bool:
    """True when the native kernels can run on tensors of this device (on a GPU: and passed their
    self-check there, see native_self_check)."""
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(_C.WITH_CUDA) and native_self_check(device) is None


_SELF_CHECKS: dict[str, str | None] = {}


def _device_key(device: torch.device) -> str:
    """The self-check's key: the device, and on CUDA the covariance kernel REFFRAME_CUDA_KERNEL
    asks for (read at every call, so each kernel is checked before its first use)."""
    if device.type != "cuda":
        return str(device)
    name = str(device)
    if device.index is None:
        try:
            name = f"cuda:{torch.cuda.current_device()}"
        except (RuntimeError, AssertionError):
            name = "cuda"
    return f"{name} ({os.environ.get('REFFRAME_CUDA_KERNEL') or 'simt'} kernel)"


def native_self_check(device: torch.device) -> str | None:
    """Run the native kernels once on `device` on a small awkward problem (20,011 x 300: partial
    tiles, row splits, columns 50 sigma off zero; bf16, fp16 and fp32; ids with repeats in three
    segments) and compare with float64 torch on the same device. None when they agree (covariance
    <= 1e-6 relative, means <= 1e-6), else why not; the answer is kept for the process. The GPU
    paths use this before their first use, so a kernel that misbehaves on an untried GPU or driver
    falls back to the pure-torch path (with a warning) instead of writing wrong numbers."""
    key = _device_key(device)
    if key in _SELF_CHECKS:
        return _SELF_CHECKS[key]
    reason: str | None = None
    try:
        g = torch.Generator().manual_seed(20011)
        n, d = 20011, 300
        base = torch.randn(n, d, generator=g) * 0.02 + torch.randn(d, generator=g) * 0.01
        base[:, :3] += 1.0
        ids = torch.randint(0, n, (4000,), generator=g).to(device)
        offsets = torch.tensor([0, 1, 300, 4000]).to(device)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            X = base.to(dtype).to(device)
            X64 = X.double()
            mu = X64.mean(0)
            Xc = X64 - mu
            C = Xc.T @ Xc / n
            mean64, cov = torch.ops.refframe.center_syrk(X)
            cov64 = cov.double()
            errors = {
                "covariance": float((cov64 - C).norm() / C.norm()),
                "column mean": float((mean64.double() - mu).abs().max() / mu.abs().max()),
                "asymmetry": float((cov64 - cov64.T).abs().max() / C.abs().max()),
                "gather_mean": float(
                    (torch.ops.refframe.gather_mean(X, ids).double() - X64[ids].mean(0)).abs().max()
                    / X64.abs().max()
                ),
            }
            seg = torch.ops.refframe.segment_mean(X, ids, offsets).double()
            bounds = offsets.tolist()
            want = torch.stack([X64[ids[a:b]].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
            errors["segment_mean"] = float((seg - want).abs().max() / X64.abs().max())
            bad = {k: v for k, v in errors.items() if not v <= (0.0 if k == "asymmetry" else 1e-6)}
            if bad:
                name = str(dtype).removeprefix("torch.")
                reason = f"{name}: " + ", ".join(f"{k} error {v:.1e}" for k, v in bad.items())
                break
    except Exception as exc:  # a kernel that cannot launch here is a failed check too
        first = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {first[0] if first else ''}"
    _SELF_CHECKS[key] = reason
    if reason is not None:
        warnings.warn(
            f"refframe: the native kernels failed their self-check on {key} ({reason}); "
            "using the pure-torch path there",
            RefframeWarning,
            stacklevel=3,
        )
    return reason


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" / "native" / "torch" to the backend that runs on `device`."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    ok = native_supports(device)
    if backend == "native" and not ok:
        if _C is None:
            why = _NATIVE_REASON
        elif _SELF_CHECKS.get(_device_key(device)) is not None:
            why = f"its self-check failed there ({_SELF_CHECKS[_device_key(device)]})"
        else:
            why = f"this build has no native kernels for {device.type}"
        raise BackendError(f"backend 'native' cannot run on {device.type}: {why}")
    if backend == "auto":
        return "native" if ok else "torch"
    return backend


def covariance(W: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean (fp32, (d,)) and population covariance Wc^T Wc / N (fp32, (d, d)) of W (N, d).

    The native path reads W (bf16, fp16 or fp32) in place, takes an exact fp64 mean and accumulates
    in fp64; the torch path is the seed's fp32 computation.
    """
    _check_matrix(W, "covariance")
    if resolve_backend(backend, W.device) == "native":
        mean64, cov = torch.ops.refframe.center_syrk(W)
        return mean64.to(torch.float32), cov
    return reference.covariance(W)


def covariance_progress() -> tuple[int, int] | None:
    """(rows done, rows in all) of the native CPU covariance running now, for a progress display;
    None when none runs (or the native library is missing). Process-wide: two covariances running
    at once share it."""
    fn = getattr(_C, "covariance_progress", None)
    if fn is None:
        return None
    done, total = fn()
    return (int(done), int(total)) if total > 0 else None


def thread_key() -> int | None:
    """The calling thread's key for cancel_covariance (None without the native library)."""
    fn = getattr(_C, "thread_key", None)
    return None if fn is None else int(fn())


def cancel_covariance(key: int | None) -> None:
    """Ask the native CPU covariance running in the thread with this key (or the next one it starts)
    to stop at its next row block; it then raises 'center_syrk: cancelled'. No other call is touched."""
    fn = getattr(_C, "cancel_covariance", None)
    if fn is not None and key is not None:
        fn(key)


def clear_cancel(key: int | None) -> None:
    """Withdraw a cancel request for that thread (its work is over)."""
    fn = getattr(_C, "clear_cancel", None)
    if fn is not None and key is not None:
        fn(key)


def _check_matrix(W: object, op: str, *, min_columns: int = 1) -> None:
    """A one-line InputError for what no backend can take: not a tensor, not 2-D, not floating point."""
    if not isinstance(W, torch.Tensor):
        raise InputError(f"{op}: W must be a torch.Tensor (N, d), got {type(W).__name__}")
    if W.dim() != 2:
        raise InputError(f"{op}: W must be 2-D (N, d), got shape {tuple(W.shape)}")
    if not W.dtype.is_floating_point:
        raise InputError(f"{op}: W must be floating point (bfloat16, float16, float32), got {W.dtype}")
    if W.shape[0] < 1 or W.shape[1] < min_columns:
        raise InputError(f"{op}: W must have at least one row and one column, got shape {tuple(W.shape)}")


def validate_ids(ids: object, n: int, name: str = "cluster ids", *, allow_empty: bool = False) -> torch.Tensor:
    """ids as a 1-D int64 tensor, checked where they are (usually the CPU) against N rows: integer
    dtype, 1-D, non-empty unless allowed, every id in [0, N). A list or numpy array is accepted."""
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ClusterIdsError(f"{name}: not a tensor of integer ids ({first})") from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ClusterIdsError(f"{name}: expected an integer dtype, got {str(ids.dtype).removeprefix('torch.')}")
    if ids.dim() != 1:
        raise ClusterIdsError(f"{name}: expected a 1-D tensor, got shape {tuple(ids.shape)}")
    if ids.numel() == 0 and not allow_empty:
        raise ClusterIdsError(f"{name}: empty; a centroid needs at least one id")
    wraps = ids.dtype == getattr(torch, "uint64", None)  # values >= 2**63 turn negative in int64
    ids = ids.to(torch.int64)  # compared as int64: a uint8 tensor would wrap the bound
    bad = (ids < 0) | (ids >= n)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        value = int(ids[first]) + (2**64 if wraps and int(ids[first]) < 0 else 0)
        raise ClusterIdsError(f"{name}: {int(bad.sum())} id(s) outside [0, {n}); first: ids[{first}] = {value}")
    return ids


def _device_ids(ids: object, W: torch.Tensor, op: str, *, allow_empty: bool = False) -> torch.Tensor:
    """ids checked before any kernel sees them, then moved to W's device: the CUDA kernels assert on
    a bad id, which would leave the CUDA context unusable, and a list or an out-of-range id gets the
    same ClusterIdsError on every device."""
    _check_matrix(W, op, min_columns=0)  # a mean of no columns is empty, not an error
    return validate_ids(ids, W.shape[0], f"{op}: ids", allow_empty=allow_empty).to(W.device)


def gather_mean(W: torch.Tensor, ids: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Mean of the rows W[ids] as fp32 (d,); the native path accumulates in fp64 without copying rows."""
    ids = _device_ids(ids, W, "gather_mean")
    if resolve_backend(backend, W.device) == "native":
        return torch.ops.refframe.gather_mean(W, ids)
    return reference.gather_mean(W, ids)


def segment_mean(
    W: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Means of K row segments W[ids[offsets[k]:offsets[k+1]]] as fp32 (K, d), in one pass."""
    ids = _device_ids(ids, W, "segment_mean", allow_empty=True)  # the offsets say what is empty
    if resolve_backend(backend, W.device) == "native":
        if W.device.type != "cpu":
            _check_offsets(offsets, ids.numel())
        return torch.ops.refframe.segment_mean(W, ids, offsets.to(W.device))
    return reference.segment_mean(W, ids, offsets)


def _check_offsets(offsets: torch.Tensor, num_ids: int) -> None:
    """The CPU kernel's checks of segment offsets, made on the host before a GPU sees them: the CUDA
    kernels assert on bad offsets, which would leave the CUDA context unusable."""
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(
            f"segment_mean: offsets must be 1-D with at least 2 entries (K+1 for K segments), got shape "
            f"{tuple(offsets.shape)}"
        )
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"segment_mean: offsets must have an integer dtype, got {offsets.dtype}")
    off = offsets.to("cpu", torch.int64)
    if int(off[0]) != 0 or int(off[-1]) != num_ids:
        raise ValueError(
            f"segment_mean: offsets must start at 0 and end at len(ids) = {num_ids}, got "
            f"{int(off[0])} and {int(off[-1])}"
        )
    steps = off[1:] - off[:-1]
    if bool((steps <= 0).any()):
        s = int((steps <= 0).nonzero()[0, 0])
        raise ValueError(
            f"segment_mean: segment {s} is empty or offsets decrease (offsets[{s}] = {int(off[s])}, "
            f"offsets[{s + 1}] = {int(off[s + 1])})"
        )
