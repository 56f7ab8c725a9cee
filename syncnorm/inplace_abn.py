"""In-Place Activated BatchNorm (Rota Bulò et al., CVPR 2018), synchronised like SyncBatchNorm.

BatchNorm followed by an invertible activation, that keeps for backward only its *output*
(plus O(C) statistics), never its input: the backward recovers the normalised values from
the output. A BatchNorm + activation pair keeps both the BatchNorm input and the activation
output, so this halves what the pair saves. In plain PyTorch (CPU and CUDA), as
``torch.library`` custom ops (``syncnorm::inplace_abn_forward`` / ``_backward``) so that
``torch.compile(fullgraph=True)`` traces it.

Forward (statistics exactly as :func:`syncnorm.functional.sync_batch_norm`: one float64
all_reduce of ``[n, n mean, n (var + mean^2)]``, none in eval or outside torch.distributed):

    z = gamma' (x - mean) / sqrt(var + eps) + beta,   y = act(z)

Backward, from y alone:

    z = act^-1(y)      leaky_relu: y / slope where y < 0;  elu: log1p(y / alpha) where y < 0
    dz = dy * act'(z)  in terms of y: slope, resp. y + alpha, where y <= 0; 1 elsewhere
    x_hat = (z - beta) / gamma'
    reduce: [sum dz, sum dz * x_hat]  (2C values, one all_reduce)
    dx = gamma' / sqrt(var + eps) * (dz - sum dz / n - x_hat * sum(dz x_hat) / n)
    d gamma = sum_local dz * x_hat,  d beta = sum_local dz

The tiny-gamma rule: gamma' is gamma with its magnitude floored at ``eps`` and its sign kept
(+eps for 0). Wherever |gamma| >= eps (every trained BatchNorm checkpoint in practice) the
layer is exactly BatchNorm + activation, negative gammas included, so checkpoints move
between the two unchanged; below it the output differs from BatchNorm's by at most
eps * |x_hat|, and x_hat stays recoverable. The gradient reaches gamma straight through the
floor (it is the gradient with respect to gamma'), so a zero-initialised gamma trains away
from zero as under BatchNorm. inplace_abn's ``|gamma| + eps`` instead changes every channel
by eps and turns negative gammas positive, so BatchNorm checkpoints would compute otherwise.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import collectives, guard
from .functional import _stats_dtype, affine_in_dtype, batch_norm_stats, update_running_stats, validate_input
from .modules import SharesProcessGroup, recomputing_in_backward

__all__ = ["ACTIVATIONS", "InPlaceABN", "InPlaceABNSync", "inplace_abn"]

ACTIVATIONS = ("leaky_relu", "elu", "identity")
_layer_counter = itertools.count()


def check_activation(activation: str, activation_param: float, layer: str) -> None:
    """Refuse an activation whose input cannot be recovered from its output."""
    if activation == "relu" or (activation == "leaky_relu" and not activation_param > 0):
        got = "'relu'" if activation == "relu" else f"'leaky_relu' with slope {activation_param}"
        raise ValueError(
            f"syncnorm: layer '{layer}' got activation {got}, which is not invertible: it maps every "
            "negative value to 0, so the backward cannot recover the normalised values from the output "
            "(InPlace-ABN keeps only the output). Use activation='leaky_relu' with a small positive "
            "activation_param such as 0.01, or SyncBatchNorm followed by nn.ReLU."
        )
    if activation == "elu" and not activation_param > 0:
        raise ValueError(f"syncnorm: layer '{layer}' needs activation_param (ELU's alpha) > 0, got {activation_param}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"syncnorm: layer '{layer}' got activation {activation!r}; choose one of {ACTIVATIONS}")
    if not math.isfinite(activation_param):
        raise ValueError(f"syncnorm: layer '{layer}' needs a finite activation_param, got {activation_param}")


def _view(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def _gamma_beta(weight: Optional[Tensor], bias: Optional[Tensor], eps: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """gamma' (|gamma| floored at eps, sign kept, +eps for 0) and beta, in the statistics' dtype."""
    gamma = torch.ones_like(like) if weight is None else weight.to(like.dtype)
    gamma = torch.where(gamma.abs() < eps, torch.full_like(gamma, eps).copysign(gamma), gamma)
    beta = torch.zeros_like(like) if bias is None else bias.to(like.dtype)
    return gamma, beta


def _statistics(input: Tensor, eps: float, group_name: str, layer: str, check: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Batch mean and biased variance over the group (statistics dtype), and the global count (float64)."""
    channels = input.shape[1]
    local_count = input.numel() // channels
    local_mean, local_var = batch_norm_stats(input)
    if group_name:
        group = collectives.lookup_group(group_name)
        if check:
            guard.verify_consistency(group, layer, input, training=True, kind=guard.KIND_FORWARD)
        sums = torch.empty(2 * channels + 1, dtype=torch.float64, device=input.device)
        sums[:1].fill_(local_count)  # fill_ on a slice: no host-to-device copy of a Python scalar
        torch.mul(local_mean, local_count, out=sums[1 : channels + 1])
        torch.mul(torch.addcmul(local_var, local_mean, local_mean), local_count, out=sums[channels + 1 :])
        collectives.all_reduce(sums, group, layer=layer, what="forward statistics")
        count = sums[0].clone()
        mean = sums[1 : channels + 1] / count
        var = (sums[channels + 1 :] / count - mean * mean).clamp_min_(0)
    else:
        count = torch.full((), float(local_count), dtype=torch.float64, device=input.device)
        mean, var = local_mean, local_var
    if local_count <= 1 and (not group_name or float(count) <= 1):
        # Only ranks holding <= 1 value read the count back; then every rank does, and all raise.
        raise ValueError(
            f"syncnorm: layer '{layer}' got {int(count)} value(s) per channel over all ranks in training "
            "mode; batch statistics need at least 2 (use a larger batch, or eval mode)"
        )
    stats_dtype = _stats_dtype(input.dtype)
    return mean.to(stats_dtype), var.to(stats_dtype), count


