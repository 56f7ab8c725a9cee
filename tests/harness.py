"""One multi-process harness for every multi-rank test.

``run_ranks(fn, world_size, *args)`` is :func:`syncnorm.testing.run_ranks`, the public gloo
world runner: ``world_size`` processes in a real gloo process group, ``fn(rank, world_size,
*args)`` on each, the per-rank results back, deliberate teardown and a hard timeout.

``run_command(cmd, timeout=...)`` runs a whole job (torchrun, a Lightning or
framework launcher) as a subprocess with ``launcher_free_env()``; on a timeout it
kills the job's whole process tree, workers in sessions of their own included
(torchrun starts each worker in a new session, so killing the launcher's process
group leaves them running and holding the output pipe), and fails the test with
the output so far.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch._dynamo  # noqa: F401  (DDP and FSDP import it lazily: ~7 s in every forked rank otherwise)
import torch.distributed as dist

from syncnorm import testing
from syncnorm.testing import RankError, RanksHung  # noqa: F401  (re-exported for the tests)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """:func:`syncnorm.testing.run_ranks`, with this module preloaded where ranks start from a forkserver."""
    kwargs.setdefault("preload", ("torch._dynamo", "harness"))
    return testing.run_ranks(fn, world_size, *args, **kwargs)


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
