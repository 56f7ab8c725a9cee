"""The normalisation core every synchronised layer runs on: statistics, gradient sums, running update.

One implementation of each step, shared by SyncBatchNorm, SyncBatchNormAct2d, InPlaceABN,
SyncInstanceNorm and precise_bn; a layer adds only what is its own (InPlaceABN its inversion,
SyncInstanceNorm its per-instance statistic).

Statistics step, per channel, with n_r the rank's value count:

    local:   mean_r, var_r             (two passes, or torch's Welford kernel)
    reduce:  [n, sum x, sum x^2] = sum over ranks of [n_r, n_r mean_r, n_r (var_r + mean_r^2)],
             after the layer's fingerprint [f, f^2] (see syncnorm.fingerprint)
    global:  mean = sum x / n,  var = sum x^2 / n - mean^2   (biased, float64, clamped at 0)

The payload is float64: in float32, ``sum x^2 / n - mean^2`` loses every digit of the variance
once the mean is ~1e3 standard deviations; each rank's own statistics are stable already.

Gradient step: each rank's ``[sum dy, sum dy * x_hat]`` (torch's fused reduction kernels),
all-reduced once; the layer turns the global means into its input gradient.

Host reads: on CPU the global count is read back once per forward (free there), which lets
every rank raise together when the group holds at most one value per channel. On CUDA
nothing is read back: a group with at most one value gives ``beta`` and leaves the running
statistics as they were, through device-side masks.
"""

from __future__ import annotations

import threading
from typing import Optional, Union

import torch
from torch import Tensor

from . import collectives, guard
from .fingerprint import counted_head, fingerprint_head, verify_fingerprint

Momentum = Union[float, Tensor]

