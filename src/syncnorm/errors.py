"""Every exception and warning syncnorm raises, reported under ``syncnorm.<Name>``."""

from __future__ import annotations

__all__ = [
    "PreciseBNWarning",
    "SyncNormCollectiveError",
    "SyncNormDriftWarning",
    "SyncNormMismatchError",
    "SyncNormNonFiniteError",
    "SyncNormSetupWarning",
    "SyncNormWaitWarning",
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


class SyncNormWaitWarning(UserWarning):
    """A rank has waited long in a syncnorm collective for the other ranks."""


class SyncNormSetupWarning(UserWarning):
    """The launcher started several processes, but torch.distributed is not initialised."""


# Reported (repr, tracebacks, pickles) under the path the docs and users write.
for _cls in (
    SyncNormCollectiveError,
    SyncNormMismatchError,
    SyncNormNonFiniteError,
    PreciseBNWarning,
    SyncNormDriftWarning,
    SyncNormWaitWarning,
    SyncNormSetupWarning,
):
    _cls.__module__ = "syncnorm"
