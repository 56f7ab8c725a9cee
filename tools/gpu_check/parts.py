"""The pieces the sections of ``tools/gpu_check`` share: stand-ins for W ranks, the error measure, the
layout check on what an op returns. (The timer is ``benchmarks/measure.py``'s.)

Everything here runs on CUDA and on CPU tensors alike (``device`` is an argument), so that
``python -m tools.gpu_check --device cpu`` rehearses the same code the GPU run takes.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import syncnorm

# ---------------------------------------------------------------------------------------------
# W identical ranks in one process


class _Done:
    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class IdenticalRanks:
    """Collectives as W ranks holding the same data would compute them, without any communication.

    Under torch's "fake" process group every collective returns at once and leaves its
    output as it was: an all_gather output stays uninitialised, so torch.nn.SyncBatchNorm
    would normalise with garbage counts and statistics. Inside :meth:`patched`,
    ``torch.distributed``'s all_reduce multiplies by W (SUM; MAX, MIN, AVG leave it) and
    the all_gathers tile the local input W times: both implementations then compute on
    real numbers (the global statistics of W copies of the local batch equal the local
    ones), with device ops only, so no host sync and nothing a CUDA graph cannot capture.
    The Python-level call counts are kept in ``calls``.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self.calls: Counter = Counter()
        self.fingerprint_checked = False  # whether syncnorm's fingerprint check ran (see fingerprint_check_on)

    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
        self.calls["all_reduce"] += 1
        if op == dist.ReduceOp.SUM:
            tensor.mul_(self.world)
        elif op not in (dist.ReduceOp.MAX, dist.ReduceOp.MIN, dist.ReduceOp.AVG):
            raise NotImplementedError(f"IdenticalRanks: all_reduce op {op}")
        return _Done() if async_op else None

    def process_group_allreduce(self, group, tensors, options=None):
        # syncnorm calls the ProcessGroup directly (dist.all_reduce's wrappers cost host time).
        op = dist.ReduceOp.SUM if options is None else options.reduceOp
        for tensor in tensors if isinstance(tensors, (list, tuple)) else [tensors]:
            self.all_reduce(tensor, op)
        return _Done()

    def all_gather_into_tensor(self, output: Tensor, input: Tensor, group=None, async_op: bool = False):
        self.calls["all_gather_into_tensor"] += 1
        output.view(self.world, -1).copy_(input.reshape(1, -1))
        return _Done() if async_op else None

    def all_gather(self, tensor_list: list, tensor: Tensor, group=None, async_op: bool = False):
        self.calls["all_gather"] += 1
        for out in tensor_list:
            out.copy_(tensor)
        return _Done() if async_op else None

    @contextlib.contextmanager
    def patched(self):
        replacements = {
            "all_reduce": self.all_reduce,
            "all_gather": self.all_gather,
            "all_gather_into_tensor": self.all_gather_into_tensor,
            "all_gather_single": self.all_gather_into_tensor,  # torch >= 2.13's name in SyncBatchNorm
            "_all_gather_base": self.all_gather_into_tensor,
        }
        saved = {name: getattr(dist, name) for name in replacements if hasattr(dist, name)}
        saved_allreduce = dist.ProcessGroup.__dict__["allreduce"]  # the descriptor, so restoring keeps binding
        identical = self
        try:
            for name in saved:
                setattr(dist, name, replacements[name])
            dist.ProcessGroup.allreduce = lambda group, *args, **kwargs: identical.process_group_allreduce(
                group, *args, **kwargs
            )
            with fingerprint_check_on() as self.fingerprint_checked:
                yield self
        finally:
            dist.ProcessGroup.allreduce = saved_allreduce
            for name, original in saved.items():
                setattr(dist, name, original)


