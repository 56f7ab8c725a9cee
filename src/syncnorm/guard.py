"""The reliability guard: turn rank disagreements into prompt, named errors.

A synchronised layer fails badly when ranks disagree: one rank skips a layer,
runs it in eval mode, or feeds another channel count or dtype. Its collective
then pairs with a different collective on another rank, and the job hangs
until the backend's timeout, mixes unrelated numbers, or (gloo, payloads of
different sizes) aborts a process. With the guard on (``SYNCNORM_CHECK=1``,
:func:`syncnorm.set_check` or ``layer.check = True``, the same on every rank),
every synchronised call first all-reduces a small fingerprint (layer name,
channel count, dtype, training flag, collective kind, input rank) with MAX over
``[f, -f]``: every rank gets the same element-wise max and min, so a difference
is seen by all ranks at once and all of them raise. Only on that failure path
are the full fingerprints gathered, to name the ranks that differ.

The fingerprint has a fixed size, so two guard calls always pair cleanly
whatever the ranks disagree about. It is an odd number of int32 values (not a
multiple of 8 bytes), so it can never be mistaken for a syncnorm statistics
payload, which is float64: if a guard call meets a statistics collective
(the switch differs between ranks), gloo sees two sizes and aborts instead of
mixing the two. NCCL does not compare sizes; there the ranks wait out the
timeout, so the switch must be the same on every rank.

Under DistributedDataParallel the layers' own checks are not the first
collectives of a step: DDP broadcasts the buffers before each forward (its
default ``forward_sync_buffers=True``, ``broadcast_buffers`` before torch 2.13)
and all-reduces gradient buckets during backward, often before the last
synchronised layer's backward runs. A rank that skipped ``backward()`` would
then meet another rank's backward with DDP's broadcast, not with a guard
check, and all ranks would wait out the process-group timeout. So the first
guarded call inside a DDP forward (over the same process group) adds two more
checks to that DDP module (:class:`_DDPStepGuard`): one at the start of every
forward, before DDP's broadcast, and one at the start of every backward through
its first output, before any gradient bucket. With those, a skipped backward is
named under DDP's defaults as well; see ``docs/troubleshooting.md`` for the
cases that stay outside any layer's reach.

Cost: one extra all_reduce of 15 int32 values per synchronised call, plus a
device-to-host read of its result (a sync on CUDA), and two per step under DDP;
see ``docs/failure-behaviour.md`` for measured numbers. With the
guard on, eval-mode calls take part as well (that is how a rank left in eval
mode is caught), so every rank must then run the same evaluation batches.
"""

from __future__ import annotations

import os
import weakref
import zlib
from collections import Counter
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves

from .collectives import all_gather_rows, all_reduce
from .errors import SyncNormMismatchError, SyncNormNonFiniteError

__all__ = [
    "KIND_BACKWARD",
    "KIND_DDP_BACKWARD",
    "KIND_DDP_FORWARD",
    "KIND_FORWARD",
    "KIND_RUNNING_STATS",
    "check_enabled",
    "check_hint",
    "check_requested",
    "set_check",
    "verify_consistency",
    "verify_eval",
    "verify_finite",
]

KIND_FORWARD = 1
KIND_BACKWARD = 2
KIND_RUNNING_STATS = 3
KIND_DDP_FORWARD = 4  # the start of a DDP forward, before DDP's buffer broadcast
KIND_DDP_BACKWARD = 5  # the start of a backward through a DDP output, before its gradient buckets
_KIND_NAMES = {
    KIND_FORWARD: "forward statistics",
    KIND_BACKWARD: "backward gradient sums",
    KIND_RUNNING_STATS: "running statistics",
}
_STEP_NAMES = {
    KIND_DDP_FORWARD: "the start of a DistributedDataParallel forward (before DDP's buffer broadcast)",
    KIND_DDP_BACKWARD: "the start of a backward through DistributedDataParallel (before its gradient all_reduce)",
}
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_MAGIC = 0x5C4E0B  # lets a report tell a guard row from some other collective's data
_FIELDS = 7  # magic, layer hash, channels, dtype, training, kind, ndim
_NAME_BYTES = 64  # of the layer name, shown in the mismatch report (the hash covers all of it)
_INT31 = 0x7FFFFFFF  # hashes are kept non-negative in int32 so that negating them cannot overflow


