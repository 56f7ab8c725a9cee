"""Swap a model's BatchNorm layers for syncnorm's, and back."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import collectives
from .modules import SyncBatchNorm

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

# The layers convert_sync_batchnorm replaces.
CONVERTIBLE_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _move_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    # Share the very same Parameter and buffer objects: optimiser state, requires_grad,
    # device and dtype all carry over untouched.
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    if source.track_running_stats:
        target.running_mean = source.running_mean
        target.running_var = source.running_var
        target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def convert_sync_batchnorm(module: nn.Module, process_group: collectives.SyncGroup = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` with :class:`SyncBatchNorm`.

    Parameters and buffers are shared with the originals (same values, ``requires_grad``,
    device and dtype), and the training flag is kept. Each new layer is named after
    its module path, which is what error messages and the consistency guard report.
    Layers that already are syncnorm layers get the new ``process_group``. Given a bare
    BatchNorm, returns the new layer; otherwise converts in place and returns ``module``.
    """
    if collectives._is_device_mesh(process_group):
        collectives.resolve_group(process_group)  # a 2-D mesh fails here, before anything changes
    return _convert(module, process_group, "")


def _convert(module: nn.Module, process_group: collectives.SyncGroup, path: str) -> nn.Module:
    if isinstance(module, SyncBatchNorm):
        module.process_group = process_group
        if path:
            module.layer_name = path
        return module
    if isinstance(module, CONVERTIBLE_BATCHNORMS):
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device=_device_of(module),
            dtype=_dtype_of(module),
            **_bias_flag(module),
        )
        converted.layer_name = path or type(module).__name__
        converted._original_cls = None if isinstance(module, nn.SyncBatchNorm) else type(module)
        return _move_state(module, converted)
    for name, child in module.named_children():
        new_child = _convert(child, process_group, f"{path}.{name}" if path else name)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn syncnorm (and torch's) SyncBatchNorm layers back into plain BatchNorm.

    Layers made by :func:`convert_sync_batchnorm` get their original class back;
    others (built directly, or converted from ``torch.nn.SyncBatchNorm``) become
    ``nn.BatchNorm2d``, whose math is the same for any input rank except for its
    input-dimension check. State is shared, as in the conversion.
    """
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        cls = getattr(module, "_original_cls", None) or nn.BatchNorm2d
        plain = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=_device_of(module),
            dtype=_dtype_of(module),
            **_bias_flag(module),
        )
        return _move_state(module, plain)
    for name, child in module.named_children():
        new_child = revert_sync_batchnorm(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _bias_flag(module: _BatchNorm) -> dict:
    # An affine layer built with bias=False (torch >= 2.13) keeps that shape.
    return {"bias": False} if module.affine and module.bias is None else {}


def _first_tensor(module: nn.Module) -> Optional[torch.Tensor]:
    for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if tensor.is_floating_point():
            return tensor
    return None


def _device_of(module: nn.Module) -> Optional[torch.device]:
    tensor = _first_tensor(module)
    return None if tensor is None else tensor.device


def _dtype_of(module: nn.Module) -> Optional[torch.dtype]:
    tensor = _first_tensor(module)
    return None if tensor is None else tensor.dtype
