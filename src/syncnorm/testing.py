"""Run a function on N gloo ranks on this machine: for testing a model with syncnorm in CI.

Also here: :func:`shard` (a rank's part of a global batch), :func:`recorded_all_reduces` (what
collectives a step makes), :func:`kill_tree` (end a launched job with every worker it started)
and :func:`free_port`.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes, joins them into a real
gloo process group on CPU, runs ``fn(rank, world_size, *args)`` on each and returns the
per-rank results, in rank order::

    import syncnorm.testing

    def train_two_steps(rank, world_size, state):
        model = syncnorm.convert_sync_batchnorm(build_model())
        model.load_state_dict(state)
        ...
        return model.state_dict()

    results = syncnorm.testing.run_ranks(train_two_steps, 2, initial_state)

The ranks rendezvous through a file in a fresh temporary folder, not a port, so test runs in
parallel (pytest-xdist) never collide. What a distributed test usually gets wrong is the end:

* gloo aborts a process ("terminate called without an active exception") when a peer leaves
  while it is still in a collective. A rank that succeeded therefore writes its result, waits
  at a barrier for the others and leaves with ``os._exit``, so no gloo destructor runs at
  interpreter exit. A rank that failed writes its error and leaves at once; its peers then
  fail fast on the closed connection, or at the process group's timeout.
* A hang must fail the test, not block CI: after ``timeout`` seconds every rank is killed and
  :class:`RanksHung` names the ranks that had not finished.

Ranks are forked when CUDA is not available (fast: nothing is imported again). With CUDA
they start from a forkserver, because a CUDA build of torch refuses autograd in a child forked
after the parent ran a backward; ``fn`` must then be importable and ``args`` picklable.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import random
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RankError", "RanksHung", "free_port", "kill_tree", "recorded_all_reduces", "run_ranks", "shard"]


@dataclass
class RankError:
    """What a rank raised: returned in its place by ``run_ranks(..., expect_errors=True)``."""

    type_name: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class RanksHung(AssertionError):
    """Some ranks had not finished when ``run_ranks``'s timeout expired (they were killed)."""


