"""The layers' shared base, and SyncBatchNorm / SyncBatchNormAct2d on :func:`syncnorm.functional.sync_batch_norm`."""

from __future__ import annotations

import copy
import inspect
import itertools
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import collectives, core, guard, pooling
from .functional import batch_norm_eval, batch_norm_local, batch_norm_training

__all__ = ["SyncBatchNorm", "SyncBatchNormAct2d", "SyncLayer"]

_layer_numbers = itertools.count()
_POOL = "_statistics_pool"  # in __dict__ only while an accumulation window is open
# torch >= 2.13 can build an affine BatchNorm without a bias.
_BATCHNORM_HAS_BIAS_FLAG = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def recomputing_in_backward() -> bool:
    """True while activation checkpointing re-runs a forward inside the backward pass."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class SyncLayer:
    """What every synchronised layer holds on top of torch's ``_NormBase`` state.

    * ``process_group``: the ranks to synchronise over (``None``: the default group).
    * ``layer_name``: names the layer in errors and in the guard; ``<Class>#<n>`` when built,
      the module path after :func:`syncnorm.convert_sync_batchnorm` (the same on every rank).
    * ``check``: the guard switch for this layer (``None``: ``SYNCNORM_CHECK``/``set_check``).
    * The step: ``num_batches_tracked`` and this step's momentum, rolled back if the call fails
      (the running statistics are written only once the call has succeeded).
    * The accumulation window (:func:`syncnorm.accumulate`): while one is open, training
      forwards pool their statistics instead of moving the running statistics, which move once
      when the window closes, or before the layer goes to eval mode.
    * Copies share the group; pickling refuses a group it cannot save. A ``ProcessGroup`` (or
      ``DeviceMesh``) is a process-wide resource that cannot be pickled, and copying it would not
      make a new group anyway, so ``copy.deepcopy`` of a model (EMA helpers such as timm's
      ``ModelEmaV3`` and torch's ``AveragedModel``) gives layers synchronising over the very same
      group. ``torch.save`` of a whole module holding a group raises a ``TypeError`` that says
      what to do; with ``process_group=None`` it saves as usual.
    """

    process_group: collectives.SyncGroup
    layer_name: str
    check: Optional[bool]
    # How an accumulation window pools this layer's statistics (second moments, or the statistic
    # itself), and the least pooled count that still moves the running statistics.
    _pools_moments = True
    _pool_min_count = 2

    def _init_sync(self, process_group: collectives.SyncGroup) -> None:
        self.process_group = process_group
        self.layer_name = f"{type(self).__name__}#{next(_layer_numbers)}"
        self.check = None

    def _group(self):
        """The process group when it has more than one rank, else None (this process alone)."""
        return collectives.synchronised_group(self.process_group)

    def _tracking(self) -> bool:
        return self.track_running_stats and self.running_mean is not None

    def _pool(self) -> Optional[pooling.StatisticsPool]:
        return self.__dict__.get(_POOL)

    def _running_target(self, recomputing: Optional[bool] = None) -> Optional[pooling.Running]:
        """What a training forward updates: the running buffers, the open window's pool, or nothing.

        ``recomputing``: :func:`recomputing_in_backward`, when the caller has asked already.
        """
        if not self._tracking():
            return None
        pool = self._pool()
        if pool is None:
            return self.running_mean, self.running_var
        # Activation checkpointing re-runs the forward in backward: the window already has it.
        if recomputing is None:
            recomputing = recomputing_in_backward()
        return pooling.ALREADY_POOLED if recomputing else pool

    def _open_window(self) -> None:
        if self._tracking() and self._pool() is None:
            self.__dict__[_POOL] = pooling.StatisticsPool(moments=self._pools_moments)

    def _close_window(self) -> None:
        try:
            self._flush_window()
        finally:
            self.__dict__.pop(_POOL, None)

    def _flush_window(self) -> None:
        """Move the running statistics by what the window pooled: one step, as one forward on all of it."""
        pool = self._pool()
        if pool is None or pool.sums is None:
            return
        with torch.no_grad():
            momentum = self._window_momentum()
            pool.flush(self.running_mean, self.running_var, momentum, min_count=self._pool_min_count)

    def _window_momentum(self) -> core.Momentum:
        self.num_batches_tracked.add_(1)
        return core.step_momentum(self.momentum, self.num_batches_tracked)

    def train(self, mode: bool = True) -> Any:
        if not mode:
            self._flush_window()  # eval must see the statistics of every micro-batch so far
        return super().train(mode)

    def _begin_step(self, synchronised: bool) -> tuple[Optional[pooling.Running], bool, core.Momentum]:
        """Count a training step: (what it updates, whether it counted, momentum for the update).

        What it updates is :meth:`_running_target`'s. Activation checkpointing re-runs the forward
        inside backward: batch statistics again, but the running statistics were updated by the
        original forward, so momentum 0; an accumulation window counts its step when it closes.
        """
        recomputing = recomputing_in_backward()
        running = self._running_target(recomputing)
        if running is None or isinstance(running, pooling.StatisticsPool) or recomputing:
            return running, False, 0.0
        steps = self.num_batches_tracked
        steps.add_(1)
        if self.momentum is None and not synchronised:
            return running, True, 1.0 / float(steps)  # what F.batch_norm is given, as torch
        return running, True, core.step_momentum(self.momentum, steps)

    def _undo_step(self, counted: bool) -> None:
        if counted:
            self.num_batches_tracked.sub_(1)

    def __deepcopy__(self, memo: dict) -> Any:
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group  # deepcopy hands out memo entries as they are
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        state = {key: value for key, value in self.__dict__.items() if key != _POOL}  # a window is not copied
        copied.__setstate__(copy.deepcopy(state, memo))
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
        state = super().__getstate__()
        return {key: value for key, value in state.items() if key != _POOL}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layer_name={self.layer_name!r}"


class SyncBatchNorm(SyncLayer, _BatchNorm):
    r"""BatchNorm whose training statistics cover the global mini-batch of all ranks.

    A drop-in for ``nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` (same
    arguments, same ``state_dict`` keys, an ``isinstance`` of ``_BatchNorm``) that:

    * runs on CPU (gloo) as well as CUDA (NCCL): it is deliberately *not* a
      ``torch.nn.SyncBatchNorm``, which ``DistributedDataParallel`` rejects on CPU;
    * does one all_reduce of ``2C + 3`` float64 values per forward and one of
      ``2C + 2`` per backward: the statistics, and a fingerprint of the layer and the
      pass, so that ranks at different layers raise instead of mixing statistics. The
      payload does not grow with the world size, and empty ranks need no mask (they add
      zeros), so there is no host sync;
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
        num_features: the number of channels C of an (N, C) or (N, C, *spatial) input.
        eps: added to the variance before its square root.
        momentum: weight of the new batch in the running statistics;
            ``None`` for a cumulative average over the batches seen.
        affine: learn a per-channel weight (gamma) and bias (beta).
        track_running_stats: keep running statistics for eval mode; without them
            eval mode normalises each rank's batch by its own statistics (eval
            never communicates).
        process_group: ranks to synchronise over: ``None`` (default group), a
            ``ProcessGroup`` (see :func:`syncnorm.new_sync_groups`) or a 1-D
            ``DeviceMesh`` such as ``mesh["dp"]``.
        device: where the parameters and buffers are created.
        dtype: their dtype; float16 and bfloat16 inputs work with float32 parameters.
        bias: with ``affine=True``, learn the bias too (``False`` needs torch >= 2.13).
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
        self._init_sync(process_group)

    def _check_input_dim(self, input: Tensor) -> None:
        pass  # forward validates, naming the layer

    def forward(self, input: Tensor) -> Tensor:
        core.validate_input(input, self.num_features, self.layer_name)
        if not self.training:
            running = (self.running_mean, self.running_var) if self._tracking() else None
            # Eval never communicates (ranks may run different numbers of eval batches),
            # except for the opt-in consistency guard.
            if guard.check_requested(self.check):
                guard.verify_eval(self._group(), input, self.layer_name, True, guard.KIND_FORWARD)
            return batch_norm_eval(input, running, self.weight, self.bias, self.eps)
        group = self._group()
        running, counted, momentum = self._begin_step(group is not None)
        try:
            if group is None and not isinstance(running, pooling.StatisticsPool):
                # Not distributed, or a group of one rank: nn.BatchNorm.
                return batch_norm_local(input, running, self.weight, self.bias, momentum, self.eps, self.layer_name)
            return batch_norm_training(
                input, running, self.weight, self.bias, momentum, self.eps, group, self.layer_name, self.check
            )
        except BaseException:
            self._undo_step(counted)
            raise


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
