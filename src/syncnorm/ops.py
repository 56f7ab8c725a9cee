"""The synchronised passes of BatchNorm and InPlace-ABN, as eager autograd Functions and custom ops.

Each pass is one body (``*_forward`` / ``*_backward`` below) built on :mod:`syncnorm.core`,
reached two ways (the dispatch rule, :func:`compiling`):

* eager calls enter a ``torch.autograd.Function``, which also updates the running statistics
  once the forward has succeeded. A custom op's Python dispatch (schema checks, autograd
  wrapper, redispatch) costs more host time than a small layer's whole compute.
* ``torch.compile`` records the ``torch.library`` custom ops ``syncnorm::batch_norm_forward``
  / ``_backward`` and ``syncnorm::inplace_abn_forward`` / ``_backward``: one opaque node per
  pass with a fake kernel, which is what lets ``fullgraph=True`` trace a model. The caller
  updates the running statistics from the op's outputs. Process groups travel by name.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import collectives, core, pooling

ACTIVATIONS = ("leaky_relu", "elu", "identity")


def compiling() -> bool:
    """The dispatch rule: custom ops while torch.compile traces, eager Functions otherwise."""
    return torch.compiler.is_compiling()


def _group(name: str):
    return collectives.lookup_group(name) if name else None


# ---------------------------------------------------------------------------------------------
# BatchNorm


def batch_norm_forward(input: Tensor, weight, bias, eps: float, group, layer: str, check: bool):
    """Training forward over the group: (output, mean, biased var, count, host count)."""
    mean, var, count, host_count = core.batch_statistics(input, group, layer, check)
    output = torch.batch_norm(
        input, weight, bias, mean, var, False, 0.0, eps, input.is_cuda and torch.backends.cudnn.enabled
    )
    return core.like(output, input), mean, var, count, host_count


def batch_norm_backward(
    grad: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, var: Tensor, count: Tensor,
    host_count: Optional[float], eps: float, group, layer: str, check: bool, input_needs_grad: bool,
) -> tuple[Optional[Tensor], Tensor, Tensor]:  # fmt: skip
    """(grad input, this rank's d weight, this rank's d bias); DDP averages the latter as usual."""
    invstd = core.inverse_std(var, eps)
    sum_dy, sum_dy_xhat = core.grad_sums(grad, input, mean, var, invstd, eps)
    if not input_needs_grad:
        return None, sum_dy_xhat, sum_dy
    if input.is_cuda and grad.stride() == input.stride():
        mean_dy, mean_dy_xhat = core.reduce_grad_sums(
            sum_dy, sum_dy_xhat, count, host_count, group, layer, check, input
        )
        if input.numel() == 0:
            return torch.empty_like(input), sum_dy_xhat, sum_dy
        # torch's fused kernel. It divides sums by a count it is given in int32; the global count
        # can pass 2^31, so it gets the means and a count of 1 (a fill kernel: nothing cached,
        # nothing copied from the host). Its output layout follows the grad's, hence only when the
        # grad's layout is the input's; otherwise the two passes below write the input's layout
        # for the same memory traffic as a copy would cost.
        grad_input = torch.batch_norm_backward_elemt(
            grad, input, mean, invstd, weight, mean_dy, mean_dy_xhat / invstd, input.new_ones(1, dtype=torch.int32)
        )
        return core.like(grad_input, input), sum_dy_xhat, sum_dy
    # dx = c2 dy - c2 mean(dy) - c2 x_hat mean(dy x_hat) with c2 = weight * invstd, in two native
    # passes: an eval-mode batch norm (x_hat formed exactly as in the forward) with weight
    # -c2 mean(dy x_hat) and bias -c2 mean(dy), plus c2 * dy.
    c2 = invstd if weight is None else invstd * weight
    shift, slope = core.reduce_grad_sums(
        sum_dy, sum_dy_xhat, count, host_count, group, layer, check, input, factor=c2, sign=-1.0
    )
    if input.numel() == 0:
        return torch.empty_like(input), sum_dy_xhat, sum_dy
    grad_input = torch.batch_norm(
        input, slope, shift, mean, var, False, 0.0, eps, input.is_cuda and torch.backends.cudnn.enabled
    )
    grad_input.addcmul_(grad, c2 if input.dim() == 2 else core.channel_view(c2, input.dim()))
    return core.like(grad_input, input), sum_dy_xhat, sum_dy


def _parameter_grads(needs, dtypes, grad_weight, grad_bias):
    grad_weight = None if not needs[1] else core.cast(grad_weight, dtypes[0])
    grad_bias = None if not needs[2] else core.cast(grad_bias, dtypes[1])
    return grad_weight, grad_bias


def _dtypes(weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple:
    return (None if weight is None else weight.dtype), (None if bias is None else bias.dtype)


class EagerBatchNorm(torch.autograd.Function):
    """Eager training-mode SyncBatchNorm: forward, running-statistics update, backward.

    ``spec`` is ``(running, momentum, eps, group, layer, check)``, one argument: each argument
    of ``apply`` costs host time.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, spec):
        running, momentum, eps, group, layer, check = spec
        output, mean, var, count, host_count = batch_norm_forward(input, weight, bias, eps, group, layer, check)
        if running is not None:
            pooling.record_step(running, mean, var, count, momentum, host_count)
        ctx.save_for_backward(input, weight, mean, var, count)
        ctx.config = (host_count, eps, group, layer, check)
        ctx.dtypes = _dtypes(weight, bias)
        return output

    @staticmethod
    def backward(ctx, grad):
        input, weight, mean, var, count = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_input, grad_weight, grad_bias = batch_norm_backward(
            grad, input, weight, mean, var, count, *ctx.config, needs[0]
        )
        return grad_input, *_parameter_grads(needs, ctx.dtypes, grad_weight, grad_bias), None


