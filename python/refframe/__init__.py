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
from .ops import covariance, gather_mean, native_available, native_status, segment_mean

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ClusterIdsError",
    "InputError",
    "KeyNotFoundError",
    "NonFiniteError",
    "OutputError",
    "RefframeError",
    "ResourceError",
    "VerificationError",
    "__version__",
    "covariance",
    "gather_mean",
    "native_available",
    "native_status",
    "segment_mean",
]
