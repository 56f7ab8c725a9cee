"""Normalisation variants on the same core math as SyncBatchNorm: LayerNorm2d, SyncInstanceNorm, get_norm.

All of them are views into the batch-norm layout, where a "channel" is whatever
set of values is normalised together (dim 1) and every other dim is reduced:

* InstanceNorm of an (N, C, *spatial) tensor is batch norm of its
  ``(1, N*C, *spatial)`` view: each (sample, channel) pair is one "channel",
  normalised over its own spatial positions. This is also how torch's
  ``instance_norm`` works, and it is local to each sample, so the normalisation
  never needs other ranks; only the tracked running statistics are averaged
  over all ranks' instances (one all_reduce of ``2C + 3`` values, fingerprint included).
* LayerNorm2d normalises the C values at each position: batch norm of the
  ``(1, N*H*W, C)`` view, or, identically, layer norm of the channels-last view
  over its last dim, which is what it runs (measured faster, see its docstring).

Forward and backward are torch's native kernels, which compute exactly
    mean, biased var over the normalised axes,  x_hat = (x - mean) / sqrt(var + eps),
    y = gamma * x_hat + beta,
    dx = 1 / sqrt(var + eps) * (g - mean(g) - x_hat * mean(g * x_hat)),   g = gamma * dy,
so no layer carries its own copy of the math.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

from . import collectives, core, fingerprint, guard, pooling
from .functional import batch_norm_eval
from .modules import SyncBatchNorm, SyncLayer, recomputing_in_backward

__all__ = ["LayerNorm2d", "SyncInstanceNorm1d", "SyncInstanceNorm2d", "SyncInstanceNorm3d", "get_norm"]


def _channels_last_permutations(ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(N, C, *spatial) -> (N, *spatial, C) and back."""
    return (0, *range(2, ndim), 1), (0, ndim - 1, *range(1, ndim - 1))


