"""tests/helpers/harness.py itself: a timed-out job leaves no process behind; the all_reduce recorder.

torchrun starts every worker in a session of its own, so killing the launcher's process group
(what the tests did before) leaves the workers running, holding the output pipe open: the test
then blocks on it until pytest-timeout (seen in CI). ``kill_tree`` kills by descent instead.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.harness import alive, kill_tree, launcher_free_env, recorded_all_reduces, run_command, run_ranks

import syncnorm
import syncnorm.testing

SLEEPER = "import os, pathlib, time; pathlib.Path(os.environ['PIDS'], str(os.getpid())).touch(); time.sleep(600)"


def test_kill_tree_ends_torchrun_workers_that_run_in_sessions_of_their_own(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.Popen(
        cmd, env=launcher_free_env(PIDS=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(workers := [int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()]) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    assert all(os.getsid(pid) == pid for pid in workers)  # each worker leads a session: killpg would miss it
    kill_tree(proc.pid)
    proc.communicate(timeout=30)  # the pipe closes: nobody holds it any more
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]


def test_run_command_fails_a_job_that_overruns_with_its_output_and_where_it_hung():
    # The job's non-Python child outlives its aborted parent unless it was listed before the abort.
    job = (
        "import subprocess, time\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        "print('started, child', child.pid, flush=True)\n"
        "def stuck_here():\n"
        "    time.sleep(600)\n"
        "stuck_here()\n"
    )
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"did not finish in 3 s[\s\S]*started") as failed:
        run_command([sys.executable, "-c", job], timeout=3, env=launcher_free_env())
    assert time.monotonic() - started < 30
    message = str(failed.value)
    assert re.search(r"line 5 in stuck_here", message), message
    child = int(re.search(r"started, child (\d+)", message).group(1))
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_run_command_returns_code_and_output_without_launcher_variables():
    env = launcher_free_env()
    assert not {"RANK", "LOCAL_RANK", "MASTER_PORT"} & env.keys()
    code, output = run_command(
        [sys.executable, "-c", "import os, sys; print(os.environ.get('RANK')); sys.exit(3)"], timeout=60
    )
    assert (code, output.strip()) == (3, "None")


def _record_then_reduce(rank, world):
    with recorded_all_reduces() as calls:
        dist.all_reduce(torch.ones(3))
    after = torch.ones(2)
    dist.all_reduce(after)  # the ProcessGroup's method is restored with its binding
    return calls, after


def test_recorded_all_reduces_counts_every_all_reduce_and_restores_the_process_group():
    for calls, after in run_ranks(_record_then_reduce, 2):
        assert calls == [(3, torch.float32)]
        assert after.tolist() == [2.0, 2.0]


def _train_step(rank, world_size, global_batch):
    layer = syncnorm.SyncBatchNorm(3).double()
    local = global_batch.chunk(world_size)[rank].clone().requires_grad_()
    layer(local).square().sum().backward()
    return layer.running_mean, local.grad


def test_the_public_world_runner_gives_each_rank_its_result_as_one_process_on_the_global_batch_would():
    # A user's test of their own layer: 2 gloo ranks against nn.BatchNorm on the global batch.
    global_batch = torch.randn(8, 3, 4, dtype=torch.float64)
    results = syncnorm.testing.run_ranks(_train_step, 2, global_batch)
    reference = torch.nn.BatchNorm1d(3).double()
    whole = global_batch.clone().requires_grad_()
    reference(whole).square().sum().backward()
    for rank, (running_mean, grad) in enumerate(results):
        torch.testing.assert_close(running_mean, reference.running_mean)
        torch.testing.assert_close(grad, whole.grad.chunk(2)[rank])


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("planted")
    return rank


def _hang_on_rank_0(rank, world_size):
    if rank == 0:
        time.sleep(600)  # rank 1 then waits for it at the runner's closing barrier: both are hung


def test_the_public_world_runner_reports_a_failed_rank_and_a_hung_one():
    results = syncnorm.testing.run_ranks(_fail_on_rank_1, 2, expect_errors=True)
    assert results[0] == 0
    assert isinstance(results[1], syncnorm.testing.RankError) and str(results[1]) == "ValueError: planted"
    with pytest.raises(AssertionError, match="rank 1 failed:(.|\n)*ValueError: planted"):
        syncnorm.testing.run_ranks(_fail_on_rank_1, 2)
    started = time.monotonic()
    with pytest.raises(syncnorm.testing.RanksHung, match=r"ranks \[0, 1\] did not finish within 5 s"):
        syncnorm.testing.run_ranks(_hang_on_rank_0, 2, timeout=5)
    assert time.monotonic() - started < 60


def test_shard_splits_a_global_batch_in_rank_order_with_uneven_and_empty_parts():
    batch = torch.arange(10).reshape(5, 2)
    sizes = [2, 0, 3]
    parts = [syncnorm.testing.shard(batch, rank, sizes) for rank in range(3)]
    assert [part.shape[0] for part in parts] == sizes
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(ValueError, match="no part for rank 3"):
        syncnorm.testing.shard(batch, 3, sizes)
    with pytest.raises(ValueError, match="no part for rank -1"):
        syncnorm.testing.shard(batch, -1, sizes)
    with pytest.raises(ValueError, match="of a batch of 5"):
        syncnorm.testing.shard(batch, 1, [4, 2])


@pytest.mark.skipif(not Path("/proc/sys/net/ipv4/ip_local_port_range").exists(), reason="Linux's /proc only")
def test_free_port_is_free_and_outside_the_ports_the_kernel_hands_out_by_itself():
    # Inside that range, any process's listener or outgoing connection could take the port
    # before the launcher binds it.
    low, high = (int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(50):
        port = syncnorm.testing.free_port()
        assert not low <= port <= high, (port, low, high)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
