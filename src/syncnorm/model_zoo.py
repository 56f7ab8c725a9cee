"""Conversion rules for the BatchNorm subclasses of model zoos (timm).

timm's ``BatchNormAct2d`` is an ``nn.BatchNorm2d`` whose ``forward`` applies
``self.drop`` and ``self.act`` after normalising (EfficientNet, MobileNetV3, RegNet,
CSPNet, ... use it); ``SyncBatchNormAct`` is timm's ``torch.nn.SyncBatchNorm`` twin.
Both become :class:`syncnorm.SyncBatchNormAct2d`, which keeps the very same ``act``
and ``drop`` modules, and both revert to ``BatchNormAct2d``.

The rules are registered lazily by class name: timm is imported only when a model
holds one of its layers (or when a directly built ``SyncBatchNormAct2d`` is reverted).
"""

from __future__ import annotations

import functools
import importlib

from torch import nn

from . import collectives
from .convert import _to_plain, _to_syncnorm, register_conversion, register_lazy_conversion
from .modules import SyncBatchNormAct2d

# timm >= 0.9 defines them in timm.layers; older releases in timm.models.layers.
_TIMM_MODULES = ("timm.layers.norm_act", "timm.models.layers.norm_act")


def _timm_batchnorm_act() -> type:
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:
        try:
            from timm.models.layers.norm_act import BatchNormAct2d
        except ImportError as err:
            raise ImportError(
                "syncnorm: reverting a SyncBatchNormAct2d gives timm's BatchNormAct2d, and timm is not "
                "installed (pip install timm)"
            ) from err
    return BatchNormAct2d


def _timm_sync_act_to_sync(module: nn.Module, process_group: collectives.SyncGroup) -> nn.Module:
    # timm's SyncBatchNormAct applies drop/act only where its converter set them.
    converted = _to_syncnorm(module, SyncBatchNormAct2d, process_group)
    for name in ("drop", "act"):
        if name not in converted._modules:
            converted.add_module(name, nn.Identity())
    return converted


def _to_timm_batchnorm_act(layer: nn.Module) -> nn.Module:
    return _to_plain(layer, _timm_batchnorm_act())


def _register_timm_rules(module_name: str) -> None:
    norm_act = importlib.import_module(module_name)
    register_conversion(norm_act.BatchNormAct2d, SyncBatchNormAct2d, _to_timm_batchnorm_act)
    register_conversion(norm_act.SyncBatchNormAct, _timm_sync_act_to_sync, _to_timm_batchnorm_act)


for _module in _TIMM_MODULES:
    for _name in ("BatchNormAct2d", "SyncBatchNormAct"):
        register_lazy_conversion(f"{_module}.{_name}", functools.partial(_register_timm_rules, _module))
# A SyncBatchNormAct2d built directly (not converted) reverts to timm's BatchNormAct2d too.
register_conversion(SyncBatchNormAct2d, SyncBatchNormAct2d, _to_timm_batchnorm_act)
