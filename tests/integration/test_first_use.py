"""What a new user meets first: clean exits, the guard under DDP's defaults, messages that point somewhere.

Multi-rank cases run real gloo ranks (tests/helpers/harness.py); the exit checks run real torchrun and
Lightning jobs (tools/exit_repeat.py, a few repeats here; run by hand it does 20+).
References are independent of the code under test: nn.BatchNorm1d on the global batch, and
plain ``dist.all_reduce`` for what the backend does on its own.
"""

from __future__ import annotations

import inspect
import pickle
import re
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.harness import RankError, launcher_free_env, run_ranks, shard
from torch import nn

import syncnorm
from syncnorm import collectives

ROOT = Path(__file__).resolve().parents[2]
PG_TIMEOUT = 30.0  # DDP's broadcast would make the ranks wait this long without the guard's DDP checks
CHANNELS = 4


# --- public names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SyncNormCollectiveError", "SyncNormMismatchError", "SyncNormNonFiniteError"])
def test_public_exceptions_report_their_public_module_path(name):
    cls = getattr(syncnorm, name)
    assert cls.__module__ == "syncnorm" and name in syncnorm.__all__
    assert repr(cls) == f"<class 'syncnorm.{name}'>"
    error = cls("what went wrong")
    assert traceback.format_exception_only(error) == [f"syncnorm.{name}: what went wrong\n"]
    copy = pickle.loads(pickle.dumps(error))  # crosses process boundaries (spawned ranks) unchanged
    assert type(copy) is cls and str(copy) == "what went wrong"


def test_warnings_report_the_public_path_and_the_lightning_module_reexports_its_own():
    for name in ("SyncNormDriftWarning", "PreciseBNWarning", "SyncNormWaitWarning", "SyncNormSetupWarning"):
        cls = getattr(syncnorm, name)
        assert repr(cls) == f"<class 'syncnorm.{name}'>" and issubclass(cls, UserWarning)
    pytest.importorskip("pytorch_lightning")
    from syncnorm.lightning import SyncNormDriftWarning

    assert SyncNormDriftWarning is syncnorm.SyncNormDriftWarning


# --- collectives leave nothing for the backend's threads to release -----------------------------


def _held_after_return(rank, world):
    """How often the backend still holds the tensor when the call returns: plain torch vs syncnorm."""
    held = {"dist.all_reduce": 0, "syncnorm all_reduce": 0, "syncnorm all_gather_rows": 0}
    for _ in range(200):
        plain = torch.ones(9, dtype=torch.float64)
        before = plain._use_count()
        dist.all_reduce(plain)
        held["dist.all_reduce"] += plain._use_count() > before
        mine = torch.ones(9, dtype=torch.float64)
        before = mine._use_count()
        collectives.all_reduce(mine, dist.group.WORLD, layer="probe", what="test")
        held["syncnorm all_reduce"] += mine._use_count() > before
        row = torch.ones(3, dtype=torch.int32)
        before = row._use_count()
        rows = collectives.all_gather_rows(row, dist.group.WORLD, layer="probe", what="test")
        held["syncnorm all_gather_rows"] += row._use_count() > before
        assert rows.tolist() == [[1, 1, 1]] * world
    held["release waits that ran out"] = len(collectives._still_held)
    return held


def test_cpu_collectives_return_after_gloo_let_go_of_the_tensor():
    """The cause of the aborts at exit: a tensor whose last reference a gloo worker drops needs the GIL.

    Right after ``dist.all_reduce`` returns, gloo's worker often still holds the tensor (counted
    for comparison, not asserted: it depends on timing); after syncnorm's, never.
    """
    for rank, held in enumerate(run_ranks(_held_after_return, 2)):
        print(f"rank {rank}: calls of 200 that returned while gloo still held the tensor: {held}")
        assert held["syncnorm all_reduce"] == 0 and held["syncnorm all_gather_rows"] == 0, held
        assert held["release waits that ran out"] == 0, held


FAILED_PG_TIMEOUT = 3.0


def _held_after_failure(rank, world, flag: str, collective: str):
    """Rank 0's collective times out (rank 1 never joins): who still holds the tensor when the error arrives."""
    if rank == 1:
        deadline = time.monotonic() + 60
        while not Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError("rank 1 released")
    tensor = torch.ones(9, dtype=torch.float64)
    before = tensor._use_count()
    started = time.monotonic()
    try:
        if collective == "all_reduce":
            collectives.all_reduce(tensor, dist.group.WORLD, layer="probe", what="test")
        else:
            collectives.all_gather_rows(tensor, dist.group.WORLD, layer="probe", what="test")
    except syncnorm.SyncNormCollectiveError:
        raise RuntimeError(
            f"held {tensor._use_count() - before} after {time.monotonic() - started:.2f} s, "
            f"release waits that ran out {len(collectives._still_held)}"
        ) from None
    finally:
        Path(flag).touch()


