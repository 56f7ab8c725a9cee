"""The host-cost floor: syncnorm's CPU training step with nothing but its ops.

:class:`BareSyncBatchNorm` computes what ``syncnorm.SyncBatchNorm`` computes on CPU, with the same
collectives and payloads: local statistics, one float64 all_reduce of
``[f, f^2, n, n mean, n (var + mean^2)]`` forward and one of ``[f, f^2, sum dy, sum dy x_hat]``
backward, eval-mode batch-norm kernels for the output and the input gradient, the running update.
It leaves out everything else a layer owes its users: the input checks and their errors, the
fingerprint check, the error wrapping and release wait around the all_reduce, the guard switch,
accumulation windows, checkpoint recomputation, rollback on failure, ``momentum=None``, half
precision and float64 inputs, the compile dispatch, empty ranks and the rule for at most one
value. It is written for the fewest aten ops and the least Python per call (cached 0-dim
constants, in-place arithmetic, one foreach op where two vectors get the same factor), with
syncnorm's choice of kernels.

``bench_host.py --floor`` times it next to syncnorm, so the gap between the two is the cost of
those features; its check, before timing, compares it with syncnorm. Not for use in training.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm import core

_F64 = torch.float64
_FINGERPRINT = (7.0, 49.0)  # [f, f^2] of some layer: it costs what a real fingerprint costs


class _Constants:
    """Per-layer constants, rebuilt when the local count changes."""

    def __init__(self, count: int, channels: int, momentum: float, eps: float) -> None:
        self.count = count
        self.head = torch.tensor([*_FINGERPRINT, float(count)], dtype=_F64)
        self.weights = torch.full((3 + 2 * channels,), float(count), dtype=_F64)
        self.weights[:3] = 1.0
        self.backward_head = torch.tensor(_FINGERPRINT, dtype=_F64)
        self.keep = torch.tensor(1.0 - momentum)
        self.eps = torch.tensor(eps)
        self.global_count: Optional[float] = None
        self.inverse_count: Optional[Tensor] = None
        self.minus_inverse_count: Optional[Tensor] = None

    def set_global_count(self, count: float) -> tuple[Tensor, Tensor]:
        """(1 / count in float64, -1 / count in float32), cached for the last count."""
        if self.global_count != count:
            self.global_count = count
            self.inverse_count = torch.tensor(1.0 / count, dtype=_F64)
            self.minus_inverse_count = torch.tensor(-1.0 / count)
        return self.inverse_count, self.minus_inverse_count


def _local_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """syncnorm's choice of kernel: its two-pass route for large contiguous inputs, else torch's."""
    if core.takes_two_passes(input):
        return core.local_moments(input)
    return torch.batch_norm_update_stats(input, None, None, 0.0)


class _BareFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Tensor, layer: BareSyncBatchNorm) -> Tensor:
        channels = input.shape[1]
        constants = layer.constants(input.numel() // channels)
        mean, var = _local_moments(input)
        payload = torch.cat((constants.head, mean, var))
        head, first, second = payload.split_with_sizes((3, channels, channels))
        second.addcmul_(first, first)
        payload.mul_(constants.weights)
        layer.group.allreduce([payload]).wait()
        count = head.tolist()[2]
        inverse_count, minus_inverse_count = constants.set_global_count(count)
        torch._foreach_mul_((first, second), inverse_count)
        second.addcmul_(first, first, value=-1).clamp_min_(0)
        mean, var = first.float(), second.float()
        output = torch.batch_norm(input, weight, bias, mean, var, False, 0.0, layer.eps, False)
        layer.running_mean.lerp_(mean, layer.momentum)
        layer.running_var.mul_(constants.keep).add_(var, alpha=layer.momentum * count / (count - 1))
        ctx.save_for_backward(input, weight, mean, var)
        ctx.config = (layer, constants, minus_inverse_count)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        input, weight, mean, var = ctx.saved_tensors
        layer, constants, minus_inverse_count = ctx.config
        channels = input.shape[1]
        invstd = var.add(constants.eps).rsqrt_()
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward.default(
            grad, input, None, mean, var, None, None, False, layer.eps, [False, True, True]
        )
        payload = torch.cat((constants.backward_head, sum_dy, sum_dy_xhat))
        head, total_dy, total_dy_xhat = payload.split_with_sizes((2, channels, channels))
        layer.group.allreduce([payload]).wait()
        head.tolist()
        c2 = invstd.mul_(weight)
        scale = c2 * minus_inverse_count
        shift, slope = total_dy.float(), total_dy_xhat.float()
        torch._foreach_mul_((shift, slope), (scale, scale))
        grad_input = torch.batch_norm(input, slope, shift, mean, var, False, 0.0, layer.eps, False)
        grad_input.addcmul_(grad, c2 if input.dim() == 2 else c2.view((1, -1) + (1,) * (input.dim() - 2)))
        return grad_input, sum_dy_xhat, sum_dy, None


class BareSyncBatchNorm(_BatchNorm):
    """syncnorm's CPU training step and nothing else (see the module docstring); training mode only."""

    def __init__(self, num_features: int, group: dist.ProcessGroup) -> None:
        super().__init__(num_features)
        self.group = group
        self._constants = None

    def _check_input_dim(self, input: Tensor) -> None:
        pass

    def constants(self, count: int) -> _Constants:
        if self._constants is None or self._constants.count != count:
            self._constants = _Constants(count, self.num_features, self.momentum, self.eps)
        return self._constants

    def forward(self, input: Tensor) -> Tensor:
        self.num_batches_tracked.add_(1)
        return _BareFunction.apply(input, self.weight, self.bias, self)
