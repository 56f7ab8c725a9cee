"""The synchronised batch-norm op: local statistics, one all_reduce, normalise; and its backward.

Both passes are ``torch.library`` custom ops (``syncnorm::batch_norm_forward`` and
``syncnorm::batch_norm_backward``) tied together with ``register_autograd``. Eager
mode calls the same ops that ``torch.compile`` records, so there is one
implementation; to Dynamo each pass is a single opaque node with a fake (meta)
kernel, which is what lets a model with synchronised BatchNorm compile with
``fullgraph=True``. The process group goes in by name (``collectives.py``).

Forward, per channel, with n_r the rank's element count:

    local:   mean_r, var_r           (torch's native statistics kernel)
    reduce:  [n, sum x, sum x^2] = [n_r, n_r mean_r, n_r (var_r + mean_r^2)]  in float64
    global:  mean = sum x / n,  var = sum x^2 / n - mean^2   (biased)
    output:  (x - mean) / sqrt(var + eps) * weight + bias     (torch's native kernel)

Backward, with x_hat = (x - mean) / sqrt(var + eps):

    reduce:  [sum dy, sum dy * x_hat]  (local sums from torch's native kernel)
    dx = weight / sqrt(var + eps) * (dy - sum dy / n - x_hat * sum(dy * x_hat) / n)
    d weight = sum_local dy * x_hat,  d bias = sum_local dy   (each rank's share;
    DDP's gradient averaging then treats them like any other parameter)

float64 accumulation of the per-rank terms keeps the variance right when the mean
is large next to the standard deviation; each rank's own statistics come from
torch's kernels, which are stable (Welford / double accumulation) locally.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import collectives, guard

__all__ = [
    "affine_in_dtype",
    "statistics_dtype",
    "sync_batch_norm",
    "batch_norm_stats",
    "update_running_stats",
    "validate_input",
]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics of half-precision inputs are kept in float32, as torch does.
    return torch.float64 if dtype == torch.float64 else torch.float32


def affine_in_dtype(
    weight: Optional[Tensor], bias: Optional[Tensor], dtype: torch.dtype
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Weight and bias in the statistics' dtype (a differentiable cast, a no-op when they match).

    Mixed precision hands a layer half-precision weight and bias next to float32
    statistics: FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` casts the
    parameters but not the running buffers, and torch's kernels then refuse the mix
    ("expected scalar type BFloat16 but found Float"). torch.nn.SyncBatchNorm casts
    weight and bias up first; so does syncnorm, and autograd casts their gradients back.
    """
    if weight is not None and weight.dtype != dtype:
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return weight, bias


def statistics_dtype(input_dtype: torch.dtype, running_mean: Optional[Tensor]) -> torch.dtype:
    """The dtype F.batch_norm computes in: the running buffers' if given, else float32 for half inputs."""
    return _stats_dtype(input_dtype) if running_mean is None else running_mean.dtype


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def validate_input(input: Tensor, num_features: Optional[int], layer: str) -> None:
    """The checks every rank runs before any collective (they need no communication)."""
    if input.dim() < 2:
        raise ValueError(
            f"syncnorm: layer '{layer}' expects input of shape (N, C) or (N, C, *spatial), "
            f"got a {input.dim()}-D tensor of shape {tuple(input.shape)}"
        )
    if not input.is_floating_point():
        raise ValueError(f"syncnorm: layer '{layer}' needs a floating-point input, got dtype {input.dtype}")
    channels = input.shape[1]
    if channels == 0:
        raise ValueError(f"syncnorm: layer '{layer}' got an input with zero channels, shape {tuple(input.shape)}")
    if num_features is not None and channels != num_features:
        raise ValueError(
            f"syncnorm: layer '{layer}' was built for {num_features} channels but got input with "
            f"{channels} channels (shape {tuple(input.shape)}); check the layer before it"
        )


_STATS_BLOCK_BYTES = 256 << 10


_STATS_BLOCK_BYTES = 256 << 10
# Below this many elements the shifted, blocked CPU route costs more Python than it saves.
_SHIFTED_STATS_MIN_NUMEL = 1 << 16