@pytest.mark.parametrize("collective", ["all_reduce", "all_gather_rows"])
def test_a_failed_cpu_collective_raises_after_gloo_let_go_of_the_tensor(tmp_path, collective):
    """A process that exits right after a collective error must not race gloo's worker either: the
    error reaches the caller only once nothing but the caller holds the tensor (the frames the error
    passed through held gloo's work, and with it the tensor)."""
    results = run_ranks(
        _held_after_failure, 2, str(tmp_path / "rank0-done"), collective, expect_errors=True, timeout=90,
        pg_timeout=FAILED_PG_TIMEOUT,
    )  # fmt: skip
    assert isinstance(results[0], RankError), results
    found = re.search(r"held (-?\d+) after ([\d.]+) s, release waits that ran out (\d+)", results[0].message)
    assert found, results[0].message
    held, seconds, ran_out = int(found.group(1)), float(found.group(2)), int(found.group(3))
    assert held == 0 and ran_out == 0, results[0].message
    # The timeout ended it, and no release wait ran out on top of it (that would add 2 s).
    assert FAILED_PG_TIMEOUT * 0.9 <= seconds < FAILED_PG_TIMEOUT + 1.5, results[0].message


def _exit_counts(jobs: str, repeats: int) -> dict[str, tuple[int, int]]:
    command = [sys.executable, str(ROOT / "tools" / "exit_repeat.py"), "--jobs", jobs, "--repeats", str(repeats)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=280, cwd=ROOT)
    found = {
        job: (int(failed), int(total))
        for job, failed, total in re.findall(r"^(\S+)\s+(\d+) of (\d+) runs exited non-zero", completed.stdout, re.M)
    }
    assert set(found) == set(jobs.split(",")), completed.stdout + completed.stderr
    return found


@pytest.mark.timeout(300)
def test_jobs_that_end_right_after_a_syncnorm_step_exit_zero_every_time():
    """torchrun ranks that end right after syncnorm's backward all_reduce, and a Lightning fit with both
    the plugin and the callback: exit status 0 on each of a few consecutive runs."""
    jobs = "torchrun-step" + (",lightning-both" if _has_lightning() else "")
    for job, (failed, total) in _exit_counts(jobs, repeats=3).items():
        assert (failed, total) == (0, 3), job


def _has_lightning() -> bool:
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        return False
    return True


# --- the guard under DistributedDataParallel's defaults ---------------------------------------


def _ddp(net: nn.Module, sync_buffers: bool) -> nn.Module:
    ddp = nn.parallel.DistributedDataParallel
    if sync_buffers:
        return ddp(net)  # DDP's default: broadcast the buffers before every forward
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(net, forward_sync_buffers=False)
    return ddp(net, broadcast_buffers=False)


def _net(head: int) -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    net = nn.Sequential(
        OrderedDict(
            norm1=nn.BatchNorm1d(CHANNELS),
            linear=nn.Linear(CHANNELS, CHANNELS),
            norm2=nn.BatchNorm1d(CHANNELS),
            head=nn.Linear(CHANNELS, head),
        )
    )
    return syncnorm.convert_sync_batchnorm(net)


def _skipped_backward_under_ddp(rank, world, head, sync_buffers):
    syncnorm.set_check(True)
    model = _ddp(_net(head), sync_buffers)
    x = torch.randn(6, CHANNELS)
    model(x).sum().backward()  # one clean step first
    start = time.monotonic()
    try:
        if rank == 1:
            model(x)  # a forward whose backward this rank never runs
        else:
            model(x).sum().backward()
        model(x).sum().backward()
    except syncnorm.SyncNormMismatchError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


@pytest.mark.parametrize("sync_buffers", [True, False], ids=["ddp-defaults", "no-buffer-broadcast"])
@pytest.mark.parametrize("head", [4, 300_000], ids=["small-head", "head-fills-ddp-first-bucket"])
def test_guard_names_a_skipped_backward_under_ddp(head, sync_buffers):
    """Under DDP's default buffer broadcast, and with a head big enough that DDP's first gradient
    bucket is ready before the last synchronised layer's backward: named on both ranks at once."""
    results = run_ranks(_skipped_backward_under_ddp, 2, head, sync_buffers, timeout=120, pg_timeout=PG_TIMEOUT)
    rank1_line = (
        "rank 1: the start of a DistributedDataParallel forward (before DDP's buffer broadcast)"
        if sync_buffers
        else "rank 1: layer 'norm1' forward statistics, train mode"
    )
    for rank, result in enumerate(results):
        print(f"rank {rank}: SyncNormMismatchError after {result['seconds']:.2f} s")
        assert result["error"] is not None, result
        assert "ranks [1] differ from rank 0" in result["error"]
        assert "rank 0: the start of a backward through DistributedDataParallel" in result["error"]
        assert rank1_line in result["error"]
        assert "skipped backward()" in result["error"]
        assert result["seconds"] < PG_TIMEOUT / 3, result  # named, not the process-group timeout


