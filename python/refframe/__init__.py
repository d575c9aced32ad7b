"""refframe: cluster-centric reference frames of token embedding matrices."""

from __future__ import annotations

from .errors import (
    BackendError,
    ClusterIdsError,
    InputError,
    KeyNotFoundError,
    NonFiniteError,
    OutputError,
    RefframeError,
    ResourceError,
    VerificationError,
)
from .frame import Frame, VarianceReport, build_frame, pca
from .framefile import load_frame, save_frame
from .ops import covariance, gather_mean, native_available, native_status, segment_mean
from .verify import VerifyResult, verify_frame

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Frame",
    "VarianceReport",
    "VerifyResult",
    "ClusterIdsError",
    "InputError",
    "KeyNotFoundError",
    "NonFiniteError",
    "OutputError",
    "RefframeError",
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
