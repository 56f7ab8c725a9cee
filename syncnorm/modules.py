"""The layer: state, checks and running statistics around :func:`syncnorm.functional.sync_batch_norm`."""

from __future__ import annotations

import copy
import inspect
import itertools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import collectives
from .functional import (
    affine_in_dtype,
    check_requested,
    statistics_dtype,
    sync_batch_norm,
    validate_input,
    verify_eval_consistency,
)

__all__ = ["SharesProcessGroup", "SyncBatchNorm", "SyncBatchNormAct2d"]

_layer_counter = itertools.count()
# torch >= 2.13 can build an affine BatchNorm without a bias.
_BATCHNORM_HAS_BIAS_FLAG = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def recomputing_in_backward() -> bool:
    """True while activation checkpointing re-runs a forward inside the backward pass."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class SharesProcessGroup:
    """Copies share the layer's ``process_group``; pickling refuses a group it cannot save.

    A ``ProcessGroup`` (or a ``DeviceMesh``) is a process-wide resource: it cannot be
    pickled, and copying it would not make a new group anyway. ``copy.deepcopy`` of a
    model (what EMA helpers such as timm's ``ModelEmaV3`` and torch's ``AveragedModel``
    do) therefore gives layers that synchronise over the very same group object.
    ``torch.save`` of a whole module whose layer holds a group raises a ``TypeError``
    that says what to do; with ``process_group=None`` (the default group) it saves as usual.
    """

    def __deepcopy__(self, memo: dict) -> Any:
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group  # deepcopy hands out memo entries as they are
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        return copied

    def __getstate__(self) -> dict:
        if self.__dict__.get("process_group") is not None:
            raise TypeError(
                f"syncnorm: layer '{self.__dict__.get('layer_name')}' ({type(self).__name__}) holds a process group "
                f"({type(self.process_group).__name__}), which cannot be pickled, so this module cannot be saved "
                "whole (torch.save(model)). Save model.state_dict() instead (recommended: the keys are "
                "nn.BatchNorm's), or set layer.process_group = None (the default group) on every syncnorm layer "
                "before saving and set the group again after loading."
            )
        return super().__getstate__()


class SyncBatchNorm(SharesProcessGroup, _BatchNorm):
    r"""BatchNorm whose training statistics cover the global mini-batch of all ranks.

    A drop-in for ``nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` (same
    arguments, same ``state_dict`` keys, an ``isinstance`` of ``_BatchNorm``) that:

    * runs on CPU (gloo) as well as CUDA (NCCL): it is deliberately *not* a
      ``torch.nn.SyncBatchNorm``, which ``DistributedDataParallel`` rejects on CPU;
    * does one all_reduce of ``2C + 1`` float64 values per forward and one of
      ``2C`` values per backward. Payload does not grow with the world size, and
      empty ranks need no mask (they add zeros), so there is no host sync;
    * keeps the variance itself in float64 (not ``1/invstd^2 - eps``), so it stays
      right when the mean is large next to the standard deviation or the
      variance is small next to eps;
    * is one custom op per pass, so ``torch.compile(fullgraph=True)`` traces it.

    Trade-offs: the float64 all_reduce moves twice the bytes of a float32 one
    (still O(C), tiny next to a conv's activations); the weight and bias
    gradients are each rank's local share, as with any DDP parameter.

    In eval mode, with ``track_running_stats=True``, it uses the running statistics
    and never communicates. Outside ``torch.distributed`` or in a group of one rank
    it is exactly ``nn.BatchNorm`` (torch's native kernel).

    Args:
        process_group: ranks to synchronise over: ``None`` (default group), a
            ``ProcessGroup`` (see :func:`syncnorm.new_sync_groups`) or a 1-D
            ``DeviceMesh`` such as ``mesh["dp"]``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: collectives.SyncGroup = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
    ) -> None:
        if not bias and not _BATCHNORM_HAS_BIAS_FLAG:
            raise TypeError("syncnorm.SyncBatchNorm(bias=False) needs torch >= 2.13 (its BatchNorm has no bias flag)")
        extra = {"bias": bias} if _BATCHNORM_HAS_BIAS_FLAG else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **extra)
        self.process_group = process_group
        # The name used in error messages and by the consistency guard; convert_sync_batchnorm
        # replaces it with the module path, which is the same on every rank.
        self.layer_name = f"SyncBatchNorm#{next(_layer_counter)}"
        self.check: Optional[bool] = None  # None: follow SYNCNORM_CHECK / syncnorm.set_check

    def _check_input_dim(self, input: Tensor) -> None:
        pass  # validate_input in the functional layer raises with the layer's name

    def forward(self, input: Tensor) -> Tensor:
        tracking = self.track_running_stats and self.running_mean is not None
        momentum: Any = 0.0 if self.momentum is None else self.momentum
        if not self.training:
            # Eval never communicates (ranks may run different numbers of eval batches),
            # except for the opt-in consistency guard.
            validate_input(input, self.num_features, self.layer_name)
            if check_requested(self.check) and self._synchronised():
                verify_eval_consistency(input, collectives.resolve_group(self.process_group), self.layer_name)
            running_mean = self.running_mean if tracking else None
            weight, bias = affine_in_dtype(self.weight, self.bias, statistics_dtype(input.dtype, running_mean))
            return F.batch_norm(
                input, running_mean, self.running_var if tracking else None, weight, bias, not tracking, 0.0, self.eps
            )
        # Activation checkpointing re-runs this forward inside backward: batch statistics
        # again (the output must be the same, and so must what autograd saves), but the
        # running statistics were already updated by the original forward: momentum 0.
        counting = tracking and not recomputing_in_backward()
        if counting:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, kept on the device
                if self._synchronised():
                    momentum = torch.reciprocal(self.num_batches_tracked.to(self.running_mean.dtype))
                else:
                    momentum = 1.0 / float(self.num_batches_tracked)
        elif tracking:
            momentum = 0.0
        try:
            return sync_batch_norm(
                input,
                self.running_mean if tracking else None,
                self.running_var if tracking else None,
                self.weight,
                self.bias,
                True,
                momentum,
                self.eps,
                self.process_group,
                layer=self.layer_name,
                check=self.check,
            )
        except BaseException:
            # Running statistics are written only after the op succeeds; undo the step count too.
            if counting:
                self.num_batches_tracked.sub_(1)
            raise

    def _synchronised(self) -> bool:
        return collectives.group_size(self.process_group) > 1

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layer_name={self.layer_name!r}"


class SyncBatchNormAct2d(SyncBatchNorm, nn.BatchNorm2d):
    """SyncBatchNorm followed by the layer's own ``drop`` and ``act`` modules, for timm's BatchNormAct2d.

    timm's ``BatchNormAct2d`` (and ``SyncBatchNormAct``) is a ``BatchNorm2d`` that applies
    ``self.drop`` then ``self.act`` after normalising; converting it to a plain
    synchronised BatchNorm would silently drop the activation. This layer keeps the
    very same ``drop`` and ``act`` modules (and every parameter, buffer and flag) and
    applies them after the synchronised normalisation. It is still an
    ``nn.BatchNorm2d`` instance, takes 4-D input only (as ``BatchNormAct2d``), and
    :func:`syncnorm.revert_sync_batchnorm` gives back ``BatchNormAct2d``. Made by
    :func:`syncnorm.convert_sync_batchnorm`; built directly, it starts with
    ``nn.Identity`` for both.
    """

    def __init__(self, num_features: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(
                f"syncnorm: layer '{self.layer_name}' ({type(self).__name__}) expects 4-D input (N, C, H, W), "
                f"got shape {tuple(input.shape)}"
            )
        return self.act(self.drop(super().forward(input)))