def _guarded_ddp_steps(rank, world, x, sizes):
    syncnorm.set_check(True)
    net = nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(CHANNELS, dtype=torch.float64)))
    model = _ddp(syncnorm.convert_sync_batchnorm(net), sync_buffers=True)
    local = shard(x, rank, sizes)
    trained = []
    for _ in range(3):
        out = model(local)
        out.square().sum().backward()
        trained.append(out.detach())
    model.eval()
    return {"trained": trained, "evaluated": model(local).detach()}


def test_guarded_ddp_training_agrees_with_global_batchnorm():
    """No false alarm from the DDP checks: three guarded steps and an eval forward, as nn.BatchNorm on the global batch."""
    sizes = [5, 3]
    x = torch.randn(sum(sizes), CHANNELS, dtype=torch.float64) * 2 + 1
    results = run_ranks(_guarded_ddp_steps, 2, x, sizes, timeout=120)
    reference = nn.BatchNorm1d(CHANNELS, dtype=torch.float64)
    trained = [reference(x).detach() for _ in range(3)]
    evaluated = reference.eval()(x).detach()
    for rank, result in enumerate(results):
        for got, want in zip(result["trained"], trained):
            torch.testing.assert_close(got, shard(want, rank, sizes), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result["evaluated"], shard(evaluated, rank, sizes), rtol=1e-12, atol=1e-12)


# --- failure messages point to the switch that names the rank ---------------------------------


def _peer_gone_silent(rank, world, guard_on):
    syncnorm.set_check(guard_on)
    net = _net(CHANNELS)
    if rank == 1:  # never reaches a collective; leaves once rank 0 has given up
        time.sleep(7.0)
        raise RuntimeError("rank 1 left")
    net(torch.randn(6, CHANNELS))


@pytest.mark.parametrize("guard_on", [False, True], ids=["guard-off", "guard-on"])
def test_timeout_messages_say_which_switch_names_the_rank(guard_on):
    results = run_ranks(_peer_gone_silent, 2, guard_on, expect_errors=True, timeout=60, pg_timeout=5.0)
    error = results[0]
    assert isinstance(error, RankError) and error.type_name == "SyncNormCollectiveError", error
    assert "layer 'norm1'" in error.message and "Timed out" in error.message
    if guard_on:
        assert "The guard (SYNCNORM_CHECK=1) is on" in error.message
        assert "forward_sync_buffers=False" in error.message
    else:
        assert "run every rank with SYNCNORM_CHECK=1" in error.message
    assert "docs/troubleshooting.md" in error.message


# --- no silent wait, no silent per-rank BatchNorm ------------------------------------------------


def test_a_rank_left_in_eval_mode_is_a_warning_then_an_error_and_both_ranks_exit_cleanly(tmp_path):
    job = ROOT / "tests" / "integration" / "jobs" / "wait_warning_job.py"
    env = launcher_free_env(SYNCNORM_WAIT_WARNING="1", SYNCNORM_CHECK="0")
    store, pg_timeout = tmp_path / "store", 5.0
    procs = [
        subprocess.Popen(
            [sys.executable, str(job), str(rank), str(store), str(pg_timeout)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out + err
        assert "terminate called" not in err, err
    out = outputs[0][0]
    warned = re.search(r"rank 0: SyncNormWaitWarning after ([\d.]+) s: (.*)", out)
    assert warned, out
    assert 0.9 <= float(warned.group(1)) < 0.8 * pg_timeout, out
    message = warned.group(2)
    for part in ("rank 0", "forward statistics", "layer '1'", "eval mode", "SYNCNORM_CHECK=1"):
        assert part in message, message
    failed = re.search(r"rank 0: SyncNormCollectiveError after ([\d.]+) s", out)
    assert failed and float(failed.group(1)) >= 0.9 * pg_timeout, out
    assert out.count("SyncNormWaitWarning") == 1, out


SETUP_PROBE = """
import warnings, torch, syncnorm
from torch import nn
warnings.simplefilter("always")
layer = syncnorm.SyncBatchNorm(3)
abn = syncnorm.InPlaceABN(3)
with warnings.catch_warnings(record=True) as caught:
    layer.eval()(torch.randn(4, 3))  # eval mode: nothing to say
    layer.train()(torch.randn(4, 3))
    layer(torch.randn(4, 3))
    abn(torch.randn(4, 3))
for warning in caught:
    print(f"{warning.category.__name__}: {warning.message}")
"""


@pytest.mark.parametrize("world_size", ["2", "1", ""], ids=["WORLD_SIZE=2", "WORLD_SIZE=1", "unset"])
def test_training_under_a_launcher_without_a_process_group_warns_once(world_size):
    env = launcher_free_env()
    if world_size:
        env["WORLD_SIZE"] = world_size
    done = subprocess.run([sys.executable, "-c", SETUP_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("SyncNormSetupWarning")]
    if world_size != "2":
        assert lines == []
        return
    assert len(lines) == 1, done.stdout
    for part in ("'SyncBatchNorm#", "WORLD_SIZE=2", "init_process_group"):
        assert part in lines[0], lines[0]
