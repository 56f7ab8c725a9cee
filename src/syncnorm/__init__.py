"""syncnorm: synchronised normalisation layers for data-parallel PyTorch training.

BatchNorm statistics over the global mini-batch of all ranks, on CPU (gloo) and
CUDA (NCCL), one all_reduce of O(C) values per pass, torch.compile friendly.
"""

from . import functional
from .accumulate import AccumulationWindow, accumulate
from .collectives import group_size, new_sync_groups, resolve_group, set_wait_warning
from .convert import convert_sync_batchnorm, register_conversion, revert_sync_batchnorm
from .errors import (
    PreciseBNWarning,
    SyncNormCollectiveError,
    SyncNormDriftWarning,
    SyncNormMismatchError,
    SyncNormNonFiniteError,
    SyncNormSetupWarning,
    SyncNormWaitWarning,
)
from .fuse import FusionReport, fuse_inplace_abn
from .guard import check_enabled, set_check
from .inplace_abn import InPlaceABN, InPlaceABNSync
from .modules import SyncBatchNorm, SyncBatchNormAct2d
from .precise import PreciseBNResult, precise_bn
from .profiler import Profile, profile
from .variants import LayerNorm2d, SyncInstanceNorm1d, SyncInstanceNorm2d, SyncInstanceNorm3d, get_norm

__version__ = "0.1.0"

__all__ = [
    "accumulate",
    "AccumulationWindow",
    "LayerNorm2d",
    "SyncInstanceNorm1d",
    "SyncInstanceNorm2d",
    "SyncInstanceNorm3d",
    "get_norm",
    "InPlaceABN",
    "InPlaceABNSync",
    "SyncBatchNorm",
    "SyncBatchNormAct2d",
    "SyncNormCollectiveError",
    "SyncNormDriftWarning",
    "SyncNormMismatchError",
    "SyncNormNonFiniteError",
    "SyncNormSetupWarning",
    "SyncNormWaitWarning",
    "check_enabled",
    "convert_sync_batchnorm",
    "functional",
    "FusionReport",
    "fuse_inplace_abn",
    "group_size",
    "new_sync_groups",
    "PreciseBNResult",
    "PreciseBNWarning",
    "precise_bn",
    "Profile",
    "profile",
    "register_conversion",
    "resolve_group",
    "revert_sync_batchnorm",
    "set_check",
    "set_wait_warning",
]