def _forward_into(
    out: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eval_mean: Optional[Tensor],
    eval_var: Optional[Tensor], eps: float, activation: str, activation_param: float, group_name: str, layer: str,
    check: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Write act(BN(input)) into ``out`` (which may be ``input`` itself); return mean, var, count."""
    stats_dtype = _stats_dtype(input.dtype)
    if eval_mean is not None and eval_var is not None:
        # Copies: an op's outputs may not alias its inputs (the running buffers).
        mean, var = eval_mean.to(stats_dtype, copy=True), eval_var.to(stats_dtype, copy=True)
        count = torch.full((), float(input.numel() // input.shape[1]), dtype=torch.float64, device=input.device)
    else:
        mean, var, count = _statistics(input, eps, group_name, layer, check)
    gamma, beta = _gamma_beta(weight, bias, eps, mean)
    scale = gamma * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    # y = x * scale + shift (torch's CPU batch-norm kernel uses this form too), the same ops whether
    # out is the input or not, so in place and out of place agree bitwise. Half inputs: one addcmul
    # in float32, rounded once; else mul then add_, 2-3x faster than addcmul with a broadcast self.
    if input.dtype == stats_dtype:
        torch.mul(input, _view(scale, input.dim()), out=out).add_(_view(shift, input.dim()))
    else:
        torch.addcmul(_view(shift, input.dim()), input, _view(scale, input.dim()), out=out)
    if activation == "leaky_relu":
        F.leaky_relu_(out, activation_param)
    elif activation == "elu":
        F.elu_(out, activation_param)
    return mean, var, count


@torch.library.custom_op("syncnorm::inplace_abn_forward", mutates_args=())
def _forward_op(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eval_mean: Optional[Tensor],
    eval_var: Optional[Tensor], eps: float, activation: str, activation_param: float, group_name: str, layer: str,
    check: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    output = torch.empty_like(input)
    mean, var, count = _forward_into(output, input, weight, bias, eval_mean, eval_var, eps,
                                     activation, activation_param, group_name, layer, check)  # fmt: skip
    return output, mean, var, count


@_forward_op.register_fake
def _(input, weight, bias, eval_mean, eval_var, eps, activation, activation_param, group_name, layer, check):
    stats_dtype = _stats_dtype(input.dtype)
    channels = input.shape[1]
    return (
        torch.empty_like(input),
        input.new_empty(channels, dtype=stats_dtype),
        input.new_empty(channels, dtype=stats_dtype),
        input.new_empty((), dtype=torch.float64),
    )


@torch.library.custom_op("syncnorm::inplace_abn_backward", mutates_args=())
def _backward_op(
    grad_output: Tensor, output: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
    count: Tensor, eps: float, activation: str, activation_param: float, group_name: str, layer: str, check: bool,
    training: bool, input_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    ndim = output.dim()
    y = output.to(mean.dtype)
    dy = grad_output.to(mean.dtype)
    gamma, beta = _gamma_beta(weight, bias, eps, mean)
    # z = act^-1(y) and dz = dy act'(z), each one native pass where torch has the kernel.
    if activation == "leaky_relu":
        dz = torch.ops.aten.leaky_relu_backward(dy, y, activation_param, True)
        z = F.leaky_relu(y, 1.0 / activation_param)  # the inverse of a leaky_relu is a leaky_relu
    elif activation == "elu":
        dz = torch.ops.aten.elu_backward(dy, activation_param, 1, 1, True, y)
        # ELU saturates at -alpha: below z ~ log(machine epsilon) y is -alpha exactly and z is lost
        # (there dz is 0); the floor keeps z finite so that 0 * z stays 0.
        floor = -1.0 + torch.finfo(y.dtype).eps
        z = torch.where(y > 0, y, torch.log1p((y / activation_param).clamp_min_(floor)))
    else:
        z, dz = y, dy
    del y
    if output.numel() == 0:
        sum_dz_xhat, sum_dz = mean.new_zeros(mean.shape), mean.new_zeros(mean.shape)
    else:
        # sum dz and sum dz (z - beta) / |gamma'| in one fused pass: torch's eval-mode batch-norm
        # backward with beta as the mean and gamma'^2 as the variance, eps 0 (sqrt(g^2) is |g| exactly).
        _, sum_dz_xhat, sum_dz = torch.ops.aten.native_batch_norm_backward(
            dz, z, None, beta, gamma * gamma, None, None, False, 0.0, [False, True, True]
        )
        sum_dz_xhat = sum_dz_xhat * gamma.sign()
    if not input_needs_grad:
        return output.new_empty(0), sum_dz_xhat, sum_dz
    invstd = torch.rsqrt(var + eps)
    scale = gamma * invstd
    if not training:
        return (dz * _view(scale, ndim)).to(output.dtype), sum_dz_xhat, sum_dz
    sums = torch.cat([sum_dz, sum_dz_xhat])
    if group_name:
        group = collectives.lookup_group(group_name)
        if check:
            guard.verify_consistency(group, layer, output, training=True, kind=guard.KIND_BACKWARD)
        collectives.all_reduce(sums, group, layer=layer, what="backward gradient")
    mean_dz, mean_dz_xhat = sums.view(2, -1) / count.to(sums.dtype)
    # dx = scale (dz - mean_dz - x_hat mean_dz_xhat) with gamma' x_hat = z - beta, i.e. per element
    # dx = scale dz + slope z + offset, with no x_hat tensor.
    slope = -invstd * mean_dz_xhat
    offset = -scale * mean_dz - slope * beta
    grad_input = (dz * _view(scale, ndim)).addcmul_(z, _view(slope, ndim)).add_(_view(offset, ndim))
    return grad_input.to(output.dtype), sum_dz_xhat, sum_dz


@_backward_op.register_fake
def _(grad_output, output, weight, bias, mean, var, count, eps, activation, activation_param, group_name, layer,
      check, training, input_needs_grad):  # fmt: skip
    grad_input = torch.empty_like(output) if input_needs_grad else output.new_empty(0)
    return grad_input, torch.empty_like(mean), torch.empty_like(mean)


def _save(ctx: Any, output: Tensor, weight, bias, mean, var, count, config: tuple, training: bool) -> None:
    # The output, not the input, is what backward needs: the whole point of the layer.
    ctx.save_for_backward(output, weight, bias, mean, var, count)
    ctx.config, ctx.training = config, training


def _grads(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    output, weight, bias, mean, var, count = ctx.saved_tensors
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_input, grad_weight, grad_bias = torch.ops.syncnorm.inplace_abn_backward(
        grad_output, output, weight, bias, mean, var, count, *ctx.config, ctx.training, needs_input
    )
    return (
        grad_input if needs_input else None,
        grad_weight.to(weight.dtype) if needs_weight else None,
        grad_bias.to(bias.dtype) if needs_bias else None,
    )


def _setup_context(ctx, inputs, output):
    _, weight, bias, eval_mean, _, *config = inputs
    _save(ctx, output[0], weight, bias, *output[1:], tuple(config), eval_mean is None)


def _backward(ctx, grad_output, _grad_mean, _grad_var, _grad_count):
    return (*_grads(ctx, grad_output), None, None, None, None, None, None, None, None)


torch.library.register_autograd("syncnorm::inplace_abn_forward", _backward, setup_context=_setup_context)


class _InPlaceForward(torch.autograd.Function):
    """Eager in-place path: the output is written over the input (``mark_dirty``), same backward op."""

    @staticmethod
    def forward(ctx, input, weight, bias, eval_mean, eval_var, *config):
        mean, var, count = _forward_into(input, input, weight, bias, eval_mean, eval_var, *config)
        ctx.mark_dirty(input)
        ctx.mark_non_differentiable(mean, var, count)
        _save(ctx, input, weight, bias, mean, var, count, config, eval_mean is None)
        return input, mean, var, count

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var, _grad_count):
        return (*_grads(ctx, grad_output), None, None, None, None, None, None, None, None)


def writes_in_place(input: Tensor) -> bool:
    """The rule of ``inplace=True``: write over an intermediate autograd result, else out of place.

    In place only in eager mode (compiled graphs plan their own buffers), and only on a tensor that
    autograd produced (not a leaf: never the user's own data or parameters) and that is not a view.
    """
    return not torch.compiler.is_compiling() and input.grad_fn is not None and input._base is None


def inplace_abn(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Union[float, Tensor] = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    process_group: collectives.SyncGroup = None,
    *,
    inplace: bool = False,
    layer: str = "inplace_abn",
    check: Optional[bool] = None,
) -> Tensor:
    """``act(sync_batch_norm(input, ...))`` that saves only its output for backward.

    Arguments as :func:`syncnorm.functional.sync_batch_norm`, plus the activation
    (``"leaky_relu"`` with slope ``activation_param`` > 0, ``"elu"`` with alpha
    ``activation_param``, or ``"identity"``) and ``inplace``: with ``True`` the output is
    written over ``input`` when :func:`writes_in_place` allows, as ``nn.LeakyReLU(inplace=True)``
    does (the caller must not use ``input`` afterwards; if another op saved it for its own
    backward, autograd raises at backward). Eval mode (with running statistics) also saves only
    the output, and never communicates.
    """
    check_activation(activation, activation_param, layer)
    num_features = running_mean.numel() if running_mean is not None else (None if weight is None else weight.numel())
    validate_input(input, num_features, layer)
    group = collectives.resolve_group(process_group)
    synchronised = group is not None and group.size() > 1
    checking = collectives.check_enabled() if check is None else check
    batch_stats = training or running_mean is None
    if not training and checking and synchronised and not torch.compiler.is_compiling():
        # Opt-in guard only: catches a rank left in eval mode while the others train.
        guard.verify_consistency(group, layer, input, training=False, kind=guard.KIND_FORWARD)
    weight, bias = affine_in_dtype(weight, bias, _stats_dtype(input.dtype))
    eval_mean, eval_var = (None, None) if batch_stats else (running_mean, running_var)
    group_name = group.group_name if training and synchronised else ""
    args = (weight, bias, eval_mean, eval_var, eps, activation, float(activation_param), group_name, layer, checking)
    if inplace and writes_in_place(input):
        output, mean, var, count = _InPlaceForward.apply(input, *args)
    else:
        output, mean, var, count = torch.ops.syncnorm.inplace_abn_forward(input, *args)
    if training and running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return output


class InPlaceABN(SharesProcessGroup, _BatchNorm):
    r"""Synchronised BatchNorm + invertible activation that keeps only its output for backward.

    A replacement for ``nn.BatchNorm2d`` + ``nn.LeakyReLU`` (or ELU, or nothing) that saves
    about half the activation memory of the pair: the backward recovers the normalised values
    from the output instead of keeping the BatchNorm input (see the module docstring for the
    math and the tiny-gamma rule). Statistics as :class:`syncnorm.SyncBatchNorm`: global over
    ``process_group`` in training, running statistics in eval (no communication), exactly
    local outside torch.distributed; same running-statistics semantics and ``state_dict`` keys as
    ``nn.BatchNorm2d``. Any input rank >= 2. ``convert_sync_batchnorm`` leaves it alone.

    Differences from BatchNorm + activation: ``"relu"`` is refused (not invertible); ``inplace``
    writes the output over the input (see :func:`writes_in_place`), off by default because a
    model that reads the input again (a pre-activation residual) would silently change; the
    gradients are recovered from the output, so they lose precision where ELU saturates and for
    channels whose |gamma| is tiny next to |beta| (in float16/bfloat16 above all).
    ``InPlaceABNSync`` is the same class, for ``inplace_abn`` users switching by import.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        process_group: collectives.SyncGroup = None,
        *,
        inplace: bool = False,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        check_activation(activation, activation_param, "InPlaceABN")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation, self.activation_param, self.inplace = activation, activation_param, inplace
        self.process_group = process_group
        self.layer_name = f"InPlaceABN#{next(_layer_counter)}"  # same on every rank: the guard compares it
        self.check: Optional[bool] = None  # None: follow SYNCNORM_CHECK / syncnorm.set_check

    def _check_input_dim(self, input: Tensor) -> None:
        pass  # validate_input raises with the layer's name

    def forward(self, input: Tensor) -> Tensor:
        tracking = self.track_running_stats and self.running_mean is not None
        momentum: Any = 0.0 if self.momentum is None else self.momentum
        # Activation checkpointing re-runs the forward in backward: the running statistics
        # were updated by the original forward already (momentum 0), as in SyncBatchNorm.
        counting = self.training and tracking and not recomputing_in_backward()
        if counting:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, kept on the device
                momentum = torch.reciprocal(self.num_batches_tracked.to(self.running_mean.dtype))
        elif self.training and tracking:
            momentum = 0.0
        try:
            return inplace_abn(
                input, self.running_mean if tracking else None, self.running_var if tracking else None,
                self.weight, self.bias, self.training, momentum, self.eps, self.activation,
                self.activation_param, self.process_group, inplace=self.inplace, layer=self.layer_name,
                check=self.check,
            )  # fmt: skip
        except BaseException:
            if counting:  # running statistics are written only after the op succeeds; so is the count
                self.num_batches_tracked.sub_(1)
            raise

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", activation={self.activation!r}, activation_param={self.activation_param}, inplace={self.inplace}"
        )


InPlaceABNSync = InPlaceABN
