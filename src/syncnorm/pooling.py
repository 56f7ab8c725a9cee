"""Running statistics pooled over a window of training forwards (gradient accumulation).

Every synchronised forward already knows the global statistics of its batch: count, mean and
variance per channel, identical on every rank. A :class:`StatisticsPool` adds them up, weighted
by count, instead of moving the running statistics at each micro-batch; :meth:`StatisticsPool.flush`
then moves them once, as one training forward on all the window's samples together would. No
collective is needed for that: every rank pools the same numbers.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import core

__all__ = ["ALREADY_POOLED", "StatisticsPool", "record_step"]


class StatisticsPool:
    """Count-weighted sums of per-channel statistics, ``[n, sum n * mean, sum n * second]`` in float64.

    ``second`` is ``var + mean^2`` for BatchNorm (``moments=True``): pooled second moments give the
    biased variance of the union of the batches. SyncInstanceNorm's statistic is itself an
    average over instances (of the instances' means and unbiased variances), so it pools
    linearly (``moments=False``). The sums stay on the statistics' device: nothing is read back.
    """

    def __init__(self, moments: bool) -> None:
        self.moments = moments
        self.sums: Optional[Tensor] = None

    def add(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        mean, var = core.cast(mean.detach(), torch.float64), core.cast(var.detach(), torch.float64)
        count = count.detach().reshape(1).to(torch.float64)
        second = torch.addcmul(var, mean, mean) if self.moments else var
        sums = torch.cat((count, count * mean, count * second))
        self.sums = sums if self.sums is None else self.sums + sums

    def flush(self, running_mean: Tensor, running_var: Tensor, momentum: core.Momentum, *, min_count: int) -> None:
        """Move the running statistics once, by the pooled statistics; then start empty."""
        if self.sums is None:
            return
        sums, self.sums = self.sums, None
        channels = (sums.numel() - 1) // 2
        count, first, second = sums.split_with_sizes((1, channels, channels))
        scale = count.clamp_min(1).reciprocal()  # an empty window leaves the buffers as they are
        mean, var = first * scale, second * scale
        if self.moments:
            var = var.addcmul_(mean, mean, value=-1).clamp_min_(0)
        host_count = None if count.is_cuda or torch.compiler.is_compiling() else float(count)
        core.update_running_stats(
            running_mean, running_var, mean, var, count, momentum, host_count, min_count=min_count,
            unbiased=self.moments,
        )  # fmt: skip


class _AlreadyPooled(StatisticsPool):
    """The target of a forward that activation checkpointing re-runs in backward: pools nothing.

    A pool still, so the recomputation takes the same path (and saves the same tensors) as the
    forward it repeats; the window already holds that forward's statistics.
    """

    def add(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        pass


ALREADY_POOLED = _AlreadyPooled(moments=True)

Running = Union[tuple[Tensor, Tensor], StatisticsPool]


def record_step(
    running: Optional[Running], mean: Tensor, var: Tensor, count: Tensor, momentum: core.Momentum,
    host_count: Optional[float] = None, *, min_count: int = 2, unbiased: bool = True,
) -> None:  # fmt: skip
    """After a successful training forward: update the running statistics, or pool the batch's.

    ``min_count`` and ``unbiased`` go to :func:`syncnorm.core.update_running_stats`; a pool applies
    its own when it is flushed.
    """
    if running is None:
        return
    if isinstance(running, StatisticsPool):
        running.add(mean, var, count)
    else:
        core.update_running_stats(
            *running, mean, var, count, momentum, host_count, min_count=min_count, unbiased=unbiased
        )