class LayerNorm2d(nn.Module):
    r"""Channels-first LayerNorm: normalises the C values at each position of an (N, C, \*spatial) tensor.

    What ConvNeXt-style networks use on conv feature maps; ``nn.LayerNorm``
    normalises trailing dims only, so on an NCHW tensor it would need a permute
    round trip in the model code. Per sample n and position p, over the channels:
    ``mean = mean_c x``, ``var = mean_c (x - mean)^2`` (biased),
    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` with per-channel weight, bias.

    The core is ``F.layer_norm`` on the channels-last view ``x.permute(0, 2, 3, 1)``
    (a free view when the input is ``channels_last``): torch's native kernel, whose
    forward and backward are the batch-norm core's formulas with the channel axis as
    the normalised axis (the same math as batch norm of the ``(1, N*H*W, C)`` view,
    except that weight and bias vary along the normalised axis, so the backward uses
    ``g = weight * dy`` in place of ``dy``). That view through the batch-norm kernel
    gives the same numbers but is slower, on CPU and on CUDA (the docs' "Normalisation
    variants" page has the measurements); hence layer norm.

    The output has the input's memory format (``channels_last`` stays
    ``channels_last``; anything else comes back contiguous). Statistics are per
    sample, so nothing is ever synchronised across ranks.

    Deliberately not a subclass of ``nn.LayerNorm``: code that rewrites
    ``nn.LayerNorm`` layers (fused or quantised replacements) assumes the last
    dim is normalised and would silently change this layer's meaning.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        affine: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"LayerNorm2d: num_channels must be >= 1, got {num_channels}")
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"LayerNorm2d({self.num_channels}) expects input of shape (N, {self.num_channels}, *spatial), "
                f"got shape {tuple(input.shape)}"
            )
        to_last, from_last = _channels_last_permutations(input.dim())
        channels_last = input.permute(to_last)
        output = F.layer_norm(channels_last, (self.num_channels,), self.weight, self.bias, self.eps)
        output = output.permute(from_last)
        # F.layer_norm's output is dense in channels-last order; give a channels-first
        # (or strided) input a contiguous output, as a conv layer would.
        return output if channels_last.is_contiguous() else output.contiguous()

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


# ---------------------------------------------------------------------------------------------
# instance norm

_INSTANCENORM_HAS_BIAS_FLAG = "bias" in inspect.signature(_InstanceNorm.__init__).parameters


class _SyncInstanceNorm(SyncLayer, _InstanceNorm):
    """The shared body of SyncInstanceNorm1d/2d/3d (the dimension checks come from torch's classes)."""

    # Its statistic is an average over instances (means, unbiased variances): pooled linearly.
    _pools_moments = False
    _pool_min_count = 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        process_group: collectives.SyncGroup = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
    ) -> None:
        if not (bias or _INSTANCENORM_HAS_BIAS_FLAG):
            raise TypeError(f"{type(self).__name__}(bias=False) needs torch >= 2.13 (this is {torch.__version__})")
        extra = {"bias": bias} if _INSTANCENORM_HAS_BIAS_FLAG else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **extra)
        self._init_sync(process_group)

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        # torch's _InstanceNorm.forward has checked the dims and unsqueezed unbatched input.
        tracking = self._tracking()
        core.validate_input(input, self.num_features if (self.affine or tracking) else None, self.layer_name)
        if not self.training and tracking:
            # Eval with running statistics: every instance gets the same per-channel
            # affine map, which is eval-mode batch norm. Never communicates (ranks may
            # run different eval batches), except to join the opt-in guard.
            if guard.check_requested(self.check) and self._synchronises_running_stats():
                guard.verify_eval(self._group(), input, self.layer_name, True, guard.KIND_RUNNING_STATS)
            return batch_norm_eval(input, (self.running_mean, self.running_var), self.weight, self.bias, self.eps)
        spatial = input.shape[2:]
        if math.prod(spatial) <= 1:
            raise ValueError(
                f"syncnorm: layer '{self.layer_name}' normalises each instance over its spatial positions and "
                f"needs more than 1 of them, got input of shape {tuple(input.shape)}"
            )
        if not (self.training and tracking and self.momentum):
            return self._normalise_instances(input, None)
        if self._group() is None:
            collectives.warn_if_launched_without_group(self.layer_name)
        # With momentum 1 the kernel writes each instance's mean and unbiased variance
        # into these buffers in the same pass that normalises (zeros, since 0 * NaN
        # garbage would stay NaN).
        batch, channels = input.shape[:2]
        stats_dtype = core.stats_dtype(input.dtype)
        instance_stats = (
            input.new_zeros(batch * channels, dtype=stats_dtype),
            input.new_zeros(batch * channels, dtype=stats_dtype),
        )
        output = self._normalise_instances(input, instance_stats)
        if not recomputing_in_backward():  # activation checkpointing: already updated
            self._update_running_stats(*(s.view(batch, channels) for s in instance_stats), input)
        return output

    def _normalise_instances(self, input: Tensor, instance_stats: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        """Batch norm of the (1, N*C, *spatial) view, with the per-channel weight repeated over N."""
        batch, channels, spatial = input.shape[0], input.shape[1], input.shape[2:]
        instances = input.reshape(1, batch * channels, *spatial)
        scratch_mean, scratch_var = instance_stats if instance_stats is not None else (None, None)
        if batch == 0 and self.weight is not None:
            # The kernel rejects a 0-element weight; a broadcast affine still gives weight
            # and bias their (zero) gradients, which DDP expects from an empty rank.
            normalised = F.batch_norm(instances, None, None, None, None, True, 0.0, self.eps).reshape(input.shape)
            shape = (1, channels) + (1,) * len(spatial)
            output = normalised * self.weight.view(shape).to(input.dtype)
            return output if self.bias is None else output + self.bias.view(shape).to(input.dtype)
        # Weight and bias in the statistics' dtype, as the other layers (mixed precision).
        weight, bias = core.affine_in_dtype(self.weight, self.bias, core.stats_dtype(input.dtype))
        weight = None if weight is None else weight.repeat(batch)
        bias = None if bias is None else bias.repeat(batch)
        output = F.batch_norm(instances, scratch_mean, scratch_var, weight, bias, True, 1.0, self.eps)
        return output.reshape(input.shape)

    def _update_running_stats(self, instance_mean: Tensor, instance_var: Tensor, input: Tensor) -> None:
        """running = lerp(running, average over all ranks' instances, momentum), as nn.InstanceNorm on one process.

        One all_reduce of [layer fingerprint (2), instance count, sum of means (C), sum of
        unbiased variances (C)] in float64 through the core, so uneven batches weigh each
        instance equally and every rank ends with identical buffers. No instances anywhere (all
        batches empty) leaves the buffers as they are (nn.InstanceNorm would write NaN).
        """
        what = "running statistics"
        with torch.no_grad():
            sums = core.pack(
                instance_mean.shape[0],
                instance_mean.sum(0, dtype=torch.float64),
                instance_var.sum(0, dtype=torch.float64),
            )
            payload = torch.cat((fingerprint.fingerprint_head(self.layer_name, what, sums), sums))
            group = self._group() if self._synchronises_running_stats() else None
            if group is not None:
                core.reduce_payload(
                    payload, group, layer=self.layer_name, what=what, check=guard.check_requested(self.check),
                    input=input, kind=guard.KIND_RUNNING_STATS,
                )  # fmt: skip
            count, mean, var, host_count = core.reduced_means(payload, group, self.layer_name, what)
            pooling.record_step(
                self._running_target(), mean, var, count, self.momentum, host_count, min_count=self._pool_min_count,
                unbiased=self._pools_moments,
            )  # fmt: skip

    def _window_momentum(self) -> core.Momentum:
        return self.momentum  # as nn.InstanceNorm: no step count

    def _synchronises_running_stats(self) -> bool:
        return (
            self.track_running_stats
            and bool(self.momentum)  # momentum None or 0 leaves the buffers unchanged, as in torch
            and self._group() is not None
        )


_SYNC_INSTANCE_NORM_DOC = r"""InstanceNorm{dims}d whose tracked running statistics cover the instances of all ranks.

    A drop-in for ``nn.InstanceNorm{dims}d`` (a subclass of it: same arguments, defaults
    ``affine=False, track_running_stats=False``, same input checks and ``state_dict``
    keys) plus ``process_group`` (``None`` for the default group, a ``ProcessGroup``
    or a 1-D ``DeviceMesh``).

    Each (sample, channel) is normalised over its own spatial positions, so the output
    and its gradients never need other ranks. With ``track_running_stats=True``, in
    training mode, the running mean and running (unbiased) variance are updated with
    the average over every rank's instances, weighted by instance count, through one
    all_reduce of ``2C + 3`` float64 values: they stay identical on all ranks and equal
    what ``nn.InstanceNorm{dims}d`` computes on the global batch. Eval mode uses the
    running statistics (when tracked) and never communicates; with the consistency
    guard on it joins the guard's check, like :class:`syncnorm.SyncBatchNorm`.

    Differences from ``nn.InstanceNorm{dims}d``: if every rank's batch is empty the
    running statistics are left unchanged (torch writes NaN), and the error for a
    channel mismatch with ``track_running_stats=True`` is raised before any collective.

    Args:
        num_features: the number of channels C.
        eps: added to each instance's variance before its square root.
        momentum: weight of the new batch in the running statistics;
            ``None`` for a cumulative average over the batches seen.
        affine: learn a per-channel weight and bias.
        track_running_stats: keep running statistics, synchronised over the group,
            and use them in eval mode. Without them nothing is ever communicated.
        process_group: ranks to synchronise the running statistics over: ``None``
            (default group), a ``ProcessGroup`` or a 1-D ``DeviceMesh``.
        device: where the parameters and buffers are created.
        dtype: their dtype.
        bias: with ``affine=True``, learn the bias too (``False`` needs torch >= 2.13).
    """


class SyncInstanceNorm1d(_SyncInstanceNorm, nn.InstanceNorm1d):
    __doc__ = _SYNC_INSTANCE_NORM_DOC.format(dims=1)


class SyncInstanceNorm2d(_SyncInstanceNorm, nn.InstanceNorm2d):
    __doc__ = _SYNC_INSTANCE_NORM_DOC.format(dims=2)


class SyncInstanceNorm3d(_SyncInstanceNorm, nn.InstanceNorm3d):
    __doc__ = _SYNC_INSTANCE_NORM_DOC.format(dims=3)


# ---------------------------------------------------------------------------------------------
# factory


def _group_norm(num_channels: int, num_groups: Optional[int] = None, **kwargs: Any) -> nn.GroupNorm:
    # 32 groups (Wu & He's default) when C is a multiple of 32, otherwise the largest
    # power of two below 32 that divides C, so any channel count works.
    return nn.GroupNorm(math.gcd(32, num_channels) if num_groups is None else num_groups, num_channels, **kwargs)


_NORM_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "syncbn": SyncBatchNorm,
    "ln2d": LayerNorm2d,
    "in": nn.InstanceNorm2d,
    "syncin": SyncInstanceNorm2d,
    "gn": _group_norm,
}


def get_norm(name: Optional[str], num_channels: int, **kwargs: Any) -> nn.Module:
    """Build the normalisation layer a config names, for (N, C, H, W) feature maps.

    ``"bn"`` nn.BatchNorm2d, ``"syncbn"`` :class:`syncnorm.SyncBatchNorm`, ``"ln2d"``
    :class:`LayerNorm2d`, ``"in"`` nn.InstanceNorm2d, ``"syncin"``
    :class:`SyncInstanceNorm2d`, ``"gn"`` nn.GroupNorm with ``num_groups=gcd(32, C)``
    unless given. ``kwargs`` go to the layer's constructor. ``""`` or ``None`` mean no
    normalisation and return ``nn.Identity()`` (ignoring ``kwargs``), so the result can
    always be called and placed in an ``nn.Sequential``. Names are case-insensitive.
    """
    if name is None or name == "":
        return nn.Identity()
    factory = _NORM_FACTORIES.get(name.lower()) if isinstance(name, str) else None
    if factory is None:
        valid = ", ".join(repr(key) for key in _NORM_FACTORIES)
        raise ValueError(f"syncnorm.get_norm: unknown norm {name!r}; valid names are {valid}, or '' / None for none")
    return factory(num_channels, **kwargs)
