"""Turn BatchNorm + invertible-activation pairs of a model into :class:`syncnorm.InPlaceABN`.

:func:`fuse_inplace_abn` looks inside every ``nn.Sequential`` for a BatchNorm directly
followed by a ``nn.LeakyReLU`` (positive slope) or ``nn.ELU`` (positive alpha), and fuses the
pair into one ``InPlaceABN`` that keeps only its output for backward. It only fuses where the
result computes exactly what the pair did, so it is safe to run on any model:

* only inside ``nn.Sequential``: there the BatchNorm's output goes to the activation and nowhere
  else, which is what lets the fused layer drop it. A pair written as two calls in some
  ``forward`` cannot be seen from outside, and is left alone;
* only exact ``nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and ``syncnorm.SyncBatchNorm``
  (a subclass may compute something else) and exact ``nn.LeakyReLU`` / ``nn.ELU``;
* not where either module has hooks (they would see other tensors, or none);
* not where a channel's |gamma| is below ``eps``: InPlaceABN floors |gamma| at ``eps`` (the
  tiny-gamma rule, see ``src/syncnorm/inplace_abn.py``), which would change that channel's output.

The BatchNorm becomes the ``InPlaceABN`` under its own name, holding the very same parameter and
buffer objects, so ``state_dict`` keys and optimiser state carry over; the activation's place
holds an ``nn.Identity``. Like :func:`syncnorm.convert_sync_batchnorm`, the fused layer
synchronises its statistics over ``process_group`` in distributed training.
:func:`syncnorm.revert_sync_batchnorm` undoes the fusion: the pair comes back as plain
BatchNorm and the very activation module it had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from . import collectives
from .convert import UNFUSED_PAIR, rebuild_as
from .inplace_abn import InPlaceABN
from .modules import SyncBatchNorm

__all__ = ["FusionReport", "fuse_inplace_abn"]

_FUSABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, SyncBatchNorm)


@dataclass
class FusionReport:
    """What :func:`fuse_inplace_abn` did: the module paths of the fused BatchNorms, and the pairs it left, with why."""

    fused: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)


def _activation_of(module: Optional[nn.Module]) -> Optional[tuple[str, float]]:
    if type(module) is nn.LeakyReLU and module.negative_slope > 0:
        return "leaky_relu", float(module.negative_slope)
    if type(module) is nn.ELU and module.alpha > 0:
        return "elu", float(module.alpha)
    return None


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, name, None)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _why_not(norm: nn.Module, activation: nn.Module) -> Optional[str]:
    if _has_hooks(norm) or _has_hooks(activation):
        return "a module of the pair has hooks"
    if norm.affine and norm.weight is not None:
        tiny = (norm.weight.detach().abs() < norm.eps).nonzero().flatten().tolist()
        if tiny:
            return f"|gamma| < eps={norm.eps} in channels {tiny[:8]}: InPlaceABN would floor it"
    return None


def fuse_inplace_abn(
    module: nn.Module, process_group: collectives.SyncGroup = None, *, inplace: bool = False
) -> FusionReport:
    """Fuse, in place, every exact BatchNorm + LeakyReLU/ELU pair of ``module``'s ``nn.Sequential`` containers.

    Args:
        module: the model; changed in place.
        process_group: the group the fused layers synchronise over (``None``: the default group).
        inplace: passed to every :class:`syncnorm.InPlaceABN` (write the output over the input
            where autograd allows; see :func:`syncnorm.functional.writes_in_place`).

    Returns a :class:`FusionReport`: the fused BatchNorms' module paths, and the pairs left as
    they were with the reason (hooks, |gamma| below eps). A BatchNorm followed by ``nn.ReLU`` is
    not a pair: ReLU is not invertible.
    """
    report = FusionReport()
    for path, container in list(module.named_modules()):
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            norm, activation = container._modules[first], container._modules[second]
            act = _activation_of(activation)
            if type(norm) not in _FUSABLE_NORMS or act is None:
                continue
            where = f"{path}.{first}" if path else first
            reason = _why_not(norm, activation)
            if reason is not None:
                report.left[where] = reason
                continue
            fused = rebuild_as(norm, InPlaceABN)
            fused.activation, fused.activation_param = act
            fused.inplace, fused.process_group = inplace, process_group
            fused.layer_name = where
            fused.check = norm.__dict__.get("check")
            # What revert_sync_batchnorm needs to undo the fusion. Set through __dict__: as an
            # attribute the activation would become a submodule of the fused layer.
            fused.__dict__[UNFUSED_PAIR] = (type(norm), activation)
            container._modules[first] = fused
            container._modules[second] = nn.Identity()
            report.fused.append(where)
    return report