class OtherRanks(IdenticalRanks):
    """W ranks where this one holds its own batch (empty, one sample) and the other W - 1 a recorded one.

    Identical ranks cannot stand for an empty rank beside ranks holding data (W empty ranks hold
    nothing at all). Inside :meth:`recording` the collectives are :class:`IdenticalRanks`' and the
    local payload of each all_reduce is kept, in call order; inside :meth:`replaying` each
    all_reduce(SUM) returns ``local + (W - 1) x`` the payload recorded at the same position, as
    W - 1 ranks holding the recorded batch would add. Record from a copy of the same layers
    (``copy.deepcopy`` keeps their names, so the fingerprints agree). Device ops only: no host
    sync, capturable in a CUDA graph (the recorded payloads are static tensors).
    """

    def __init__(self, world: int) -> None:
        super().__init__(world)
        self.mode = "identical"
        self.recorded: list[Tensor] = []
        self.position = 0

    @contextlib.contextmanager
    def _mode(self, mode: str):
        saved, self.mode, self.position = self.mode, mode, 0
        try:
            yield self
        finally:
            self.mode = saved

    def recording(self):
        self.recorded = []
        return self._mode("record")

    def replaying(self):
        if not self.recorded:
            raise RuntimeError("OtherRanks: nothing recorded to replay")
        return self._mode("replay")

    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
        if self.mode == "record":
            self.recorded.append(tensor.detach().clone())
        if self.mode != "replay" or op != dist.ReduceOp.SUM:
            return super().all_reduce(tensor, op, group, async_op)
        self.calls["all_reduce"] += 1
        others = self.recorded[self.position % len(self.recorded)]
        if others.shape != tensor.shape or others.dtype != tensor.dtype:
            raise RuntimeError(
                f"OtherRanks: all_reduce {self.position} got {tuple(tensor.shape)} {tensor.dtype}, the recorded "
                f"sequence has {tuple(others.shape)} {others.dtype} there (the replayed layers call differently)"
            )
        self.position += 1
        tensor.add_(others, alpha=self.world - 1)
        return _Done() if async_op else None


_UNSET = object()


@contextlib.contextmanager
def fingerprint_check_on():
    """Have syncnorm verify its layer fingerprints under the fake group, as on a real one.

    syncnorm skips that check under torch's fake backend, whose collectives leave a payload
    unchanged (it would fail). The stand-ins sum payloads as real ranks do, so the check holds;
    turned on, its CUDA device-side assert (``torch._assert_async``) runs inside the sync-debug
    and CUDA-graph checks as it does on NCCL. Done through syncnorm's per-group cache of the
    backend test (``syncnorm.fingerprint._fake_backend``); yields False where that cache is not there.
    """
    cache = getattr(syncnorm.fingerprint, "_fake_backend", None)
    if not (dist.is_available() and dist.is_initialized()) or not isinstance(cache, dict):
        yield False
        return
    name = dist.group.WORLD.group_name
    saved = cache.get(name, _UNSET)
    cache[name] = False
    try:
        yield True
    finally:
        if saved is _UNSET:
            cache.pop(name, None)
        else:
            cache[name] = saved


# ---------------------------------------------------------------------------------------------
# errors


def track_error(errors: dict, key: str, got: Tensor, want: Tensor) -> None:
    """Largest |got - want| relative to the largest |want|, floored at 1e-3 (0 for an empty shard, inf for NaN).

    The floor keeps a reference that is zero up to rounding (the gradient of a bias in front of
    a BatchNorm, of a batch of 2) from turning float32 rounding into a large relative error."""
    want = want.detach().double().cpu()
    if want.numel() == 0:
        errors.setdefault(key, 0.0)
        return
    diff = float((got.detach().double().cpu() - want).abs().max()) / max(float(want.abs().max()), 1e-3)
    errors[key] = max(errors.get(key, 0.0), diff if diff == diff else float("inf"))


# ---------------------------------------------------------------------------------------------
# layout: the strides of what an op returns


def same_layout(tensor: Tensor, reference: Tensor) -> bool:
    """Same shape, and the same stride on every dim longer than 1 (a size-1 dim's stride is arbitrary)."""
    return tensor.shape == reference.shape and all(
        a == b for a, b, size in zip(tensor.stride(), reference.stride(), reference.shape) if size > 1
    )


def layout_problems(input: Tensor, output: Tensor, grad_input: Optional[Tensor]) -> list[str]:
    """Where the op's own output or input gradient does not have the input's strides.

    ``grad_input`` must be the gradient as the op returned it (``torch.autograd.grad``, or a
    hook on the input), never ``input.grad``: AccumulateGrad gives ``.grad`` the input's strides
    whatever the op returned, and a mismatch costs a layout copy in the op that feeds this one.
    """
    if input.numel() == 0:
        return []
    problems = []
    for what, tensor in (("output", output), ("grad_input", grad_input)):
        if tensor is not None and not same_layout(tensor, input):
            problems.append(f"{what} strides {tuple(tensor.stride())} != input strides {tuple(input.stride())}")
    return problems


def op_output_and_grads(
    module: nn.Module, input: Tensor, grad_output: Tensor
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``module(input)``, and the gradients of input and parameters as the op returns them (no AccumulateGrad)."""
    output = module(input)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(output, [input, *params], grad_output, allow_unused=True)
    return output, grads[0], tuple(grads[1:])