@torch.library.custom_op("syncnorm::batch_norm_forward", mutates_args=())
def _batch_norm_forward_op(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, group_name: str, layer: str,
    check: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    output, mean, var, count, _ = batch_norm_forward(input, weight, bias, eps, _group(group_name), layer, check)
    return output, mean, var, count.clone()  # an op's outputs may not alias each other


def _statistics_like(input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    channels, dtype = input.shape[1], core.stats_dtype(input.dtype)
    return (
        input.new_empty(channels, dtype=dtype),
        input.new_empty(channels, dtype=dtype),
        input.new_empty(1, dtype=torch.float64),
    )


@_batch_norm_forward_op.register_fake
def _(input, weight, bias, eps, group_name, layer, check):
    return torch.empty_like(input), *_statistics_like(input)


@torch.library.custom_op("syncnorm::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(
    grad: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, var: Tensor, count: Tensor, eps: float,
    group_name: str, layer: str, check: bool, input_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    grad_input, grad_weight, grad_bias = batch_norm_backward(
        grad, input, weight, mean, var, count, None, eps, _group(group_name), layer, check, input_needs_grad
    )
    return input.new_empty(0) if grad_input is None else grad_input, grad_weight, grad_bias


@_batch_norm_backward_op.register_fake
def _(grad, input, weight, mean, var, count, eps, group_name, layer, check, input_needs_grad):
    grad_input = torch.empty_like(input) if input_needs_grad else input.new_empty(0)
    return grad_input, torch.empty_like(mean), torch.empty_like(mean)


def _batch_norm_setup_context(ctx, inputs, output):
    input, weight, bias, eps, group_name, layer, check = inputs
    _, mean, var, count = output
    ctx.save_for_backward(input, weight, mean, var, count)
    ctx.config = (eps, group_name, layer, check)
    ctx.dtypes = _dtypes(weight, bias)


def _batch_norm_op_backward(ctx, grad, _grad_mean, _grad_var, _grad_count):
    input, weight, mean, var, count = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = torch.ops.syncnorm.batch_norm_backward(
        grad, input, weight, mean, var, count, *ctx.config, needs[0]
    )
    grad_input = grad_input if needs[0] else None
    return grad_input, *_parameter_grads(needs, ctx.dtypes, grad_weight, grad_bias), *(None,) * 4


torch.library.register_autograd(
    "syncnorm::batch_norm_forward", _batch_norm_op_backward, setup_context=_batch_norm_setup_context
)


# ---------------------------------------------------------------------------------------------
# InPlace-ABN: BatchNorm + invertible activation that keeps only its output for backward


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


def _gamma_beta(weight: Optional[Tensor], bias: Optional[Tensor], eps: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """gamma' (|gamma| floored at eps, sign kept, +eps for 0) and beta, in the statistics' dtype."""
    gamma = torch.ones_like(like) if weight is None else core.cast(weight, like.dtype)
    # where(gamma < 0, ...) rather than copysign, which ONNX has no operator for. The floor passes
    # the gradient straight through to gamma (as the eager backward does), also where autograd
    # differentiates this code (traced eval graphs).
    floor = torch.full_like(gamma, eps)
    floored = torch.where(gamma.abs() < eps, torch.where(gamma < 0, -floor, floor), gamma)
    gamma = gamma + (floored - gamma).detach()
    beta = torch.zeros_like(like) if bias is None else core.cast(bias, like.dtype)
    return gamma, beta


def inplace_abn_forward(
    out: Tensor, input: Tensor, weight, bias, eval_mean: Optional[Tensor], eval_var: Optional[Tensor], eps: float,
    activation: str, activation_param: float, group, layer: str, check: bool,
):  # fmt: skip
    """Write act(BN(input)) into ``out`` (which may be ``input``); return mean, var, count, host count."""
    if eval_mean is not None and eval_var is not None:
        dtype = core.stats_dtype(input.dtype)
        # Copies: an op's outputs may not alias its inputs (the running buffers).
        mean, var = eval_mean.to(dtype, copy=True), eval_var.to(dtype, copy=True)
        count = mean.new_full((1,), input.numel() // input.shape[1], dtype=torch.float64)
        host_count = None
    else:
        mean, var, count, host_count = core.batch_statistics(input, group, layer, check)
    scale, shift = _scale_shift(input, weight, bias, mean, var, eps)
    # y = x * scale + shift, the same ops whether out is the input or not, so in place and out of
    # place agree bitwise. Half inputs: one addcmul in float32, rounded once; else mul then add_,
    # which is faster than addcmul with a broadcast self.
    if input.dtype == mean.dtype:
        torch.mul(input, scale, out=out).add_(shift)
    else:
        torch.addcmul(shift, input, scale, out=out)
    _activate(out, activation, activation_param, inplace=True)
    return mean, var, count, host_count


def inplace_abn_eval(
    input: Tensor, weight, bias, running_mean: Tensor, running_var: Tensor, eps: float, activation: str,
    activation_param: float,
) -> Tensor:  # fmt: skip
    """act(BN(input)) with the running statistics, out of place in torch's own differentiable ops.

    What traced graphs record (torch.export, ONNX): the same arithmetic as :func:`inplace_abn_forward`.
    """
    dtype = core.stats_dtype(input.dtype)
    scale, shift = _scale_shift(input, weight, bias, core.cast(running_mean, dtype), core.cast(running_var, dtype), eps)
    if input.dtype == dtype:
        output = input * scale + shift
    else:
        output = torch.addcmul(shift, input, scale).to(input.dtype)
    return _activate(output, activation, activation_param, inplace=False)


def _activate(x: Tensor, activation: str, activation_param: float, *, inplace: bool) -> Tensor:
    """InPlace-ABN's activation of ``x`` (``"identity"`` returns it as it is)."""
    if activation == "leaky_relu":
        return F.leaky_relu(x, activation_param, inplace=inplace)
    if activation == "elu":
        return F.elu(x, activation_param, inplace=inplace)
    return x


def _scale_shift(input: Tensor, weight, bias, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with act's input = x * scale + shift, shaped to broadcast over ``input``."""
    gamma, beta = _gamma_beta(weight, bias, eps, mean)
    scale = gamma * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    return core.channel_view(scale, input.dim()), core.channel_view(shift, input.dim())


def inplace_abn_backward(
    grad: Tensor, output: Tensor, weight, bias, mean: Tensor, var: Tensor, count: Tensor, host_count, eps: float,
    activation: str, activation_param: float, group, layer: str, check: bool, training: bool,
    input_needs_grad: bool,
) -> tuple[Optional[Tensor], Tensor, Tensor]:  # fmt: skip
    """(grad input, d weight, d bias) from the output alone: z = act^-1(y), then BatchNorm's backward."""
    ndim = output.dim()
    y, dy = core.cast(output, mean.dtype), core.cast(grad, mean.dtype)
    gamma, beta = _gamma_beta(weight, bias, eps, mean)
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
    # x_hat = (z - beta) / gamma': BatchNorm's gradient sums with beta as the mean and |gamma'|
    # as the standard deviation (eps 0), then the sign of gamma'.
    abs_invstd = gamma.abs().reciprocal()
    sum_dz, sum_dz_xhat = core.grad_sums(dz, z, beta, gamma * gamma, abs_invstd, 0.0)
    sum_dz_xhat = sum_dz_xhat * gamma.sign()
    if not input_needs_grad:
        return None, sum_dz_xhat, sum_dz
    invstd = core.inverse_std(var, eps)
    scale = gamma * invstd
    if not training:
        grad_input = core.cast(dz * core.channel_view(scale, ndim), output.dtype)
        return core.like(grad_input, output), sum_dz_xhat, sum_dz
    mean_dz, mean_dz_xhat = core.reduce_grad_sums(sum_dz, sum_dz_xhat, count, host_count, group, layer, check, output)
    # dx = scale (dz - mean_dz - x_hat mean_dz_xhat) with gamma' x_hat = z - beta, i.e. per element
    # dx = scale dz + slope z + offset, with no x_hat tensor.
    slope = -invstd * mean_dz_xhat
    offset = -scale * mean_dz - slope * beta
    grad_input = (dz * core.channel_view(scale, ndim)).addcmul_(z, core.channel_view(slope, ndim))
    grad_input.add_(core.channel_view(offset, ndim))
    return core.like(core.cast(grad_input, output.dtype), output), sum_dz_xhat, sum_dz


class EagerInPlaceABN(torch.autograd.Function):
    """Eager InPlace-ABN: forward into ``out`` (the input itself when in place), running update, backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, spec):
        running, momentum, training, in_place, eps, activation, param, group, layer, check = spec
        out = input if in_place else torch.empty_like(input)
        eval_mean, eval_var = (None, None) if training else running
        mean, var, count, host_count = inplace_abn_forward(
            out, input, weight, bias, eval_mean, eval_var, eps, activation, param, group, layer, check
        )
        if training and running is not None:
            pooling.record_step(running, mean, var, count, momentum, host_count)
        if in_place:
            ctx.mark_dirty(input)
        # The output, not the input, is what backward needs: the whole point of the layer.
        ctx.save_for_backward(out, weight, bias, mean, var, count)
        ctx.config = (host_count, eps, activation, param, group, layer, check, training)
        ctx.dtypes = _dtypes(weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        output, weight, bias, mean, var, count = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_input, grad_weight, grad_bias = inplace_abn_backward(
            grad, output, weight, bias, mean, var, count, *ctx.config, needs[0]
        )
        return grad_input, *_parameter_grads(needs, ctx.dtypes, grad_weight, grad_bias), None


@torch.library.custom_op("syncnorm::inplace_abn_forward", mutates_args=())
def _inplace_abn_forward_op(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eval_mean: Optional[Tensor],
    eval_var: Optional[Tensor], eps: float, activation: str, activation_param: float, group_name: str, layer: str,
    check: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    output = torch.empty_like(input)
    mean, var, count, _ = inplace_abn_forward(
        output, input, weight, bias, eval_mean, eval_var, eps, activation, activation_param, _group(group_name),
        layer, check,
    )  # fmt: skip
    return output, mean, var, count.clone()


@_inplace_abn_forward_op.register_fake
def _(input, weight, bias, eval_mean, eval_var, eps, activation, activation_param, group_name, layer, check):
    return torch.empty_like(input), *_statistics_like(input)


@torch.library.custom_op("syncnorm::inplace_abn_backward", mutates_args=())
def _inplace_abn_backward_op(
    grad: Tensor, output: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
    count: Tensor, eps: float, activation: str, activation_param: float, group_name: str, layer: str, check: bool,
    training: bool, input_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    grad_input, grad_weight, grad_bias = inplace_abn_backward(
        grad, output, weight, bias, mean, var, count, None, eps, activation, activation_param, _group(group_name),
        layer, check, training, input_needs_grad,
    )  # fmt: skip
    return output.new_empty(0) if grad_input is None else grad_input, grad_weight, grad_bias


@_inplace_abn_backward_op.register_fake
def _(grad, output, weight, bias, mean, var, count, eps, activation, activation_param, group_name, layer, check,
      training, input_needs_grad):  # fmt: skip
    grad_input = torch.empty_like(output) if input_needs_grad else output.new_empty(0)
    return grad_input, torch.empty_like(mean), torch.empty_like(mean)


def _inplace_abn_setup_context(ctx, inputs, output):
    _, weight, bias, eval_mean, _, *config = inputs
    ctx.save_for_backward(output[0], weight, bias, *output[1:])
    ctx.config = (*config, eval_mean is None)
    ctx.dtypes = _dtypes(weight, bias)


def _inplace_abn_op_backward(ctx, grad, _grad_mean, _grad_var, _grad_count):
    output, weight, bias, mean, var, count = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = torch.ops.syncnorm.inplace_abn_backward(
        grad, output, weight, bias, mean, var, count, *ctx.config, needs[0]
    )
    grad_input = grad_input if needs[0] else None
    return grad_input, *_parameter_grads(needs, ctx.dtypes, grad_weight, grad_bias), *(None,) * 8


torch.library.register_autograd(
    "syncnorm::inplace_abn_forward", _inplace_abn_op_backward, setup_context=_inplace_abn_setup_context
)


def custom_op_running_update(running: Optional[pooling.Running], mean, var, count, momentum: Any) -> None:
    """The running-statistics update after a custom op (compiled code): no host read."""
    pooling.record_step(running, mean, var, count, momentum)
