"""Run syncnorm on fake CUDA tensors and fail on what would stall or break a real GPU.

No GPU is needed: with a CUDA build of torch, ``FakeTensorMode`` makes tensors with
``device="cuda"`` that carry shape, dtype and strides but no data, and torch's "fake"
process group makes ``world_size > 1`` collectives that return at once. The numbers are
meaningless; what is checked is *which ops run*. :class:`CudaOpChecker`, a dispatch mode
above the fake mode, sees every aten op and fails on the first one that

* reads a device value back to the host (:func:`host_read`: ``.item()``, ``float(t)``, ``nonzero``, ...),
* moves data between CPU and CUDA (:func:`host_device_copy`: a copy, ``t[0] = 3.0``, a CPU
  scalar tensor mixed into a CUDA op), or
* would be refused by torch's CUDA kernels although their meta kernels accept it
  (:func:`cuda_refusal`, rules read from aten/src/ATen/native/cuda/Normalization.cu(h)).

Three gaps of fake tensors are filled here:

* torch's CUDA-only batch-norm ops have no meta kernels: :func:`register_batch_norm_meta_kernels`.
* a ``torch.library`` custom op under FakeTensorMode runs its *fake* kernel, which hides the
  real body; the checker instead redispatches every ``syncnorm::*`` op to its CUDA kernel (the
  real body, as on a GPU) with itself pushed again, so the body's ops are checked too.
* the autograd engine needs a CUDA device for CUDA tensors ("hasPrimaryContext expects a
  valid device index"), so :func:`run_backward` walks the graph itself, calling each node.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch._dynamo
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import syncnorm

aten = torch.ops.aten

WATCHED_NAMESPACE = "syncnorm"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(syncnorm.__file__))


class DeviceViolation(AssertionError):
    """An op that would read back to the host, cross devices, or be refused on a real GPU."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # at::toAccumulateType(dtype, /*is_cuda=*/true) for the floating types batch norm takes
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_last_kernel(t: Tensor) -> bool:
    # batch_norm_use_channels_last_kernels in Normalization.cu
    return t.is_contiguous(memory_format=torch.channels_last) or (t.is_contiguous() and t.stride(1) == 1)


def _tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Tensor]:
    return [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]


# --- meta kernels for torch's CUDA-only batch-norm ops (shapes and dtypes as Normalization.cu) ----


def _stats_meta(input: Tensor, *_: Any) -> tuple[Tensor, Tensor]:
    # batch_norm_stats -> (mean, invstd), batch_norm_update_stats -> (mean, biased var)
    channels, dtype = input.shape[1], _acc_dtype(input.dtype)
    return input.new_empty(channels, dtype=dtype), input.new_empty(channels, dtype=dtype)


def _elemt_meta(input: Tensor, *_: Any) -> Tensor:
    return torch.empty_like(input)  # empty_like(self, self.suggest_memory_format()), the same for dense input


def _backward_reduce_meta(grad_out, input, mean, invstd, weight, input_g, weight_g, bias_g):
    channels = input.shape[1]
    if _channels_last_kernel(grad_out) and _channels_last_kernel(input):
        # the channels-last kernel returns all four (empty weight grads without a weight)
        params = (channels, weight.dtype) if weight is not None else (0, mean.dtype)
        return (
            torch.empty_like(mean), torch.empty_like(mean),
            mean.new_empty(params[0], dtype=params[1]), mean.new_empty(params[0], dtype=params[1]),
        )  # fmt: skip
    stats = torch.empty_like(mean) if input_g else None
    grad_weight = mean.new_empty(channels, dtype=weight.dtype) if weight_g and weight is not None else None
    grad_bias = mean.new_empty(channels, dtype=weight.dtype) if bias_g and weight is not None else None
    return stats, None if stats is None else torch.empty_like(mean), grad_weight, grad_bias


def _backward_elemt_meta(grad_out: Tensor, input: Tensor, *_: Any) -> Tensor:
    return torch.empty_like(input) if _channels_last_kernel(grad_out) else input.new_empty(input.shape)