def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of an (N, C, *) tensor, in float64.

    Two routes, both stable when the mean is large next to the spread:

    * large contiguous (N, C, *spatial) input on CPU: subtract a per-channel shift (the
      mean of the first sample's positions, which is close to the channel mean), then
      float32 sums of the shifted values and their squares. This is 5-10x faster than
      torch's Welford kernel for this layout, and the shift keeps sum-of-squares
      cancellation harmless; the mean is rebuilt in float64.
    * everything else (small inputs, (N, C), channels_last, CUDA): torch's own one-pass
      (Welford) statistics kernel, one op.
    """
    channels = input.shape[1]
    if input.numel() == 0:
        zeros = input.new_zeros(channels, dtype=torch.float64)
        return zeros, zeros.clone()
    stats_dtype = _stats_dtype(input.dtype)
    if (
        input.device.type == "cpu"
        and input.dim() > 2
        and input.numel() >= _SHIFTED_STATS_MIN_NUMEL
        and input.is_contiguous()
        and input[0, 0].numel() > 1
    ):
        per_sample = input.view(input.shape[0], channels, -1)
        shift = per_sample[0].mean(1, dtype=stats_dtype).view(1, channels, 1)
        # A few samples at a time, so the shifted temporary stays in cache (and small).
        block = max(1, _STATS_BLOCK_BYTES // (per_sample[0].numel() * per_sample.element_size()))
        sum_shifted = torch.zeros(channels, dtype=torch.float64)
        sum_sq_shifted = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, per_sample.shape[0], block):
            shifted = torch.sub(per_sample[start : start + block], shift)
            sum_shifted += shifted.sum((0, 2))
            sum_sq_shifted += shifted.square_().sum((0, 2))
        count = per_sample.shape[0] * per_sample.shape[2]
        mean_shifted = sum_shifted / count
        var = (sum_sq_shifted / count - mean_shifted * mean_shifted).clamp_min_(0)
        return shift.view(channels).to(torch.float64) + mean_shifted, var
    if input.dtype == stats_dtype:
        mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
    else:
        # With float32 running buffers torch's kernel returns float32 statistics for half
        # inputs; momentum 0 leaves these scratch buffers as they are.
        scratch_mean = input.new_zeros(channels, dtype=stats_dtype)
        scratch_var = input.new_ones(channels, dtype=stats_dtype)
        mean, var = torch.batch_norm_update_stats(input, scratch_mean, scratch_var, 0.0)
    return mean.to(torch.float64), var.to(torch.float64)


_constants: dict[tuple, Tensor] = {}


def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached one-element tensor, so hot paths never build one from a Python number (a copy on CUDA)."""
    key = (value, dtype, device)
    tensor = _constants.get(key)
    if tensor is None:
        tensor = _constants[key] = torch.full((1,), value, dtype=dtype, device=device)
    return tensor


def _like_input(result: Tensor, input: Tensor) -> Tensor:
    # The fake kernels promise empty_like(input) strides, and torch.compile's stride asserts
    # hold the real kernels to it; torch's CUDA kernels pick their output layout by rules
    # that vary between releases (channels_last_3d, or a grad whose layout differs from the
    # input's, come back contiguous), so a result with other strides is copied once.
    if result.stride() == input.stride() or input.numel() == 0:
        return result
    return torch.empty_like(input).copy_(result)


# ---------------------------------------------------------------------------------------------
# the two passes, as plain functions: the custom ops below and the eager autograd.Function
# both run these bodies, so eager and compiled code share one implementation of the math


def forward_impl(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, group, layer: str, check: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Synchronised training-mode forward: (output, mean, biased var, global count), stats in float32/64."""
    channels = input.shape[1]
    local_count = input.numel() // channels
    if check:
        guard.verify_consistency(group, layer, input, training=True, kind=guard.KIND_FORWARD)
    local_mean, local_var = batch_norm_stats(input)
    # [n_r, n_r mean_r, n_r (var_r + mean_r^2)] in float64, built without writing a Python
    # number into a device tensor (that is a blocking host-to-device copy on CUDA).
    one = _constant(1.0, torch.float64, input.device)
    payload = torch.cat((one, local_mean, torch.addcmul(local_var, local_mean, local_mean))).mul_(local_count)
    local_payload = payload.clone() if check else None
    collectives.all_reduce(payload, group, layer=layer, what="forward statistics")
    count = payload[:1]
    if local_count <= 1 and input.device.type == "cpu" and float(count) <= 1:
        # Only ranks holding <= 1 value look (free on CPU); the global count can be <= 1 only
        # if every rank holds <= 1, so all of them raise. On CUDA that look would be a host
        # sync every step (BatchNorm1d with one sample per GPU), so there the layer does not
        # raise: the output is beta and update_running_stats leaves the buffers unchanged.
        raise ValueError(
            f"syncnorm: layer '{layer}' got {int(count)} value(s) per channel over all ranks in "
            "training mode; batch statistics need at least 2 (use a larger batch, or eval mode)"
        )
    if check:
        guard.verify_finite(payload, local_payload, group, layer)
    moments = payload[1:] / count  # [mean, E[x^2]]
    mean = moments[:channels]
    var = torch.addcmul(moments[channels:], mean, mean, value=-1).clamp_min_(0)
    stats_dtype = _stats_dtype(input.dtype)
    if stats_dtype != torch.float64:
        mean, var = mean.to(stats_dtype), var.to(stats_dtype)
    output = torch.batch_norm(input, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    return _like_input(output, input), mean, var, count


def backward_impl(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    eps: float,
    group,
    layer: str,
    check: bool,
    input_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Synchronised backward: (grad_input, this rank's d weight, this rank's d bias)."""
    channels = input.shape[1]
    if input.numel() == 0:
        sum_dy_xhat = sum_dy = mean.new_zeros(channels)
    elif input.is_cuda:
        # torch's fused CUDA reduction of sum(dy) and sum(dy * (x - mean)).
        invstd = torch.rsqrt(var + eps)
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
            grad_output, input, mean, invstd, weight, True, False, False
        )
        sum_dy_xhat = sum_dy_xmu * invstd
    else:
        # Eval-mode backward with (mean, var) as "running" statistics returns exactly
        # sum(dy * x_hat) and sum(dy), in one fused pass.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_output, input, weight, mean, var, None, None, False, eps, [False, True, True]
        )
    if not input_needs_grad:
        return input.new_empty(0), sum_dy_xhat, sum_dy
    if check:
        guard.verify_consistency(group, layer, input, training=True, kind=guard.KIND_BACKWARD)
    sums = torch.cat((sum_dy, sum_dy_xhat))
    collectives.all_reduce(sums, group, layer=layer, what="backward gradient")
    if input.numel() == 0:
        return torch.empty_like(input), sum_dy_xhat, sum_dy
    # [mean(dy), mean(dy * x_hat)] over the global batch.
    means = sums.div_(count.to(sums.dtype))
    invstd = torch.rsqrt(var + eps)
    if input.is_cuda:
        # The kernel divides by the sum of the counts it is given, in int32 per entry; the
        # global count can pass 2^31 (batch 256 at 112x112 on 1024 GPUs), so it gets the
        # means and a count of 1 instead: nothing to overflow.
        grad_input = torch.batch_norm_backward_elemt(
            grad_output, input, mean, invstd, weight, means[:channels], means[channels:] / invstd,
            _constant(1, torch.int32, input.device),
        )  # fmt: skip
        return _like_input(grad_input, input), sum_dy_xhat, sum_dy
    # dx = c2 * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with c2 = weight * invstd, in two
    # native passes: x_hat * (-c2 mean(dy x_hat)) - c2 mean(dy) is an eval-mode batch norm
    # (x_hat formed exactly as in the forward), then + c2 * dy.
    c2 = invstd if weight is None else weight * invstd
    coefficients = means.view(2, channels).mul_(-c2)
    grad_input = torch.batch_norm(
        input, coefficients[1], coefficients[0], mean, var, False, 0.0, eps, torch.backends.cudnn.enabled
    )
    grad_input.addcmul_(grad_output, _channel_view(c2, input.dim()))
    return _like_input(grad_input, input), sum_dy_xhat, sum_dy