# Reductions over more elements than this use two passes in float32 blocks (see local_moments).
_TWO_PASS_MIN_NUMEL = 1 << 14
_TWO_PASS_BLOCK_NUMEL = 1 << 22


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for an input dtype: float32 for half inputs, as torch does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def affine_in_dtype(
    weight: Optional[Tensor], bias: Optional[Tensor], dtype: torch.dtype
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Weight and bias in the statistics' dtype (a differentiable cast; a no-op when they match).

    Mixed precision hands a layer half-precision weight and bias next to float32 statistics
    (FSDP2's ``MixedPrecisionPolicy`` casts parameters, not buffers), and torch's kernels refuse
    the mix. torch.nn.SyncBatchNorm casts weight and bias up; so does syncnorm, and autograd
    casts their gradients back.
    """
    if weight is not None and weight.dtype != dtype:
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return weight, bias


# Tensor.float() and its siblings parse their arguments faster than Tensor.to(dtype).
_CASTS = {
    torch.float32: Tensor.float,
    torch.float64: Tensor.double,
    torch.float16: Tensor.half,
    torch.bfloat16: Tensor.bfloat16,
}


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when it would return ``t`` (it costs host time even then)."""
    if t.dtype == dtype:
        return t
    method = _CASTS.get(dtype)
    return t.to(dtype) if method is None else method(t)


def like(result: Tensor, reference: Tensor) -> Tensor:
    """``result`` with ``reference``'s strides (copied only if they differ).

    The ops' fake kernels promise ``empty_like(reference)``, and torch.compile asserts that the
    real kernels keep the promise, for empty tensors too; torch's CUDA kernels choose their
    output layout by rules that vary between releases.
    """
    if result.stride() == reference.stride():
        return result
    if reference.numel() == 0:
        return torch.empty_like(reference)
    return torch.empty_like(reference).copy_(result)


def _host_tensor(t: Tensor) -> bool:
    """A plain CPU tensor: one that may meet the cached CPU constants (fake and device tensors may not)."""
    return t.is_cpu and type(t) is Tensor


def inverse_std(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``, with eps a cached 0-dim tensor on CPU (see :func:`scalar`)."""
    return torch.rsqrt(var + (scalar(eps, var.dtype) if _host_tensor(var) else eps))


def channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


# ---------------------------------------------------------------------------------------------
# statistics


_scratch_space = threading.local()


def _scratch(numel: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A per-thread CPU buffer of at least ``numel`` elements, reused across calls.

    The two-pass statistics need a temporary the size of the input (at most
    ``_TWO_PASS_BLOCK_NUMEL`` elements: 16 MiB in float32, 32 MiB in float64, kept per thread
    and dtype); a fresh allocation of that size is freshly mapped memory on every call, whose page
    faults cost as much as the pass itself. Tensor subclasses (fake tensors) get a fresh one.
    """
    if type(like) is not Tensor:
        return like.new_empty(numel, dtype=dtype)
    buffers = _scratch_space.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a buffer born in inference mode could not be written later
            buffer = buffers[dtype] = torch.empty(numel, dtype=dtype, device="cpu")
    return buffer


def takes_two_passes(input: Tensor) -> bool:
    """Whether :func:`local_moments` takes its two-pass route: large contiguous (N, C, *spatial) on CPU."""
    return (
        input.device.type == "cpu"
        and input.numel() >= _TWO_PASS_MIN_NUMEL
        and input.dim() > 2
        and input.is_contiguous()
    )


def local_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of an (N, C, *) tensor, in the statistics dtype.

    Large contiguous (N, C, *spatial) inputs on CPU take two passes (mean, then the mean of
    squared deviations), in blocks of samples so the temporary stays bounded: faster there
    than torch's Welford kernel, and the most stable method there is. Everything else
    (small inputs, (N, C), channels_last, CUDA) runs torch's one-pass kernel.
    """
    channels = input.shape[1]
    dtype = stats_dtype(input.dtype)
    if input.numel() == 0:
        zeros = input.new_zeros(channels, dtype=dtype)
        return zeros, zeros
    if takes_two_passes(input):
        per_sample = input.view(input.shape[0], channels, -1)
        mean = per_sample.mean((0, 2), dtype=dtype)
        centre = mean.view(1, channels, 1)
        block = max(1, _TWO_PASS_BLOCK_NUMEL // (channels * per_sample.shape[2]))
        scratch = _scratch(min(block, per_sample.shape[0]) * channels * per_sample.shape[2], input, dtype)
        if block >= per_sample.shape[0]:
            deviations = scratch[: per_sample.numel()].view(per_sample.shape)
            return mean, torch.sub(per_sample, centre, out=deviations).square_().mean((0, 2))
        square_sum = torch.zeros_like(mean)
        for start in range(0, per_sample.shape[0], block):
            chunk = per_sample[start : start + block]
            deviations = scratch[: chunk.numel()].view(chunk.shape)
            square_sum += torch.sub(chunk, centre, out=deviations).square_().sum((0, 2))
        return mean, square_sum.div_(per_sample.shape[0] * per_sample.shape[2])
    if input.dtype == dtype or input.is_cuda:
        # On CUDA the kernel returns float32 statistics for half inputs by itself.
        return torch.batch_norm_update_stats(input, None, None, 0.0)
    # On CPU it returns the input's dtype unless given float32 buffers (momentum 0 leaves them).
    return torch.batch_norm_update_stats(
        input, input.new_zeros(channels, dtype=dtype), input.new_ones(channels, dtype=dtype), 0.0
    )


_ONE_CPU = torch.ones(1, dtype=torch.float64, device="cpu")


def _one(like: Tensor) -> Tensor:
    # On CUDA a fill kernel (a Python number written into a device tensor would be a blocking
    # host-to-device copy, and a cached device tensor could be born inside a CUDA graph capture).
    return like.new_ones(1, dtype=torch.float64) if like.device.type != "cpu" else _ONE_CPU


def pack(count: Union[int, Tensor], first: Tensor, second: Tensor) -> Tensor:
    """``[count, first (C), second (C)]`` in float64: the statistics part of every payload."""
    head = count.reshape(1).to(torch.float64) if isinstance(count, Tensor) else _one(first).mul(count)
    return cast(torch.cat((head, first, second)), torch.float64)


def moments_payload(count: int, mean: Tensor, var: Tensor, layer: str, what: str) -> Tensor:
    """``[f, f^2, n, n mean, n (var + mean^2)]`` in float64, for a rank's n values per channel."""
    if _host_tensor(mean):
        # One cat, which also casts to float64, then in-place arithmetic on its parts.
        channels = mean.shape[0]
        head, weights = counted_head(layer, what, count, channels)
        payload = torch.cat((head, mean, var))
        _, first, second = payload.split_with_sizes((3, channels, channels))
        second.addcmul_(first, first)
        return payload.mul_(weights)
    mean = cast(mean, torch.float64)
    payload = torch.cat((fingerprint_head(layer, what, mean), _one(mean), mean, torch.addcmul(var, mean, mean)))
    payload[2:].mul_(count)
    return payload


def reduce_payload(payload: Tensor, group, *, layer: str, what: str, check: bool, input: Tensor, kind: int) -> Tensor:
    """All-reduce a packed payload in place, with the guard's checks around it when ``check``."""
    if check:
        guard.verify_consistency(group, layer, input, training=True, kind=kind)
        local = payload.clone()
    collectives.all_reduce(payload, group, layer=layer, what=what)
    if check:
        guard.verify_finite(payload, local, group, layer)
    return payload


def reduced_means(payload: Tensor, group, layer: str, what: str) -> tuple[Tensor, Tensor, Tensor, Optional[float]]:
    """(count, first / count, second / count, host count) of a reduced ``[f, f^2, count, first, second]``.

    The fingerprint is verified first (:func:`verify_fingerprint`). The host count is a Python
    float on CPU (reading it costs nothing there) and None on CUDA or while compiling, where
    everything stays on the device. A payload that never left this process (``group`` None)
    has no fingerprint to check.
    """
    channels = (payload.numel() - 3) // 2
    _, count, first, second = payload.split_with_sizes((2, 1, channels, channels))
    head = None if group is None else verify_fingerprint(payload, group, layer, what)
    if payload.is_cuda or torch.compiler.is_compiling():
        scale = count.reciprocal()
        return count, first * scale, second * scale, None
    host_count = head[2] if head is not None else float(count)
    if not host_count:
        return count, first * 0.0, second * 0.0, host_count
    # By the count tensor: a Python number would be wrapped into a tensor per call.
    return count, first.div(count), second.div(count), host_count


def global_moments(
    payload: Tensor, dtype: torch.dtype, group, layer: str, what: str
) -> tuple[Tensor, Tensor, Tensor, Optional[float]]:
    """(mean, biased var, count, host count) from a reduced moments payload; stats in ``dtype``."""
    count, mean, mean_square, host_count = reduced_means(payload, group, layer, what)
    var = mean_square.addcmul_(mean, mean, value=-1).clamp_min_(0)
    if dtype != torch.float64:
        mean, var = cast(mean, dtype), cast(var, dtype)
    return mean, var, count, host_count


def too_few_values(layer: str, count: float) -> ValueError:
    return ValueError(
        f"syncnorm: layer '{layer}' got {int(count)} value(s) per channel over all ranks in training "
        "mode; batch statistics need at least 2 (use a larger batch, or eval mode)"
    )


def batch_statistics(input: Tensor, group, layer: str, check: bool) -> tuple[Tensor, Tensor, Tensor, Optional[float]]:
    """The statistics step: global (mean, biased var, count, host count) over the group.

    ``group`` None means this process alone. On CPU a group with at most one value per channel
    raises on every rank (all of them read the same count); on CUDA it is not read back.
    """
    channels = input.shape[1]
    local_count = input.numel() // channels
    mean, var = local_moments(input)
    if group is None:
        count = float(local_count)
        if count <= 1:
            raise too_few_values(layer, count)
        return mean, var, mean.new_full((1,), count, dtype=torch.float64), count
    what = "forward statistics"
    payload = moments_payload(local_count, mean, var, layer, what)
    reduce_payload(payload, group, layer=layer, what=what, check=check, input=input, kind=guard.KIND_FORWARD)
    mean, var, count, host_count = global_moments(payload, mean.dtype, group, layer, what)
    if host_count is not None and host_count <= 1:
        raise too_few_values(layer, host_count)
    return mean, var, count, host_count


# ---------------------------------------------------------------------------------------------
# gradients


def grad_sums(grad: Tensor, input: Tensor, mean: Tensor, var: Tensor, invstd: Tensor, eps: float):
    """Per channel ``(sum dy, sum dy * (x - mean) * invstd)`` with invstd = 1 / sqrt(var + eps).

    One fused pass of torch's kernels: on CUDA the reduction SyncBatchNorm uses, on CPU the
    eval-mode batch-norm backward with (mean, var) as running statistics (CUDA's version of
    that one asserts without saved statistics, hence two routes).
    """
    if input.numel() == 0:
        return mean.new_zeros(mean.shape), mean.new_zeros(mean.shape)
    if input.is_cuda:
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(grad, input, mean, invstd, None, True, False, False)
        return sum_dy, sum_dy_xmu * invstd
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad, input, None, mean, var, None, None, False, eps, [False, True, True]
    )
    return sum_dy, sum_dy_xhat


def reduce_grad_sums(
    sum_dy: Tensor, sum_dy_xhat: Tensor, count: Tensor, host_count: Optional[float], group, layer: str,
    check: bool, input: Tensor, factor: Optional[Tensor] = None, sign: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The gradient all_reduce: ``sign * factor * (mean dy, mean dy * x_hat)`` over the group.

    ``factor`` (per channel, optional) and ``sign`` are folded into the one scaling that turns
    the global sums into means. The payload is ``[f, f^2, sum dy (C), sum dy * x_hat (C)]`` in
    float64 (the fingerprint's sums must stay exact); the means come back in the sums' dtype.
    """
    dtype = sum_dy.dtype
    if group is not None:
        what = "backward gradient"
        if check:
            guard.verify_consistency(group, layer, input, training=True, kind=guard.KIND_BACKWARD)
        payload = torch.cat((fingerprint_head(layer, what, sum_dy), sum_dy, sum_dy_xhat))
        collectives.all_reduce(payload, group, layer=layer, what=what)
        head, sum_dy, sum_dy_xhat = payload.split_with_sizes((2, sum_dy.shape[0], sum_dy.shape[0]))
        verify_fingerprint(head, group, layer, what)
        # Fresh tensors from here on (float64 payload) unless the sums are float64 themselves, then
        # views of the payload: either way the caller's sums (its parameter gradients) stay as they are.
        sum_dy, sum_dy_xhat = cast(sum_dy, dtype), cast(sum_dy_xhat, dtype)
    else:
        sum_dy, sum_dy_xhat = sum_dy.clone(), sum_dy_xhat.clone()
    if host_count is not None:
        scale = scalar(sign / host_count if host_count else 0.0, dtype)
    else:
        scale = count.reciprocal().to(dtype)
        scale = scale if sign == 1.0 else scale.mul_(sign)
    if factor is not None:
        scale = factor * scale
    return sum_dy.mul_(scale), sum_dy_xhat.mul_(scale)


# ---------------------------------------------------------------------------------------------
# running statistics


def step_momentum(momentum: Optional[float], num_batches_tracked: Tensor) -> Momentum:
    """This step's averaging factor: ``momentum``, or 1 / steps for ``momentum=None`` (cumulative).

    The count is read on CPU (free) and kept on the device elsewhere, in float64 either way:
    a half-precision count would stop at 256 (bfloat16) or overflow (float16).
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked.is_cuda or torch.compiler.is_compiling():
        return torch.reciprocal(num_batches_tracked.to(torch.float64))
    return 1.0 / float(num_batches_tracked)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    momentum: Momentum,
    host_count: Optional[float] = None,
    *,
    min_count: int = 2,
    unbiased: bool = True,
) -> None:
    """running = (1 - momentum) running + momentum batch, identically on every rank.

    ``var`` is made unbiased (times n / (n - 1)) unless ``unbiased=False``. A global count
    below ``min_count`` leaves the buffers unchanged; on CUDA through a device-side mask.
    Called only after the op has succeeded, so a failed step never half-updates them.
    """
    if torch.is_grad_enabled():
        with torch.no_grad():
            return update_running_stats(
                running_mean, running_var, mean, var, count, momentum, host_count, min_count=min_count,
                unbiased=unbiased,
            )  # fmt: skip
    dtype = running_mean.dtype
    if host_count is not None and not isinstance(momentum, Tensor) and dtype in (torch.float32, torch.float64):
        if host_count < min_count:
            return
        factor = host_count / (host_count - 1) if unbiased else 1.0
        running_mean.lerp_(cast(mean, dtype), momentum)
        running_var.mul_(scalar(1 - momentum, dtype)).add_(cast(var, dtype), alpha=momentum * factor)
        return
    # Device-side route: a tensor count and momentum, no host read. Half-precision buffers
    # are averaged in float32 and rounded once, as torch's kernels do.
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if unbiased:
        var = var * (count / (count - 1)).to(var.dtype)
    weight = (count >= min_count).to(work)
    weight = weight * (momentum.to(work) if isinstance(momentum, Tensor) else momentum)
    for running, batch in ((running_mean, mean), (running_var, var)):
        batch = torch.where(weight > 0, batch.to(work), 0)  # 0 * NaN would poison the buffer
        if work == dtype:
            running.lerp_(batch, weight)
        else:
            running.copy_(torch.lerp(running.to(work), batch, weight))


# Python numbers that recur every step (1 - momentum, 1 / global count) as 0-dim CPU tensors: an
# arithmetic op wraps a Python number into a new tensor on every call. A few entries; values
# that change every step (momentum=None) get none past the cap.
_scalars: dict[tuple[float, torch.dtype], Tensor] = {}


def scalar(value: float, dtype: torch.dtype) -> Union[float, Tensor]:
    """``value`` as a cached 0-dim CPU tensor of ``dtype`` (the number itself past the cache's cap)."""
    known = _scalars.get((value, dtype))
    if known is None:
        if len(_scalars) >= 64:
            return value
        with torch.inference_mode(False):
            known = _scalars[(value, dtype)] = torch.tensor(value, dtype=dtype, device="cpu")
    return known