def _gather_stats_meta(input, mean, *_: Any) -> tuple[Tensor, Tensor]:
    dtype = torch.float32 if mean.dtype in (torch.float16, torch.bfloat16) else mean.dtype
    return mean.new_empty(mean.shape[1], dtype=dtype), mean.new_empty(mean.shape[1], dtype=dtype)


_META_KERNELS: dict[str, Callable[..., Any]] = {
    "batch_norm_stats": _stats_meta,
    "batch_norm_update_stats": _stats_meta,
    "batch_norm_elemt": _elemt_meta,
    "batch_norm_backward_reduce": _backward_reduce_meta,
    "batch_norm_backward_elemt": _backward_elemt_meta,
    "batch_norm_gather_stats_with_counts": _gather_stats_meta,
    "batch_norm_gather_stats": _gather_stats_meta,
}


def register_batch_norm_meta_kernels() -> torch.library.Library:
    """Meta kernels for the ops above that have none; destroy the returned library to remove them."""
    library = torch.library.Library("aten", "IMPL")
    for name, kernel in _META_KERNELS.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "Meta"):
            library.impl(name, kernel, "Meta")
    return library


# --- the three checks: each returns what is wrong with one op call, or None -------------------

_HOST_READS = {
    aten._local_scalar_dense.default: ".item() / float() / int() / bool() of a device tensor",
    aten.is_nonzero.default: "bool() of a device tensor",
    aten.equal.default: "torch.equal (its result is a host bool)",
    aten.nonzero.default: "nonzero (its output size lives on the device)",
    aten.masked_select.default: "masked_select (its output size lives on the device)",
    aten._unique2.default: "unique (its output size lives on the device)",
    aten.unique_consecutive.default: "unique_consecutive (its output size lives on the device)",
    aten.repeat_interleave.Tensor: "repeat_interleave with tensor repeats (output size on the device)",
}


def host_read(func, args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[str]:
    """A device value read back to the host: a blocking sync on every step."""
    if not any(t.is_cuda for t in _tensors(args, kwargs)):
        return None
    if func in _HOST_READS:
        return _HOST_READS[func]
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        if any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1], {})):
            return "boolean-mask indexing (it runs nonzero: the output size lives on the device)"
    return None


def host_device_copy(func, args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[str]:
    """Data moved between CPU and CUDA: a copy, or a CPU tensor (a 0-dim "CPU scalar" too) in a CUDA op."""
    tensors = _tensors(args, kwargs)
    devices = {t.device.type for t in tensors}
    if func in (aten._to_copy.default, aten.to.device, aten.to.dtype_layout, aten._copy_from.default):
        target = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, torch.device)), None)
        if target is not None and tensors and torch.device(target).type != tensors[0].device.type:
            return f"a copy from {tensors[0].device.type} to {torch.device(target).type}"
    if func is aten.batch_norm_gather_stats.default and "cuda" in devices:
        return "batch_norm_gather_stats copies its int count from the host"
    if {"cpu", "cuda"} <= devices:
        cpu = [t for t in tensors if t.device.type == "cpu"]
        what = "a 0-dim CPU tensor (a Python number written into a CUDA tensor, or a CPU scalar)"
        return (what if all(t.dim() == 0 for t in cpu) else "a CPU tensor") + " mixed into a CUDA op"
    return None


def _native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
                                train, eps, output_mask) -> Optional[str]:  # fmt: skip
    # batch_norm_backward_cuda takes its fused kernel only with output_mask[0], (train or a weight
    # or bias grad), a non-channels-last layout and 32-bit indexing; every other call hits
    # TORCH_INTERNAL_ASSERT(save_mean->defined()) and (save_invstd->defined()). Conservatively:
    if save_mean is None or save_invstd is None:
        return "native_batch_norm_backward on CUDA needs save_mean and save_invstd defined (an internal assert)"
    return None


def _stats_dtypes(name: str, input: Tensor, stats: dict[str, Optional[Tensor]]) -> Optional[str]:
    acc = _acc_dtype(input.dtype)
    wrong = {k: v.dtype for k, v in stats.items() if v is not None and v.dtype != acc}
    if wrong:
        return f"{name} on CUDA reads {', '.join(wrong)} as {acc} for {input.dtype} input, got {wrong}"
    return None


