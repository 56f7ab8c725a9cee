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

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch._dynamo  # noqa: F401  (DDP and FSDP import it lazily: ~7 s in every forked rank otherwise)

from syncnorm import testing
from syncnorm.testing import RankError, RanksHung, free_port, kill_tree, recorded_all_reduces, shard  # noqa: F401


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """:func:`syncnorm.testing.run_ranks`, with this module preloaded where ranks start from a forkserver."""
    kwargs.setdefault("preload", ("torch._dynamo", "helpers.harness"))
    return testing.run_ranks(fn, world_size, *args, **kwargs)


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

REPO = Path(__file__).resolve().parents[2]
# Launchers (torchrun, Lightning, Accelerate, Ray, SLURM) read these to detect an outer job; a job
# started by a test must not inherit them from a test run that is itself launched.
LAUNCHER_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "ACCELERATE_", "SYNCNORM_")
LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "RAY_ADDRESS")  # fmt: skip


def launcher_free_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables, one thread per process; plus ``extra``.

    ``PYTHON`` is this interpreter, the one the launch scripts in ``launch/`` then run; syncnorm
    comes from its installed package, as for a user."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith(LAUNCHER_ENV_PREFIXES)}
    # A job that aborts or is stopped for overrunning prints every thread's Python stack.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    """Running: in /proc and not a zombie (a child that exited stays in /proc until it is reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def dump_python_stacks(tree: list[int], wait_s: float = 3.0) -> None:
    """SIGABRT to every Python process in ``tree``: with ``PYTHONFAULTHANDLER`` set (see
    :func:`launcher_free_env`) each prints where all its threads are, so a hung job says where it
    hung. Core dumps are switched off for them first (the abort would otherwise write one)."""
    targets = []
    for target in tree:
        try:
            if os.path.basename(os.readlink(f"/proc/{target}/exe")).startswith("python"):
                resource.prlimit(target, resource.RLIMIT_CORE, (0, 0))
                targets.append(target)
        except (OSError, ValueError):
            continue
    for target in targets:
        try:
            os.kill(target, signal.SIGABRT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(alive(target) for target in targets):
        time.sleep(0.1)


def run_command(
    cmd: list[str], *, timeout: float, env: Optional[dict[str, str]] = None, cwd: Path = REPO
) -> tuple[int, str]:
    """Run ``cmd`` (stdout and stderr together); return ``(returncode, output)``.

    On a timeout the whole process tree is killed and the test fails with the output's tail."""
    returncode, output, _ = run_split(cmd, timeout=timeout, env=env, cwd=cwd, merged=True)
    return returncode, output


def run_split(
    cmd: list[str], *, timeout: float, env: Optional[dict[str, str]] = None, cwd: Path = REPO, merged: bool = False
) -> tuple[int, str, str]:
    """:func:`run_command` with stdout and stderr apart: ``(returncode, stdout, stderr)``."""
    proc = subprocess.Popen(
        [str(part) for part in cmd], cwd=cwd, env=env or launcher_free_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The tree is listed before any process ends: the children of an aborted parent are
        # re-parented, and kill_tree could no longer find them from the job's root.
        tree = [proc.pid, *testing._descendants(proc.pid)]
        dump_python_stacks(tree)
        for pid in tree:
            kill_tree(pid)
        stdout, stderr = proc.communicate()
        import pytest  # here, not at the top: only a timed-out test needs it

        pytest.fail(
            f"did not finish in {timeout:.0f} s (process tree killed): {' '.join(map(str, cmd))}\n"
            f"{stdout[-20000:]}\n{(stderr or '')[-20000:]}"
        )
    return proc.returncode, stdout, stderr or ""
