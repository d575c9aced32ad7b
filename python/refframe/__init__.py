"""refframe: cluster-centric reference frames of token embedding matrices."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    BackendError,
    CheckpointError,
    ClusterIdsError,
    FileFormatError,
    InputError,
    KeyNotFoundError,
    NonFiniteError,
    NumericalError,
    OutputError,
    RefframeError,
    RefframeWarning,
    ResourceError,
    VerificationError,
)

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from .cache import PCACache
    from .checkpoint import load_checkpoint_w
    from .frame import Frame, VarianceReport, build_frame, pca
    from .framefile import load_frame, save_frame
    from .multi import build_frame_cached, build_frames, save_frames
    from .ops import covariance, gather_mean, last_cpu_covariance, native_available, native_status, segment_mean
    from .verify import VerifyResult, verify_frame

# The rest of the API loads torch, so it is imported on first use: `import refframe` (and the
# command line's --help) stays fast, and Ctrl-C while torch loads is an ordinary interrupt.
_LAZY = {
    "PCACache": "cache",
    "load_checkpoint_w": "checkpoint",
    "Frame": "frame",
    "VarianceReport": "frame",
    "build_frame": "frame",
    "pca": "frame",
    "load_frame": "framefile",
    "save_frame": "framefile",
    "build_frame_cached": "multi",
    "build_frames": "multi",
    "save_frames": "multi",
    "covariance": "ops",
    "gather_mean": "ops",
    "last_cpu_covariance": "ops",
    "native_available": "ops",
    "native_status": "ops",
    "segment_mean": "ops",
    "VerifyResult": "verify",
    "verify_frame": "verify",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'refframe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Frame",
    "VarianceReport",
    "VerifyResult",
    "ClusterIdsError",
    "FileFormatError",
    "InputError",
    "KeyNotFoundError",
    "NonFiniteError",
    "NumericalError",
    "OutputError",
    "RefframeError",
    "RefframeWarning",
    "ResourceError",
    "VerificationError",
    "__version__",
    "build_frame",
    "load_frame",
    "pca",
    "save_frame",
    "verify_frame",
    "covariance",
    "gather_mean",
    "last_cpu_covariance",
    "native_available",
    "native_status",
    "segment_mean",
]

__all__ += [
    "CheckpointError",
    "PCACache",
    "build_frame_cached",
    "build_frames",
    "load_checkpoint_w",
    "save_frames",
]
