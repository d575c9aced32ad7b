"""refframe: cluster-centric reference frames of token embedding matrices."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    BackendError,
    CheckpointError,
    ClusterIdsError,
    DependencyError,
    DistributedError,
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
from .layout import __version__

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from ._native import last_cpu_covariance, native_available, native_status
    from .build import build_frame, build_frame_cached, build_frames, pca, save_frames
    from .cache import PCACache
    from .frame import Frame, VarianceReport, load_frame, save_frame
    from .inputs import load_checkpoint_w
    from .ops import covariance, gather_mean, segment_mean
    from .projection import nearest, project, radii
    from .verify import VerifyResult, verify_frame

# The rest of the API loads torch, so it is imported on first use: `import refframe` (and the
# command line's --help) stays fast, and Ctrl-C while torch loads is an ordinary interrupt.
_LAZY = {
    "PCACache": "cache",
    "load_checkpoint_w": "inputs",
    "Frame": "frame",
    "VarianceReport": "frame",
    "load_frame": "frame",
    "save_frame": "frame",
    "build_frame": "build",
    "build_frame_cached": "build",
    "build_frames": "build",
    "pca": "build",
    "save_frames": "build",
    "covariance": "ops",
    "gather_mean": "ops",
    "segment_mean": "ops",
    "nearest": "projection",
    "project": "projection",
    "radii": "projection",
    "last_cpu_covariance": "_native",
    "native_available": "_native",
    "native_status": "_native",
    "VerifyResult": "verify",
    "verify_frame": "verify",
}


# Submodules reachable as attributes without an import of their own: refframe.plot.spectrum(frame).
_LAZY_MODULES = ("plot",)


def __getattr__(name: str) -> object:
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'refframe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))


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

__all__ += ["nearest", "project", "radii"]

__all__ += ["DependencyError", "DistributedError"]
