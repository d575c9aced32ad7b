"""refframe: cluster-centric reference frames of token embedding matrices."""

from __future__ import annotations

from .cache import PCACache
from .checkpoint import load_checkpoint_w
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
from .frame import Frame, VarianceReport, build_frame, pca
from .framefile import load_frame, save_frame
from .multi import build_frame_cached, build_frames, save_frames
from .ops import covariance, gather_mean, native_available, native_status, segment_mean
from .verify import VerifyResult, verify_frame

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
