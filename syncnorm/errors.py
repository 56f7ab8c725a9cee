"""Every exception and warning syncnorm raises, reported under ``syncnorm.<Name>``."""

from __future__ import annotations

__all__ = [
    "PreciseBNWarning",
    "SyncNormCollectiveError",
    "SyncNormDriftWarning",
    "SyncNormMismatchError",
    "SyncNormNonFiniteError",
]


class SyncNormCollectiveError(RuntimeError):
    """A syncnorm collective failed: a peer died, or the group's timeout expired."""


class SyncNormMismatchError(RuntimeError):
    """The ranks disagreed about which layer they are at, or about its inputs."""


class SyncNormNonFiniteError(FloatingPointError, RuntimeError):
    """The synchronised statistics contain NaN or Inf."""


class PreciseBNWarning(UserWarning):
    """precise_bn left a layer's statistics as they were, or used fewer batches than asked for."""


class SyncNormDriftWarning(UserWarning):
    """The running statistics of a synchronised layer differ between ranks."""


# Reported (repr, tracebacks, pickles) under the path the docs and users write.
for _cls in (
    SyncNormCollectiveError,
    SyncNormMismatchError,
    SyncNormNonFiniteError,
    PreciseBNWarning,
    SyncNormDriftWarning,
):
    _cls.__module__ = "syncnorm"
