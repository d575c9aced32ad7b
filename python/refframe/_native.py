"""The compiled library refframe._C: loading, version check, fake kernels, self-check, status.

Loads _C if it exists and was built against the running torch; otherwise warns once, says how to
rebuild, and every op runs the pure-torch reference instead. Also the CPU covariance's progress and
cancel hooks, and the GPU self-check that gates the native kernels on each device.
"""

from __future__ import annotations

import os
import warnings

import torch

from .errors import RefframeWarning

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

    if hasattr(torch.ops.refframe, "center_syrk_partial"):  # a library built before the partials has none

        @torch.library.register_fake("refframe::center_stats")
        def _center_stats_fake(W: torch.Tensor, row_offset: int, total_rows: int, exact: bool) -> torch.Tensor:
            return W.new_empty((4, W.shape[1]), dtype=torch.float64)

        @torch.library.register_fake("refframe::center_row_runs")
        def _center_row_runs_fake(W: torch.Tensor) -> torch.Tensor:
            return W.new_empty((torch.library.get_ctx().new_dynamic_size(), 3), dtype=torch.int64)

        @torch.library.register_fake("refframe::center_syrk_partial")
        def _center_syrk_partial_fake(
            W: torch.Tensor, stats: torch.Tensor, runs: torch.Tensor, row_offset: int, total_rows: int, exact: bool
        ) -> torch.Tensor:
            d = W.shape[1]
            return W.new_empty((d * (d + 1) // 2,), dtype=torch.float64)

        @torch.library.register_fake("refframe::center_syrk_finish")
        def _center_syrk_finish_fake(
            sums: torch.Tensor, stats: torch.Tensor, total_rows: int, dtype: torch.dtype, exact: bool
        ) -> tuple[torch.Tensor, torch.Tensor]:
            d = stats.shape[1]
            return stats.new_empty((d,), dtype=torch.float64), stats.new_empty((d, d), dtype=torch.float32)

    @torch.library.register_fake("refframe::project")
    def _project_fake(
        W: torch.Tensor, center: torch.Tensor, basis: torch.Tensor, ids: torch.Tensor | None
    ) -> torch.Tensor:
        n = W.shape[0] if ids is None else ids.shape[0]
        return W.new_empty((n, basis.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("refframe::radii")
    def _radii_fake(W: torch.Tensor, center: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        n = W.shape[0] if ids is None else ids.shape[0]
        return W.new_empty((n,), dtype=torch.float32)


def has_op(name: str) -> bool:
    """Whether the loaded library defines the operator refframe::name (a library built before an op
    existed runs that op on the torch path)."""
    return _C is not None and hasattr(torch.ops.refframe, name)


def cpu_kernel() -> str:
    """The CPU kernel set the native kernels run now ("" without the library): REFFRAME_CPU_KERNEL
    is read at every call."""
    return _C.cpu_kernel() if _C is not None else ""


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
    fp16/fp32 W, non-finite W and W that would need more than d / 4 extra columns to avx512; the
    columns are d, plus one per column that avx512bf16 centered and split into two parts."""
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


def unavailable_reason(device: torch.device) -> str | None:
    """Why the native kernels cannot run on `device` (None when they can)."""
    if native_supports(device):
        return None
    if _C is None:
        return _NATIVE_REASON
    failed = _SELF_CHECKS.get(_device_key(device))
    if failed is not None:
        return f"its self-check failed there ({failed})"
    return f"this build has no native kernels for {device.type}"


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
    segments; project and radii where the library has them) and compare with float64 torch on the
    same device. None when they agree (covariance <= 1e-6 relative, means <= 1e-6, coordinates and
    distances <= 1e-6 of the row's distance), else why not; the answer is kept for the process. The GPU
    paths use this before their first use, so a kernel that misbehaves on an untried GPU or driver
    falls back to the pure-torch path (with a warning) instead of writing wrong numbers."""
    key = _device_key(device)
    if key in _SELF_CHECKS:
        return _SELF_CHECKS[key]
    reason: str | None = None
    try:
        reason = _self_check_errors(device)
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


def _self_check_errors(device: torch.device) -> str | None:
    """The self-check's problem on `device`: None, or the dtype and the ops whose error is too large
    (project and radii: each coordinate / distance within 1e-6 of its row's distance to the center)."""
    g = torch.Generator().manual_seed(20011)
    n, d = 20011, 300
    base = torch.randn(n, d, generator=g) * 0.02 + torch.randn(d, generator=g) * 0.01
    base[:, :3] += 1.0
    ids = torch.randint(0, n, (4000,), generator=g).to(device)
    offsets = torch.tensor([0, 1, 300, 4000]).to(device)
    basis = torch.linalg.qr(torch.randn(d, 70, generator=g, dtype=torch.float64))[0].float().to(device)
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
                (torch.ops.refframe.gather_mean(X, ids).double() - X64[ids].mean(0)).abs().max() / X64.abs().max()
            ),
        }
        seg = torch.ops.refframe.segment_mean(X, ids, offsets).double()
        bounds = offsets.tolist()
        want = torch.stack([X64[ids[a:b]].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
        errors["segment_mean"] = float((seg - want).abs().max() / X64.abs().max())
        if has_op("project") and has_op("radii"):
            center = X[ids[:300]].float().mean(0)
            rows = X64 - center.double()
            dist = rows.norm(dim=1)
            coords = torch.ops.refframe.project(X, center, basis, None).double()
            errors["project"] = float(((coords - rows @ basis.double()).abs() / dist[:, None]).max())
            r = torch.ops.refframe.radii(X, center, ids).double()
            errors["radii"] = float(((r - dist[ids]).abs() / dist[ids]).max())
        bad = {k: v for k, v in errors.items() if not v <= (0.0 if k == "asymmetry" else 1e-6)}
        if bad:
            name = str(dtype).removeprefix("torch.")
            return f"{name}: " + ", ".join(f"{k} error {v:.1e}" for k, v in bad.items())
    return None


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