_check_override: Optional[bool] = None


def set_check(enabled: Optional[bool]) -> None:
    """Turn the rank-consistency and non-finite guard on or off for this process.

    ``None`` goes back to the environment variable ``SYNCNORM_CHECK``: on for any value but
    empty, "0", "false" or "False".
    """
    global _check_override
    _check_override = enabled


def check_enabled() -> bool:
    """Whether the rank-consistency and non-finite guard is on: ``set_check``'s value, else ``SYNCNORM_CHECK``."""
    if _check_override is not None:
        return _check_override
    return os.environ.get("SYNCNORM_CHECK", "0") not in ("", "0", "false", "False")


def check_requested(check: Optional[bool]) -> bool:
    """A layer's own ``check`` setting, or the process-wide switch when it is None."""
    return check_enabled() if check is None else check


def check_hint() -> str:
    """What a collective failure message adds so the user can find the rank that went wrong."""
    if not check_enabled():
        return (
            " Ranks that call different collectives (a rank left in eval mode, a skipped layer or "
            "backward(), another channel count or dtype) end like this, or in a bare gloo abort: run every "
            "rank with SYNCNORM_CHECK=1 (or syncnorm.set_check(True)) to have them named. "
            "See docs/troubleshooting.md."
        )
    return (
        " The guard (SYNCNORM_CHECK=1) is on and found no disagreement first: the other ranks were not "
        "in a syncnorm collective but in another one (your own, a framework's) or in none (stuck, dead, "
        "or finished). The guard checks at the start of each DistributedDataParallel forward and "
        "backward when DDP runs over the layers' process group; where DDP runs over another group, "
        "construct it with forward_sync_buffers=False (broadcast_buffers=False on torch < 2.13) so that "
        "its buffer broadcast cannot meet a guard check. See docs/troubleshooting.md."
    )