def _rank_main(fn, rank, world_size, args, folder, pg_timeout_s, threads, seed):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    result_path = os.path.join(folder, f"rank{rank}.pkl")
    code = 0
    try:
        store = dist.FileStore(os.path.join(folder, "store"), world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
        )
        # gloo's init can return on one rank while another still connects to it: a rank that
        # failed at once and exited would then break the other's init ("connectFullMesh failed").
        dist.barrier()
        if seed is not None:
            torch.manual_seed(seed + rank)
        outcome: Any = fn(rank, world_size, *args)
    except BaseException as err:  # report everything, SystemExit from the function included
        outcome = RankError(type(err).__name__, str(err), traceback.format_exc())
        code = 1
    try:
        data = pickle.dumps(outcome)
    except Exception as err:  # a result that does not pickle is this rank's error, reported as such
        data = pickle.dumps(
            RankError(type(err).__name__, f"the result of type {type(outcome).__name__} does not pickle: {err}", "")
        )
        code = 1
    with open(result_path + ".tmp", "wb") as handle:
        handle.write(data)
    os.replace(result_path + ".tmp", result_path)
    if code == 0:
        try:
            dist.barrier()
        except BaseException:
            pass
    os._exit(code)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
    expect_errors: bool = False,
    threads: int = 1,
    seed: int | None = 1234,
    start_method: str = "",
    preload: Sequence[str] = (),
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    Args:
        fn: called in every rank once the process group exists; its return value must pickle.
        world_size: the number of ranks (processes).
        *args: passed to ``fn`` after ``rank`` and ``world_size``.
        timeout: seconds for the whole run; ranks still running then are killed and
            :class:`RanksHung` is raised.
        pg_timeout: the process group's own timeout, for a collective that never completes.
        expect_errors: ``False``: an exception on any rank raises ``AssertionError`` with that
            rank's traceback. ``True``: it comes back as a :class:`RankError` in its place.
        threads: torch threads per rank; one keeps N ranks from fighting over few cores.
        seed: each rank calls ``torch.manual_seed(seed + rank)`` first; ``None`` skips it.
        start_method: ``"fork"`` or ``"forkserver"``; by default fork without CUDA,
            forkserver with it.
        preload: modules the forkserver imports once for every rank (the module of ``fn``,
            for instance), on top of torch and syncnorm.
    """
    start_method = start_method or ("forkserver" if torch.cuda.is_available() else "fork")
    context = mp.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(["torch", "torch.distributed", "syncnorm", *preload])
    with tempfile.TemporaryDirectory(prefix="syncnorm-ranks-") as folder:
        procs = [
            context.Process(
                target=_rank_main, args=(fn, rank, world_size, args, folder, pg_timeout, threads, seed), daemon=True
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        results: list[Any] = []
        for rank in range(world_size):
            path = os.path.join(folder, f"rank{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as handle:
                    results.append(pickle.load(handle))
            else:
                results.append(RankError("NoResult", f"rank {rank} exited with code {procs[rank].exitcode}", ""))
    if hung:
        raise RanksHung(f"ranks {hung} did not finish within {timeout} s; results: {results}")
    if not expect_errors:
        failures = [
            f"rank {rank} failed:\n{r.traceback or r}" for rank, r in enumerate(results) if isinstance(r, RankError)
        ]
        if failures:
            raise AssertionError("\n".join(failures))
    return results


def shard(global_batch: torch.Tensor, rank: int, sizes: Sequence[int]) -> torch.Tensor:
    """Rank ``rank``'s part of ``global_batch`` split along dim 0 into consecutive pieces of ``sizes``.

    With exact synchronisation, the ranks' outputs concatenated in rank order equal one process's
    output on ``global_batch``: the reference a distributed test compares against. ``sizes`` may
    be uneven and may hold zeros (an empty rank).
    """
    if not 0 <= rank < len(sizes) or sum(sizes[: rank + 1]) > global_batch.shape[0]:
        raise ValueError(f"sizes {list(sizes)} hold no part for rank {rank} of a batch of {global_batch.shape[0]}")
    start = sum(sizes[:rank])
    return global_batch[start : start + sizes[rank]]


@contextlib.contextmanager
def recorded_all_reduces() -> Iterator[list[tuple[int, torch.dtype]]]:
    """Record ``(numel, dtype)`` of every all_reduce this process issues, at the ProcessGroup level.

    ``with recorded_all_reduces() as calls: model(x).sum().backward()`` then ``calls`` lists them:
    a test can assert how many collectives a step makes, and how large. Every all_reduce reaches
    ``ProcessGroup.allreduce``, whether through ``dist.all_reduce`` or a direct call, so nothing
    can slip past the count.
    """
    calls: list[tuple[int, torch.dtype]] = []
    real = dist.ProcessGroup.allreduce  # a plain function here: it takes the group explicitly
    # What the class holds is a pybind method descriptor; setting `real` back would lose the binding.
    saved = dist.ProcessGroup.__dict__["allreduce"]

    def recording(self, tensors, *args, **kwargs):
        for tensor in tensors if isinstance(tensors, (list, tuple)) else [tensors]:
            calls.append((tensor.numel(), tensor.dtype))
        return real(self, tensors, *args, **kwargs)

    dist.ProcessGroup.allreduce = recording
    try:
        yield calls
    finally:
        dist.ProcessGroup.allreduce = saved


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out for ``bind(port 0)`` and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(part) for part in handle.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 65535  # Linux's and the IANA range's union, where /proc is not there


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``--master-port`` and the like).

    It is taken from outside the kernel's ephemeral range: a port from inside it could be handed
    to another process (a gloo rank's listener, any outgoing connection) between this call and
    the launcher's own bind, and a rank that then reaches the wrong listener waits forever. Only
    where that range leaves no port from 1024 up does it fall back to one from the range.
    """
    low, high = _ephemeral_range()
    candidates = [port for port in range(1024, 65536) if not low <= port <= high]
    # Not the random module's shared state: a test that seeds it would make parallel runs pick alike.
    for port in random.SystemRandom().sample(candidates, min(len(candidates), 64)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), whatever session or group it moved to."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (collected first: a killed parent's children are re-parented)."""
    for target in [pid, *_descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