# ---------------------------------------------------------------------------------------------
# the custom ops (what torch.compile records: one opaque node per pass, with fake kernels)


@torch.library.custom_op("syncnorm::batch_norm_forward", mutates_args=())
def _forward_op(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    group_name: str,
    layer: str,
    check: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    output, mean, var, count = forward_impl(
        input, weight, bias, eps, collectives.lookup_group(group_name), layer, check
    )
    return output, mean, var, count.clone()  # an op's outputs may not alias each other


@_forward_op.register_fake
def _(input, weight, bias, eps, group_name, layer, check):
    channels = input.shape[1]
    stats_dtype = _stats_dtype(input.dtype)
    return (
        torch.empty_like(input),
        input.new_empty(channels, dtype=stats_dtype),
        input.new_empty(channels, dtype=stats_dtype),
        input.new_empty(1, dtype=torch.float64),
    )


@torch.library.custom_op("syncnorm::batch_norm_backward", mutates_args=())
def _backward_op(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    eps: float,
    group_name: str,
    layer: str,
    check: bool,
    input_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    group = collectives.lookup_group(group_name) if input_needs_grad else None
    return backward_impl(grad_output, input, weight, mean, var, count, eps, group, layer, check, input_needs_grad)


@_backward_op.register_fake
def _(grad_output, input, weight, mean, var, count, eps, group_name, layer, check, input_needs_grad):
    grad_input = torch.empty_like(input) if input_needs_grad else input.new_empty(0)
    return grad_input, torch.empty_like(mean), torch.empty_like(mean)


def _parameter_grads(ctx, weight, grad_weight, grad_bias):
    needs_weight, needs_bias = ctx.needs_input_grad[1:3]
    if weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    return (grad_weight if needs_weight else None), (grad_bias if needs_bias else None)


def _setup_context(ctx, inputs, output):
    input, weight, _bias, eps, group_name, layer, check = inputs
    _, mean, var, count = output
    ctx.save_for_backward(input, weight, mean, var, count)
    ctx.eps, ctx.group_name, ctx.layer, ctx.check = eps, group_name, layer, check


def _backward(ctx, grad_output, _grad_mean, _grad_var, _grad_count):
    input, weight, mean, var, count = ctx.saved_tensors
    needs_input = ctx.needs_input_grad[0]
    grad_input, grad_weight, grad_bias = torch.ops.syncnorm.batch_norm_backward(
        grad_output, input, weight, mean, var, count, ctx.eps, ctx.group_name, ctx.layer, ctx.check, needs_input
    )
    return (
        grad_input if needs_input else None,
        *_parameter_grads(ctx, weight, grad_weight, grad_bias),
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("syncnorm::batch_norm_forward", _backward, setup_context=_setup_context)


class _EagerSyncBatchNorm(torch.autograd.Function):
    """The eager entry: the same bodies as the custom ops, without torch.library's dispatch.

    A custom op's Python dispatch (schema checks, autograd wrapper, redispatch) costs more
    host time than the whole layer's compute at small shapes; eager calls come here,
    compiled code records the custom ops. Both run forward_impl / backward_impl.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, eps, group, layer, check):
        output, mean, var, count = forward_impl(input, weight, bias, eps, group, layer, check)
        ctx.save_for_backward(input, weight, mean, var, count)
        ctx.eps, ctx.group, ctx.layer, ctx.check = eps, group, layer, check
        ctx.mark_non_differentiable(mean, var, count)
        return output, mean, var, count

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var, _grad_count):
        input, weight, mean, var, count = ctx.saved_tensors
        needs_input = ctx.needs_input_grad[0]
        grad_input, grad_weight, grad_bias = backward_impl(
            grad_output, input, weight, mean, var, count, ctx.eps, ctx.group, ctx.layer, ctx.check, needs_input,
        )  # fmt: skip
        return (
            grad_input if needs_input else None,
            *_parameter_grads(ctx, weight, grad_weight, grad_bias),
            None,
            None,
            None,
            None,
        )


# ---------------------------------------------------------------------------------------------
# public functional form


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    momentum: Union[float, Tensor],
    may_be_degenerate: bool = True,
) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance.

    Called only after the forward op has returned, so a failed step never leaves
    the running statistics half-updated. ``momentum`` may be a tensor (the
    cumulative average of ``momentum=None``) so that nothing is read back to the host.
    A global count of at most 1 (possible only on CUDA, where the forward does not read
    the count back) leaves the buffers unchanged, as the forward's error would elsewhere;
    ``may_be_degenerate=False`` (this rank held 2 or more values) skips that mask.
    """
    with torch.no_grad():
        unbiased = var * (count / (count - 1)).to(var.dtype)
        if isinstance(momentum, Tensor):
            momentum = momentum.to(running_mean.dtype)
        if may_be_degenerate and count.device.type != "cpu":
            keep = count <= 1  # a device-side mask: no host sync
            running_mean.copy_(
                torch.where(keep, running_mean, torch.lerp(running_mean, mean.to(running_mean.dtype), momentum))
            )
            running_var.copy_(
                torch.where(keep, running_var, torch.lerp(running_var, unbiased.to(running_var.dtype), momentum))
            )
            return
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Union[float, Tensor] = 0.1,
    eps: float = 1e-5,
    process_group: collectives.SyncGroup = None,
    *,
    layer: str = "sync_batch_norm",
    check: Optional[bool] = None,
) -> Tensor:
    """Batch norm whose training-mode statistics cover the batches of every rank in the group.

    Same arguments as :func:`torch.nn.functional.batch_norm` plus ``process_group``
    (None for the default group, a ProcessGroup, or a 1-D DeviceMesh). In training
    mode ``running_mean``/``running_var`` (if given) are updated in place with the
    global statistics, identically on every rank. In eval mode, without
    torch.distributed, or in a group of one rank, this is exactly ``F.batch_norm``.
    """
    num_features = (
        running_mean.numel() if running_mean is not None else (weight.numel() if weight is not None else None)
    )
    validate_input(input, num_features, layer)
    group = collectives.resolve_group(process_group)
    if not training or group is None or group.size() == 1:
        # torch's kernels want weight and bias in the running buffers' dtype, or (without
        # buffers) in the input's statistics dtype.
        weight, bias = affine_in_dtype(weight, bias, statistics_dtype(input.dtype, running_mean))
        if training and input.numel() // input.shape[1] <= 1:
            # F.batch_norm's own message; raised here so the text names the layer.
            raise ValueError(
                f"syncnorm: layer '{layer}' needs more than 1 value per channel when training, got input of shape {tuple(input.shape)}"
            )
        if not training and check_requested(check) and group is not None and group.size() > 1:
            verify_eval_consistency(input, group, layer)
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    # The op normalises with statistics in _stats_dtype(input.dtype): weight and bias follow.
    weight, bias = affine_in_dtype(weight, bias, _stats_dtype(input.dtype))
    check = check_requested(check)
    if torch.compiler.is_compiling():
        output, mean, var, count = torch.ops.syncnorm.batch_norm_forward(
            input, weight, bias, eps, group.group_name, layer, check
        )
    else:
        output, mean, var, count = _EagerSyncBatchNorm.apply(input, weight, bias, eps, group, layer, check)
    if running_mean is not None and running_var is not None:
        degenerate = input.numel() <= input.shape[1]  # this rank holds at most 1 value per channel
        update_running_stats(running_mean, running_var, mean, var, count, momentum, degenerate)
    return output


def check_requested(check: Optional[bool]) -> bool:
    return collectives.check_enabled() if check is None else check


def verify_eval_consistency(input: Tensor, group, layer: str) -> None:
    # Only with the guard on: an eval-mode call joins the consistency check so that a
    # rank left in eval mode while the others train is named instead of hanging them.
    if torch.compiler.is_compiling():
        return
    guard.verify_consistency(group, layer, input, training=False, kind=guard.KIND_FORWARD)