def _hash31(text: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, and ranks started by a
    # launcher (torchrun) are separate interpreters.
    return zlib.crc32(text.encode()) & _INT31


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 100 + _hash31(str(dtype)) % 1000


def _fingerprint(layer: str, channels: int, dtype: torch.dtype, training: bool, kind: int, ndim: int) -> list[int]:
    return [_MAGIC, _hash31(layer), channels, _dtype_code(dtype), int(training), kind, ndim]


def _describe(row: list[int]) -> str:
    if row[0] != _MAGIC:
        return "not in a syncnorm guard (its collective met another kind of collective)"
    if row[5] in _STEP_NAMES:
        return _STEP_NAMES[row[5]]
    name = bytes(b for b in row[_FIELDS:] if b > 0).decode("utf-8", "replace")
    dtype = _DTYPES[row[3]] if 0 <= row[3] < len(_DTYPES) else f"dtype code {row[3]}"
    kind = _KIND_NAMES.get(row[5], f"kind {row[5]}")
    mode = "train" if row[4] else "eval"
    return f"layer '{name}' {kind}, {mode} mode, {row[2]} channels, {row[6]}-D input, {dtype}"


def _odd_ranks_out(fingerprints: list[tuple[int, ...]], ranks: list[int]) -> tuple[int, list[int]]:
    """The rank whose fingerprint most ranks share (ties: the lowest rank), and the ranks that differ from it."""
    counts = Counter(fingerprints)
    majority = max(fingerprints, key=lambda f: (counts[f], -fingerprints.index(f)))
    reference = ranks[fingerprints.index(majority)]
    return reference, [rank for rank, f in zip(ranks, fingerprints) if f != majority]


def verify_consistency(group: dist.ProcessGroup, layer: str, input: torch.Tensor, *, training: bool, kind: int) -> None:
    """Raise :class:`SyncNormMismatchError` on every rank of ``group`` unless all ranks agree.

    The fingerprint is the layer name, ``training``, ``kind`` and the input's channel
    count, dtype and number of dims. Every rank must call this at the same point (it is
    a collective); the error on each rank names its own layer, the ranks that differ
    from the majority, and what every rank was doing. Called inside a DDP forward, it
    also arms that DDP module's step checks (:class:`_DDPStepGuard`).
    """
    _DDPStepGuard.arm(group, input.device)
    fingerprint = _fingerprint(layer, input.shape[1], input.dtype, training, kind, input.dim())
    _verify(group, layer, fingerprint, input.device)


def verify_eval(group: Optional[dist.ProcessGroup], input: torch.Tensor, layer: str, check: bool, kind: int) -> None:
    """The eval-mode call's part in the guard, when it is on and the group has two or more ranks.

    Eval never communicates otherwise (ranks may run different numbers of eval batches); with
    the guard on it joins the check, so that a rank left in eval mode while the others train is
    named instead of hanging them. Compiled code skips it (the check reads back to the host).
    """
    if check and group is not None and not torch.compiler.is_compiling():
        verify_consistency(group, layer, input, training=False, kind=kind)


def _verify(group: dist.ProcessGroup, layer: str, fingerprint: list[int], device: torch.device) -> None:
    # [f, -f, 0]: the trailing 0 makes the count odd (see the module docstring).
    pair = torch.tensor(fingerprint + [-v for v in fingerprint] + [0], dtype=torch.int32, device=device)
    all_reduce(pair, group, layer=layer, what="consistency-guard", op=dist.ReduceOp.MAX)
    reduced = pair.tolist()  # one host read (a sync on CUDA); cheaper than comparing on the device
    if reduced[:_FIELDS] == [-v for v in reduced[_FIELDS : 2 * _FIELDS]]:
        return
    name = list(layer.encode()[:_NAME_BYTES])
    row = torch.tensor(fingerprint + name + [0] * (_NAME_BYTES - len(name)), dtype=torch.int32, device=device)
    rows = all_gather_rows(row, group, layer=layer, what="consistency-guard").tolist()
    ranks = dist.get_process_group_ranks(group)
    reference, differing = _odd_ranks_out([tuple(r[:_FIELDS]) for r in rows], ranks)
    lines = "\n".join(f"  rank {rank}: {_describe(r)}" for rank, r in zip(ranks, rows))
    kinds = {r[5] for r in rows if r[0] == _MAGIC}
    skipped = (
        "A rank that starts a forward while others are in a backward skipped backward() (or ran it on "
        "another loss) in the step before. "
        if kinds & {KIND_FORWARD, KIND_DDP_FORWARD} and kinds & {KIND_BACKWARD, KIND_DDP_BACKWARD}
        else ""
    )
    where = f"at layer '{layer}'" if fingerprint[5] not in _STEP_NAMES else f"at {_STEP_NAMES[fingerprint[5]]}"
    raise SyncNormMismatchError(
        f"syncnorm: ranks disagree {where} (where rank {dist.get_rank()} is); "
        f"ranks {differing} differ from rank {reference}:\n{lines}\n{skipped}"
        "Every rank must call the same synchronised layers in the same order, in the same "
        "train/eval mode, with the same channel count and dtype, and run backward on all of them."
    )


class _DDPStepGuard:
    """Guard checks at the start of each forward and backward of one DistributedDataParallel module.

    Installed on a DDP module by the first guarded syncnorm call inside its forward, when DDP
    and the layer use the same process group. Both checks run only while armed, that is when
    the previous forward of this DDP module ran a guarded syncnorm call: every rank that ran
    the same steps makes the same decision. The forward check is a forward pre-hook, so it runs
    before DDP's own pre-forward buffer broadcast (and is skipped when DDP will not broadcast);
    the backward check is a gradient hook on the first output that requires grad, so it runs
    before any parameter gradient, hence before any of DDP's gradient buckets.
    """

    _installed: weakref.WeakKeyDictionary[DistributedDataParallel, _DDPStepGuard] = weakref.WeakKeyDictionary()

    def __init__(self, ddp: DistributedDataParallel, device: torch.device) -> None:
        self.device = device
        self.armed = False
        ddp.register_forward_pre_hook(self._before_forward)
        ddp.register_forward_hook(self._after_forward)

    @classmethod
    def arm(cls, group: dist.ProcessGroup, device: torch.device) -> None:
        ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
        if ddp is None or getattr(ddp, "process_group", None) is not group:
            return
        step_guard = cls._installed.get(ddp)
        if step_guard is None:
            step_guard = cls._installed[ddp] = cls(ddp, device)
        step_guard.armed = True

    def _check(self, ddp: DistributedDataParallel, kind: int) -> None:
        _verify(ddp.process_group, "DistributedDataParallel", [_MAGIC, 0, 0, 0, 1, kind, 0], self.device)

    @torch.compiler.disable
    def _before_forward(self, ddp: DistributedDataParallel, args: Any) -> None:
        if self.armed:
            self.armed = False  # armed again by the guarded calls of this forward
            will_sync = getattr(ddp, "will_sync_module_buffers", None)
            if will_sync is None or will_sync():
                self._check(ddp, KIND_DDP_FORWARD)

    @torch.compiler.disable
    def _after_forward(self, ddp: DistributedDataParallel, args: Any, output: Any) -> None:
        if not (self.armed and torch.is_grad_enabled()):
            return
        first: Optional[torch.Tensor] = next(
            (t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad), None
        )
        if first is not None:
            ddp_ref = weakref.ref(ddp)

            def before_backward(grad: torch.Tensor) -> None:
                module = ddp_ref()
                if module is not None:
                    self._check(module, KIND_DDP_BACKWARD)

            first.register_hook(before_backward)


def verify_finite(
    global_values: torch.Tensor, local_values: torch.Tensor, group: dist.ProcessGroup, layer: str
) -> None:
    """Raise :class:`SyncNormNonFiniteError` on every rank if the reduced values are not finite.

    ``global_values`` (the all-reduced ``[f, f^2, count, sum x, sum x^2]``) is identical on
    every rank, so they all take the same branch; the gather that names the ranks
    whose own ``local_values`` were not finite runs only on that (failing) branch.
    """
    finite = torch.isfinite(global_values)
    if bool(finite.all()):
        return
    local_bad = torch.tensor([0 if bool(torch.isfinite(local_values).all()) else 1], device=global_values.device)
    flags = all_gather_rows(local_bad, group, layer=layer, what="non-finite-guard").flatten().tolist()
    ranks = dist.get_process_group_ranks(group)
    culprits = [rank for rank, flag in zip(ranks, flags) if flag]
    head = 3  # the layer fingerprint (2 values) and the count come before the 2C sums
    channels = (global_values.numel() - head) // 2
    bad = (~finite).nonzero().flatten().tolist()
    bad_channels = sorted({(int(i) - head) % channels for i in bad if i >= head})
    shown = ", ".join(map(str, bad_channels[:8])) + (", ..." if len(bad_channels) > 8 else "")
    if culprits:
        source = (
            f"ranks {culprits} brought non-finite local statistics "
            "(NaN/Inf in their batch, or values whose squares overflow)"
        )
    else:
        source = "every rank's local statistics were finite: their sum over ranks overflowed"
    raise SyncNormNonFiniteError(
        f"syncnorm: non-finite (NaN/Inf) batch statistics in layer '{layer}' on rank {dist.get_rank()}, "
        f"channels [{shown}]; {source}. The layer's running statistics were left unchanged."
    )
