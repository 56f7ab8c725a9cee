"""The functional forms: :func:`sync_batch_norm` and :func:`inplace_abn`.

Both take :func:`torch.nn.functional.batch_norm`'s arguments plus ``process_group`` (None for
the default group, a ProcessGroup, or a 1-D DeviceMesh). In training mode the statistics
cover the batches of every rank in the group, and the running statistics (if given) are
updated in place, identically on every rank, only once the call has succeeded. The math is
on the docs' "The math" page; the implementation is :mod:`syncnorm.core` and :mod:`syncnorm.ops`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import collectives, core, guard, ops, pooling

__all__ = ["inplace_abn", "sync_batch_norm", "writes_in_place"]
# batch_norm_eval, batch_norm_local and batch_norm_training are the layers' shared paths, not API.


def _num_features(running_mean: Optional[Tensor], weight: Optional[Tensor]) -> Optional[int]:
    if running_mean is not None:
        return running_mean.numel()
    return None if weight is None else weight.numel()


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

    In eval mode, without torch.distributed, or in a group of one rank, this is exactly
    ``F.batch_norm``. ``momentum`` may be a tensor (on the device, for ``momentum=None``'s
    cumulative average). ``layer`` names the call in errors and in the guard; ``check``
    overrides the guard switch for this call.
    """
    core.validate_input(input, _num_features(running_mean, weight), layer)
    group = collectives.synchronised_group(process_group)
    running = None if running_mean is None or running_var is None else (running_mean, running_var)
    if not training:
        guard.verify_eval(group, input, layer, guard.check_requested(check), guard.KIND_FORWARD)
        return batch_norm_eval(input, running, weight, bias, eps)
    if group is None:
        if isinstance(momentum, Tensor):
            momentum = float(momentum)
        return batch_norm_local(input, running, weight, bias, momentum, eps, layer)
    return batch_norm_training(input, running, weight, bias, momentum, eps, group, layer, check)


# --- the paths, shared by the functional form and the layers ---------------------------------


def _native_dtype(input_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether torch's batch-norm kernels take running statistics of ``dtype`` next to this input."""
    return dtype == input_dtype or (dtype == torch.float32 and input_dtype in (torch.float16, torch.bfloat16))


def batch_norm_eval(
    input: Tensor, running: Optional[tuple[Tensor, Tensor]], weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float,
) -> Tensor:  # fmt: skip
    """Eval mode: the running statistics (batch statistics without them); never communicates.

    Weight, bias and running statistics are used in the statistics' dtype where torch's kernel
    would refuse their own dtype next to the input's (bfloat16 buffers with a float32 input),
    as the synchronised path does; elsewhere this is exactly ``F.batch_norm``.
    """
    if running is None:
        weight, bias = core.affine_in_dtype(weight, bias, core.stats_dtype(input.dtype))
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    running_mean, running_var = running
    if not _native_dtype(input.dtype, running_mean.dtype):
        dtype = core.stats_dtype(input.dtype)
        running_mean, running_var = core.cast(running_mean, dtype), core.cast(running_var, dtype)
    weight, bias = core.affine_in_dtype(weight, bias, running_mean.dtype)
    return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)


def batch_norm_local(
    input: Tensor, running: Optional[tuple[Tensor, Tensor]], weight: Optional[Tensor], bias: Optional[Tensor],
    momentum: float, eps: float, layer: str,
) -> Tensor:  # fmt: skip
    """Training without other ranks: exactly ``F.batch_norm`` (nn.BatchNorm), or the core's path
    with the same dtype rule as the synchronised one where torch's kernel would refuse the
    running statistics' dtype next to the input's."""
    collectives.warn_if_launched_without_group(layer)
    if input.numel() <= input.shape[1]:
        raise core.too_few_values(layer, input.numel() // input.shape[1])
    if running is not None and not _native_dtype(input.dtype, running[0].dtype):
        return batch_norm_training(input, running, weight, bias, momentum, eps, None, layer, False)
    dtype = core.stats_dtype(input.dtype) if running is None else running[0].dtype
    weight, bias = core.affine_in_dtype(weight, bias, dtype)
    running_mean, running_var = (None, None) if running is None else running
    return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)


def batch_norm_training(
    input: Tensor, running: Optional[pooling.Running], weight: Optional[Tensor], bias: Optional[Tensor],
    momentum: Union[float, Tensor], eps: float, group, layer: str, check: Optional[bool],
) -> Tensor:  # fmt: skip
    """Training on the core (``group`` None: this process alone), for a validated input."""
    weight, bias = core.affine_in_dtype(weight, bias, core.stats_dtype(input.dtype))
    check = guard.check_requested(check)
    if ops.compiling():
        output, mean, var, count = torch.ops.syncnorm.batch_norm_forward(
            input, weight, bias, eps, "" if group is None else group.group_name, layer, check
        )
        ops.custom_op_running_update(running, mean, var, count, momentum)
        return output
    return ops.EagerBatchNorm.apply(input, weight, bias, (running, momentum, eps, group, layer, check))


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

    Arguments as :func:`sync_batch_norm`, plus the activation (``"leaky_relu"`` with slope
    ``activation_param`` > 0, ``"elu"`` with alpha ``activation_param``, or ``"identity"``) and
    ``inplace``: with ``True`` the output is written over ``input`` when :func:`writes_in_place`
    allows, as ``nn.LeakyReLU(inplace=True)`` does (the caller must not use ``input`` afterwards;
    if another op saved it for its own backward, autograd raises at backward). Eval mode (with
    running statistics) also saves only the output, and never communicates.
    """
    running = None if running_mean is None or running_var is None else (running_mean, running_var)
    return inplace_abn_with(
        input, running, _num_features(running_mean, weight), weight, bias, training, momentum, eps, activation,
        activation_param, process_group, inplace, layer, check,
    )  # fmt: skip


def inplace_abn_with(
    input: Tensor, running: Optional[pooling.Running], num_features: Optional[int], weight: Optional[Tensor],
    bias: Optional[Tensor], training: bool, momentum: Union[float, Tensor], eps: float, activation: str,
    activation_param: float, process_group: collectives.SyncGroup, inplace: bool, layer: str, check: Optional[bool],
) -> Tensor:  # fmt: skip
    """:func:`inplace_abn` with what training updates given as one target: running buffers or a window's pool."""
    ops.check_activation(activation, activation_param, layer)
    core.validate_input(input, num_features, layer)
    group = collectives.synchronised_group(process_group)
    check = guard.check_requested(check)
    batch_stats = training or running is None
    if not training:
        guard.verify_eval(group, input, layer, check, guard.KIND_FORWARD)
    elif group is None:
        collectives.warn_if_launched_without_group(layer)
    weight, bias = core.affine_in_dtype(weight, bias, core.stats_dtype(input.dtype))
    group = group if training else None
    if ops.compiling():
        if not batch_stats:
            # Eval: torch's own ops, traced as they are, so that torch.export and ONNX see no
            # syncnorm op (there is no backward to keep small in an exported graph).
            return ops.inplace_abn_eval(input, weight, bias, *running, eps, activation, activation_param)
        output, mean, var, count = torch.ops.syncnorm.inplace_abn_forward(
            input, weight, bias, None, None, eps, activation, float(activation_param),
            "" if group is None else group.group_name, layer, check,
        )  # fmt: skip
        if training:
            ops.custom_op_running_update(running, mean, var, count, momentum)
        return output
    in_place = inplace and writes_in_place(input)
    spec = (running, momentum, batch_stats, in_place, eps, activation, float(activation_param), group, layer, check)
    return ops.EagerInPlaceABN.apply(input, weight, bias, spec)
