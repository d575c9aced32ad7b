"""Exception hierarchy: every failure refframe reports is a RefframeError with a one-line message."""

from __future__ import annotations


class RefframeError(Exception):
    """Base class of all errors raised by refframe."""


class InputError(RefframeError):
    """An input file or tensor is missing, unreadable, malformed or has the wrong shape or dtype."""


class FileFormatError(InputError):
    """A file is not a well-formed safetensors file (not safetensors at all, truncated, corrupted header)."""


class KeyNotFoundError(InputError):
    """A requested tensor key is not in the file."""


class CheckpointError(InputError):
    """A Hugging Face style checkpoint folder is unusable (no model.safetensors, a malformed
    model.safetensors.index.json, a shard it names is missing)."""


class ClusterIdsError(InputError):
    """Cluster token ids are malformed or out of range."""


class NonFiniteError(InputError):
    """W contains NaN or Inf values."""


class ResourceError(RefframeError):
    """The job would not fit in memory, or the output location cannot be written."""


class OutputError(ResourceError):
    """The output path is unusable (missing directory, not writable, a directory, disk full)."""


class NumericalError(RefframeError):
    """The computation failed numerically (covariance overflow, eigendecomposition did not converge)."""


class BackendError(RefframeError):
    """The requested backend cannot run here (e.g. native without the compiled library)."""


class VerificationError(RefframeError):
    """A frame file failed verification."""


class DependencyError(RefframeError):
    """An optional package a feature needs is not installed (matplotlib for refframe.plot)."""


class DistributedError(RefframeError):
    """A sharded build lost a rank (it failed, exited or was killed) or a collective timed out."""


class RefframeWarning(UserWarning):
    """A suspicious input that refframe accepts (e.g. duplicate cluster ids); the CLI prints it as
    one line `refframe: warning: ...`."""
