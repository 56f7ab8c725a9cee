"""The launch scripts and examples/train_digits.py under real torchrun (subprocesses, gloo on CPU).

References are independent of the multi-rank code path: a single process with plain nn.BatchNorm2d
on the global batch, and an uninterrupted run for the fault and corrupt-checkpoint tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.harness import free_port, kill_tree, launcher_free_env

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "launch" / "torchrun_local.sh"
MULTINODE = REPO / "launch" / "torchrun_multinode.sh"
SLURM = REPO / "launch" / "slurm.sbatch"
TRAIN = REPO / "examples" / "train_digits.py"
CRASH_JOB = REPO / "tests" / "integration" / "jobs" / "digits_crash_job.py"  # runs TRAIN's main, SIGKILLs one rank once
COMMAND_TIMEOUT = 200  # seconds; generous because the CPU is shared with other test workers
# A short deterministic job: 2 epochs of 8 batches, per-rank batch 4.
SHORT_RUN = ["--epochs", "2", "--limit-batches", "8", "--batch-size", "4", "--no-progress"]


def start(command: list, env: dict[str, str]) -> subprocess.Popen:
    # Own session: on a timeout the whole torchrun tree (agent and workers) is killed, nothing leaks.
    return subprocess.Popen(
        [str(c) for c in command],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = COMMAND_TIMEOUT) -> tuple[str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun's workers lead sessions of their own: killpg would miss them
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"timed out after {timeout} s: {proc.args}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-5000:]}"
        )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}: {proc.args}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-5000:]}"
    )
    return stdout, stderr


def run(command: list, env: dict[str, str] | None = None) -> tuple[str, str]:
    return finish(start(command, env or launcher_free_env()))


def load_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_model.pt", weights_only=True)


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    differing = {
        k: (actual[k].double() - expected[k].double()).abs().max().item()
        for k in expected
        if not torch.equal(actual[k], expected[k])
    }
    assert not differing, f"final weights/buffers differ (max abs diff per tensor): {differing}"


def assert_complete_run(out: Path, world_size: int, epochs: int) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["world_size"] == world_size
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, epochs + 1))
    for record in metrics["history"]:
        assert isinstance(record["held_out_accuracy"], float) and 0.0 <= record["held_out_accuracy"] <= 1.0
        assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return metrics


@pytest.mark.timeout(400)
def test_local_two_processes_match_one_process_on_the_global_batch(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    distributed = start(
        ["bash", LOCAL, 2, TRAIN, "--norm", "sync", "--out", two, "--ckpt-every", 3, *SHORT_RUN], launcher_free_env()
    )
    # Reference: one plain process (no torchrun, no process group), nn.BatchNorm2d on the 2 x 4 batch.
    single = start(
        [sys.executable, TRAIN, "--norm", "local", "--out", one, *SHORT_RUN, "--batch-size", 8], launcher_free_env()
    )
    stdout, _ = finish(distributed)
    finish(single)
    assert_complete_run(two, world_size=2, epochs=2)
    assert "epoch 2/2" in stdout and "held-out acc" in stdout
    assert sorted(p.name for p in two.glob("ckpt-*.pt"))[-1] == "ckpt-00000016.pt"  # the last epoch end
    assert_complete_run(one, world_size=1, epochs=2)
    synced, reference = load_weights(two), load_weights(one)
    for name, expected in reference.items():
        torch.testing.assert_close(synced[name], expected, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.timeout(400)
def test_two_agents_as_two_nodes_over_loopback(tmp_path):
    out, port = tmp_path / "run", free_port()
    common = dict(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1", RDZV_TIMEOUT="120")
    # Node 0 takes its settings from the environment, node 1 from the options.
    node0 = start(["bash", MULTINODE, TRAIN, "--out", out, *SHORT_RUN], launcher_free_env(**common, NODE_RANK="0"))
    node1 = start(
        ["bash", MULTINODE, "--nnodes", 2, "--node-rank", 1, "--master-addr", "127.0.0.1", "--master-port", port]
        + ["--nproc-per-node", 1, "--rdzv-timeout", 120, TRAIN, "--out", out, *SHORT_RUN],
        launcher_free_env(),
    )
    finish(node0)
    finish(node1)
    assert_complete_run(out, world_size=2, epochs=2)


@pytest.mark.timeout(500)
def test_kill_9_of_a_worker_restarts_and_resumes_to_identical_weights(tmp_path):
    job = ["--ckpt-every", 4, *SHORT_RUN]
    uninterrupted, faulted, log = tmp_path / "uninterrupted", tmp_path / "faulted", tmp_path / "processes.jsonl"
    reference = start(["bash", LOCAL, 2, TRAIN, *job, "--out", uninterrupted], launcher_free_env())
    # Rank 1 SIGKILLs itself after step 14 (epoch 2, batch 6); the newest checkpoint is step 12
    # (epoch 2, batch 4), so the restarted group must redo steps 13-14 from the right batches.
    crashing = [CRASH_JOB, "--crash-at-step", 14, "--crash-rank", 1, "--process-log", log, TRAIN]
    stdout, stderr = finish(
        start(["bash", LOCAL, 2, *crashing, *job, "--out", faulted], launcher_free_env(MAX_RESTARTS="1"))
    )
    finish(reference)

    assert "exitcode: -9" in stderr or "Signals.SIGKILL" in stderr, stderr[-3000:]
    crash = json.loads((faulted / ".crash-injected").read_text())
    assert crash["rank"] == 1 and crash["step"] == 14
    processes = [json.loads(line) for line in log.read_text().splitlines()]
    starts = sorted((e["restart"], e["rank"]) for e in processes if e["event"] == "start")
    assert starts == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]  # two attempts of both ranks
    # The first attempt started from scratch, the restarted one (only it) from the step-12 checkpoint.
    resumed = re.findall(r"resuming from (\S+): (epoch \d+, \d+ batches done, step \d+)", stdout)
    assert resumed == [(str(faulted / "ckpt-00000012.pt"), "epoch 2, 4 batches done, step 12")], stdout
    assert stdout.count("epoch 1/2 ") == 1 and stdout.count("epoch 2/2 ") == 1, stdout
    assert_complete_run(faulted, world_size=2, epochs=2)
    assert_bitwise_equal(load_weights(faulted), load_weights(uninterrupted))

    restart, first_step = (
        next(e for e in processes if e["event"] == event and e["restart"] == "1" and e["rank"] == 0)
        for event in ("start", "first_step")
    )
    print(
        f"\nrestart after kill -9: {first_step['time'] - crash['time']:.2f} s until the first resumed step"
        f" (kill -> new worker process {restart['launched'] - crash['time']:.2f} s,"
        f" process start -> first step {first_step['time'] - restart['launched']:.2f} s)"
    )


@pytest.mark.timeout(400)
def test_truncated_and_foreign_checkpoints_are_skipped_with_a_warning(tmp_path):
    job = [TRAIN, "--epochs", "2", "--limit-batches", "6", "--batch-size", "8", "--ckpt-every", "2", "--no-progress"]
    reference = tmp_path / "reference"
    run([sys.executable, *job, "--keep-ckpts", "10", "--out", reference])  # one plain process, no torchrun

    # A run interrupted after epoch 1 holds checkpoints 2, 4 and 6 (the reference's, as runs are
    # deterministic); its newest was cut short, and a foreign file looks even newer.
    out = tmp_path / "run"
    out.mkdir()
    for step in (2, 4, 6):
        shutil.copy(reference / f"ckpt-{step:08d}.pt", out)
    newest = out / "ckpt-00000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (out / "ckpt-00000099.pt").write_bytes(b"not a checkpoint")

    stdout, stderr = run(["bash", LOCAL, 1, *job, "--keep-ckpts", "10", "--out", out])
    assert "WARNING: skipping unreadable checkpoint" in stderr
    assert "ckpt-00000099.pt" in stderr and "ckpt-00000006.pt" in stderr
    assert f"resuming from {out / 'ckpt-00000004.pt'}: epoch 1, 4 batches done, step 4" in stdout, stdout
    assert_complete_run(out, world_size=1, epochs=2)
    assert_bitwise_equal(load_weights(out), load_weights(reference))


# Stand-ins for SLURM's commands (SLURM itself does not run here): `scontrol show hostnames` names
# this machine, and `srun --ntasks=N CMD...` runs N copies of CMD with SLURM_NODEID=0..N-1, like
# one task per node, failing if any copy fails.
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && echo 127.0.0.1
"""
FAKE_SRUN = """#!/usr/bin/env bash
ntasks=1
while [[ $1 == --* ]]; do [[ $1 == --ntasks=* ]] && ntasks=${1#--ntasks=}; shift; done
pids=()
for ((i = 0; i < ntasks; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


@pytest.mark.timeout(400)
def test_slurm_job_starts_one_agent_per_node_with_the_slurm_rendezvous(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm_env = dict(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[01-02]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_CPUS_PER_TASK="1",
        MASTER_PORT=str(free_port()),
        RDZV_TIMEOUT="120",
    )
    out = tmp_path / "run"
    _, stderr = run(["bash", SLURM, TRAIN, "--out", out, *SHORT_RUN], launcher_free_env(**slurm_env))
    assert f"2 nodes x 1 workers, rendezvous 127.0.0.1:{slurm_env['MASTER_PORT']} (slurm-4242)" in stderr
    assert_complete_run(out, world_size=2, epochs=2)


def test_launch_scripts_reject_bad_usage_before_starting_anything():
    for command, message in [
        (["bash", LOCAL], "Usage"),
        (["bash", LOCAL, "zero", TRAIN], "NPROC must be a positive integer"),
        (["bash", LOCAL, 2, "no/such/script.py"], "no such training script"),
        (["bash", MULTINODE, "--nnodes"], "needs a value"),
        (["bash", MULTINODE, "--bogus", TRAIN], "unknown option --bogus"),
        (["bash", MULTINODE, "--nnodes", 2, "--node-rank", 2, TRAIN], "NODE_RANK must be in [0, 2)"),
        (["bash", SLURM, TRAIN], "run this with sbatch"),
    ]:
        proc = subprocess.run(
            [str(c) for c in command], env=launcher_free_env(), cwd=REPO, capture_output=True, text=True, timeout=30
        )
        assert proc.returncode != 0, command
        assert message in proc.stderr, (command, proc.stderr)
        if message == "Usage":
            assert "PYTHON=/path/to/venv/bin/python" in proc.stderr, proc.stderr  # the usage text names PYTHON


# A two-rank job that says which interpreter stub started it (the stubs export their name).
PROBE = """
import os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
print(f"rank {dist.get_rank()} of {dist.get_world_size()} via {os.environ.get('STUB_NAME', 'no stub')}|")
dist.barrier()
dist.destroy_process_group()
"""


def interpreter_stubs(folder: Path, **with_torch: bool) -> str:
    """``python``/``python3`` stand-ins in ``folder``: this interpreter, or this one without site-packages (no torch).

    Returns a PATH that finds them first.
    """
    folder.mkdir()
    for name, has_torch in with_torch.items():
        flags = "" if has_torch else " -S"  # -S: no site-packages, so no torch
        (folder / name).write_text(f'#!/usr/bin/env bash\nSTUB_NAME={name} exec {sys.executable}{flags} "$@"\n')
        (folder / name).chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def env_without_python(path: str, **extra: str) -> dict[str, str]:
    env = launcher_free_env(PATH=path)
    del env["PYTHON"]
    env.update(extra)
    return env


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "python_has_torch, expected",
    [(True, "python"), (False, "python3")],
    ids=["python-has-torch", "only-python3-has-torch"],
)
def test_launch_uses_python_when_it_has_torch_else_python3(tmp_path, python_has_torch, expected):
    """Without PYTHON: an activated venv's ``python`` wins over a system ``python3``; else ``python3``."""
    path = interpreter_stubs(tmp_path / "bin", python=python_has_torch, python3=True)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    stdout, _ = run(["bash", LOCAL, 2, probe], env_without_python(path))
    # Both ranks print at once: their lines may interleave.
    assert sorted(re.findall(r"rank (\d) of 2 via ([^|]+)\|", stdout)) == [("0", expected), ("1", expected)], stdout


