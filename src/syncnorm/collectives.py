"""The one place where syncnorm talks to other ranks.

Everything that crosses a process boundary goes through :func:`all_reduce`
(and, on failure paths only, :func:`all_gather_rows`). Where the backend reports a
failure to the caller, it surfaces as a :class:`SyncNormCollectiveError` that names
the layer and the rank. That is gloo (a dead peer, an expired timeout) and NCCL with
``TORCH_NCCL_BLOCKING_WAIT=1``; otherwise NCCL collectives return at enqueue, and a
failure shows later, from NCCL's watchdog, which aborts the process (see
``docs/failure-behaviour.md``). A gloo size mismatch aborts inside gloo's own thread.

On a CPU tensor (gloo) every collective also waits until the backend's worker
thread has let go of the tensor (:func:`_wait_until_released`), a failed one too
before it raises. Without that, a
process that exits soon after a collective can abort ("terminate called without
an active exception"): once Python has dropped a tensor that the worker still
holds, the worker's release must take the GIL, and a thread that asks for the
GIL while the interpreter is finalizing is ended mid-C++-frame, which calls
``std::terminate``. Lightning's last step is syncnorm's: the callback's final
health check, a few milliseconds before the process exits.

Process groups travel into the custom ops (see ``ops.py``) by *name*:
a ``ProcessGroup`` object cannot be an argument of a ``torch.library`` op, a
string can, and torch keeps a registry from group names back to groups.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from collections import deque
from datetime import timedelta
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from . import profiler
from .errors import SyncNormCollectiveError

__all__ = [
    "SyncGroup",
    "all_reduce",
    "group_name",
    "group_size",
    "new_sync_groups",
    "resolve_group",
    "set_wait_warning",
    "synchronised_group",
    "warn_if_launched_without_group",
    "wait_warning_seconds",
]

# What users may pass as ``process_group``: nothing (the default group), a
# ProcessGroup, or a 1-D DeviceMesh (for example ``mesh["dp"]``).
SyncGroup = Union[None, dist.ProcessGroup, Any]


def _is_device_mesh(obj: object) -> bool:
    return type(obj).__name__ == "DeviceMesh" and hasattr(obj, "get_group")


def resolve_group(process_group: SyncGroup) -> Optional[dist.ProcessGroup]:
    """Turn what the user passed into a ProcessGroup (``None`` when not distributed)."""
    if _is_device_mesh(process_group):
        if process_group.ndim != 1:
            names = getattr(process_group, "mesh_dim_names", None)
            hint = 'mesh["<name>"], the data-parallel one of ' + str(list(names)) if names else "a 1-D slice of it"
            raise ValueError(
                f"syncnorm: got a {process_group.ndim}-D DeviceMesh as process_group; "
                f"BatchNorm statistics are synchronised over one mesh dimension only. "
                f"Pass the data-parallel dimension: {hint}."
            )
        return process_group.get_group()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if process_group is None:
        return dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "syncnorm: process_group must be None, a torch.distributed ProcessGroup or a 1-D "
            f"DeviceMesh, got {type(process_group).__name__}"
        )
    return process_group


_warned_not_distributed = False


def warn_if_launched_without_group(layer: str) -> None:
    """Warn once when a launcher started several processes but torch.distributed is not initialised.

    torchrun (and Lightning, SLURM's wrappers, ...) set ``WORLD_SIZE``; without
    ``init_process_group`` every layer would quietly train as per-rank BatchNorm, with
    different running statistics on each rank. Called by layers in training mode only.
    """
    global _warned_not_distributed
    if _warned_not_distributed or dist.is_initialized():
        return
    world = os.environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) <= 1:
        return
    _warned_not_distributed = True
    from .errors import SyncNormSetupWarning

    warnings.warn(
        f"syncnorm: layer '{layer}' runs in training mode with WORLD_SIZE={world} in the environment, but "
        "torch.distributed is not initialised, so it normalises with this process's batch alone (as "
        "nn.BatchNorm) and the ranks' running statistics drift apart. Call "
        'torch.distributed.init_process_group("nccl" or "gloo") in every process before the first '
        "forward.",
        SyncNormSetupWarning,
        stacklevel=3,
    )


def synchronised_group(process_group: SyncGroup) -> Optional[dist.ProcessGroup]:
    """The resolved group when it has two or more ranks, else None (this process alone)."""
    group = resolve_group(process_group)
    return group if group is not None and group.size() > 1 else None


def group_size(process_group: SyncGroup) -> int:
    """Number of ranks the statistics are synchronised over (1 when not distributed)."""
    group = resolve_group(process_group)
    return 1 if group is None else group.size()


def group_name(process_group: SyncGroup) -> str:
    """The registry name of the group, which is what the custom ops take."""
    group = resolve_group(process_group)
    if group is None:
        raise RuntimeError("syncnorm: torch.distributed is not initialised")
    return group.group_name


def lookup_group(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


def new_sync_groups(group_size: int) -> dist.ProcessGroup:
    """Split the default group into blocks of ``group_size`` consecutive ranks.

    Every rank must call this (``new_group`` is collective); each gets back the
    group of its own block, to pass as ``process_group``. Use it to synchronise
    within a node (``group_size=local_world_size``) or within a block of GPUs.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("syncnorm.new_sync_groups: call torch.distributed.init_process_group first")
    world = dist.get_world_size()
    if group_size < 1 or world % group_size != 0:
        raise ValueError(
            f"syncnorm.new_sync_groups: group_size={group_size} must be >= 1 and divide the world size {world}"
        )
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = group
    assert mine is not None
    return mine


# How long a collective waits for gloo's worker to let go of its tensor. The worker does that
# right after finishing the collective; only a descheduled worker takes longer.
_RELEASE_WAIT_S = 2.0
# Tensors a worker still held when the wait ran out: kept alive here, so that the worker's
# release never is the last reference (which would need the GIL; see the module docstring).
_still_held: deque = deque(maxlen=64)


def _wait_until_all_released(
    tensors: list[torch.Tensor], baselines: list[int], failure: Optional[BaseException]
) -> None:
    """:func:`_wait_until_released` for each tensor; after a ``failure`` too, whose frames (which
    held the backend's work, and with it the tensors) are cleared first."""
    if failure is not None:
        traceback.clear_frames(failure.__traceback__)
    for tensor, baseline in zip(tensors, baselines):
        _wait_until_released(tensor, baseline)


def _wait_until_released(tensor: torch.Tensor, baseline: int) -> None:
    """Return once no backend thread holds ``tensor`` any more (its use count is back at ``baseline``)."""
    if tensor._use_count() <= baseline:
        return
    deadline = time.monotonic() + _RELEASE_WAIT_S
    while tensor._use_count() > baseline:
        if time.monotonic() > deadline:
            _still_held.append(tensor)
            return
        os.sched_yield()


# CPU tensors go through gloo (or MPI), whose collectives have finished when the call returns:
# the release wait is for the worker's bookkeeping only. CUDA collectives (NCCL) return at
# enqueue; waiting there would wait for the GPU.
_HAS_USE_COUNT = hasattr(torch.Tensor, "_use_count")


def _waits_for_release(tensor: torch.Tensor) -> bool:
    return tensor.is_cpu and _HAS_USE_COUNT


_ALLREDUCE_OPTIONS: dict = {}


def _options(op) -> dist.AllreduceOptions:
    options = _ALLREDUCE_OPTIONS.get(op)
    if options is None:
        options = _ALLREDUCE_OPTIONS[op] = dist.AllreduceOptions()
        options.reduceOp = op
        if hasattr(options, "asyncOp"):
            options.asyncOp = False  # as dist.all_reduce(async_op=False): NCCL's synchronous route
    return options


# --- the warning for a collective that waits long ---------------------------------------------

DEFAULT_WAIT_WARNING_S = 60.0
_wait_warning_override: Optional[float] = None


def set_wait_warning(seconds: Optional[float]) -> None:
    """After how many seconds a rank waiting in a syncnorm collective warns (on CPU/gloo).

    The rank keeps waiting after the warning (another rank may be busy, validating alone for
    instance) until the process group's timeout, which raises :class:`SyncNormCollectiveError`.
    ``0`` turns the warning off; ``None`` goes back to the environment variable
    ``SYNCNORM_WAIT_WARNING`` (seconds), else 60.
    """
    global _wait_warning_override
    if seconds is not None and not seconds >= 0:
        raise ValueError(f"syncnorm.set_wait_warning: seconds must be >= 0 or None, got {seconds}")
    _wait_warning_override = seconds


def wait_warning_seconds() -> float:
    """The threshold in force: ``set_wait_warning``'s value, else ``SYNCNORM_WAIT_WARNING``, else 60."""
    if _wait_warning_override is not None:
        return _wait_warning_override
    value = os.environ.get("SYNCNORM_WAIT_WARNING", "")
    try:
        return float(value) if value else DEFAULT_WAIT_WARNING_S
    except ValueError:
        raise ValueError(f"syncnorm: SYNCNORM_WAIT_WARNING must be a number of seconds, got {value!r}") from None


_timeouts: dict[float, timedelta] = {}


def _wait_loudly(work, group: dist.ProcessGroup, layer: str, what: str) -> None:
    """Wait for a gloo collective; past the threshold, warn once, then wait on to the group's timeout."""
    seconds = wait_warning_seconds()
    if not seconds:
        work.wait()
        return
    timeout = _timeouts.get(seconds)
    if timeout is None:
        timeout = _timeouts[seconds] = timedelta(seconds=seconds)
    started = time.monotonic()
    try:
        work.wait(timeout)
        return
    except RuntimeError as err:
        # gloo's timed wait says "Operation timed out!" and leaves the work pending; any other
        # error (a peer gone, the group's own timeout) is the collective's failure.
        if "Operation timed out" not in str(err) or time.monotonic() - started < 0.99 * seconds:
            raise
    from .errors import SyncNormWaitWarning
    from .guard import check_enabled

    guard = (
        "The guard (SYNCNORM_CHECK=1) is on: if the ranks disagree about this layer, it names them once they meet."
        if check_enabled()
        else "Run every rank with SYNCNORM_CHECK=1 to have the rank that went elsewhere named."
    )
    warnings.warn(
        f"syncnorm: rank {dist.get_rank()} has waited {time.monotonic() - started:.0f} s in the {what} "
        f"all_reduce of layer '{layer}' (group of {group.size()}) for the other ranks. Likely causes: a rank left "
        "in eval mode, a rank that skipped this layer or backward(), ranks with different numbers of batches; "
        f"or another rank is busy elsewhere (validating alone). It keeps waiting until the process group's "
        f"timeout. {guard} (This warning: SYNCNORM_WAIT_WARNING=<seconds>, 0 turns it off.)",
        SyncNormWaitWarning,
        stacklevel=2,
    )
    work.wait()


def all_reduce(
    tensor: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    layer: str,
    what: str,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """In-place all_reduce that names the syncnorm layer when it fails.

    On CPU it returns only once the backend no longer holds ``tensor`` (see the module docstring).
    """
    compiling = torch.compiler.is_compiling()
    wait = _waits_for_release(tensor) and not compiling
    baseline = tensor._use_count() if wait else 0
    recording = None if compiling else profiler._active
    begun = recording._begin(tensor) if recording is not None else None
    try:
        if compiling:
            dist.all_reduce(tensor, op=op, group=group)
        else:
            # The process group's own call: dist.all_reduce's argument checks and logging
            # wrappers cost more host time than a small layer's whole compute.
            work = group.allreduce([tensor], _options(op))
            if work is not None:
                if wait:
                    _wait_loudly(work, group, layer, what)
                else:
                    # CUDA (NCCL): wait() only orders the current stream after the collective;
                    # a timed wait would block the host until the GPU finished.
                    work.wait()
            del work  # the work holds the tensor: the release wait below counts on it being gone
    except Exception as err:  # backend errors have no common base class
        if wait:
            # As on success: a failed gloo collective has ended too, but its worker may not have let
            # go of the tensor yet; a caller that exits at once would race it (module docstring).
            work = None  # our handle holds the tensor as well
            _wait_until_all_released([tensor], [baseline], err)
        from .guard import check_hint

        raise SyncNormCollectiveError(
            f"syncnorm: the {what} all_reduce of layer '{layer}' failed on rank "
            f"{dist.get_rank()} (group of {dist.get_world_size(group)}): a peer may have died, "
            f"skipped this layer, or the process group's timeout expired. "
            f"Backend said: {type(err).__name__}: {err}." + check_hint()
        ) from err
    if wait:
        _wait_until_released(tensor, baseline)
    if recording is not None:
        recording._end(begun, tensor, group, layer, what)
    return tensor


def all_gather_rows(row: torch.Tensor, group: dist.ProcessGroup, *, layer: str, what: str) -> torch.Tensor:
    """Gather one small row per rank; used only on error paths to name the ranks."""
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    wait = _waits_for_release(row)
    baselines = [t._use_count() for t in [row, *rows]] if wait else []
    try:
        dist.all_gather(rows, row, group=group)
    except Exception as err:
        if wait:
            _wait_until_all_released([row, *rows], baselines, err)
        from .guard import check_hint

        raise SyncNormCollectiveError(
            f"syncnorm: the {what} all_gather of layer '{layer}' failed on rank {dist.get_rank()}: "
            f"{type(err).__name__}: {err}." + check_hint()
        ) from err
    _wait_until_all_released([row, *rows], baselines, None)
    return torch.stack(rows)