def _backward_reduce(grad_out, input, mean, invstd, weight, input_g, weight_g, bias_g) -> Optional[str]:
    if (weight_g or bias_g) and weight is None:
        return "batch_norm_backward_reduce on CUDA cannot return weight/bias grads without a weight"
    if weight is not None and weight.dtype not in (input.dtype, _acc_dtype(input.dtype)):
        return f"batch_norm_backward_reduce on CUDA refuses a {weight.dtype} weight with {input.dtype} input"
    return _stats_dtypes("batch_norm_backward_reduce", input, {"mean": mean, "invstd": invstd})


def _backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count) -> Optional[str]:
    if count.dtype != torch.int32:
        return f"batch_norm_backward_elemt on CUDA reads count as int32, got {count.dtype}"
    if weight is not None and weight.dtype != _acc_dtype(input.dtype):
        return f"batch_norm_backward_elemt on CUDA refuses a {weight.dtype} weight with {input.dtype} input"
    stats = {"mean": mean, "invstd": invstd, "sum_dy": sum_dy, "sum_dy_xmu": sum_dy_xmu}
    return _stats_dtypes("batch_norm_backward_elemt", input, stats)


def _elemt(input, weight, bias, mean, invstd, eps) -> Optional[str]:
    return _stats_dtypes("batch_norm_elemt", input, {"mean": mean, "invstd": invstd})


_CUDA_RULES: dict[Any, Callable[..., Optional[str]]] = {
    aten.native_batch_norm_backward.default: _native_batch_norm_backward,
    aten.batch_norm_backward_reduce.default: _backward_reduce,
    aten.batch_norm_backward_elemt.default: _backward_elemt,
    aten.batch_norm_elemt.default: _elemt,
}


def cuda_refusal(func, args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[str]:
    """A call that torch's CUDA kernel refuses (asserts or raises) although the meta kernel accepts it."""
    rule = _CUDA_RULES.get(func)
    if rule is None or not any(t.is_cuda for t in _tensors(args, kwargs)):
        return None
    return rule(*args, **kwargs)


CHECKS: tuple[Callable[..., Optional[str]], ...] = (host_read, host_device_copy, cuda_refusal)


# --- the dispatch mode -----------------------------------------------------------------------


def watched_stack(limit: int = 6) -> str:
    """The innermost frames of syncnorm (and of the test) on the current Python stack."""
    frames = [
        f for f in traceback.extract_stack()[:-1]
        if os.path.abspath(f.filename).startswith(_PACKAGE_DIR) or os.path.basename(f.filename).startswith("test_")
    ]  # fmt: skip
    return "".join(traceback.format_list(frames[-limit:])).rstrip()


@dataclass
class RecordedOp:
    func: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return str(self.func)


class CudaOpChecker(TorchDispatchMode):
    """Records every op; raises :class:`DeviceViolation` on the first that a check flags.

    ``syncnorm::*`` ops run their CUDA kernel (the real body) instead of the fake kernel.
    Violations are also kept in ``violations``, in case code under test swallows the error.
    """

    @classmethod
    def is_infra_mode(cls) -> bool:
        # Passive like torch's own infra modes (it only looks, then runs the op as it would have
        # run): Dynamo skips every frame while a non-infra dispatch mode is on the stack.
        return True

    def __init__(self, checks: Sequence[Callable[..., Optional[str]]] = CHECKS) -> None:
        super().__init__()
        self.checks = tuple(checks)
        self.ops: list[RecordedOp] = []
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(RecordedOp(func, args, kwargs))
        for check in self.checks:
            problem = check(func, args, kwargs)
            if problem is not None:
                message = f"{func}: {problem}\n{watched_stack()}"
                self.violations.append(message)
                raise DeviceViolation(message)
        if func.namespace == WATCHED_NAMESPACE:
            # The body, as the dispatcher would run it on a GPU: the CUDA kernel (a custom_op's
            # CompositeExplicitAutograd or "cuda" kernel), below autograd, with this mode on top.
            with self, torch.no_grad():
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args, **kwargs)
        if func.namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), "CompositeImplicitAutograd"
        ):
            # Reached below autograd (inside an op body): decompose here, as autograd would have,
            # so that the ops it is made of pass the checks too (the fake mode would hide them).
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)

    def count(self, namespace: str, name: str = "") -> int:
        return sum(1 for op in self.ops if op.func.namespace == namespace and name in op.name)