def test_launch_without_torch_stops_with_a_message_naming_python(tmp_path):
    path = interpreter_stubs(tmp_path / "bin", python=False, python3=False)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cases = [
        (["bash", LOCAL, 2, probe], env_without_python(path), "python3 from PATH (python: no torch)"),
        (["bash", MULTINODE, probe], env_without_python(path), "python3 from PATH (python: no torch)"),
        (["bash", LOCAL, 2, probe], env_without_python(path, PYTHON=str(tmp_path / "bin" / "python")), "PYTHON="),
        (["bash", LOCAL, 2, probe], env_without_python(path, PYTHON="no-such-python"), "no interpreter"),
    ]
    for command, env, origin in cases:
        proc = subprocess.run([str(c) for c in command], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert origin in proc.stderr and "Set PYTHON to the" in proc.stderr, proc.stderr
        assert "rank 0" not in proc.stdout  # stopped before torchrun started anything


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_launch_scripts_are_shellcheck_clean():
    proc = subprocess.run(
        [
            "shellcheck",
            "--shell=bash",
            "--severity=style",
            "--external-sources",
            str(LOCAL),
            str(MULTINODE),
            str(SLURM),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


MINIMAL = REPO / "examples" / "ddp_minimal.py"


@pytest.mark.parametrize("document", ["README.md", "docs/getting-started.md"])
def test_the_docs_show_the_minimal_example_as_it_is_in_examples(document):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / document).read_text(), re.S)
    assert MINIMAL.read_text() in blocks


@pytest.mark.timeout(300)
def test_the_minimal_example_runs_under_torchrun_and_prints_a_line_per_step():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(MINIMAL)]  # fmt: skip
    stdout, _ = finish(start(command, launcher_free_env()))
    assert re.findall(r"^step (\d): loss \d+\.\d{3}$", stdout, re.M) == ["0", "1", "2"], stdout


def test_the_getting_started_test_of_a_model_on_gloo_ranks_runs_and_passes(tmp_path):
    document = (REPO / "docs" / "getting-started.md").read_text()
    block = re.search(r"## Test your model on gloo ranks.*?```python\n(.*?)```", document, re.S)[1]
    script = tmp_path / "test_sync.py"
    script.write_text(block)
    stdout, _ = finish(start([sys.executable, str(script)], launcher_free_env()))
    assert stdout.strip() == "2 ranks match one process"
