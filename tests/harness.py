"""One multi-process harness for every multi-rank test.

``run_ranks(fn, world_size, *args)`` forks ``world_size`` processes, joins them
into a real gloo process group (a FileStore in a fresh temp folder, so tests
running in parallel under pytest-xdist never fight over a port), runs
``fn(rank, world_size, *args)`` on each and returns the per-rank results.

Teardown is deliberate, because gloo aborts a process ("terminate called
without an active exception") when a peer leaves while it is still in a
collective: a rank that succeeded writes its result, waits at a barrier for the
others and then leaves with ``os._exit`` so no gloo destructor runs at
interpreter exit. A rank that failed writes its error and leaves at once; its
peers then fail fast on the closed connection (or at the group timeout). A hard
timeout kills every rank, so a hang fails the test instead of blocking CI.

``run_command(cmd, timeout=...)`` runs a whole job (torchrun, a Lightning or
framework launcher) as a subprocess with ``launcher_free_env()``; on a timeout it
kills the job's whole process tree, workers in sessions of their own included
(torchrun starts each worker in a new session, so killing the launcher's process
group leaves them running and holding the output pipe), and fails the test with
the output so far.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch._dynamo  # noqa: F401  (DDP and FSDP import it lazily: ~7 s in every forked rank otherwise)
import torch.distributed as dist


@dataclass
class RankError:
    """What a rank raised, for tests that expect errors."""

    type_name: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class RanksHung(AssertionError):
    pass


def _worker(fn, rank, world_size, args, folder, pg_timeout_s, threads):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    result_path = os.path.join(folder, f"rank{rank}.pkl")
    code = 0
    try:
        store = dist.FileStore(os.path.join(folder, "store"), world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
        )
        torch.manual_seed(1234 + rank)
        outcome: Any = fn(rank, world_size, *args)
    except BaseException as err:  # report everything, including SystemExit from the test body
        outcome = RankError(type(err).__name__, str(err), traceback.format_exc())
        code = 1
    with open(result_path + ".tmp", "wb") as handle:
        pickle.dump(outcome, handle)
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
    start_method: str = "",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    With ``expect_errors=False`` any rank's exception fails the test with that
    rank's traceback; with ``True`` the exception comes back as a :class:`RankError`.
    Without CUDA ranks are forked (fast); with CUDA they start from a forkserver, so
    ``fn`` must then be importable and ``args`` picklable.
    """
    # fork is fastest, but a CUDA build of torch refuses autograd in a child forked after the
    # parent ran a backward; forkserver (with torch preloaded) avoids that there.
    start_method = start_method or ("forkserver" if torch.cuda.is_available() else "fork")
    context = mp.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "syncnorm", "harness"])
    with tempfile.TemporaryDirectory(prefix="syncnorm-ranks-") as folder:
        procs = [
            context.Process(target=_worker, args=(fn, rank, world_size, args, folder, pg_timeout, threads), daemon=True)
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
        raise RanksHung(f"ranks {hung} did not finish within {timeout}s; results: {results}")
    if not expect_errors:
        failures = [
            f"rank {rank} failed:\n{r.traceback or r}" for rank, r in enumerate(results) if isinstance(r, RankError)
        ]
        if failures:
            raise AssertionError("\n".join(failures))
    return results


def shard(global_batch: torch.Tensor, rank: int, sizes: list[int]) -> torch.Tensor:
    """This rank's slice of a global batch split into consecutive pieces of the given sizes."""
    start = sum(sizes[:rank])
    return global_batch[start : start + sizes[rank]]


def sgd_on_shards(model: torch.nn.Module, batches, rank: int = 0, world_size: int = 1, lr: float = 0.1) -> None:
    """SGD (momentum 0.9) on an MSE loss, this rank training on its even share of every global batch.

    With ``world_size=1`` it is the single-process reference on the global batches."""
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for inputs, targets in batches:
        sizes = [inputs.shape[0] // world_size] * world_size
        optimiser.zero_grad()
        torch.nn.functional.mse_loss(model(shard(inputs, rank, sizes)), shard(targets, rank, sizes)).backward()
        optimiser.step()


# --- whole jobs as subprocesses ---------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# Launchers (torchrun, Lightning, Accelerate, Ray, SLURM) read these to detect an outer job; a job
# started by a test must not inherit them from a test run that is itself launched.
LAUNCHER_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "ACCELERATE_", "SYNCNORM_")
LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "RAY_ADDRESS")  # fmt: skip


@contextlib.contextmanager
def recorded_all_reduces():
    """Record (numel, dtype) of every all_reduce this process issues, at the ProcessGroup level.

    Every all_reduce reaches ``ProcessGroup.allreduce``, whether through ``dist.all_reduce`` or a
    direct call, so nothing can slip past the count.
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_free_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables, one thread per process, the repo importable; plus ``extra``.

    ``PYTHON`` is this interpreter, the one the launch scripts in ``launch/`` then run."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith(LAUNCHER_ENV_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), PYTHON=sys.executable)
    env.update(extra)
    return env


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


def run_command(
    cmd: list[str], *, timeout: float, env: Optional[dict[str, str]] = None, cwd: Path = REPO
) -> tuple[int, str]:
    """Run ``cmd`` (stdout and stderr together); return ``(returncode, output)``.

    On a timeout the whole process tree is killed and the test fails with the output's tail."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env or launcher_free_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate()
        import pytest  # here: the benchmarks import this module without pytest installed

        pytest.fail(
            f"did not finish in {timeout:.0f} s (process tree killed): {' '.join(map(str, cmd))}\n{output[-5000:]}"
        )
    return proc.returncode, output