# --- backward without the autograd engine ----------------------------------------------------


def _call_node(node: Any, grads: list[Optional[Tensor]]) -> tuple[Optional[Tensor], ...]:
    if hasattr(node, "apply"):  # a Python autograd.Function's node
        if getattr(node, "materialize_grads", True):
            grads = [
                g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                for g, m in zip(grads, node._input_metadata)
            ]
        result = node.apply(*grads)
    else:
        result = node(*grads)
    return result if isinstance(result, tuple) else (result,)


def _as_expected(grad: Tensor, metadata: Any) -> Tensor:
    # The engine's validate_outputs: a broadcast input's grad is summed to its shape, and cast to its dtype.
    if grad.shape != metadata.shape:
        grad = grad.sum_to_size(metadata.shape)
    return grad if grad.dtype == metadata.dtype else grad.to(metadata.dtype)


def run_backward(output: Tensor, grad_output: Tensor) -> None:
    """``output.backward(grad_output)`` by hand: each node called once all its grads are in.

    Nodes run in dependency order (Kahn's algorithm over the graph reachable from
    ``output.grad_fn``), grads summed per node input; AccumulateGrad nodes write ``.grad``.
    """
    root = output.grad_fn
    assert root is not None, "the output does not require grad"
    dependencies: dict[Any, int] = defaultdict(int)
    seen, stack = {root}, [root]
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is not None:
                dependencies[child] += 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    pending: dict[Any, list[Optional[Tensor]]] = {root: [None] * len(root._input_metadata)}
    pending[root][output.output_nr] = grad_output
    ready = [root]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            grads = pending.pop(node)
            try:
                results = _call_node(node, grads) if any(g is not None for g in grads) else ()
            except Exception as error:
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note(f"(in the backward of autograd node {node.name()})")
                raise
            for index, (child, input_nr) in enumerate(node.next_functions):
                if child is None:
                    continue
                slots = pending.setdefault(child, [None] * max(1, len(child._input_metadata)))
                grad = results[index] if index < len(results) else None
                if grad is not None:
                    grad = _as_expected(grad, child._input_metadata[input_nr])
                    slots[input_nr] = grad if slots[input_nr] is None else slots[input_nr] + grad
                dependencies[child] -= 1
                if dependencies[child] == 0:
                    ready.append(child)


# --- the session: fake process group, fake CUDA, the checker ----------------------------------


def forget_fake_tensors(package: str = WATCHED_NAMESPACE) -> None:
    """Drop fake tensors that the package cached in module-level dicts, so that no later real run meets them."""
    for module_name, module in list(sys.modules.items()):
        if module_name != package and not module_name.startswith(package + "."):
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, dict) and not name.startswith("__"):
                for key in [k for k, v in value.items() if any(isinstance(t, FakeTensor) for t in tree_leaves(v))]:
                    del value[key]


@contextmanager
def fake_cuda_session(world_size: int = 4) -> Iterator[FakeTensorMode]:
    """A FakeTensorMode to build layers and inputs in, with the meta kernels and torch's "fake"
    process group of ``world_size`` ranks (collectives return at once, so W > 1 paths run).

    One mode for the whole session: fake tensors that the code under test caches (a constant
    per device, say) may not meet another mode. Everything is undone at the end.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    library = register_batch_norm_meta_kernels()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield FakeTensorMode()
    finally:
        dist.destroy_process_group()
        library._destroy()
        forget_fake_tensors()
        torch._dynamo.reset()


@contextmanager
def checked() -> Iterator[CudaOpChecker]:
    """A :class:`CudaOpChecker` on top of the mode stack (enter the FakeTensorMode first)."""
    checker = CudaOpChecker()
    with checker:
        yield checker
    assert not checker.violations, "\n\n".join(checker.violations)
