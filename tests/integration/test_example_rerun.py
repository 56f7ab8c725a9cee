"""examples/train_digits.py run again on the same --out, under real torchrun (2 CPU ranks, gloo).

A finished run says it is complete and trains nothing; ``--fresh`` trains again; a run that did
not finish resumes (also when ``--fresh`` is on the command line of a group that torchrun restarts);
``--precise-bn N`` on a finished run redoes only the final step.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers.harness import launcher_free_env, run_command

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "launch" / "torchrun_local.sh"
TRAIN = REPO / "examples" / "train_digits.py"
CRASH_JOB = REPO / "tests" / "integration" / "jobs" / "digits_crash_job.py"  # runs TRAIN's main, SIGKILLs one rank once
COMMAND_TIMEOUT = 200
SHORT_RUN = ["--epochs", "1", "--limit-batches", "4", "--batch-size", "4", "--device", "cpu"]


def torchrun(
    out: Path,
    *args,
    env: dict[str, str] | None = None,
    expect_rc: int | None = 0,
    progress: bool = False,
    crash: tuple = (),
) -> tuple[int, str]:
    """``launch/torchrun_local.sh 2 train_digits.py ...``; the whole process tree is killed on a timeout.

    ``crash``: options of tests/integration/jobs/digits_crash_job.py, which then runs train_digits.py.
    """
    flags = SHORT_RUN if progress else [*SHORT_RUN, "--no-progress"]
    job = [str(CRASH_JOB), *map(str, crash)] if crash else []
    cmd = ["bash", str(LOCAL), "2", *job, str(TRAIN), *flags, "--out", str(out), *map(str, args)]
    returncode, output = run_command(cmd, timeout=COMMAND_TIMEOUT, env=env)
    if expect_rc is not None:
        assert returncode == expect_rc, f"exit {returncode}: {cmd}\n{output[-5000:]}"
    return returncode, output


def files_of(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of the run folder with its modification time and contents."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir()) if p.is_file()}


def resumed_from(output: str) -> list[tuple[str, str]]:
    """``(checkpoint file name, where)`` of every "resuming from" line the example printed."""
    found = re.findall(r"resuming from (\S+): (epoch \d+, \d+ batches done, step \d+)", output)
    return [(Path(path).name, where) for path, where in found]


def killed_a_worker(output: str) -> bool:
    return "exitcode: -9" in output or "Signals.SIGKILL" in output


@pytest.mark.timeout(400)
def test_rerun_of_a_finished_run_says_so_and_trains_nothing_and_fresh_trains_again(tmp_path):
    out = tmp_path / "run"
    _, first = torchrun(out)
    assert "epoch 1/1" in first
    before = files_of(out)
    assert {"metrics.json", "metrics.png", "final_model.pt", "ckpt-00000004.pt"} <= before.keys()

    _, again = torchrun(out)
    assert "already holds this run, complete" in again
    for name in ("metrics.json", "metrics.png", "final_model.pt"):
        assert str(out / name) in again
    assert "--fresh" in again
    assert "epoch 1/1" not in again and "resuming" not in again
    assert files_of(out) == before  # nothing rewritten

    _, fresh = torchrun(out, "--fresh", progress=True)
    assert "epoch 1/1" in fresh and "resuming" not in fresh and "already holds" not in fresh
    # The progress bar is on, but the output goes to a pipe: no bar redrawing itself into the log.
    assert "\r" not in fresh and "it/s" not in fresh
    after = files_of(out)  # the old run's files were cleared and written again
    assert all(after[name][0] > before[name][0] for name in ("metrics.json", "final_model.pt", "ckpt-00000004.pt"))
    # Deterministic: training again gives bitwise the same model.
    retrained = torch.load(out / "final_model.pt", weights_only=True)
    previous = torch.load(io.BytesIO(before["final_model.pt"][1]), weights_only=True)
    assert all(torch.equal(retrained[k], v) for k, v in previous.items())


@pytest.mark.timeout(500)
def test_an_unfinished_run_resumes_also_when_torchrun_restarts_a_fresh_run(tmp_path):
    out = tmp_path / "run"
    job = ("--epochs", "2", "--ckpt-every", "2")
    # Rank 1 kills itself after step 6 (epoch 2); the newest checkpoint is step 4 (the end of epoch 1).
    crash = ("--crash-at-step", 6, "--crash-rank", 1)
    rc, crashed = torchrun(out, *job, crash=crash, expect_rc=None)
    assert rc != 0 and killed_a_worker(crashed), crashed[-5000:]
    assert (out / ".crash-injected").exists() and not (out / "metrics.json").exists()
    _, resumed = torchrun(out, *job)
    assert resumed_from(resumed) == [("ckpt-00000004.pt", "epoch 2, 0 batches done, step 4")], resumed
    assert "epoch 2/2" in resumed and "epoch 1/2" not in resumed

    # --fresh clears only on the first attempt: the group torchrun restarts after the crash resumes.
    (out / ".crash-injected").unlink()
    log = tmp_path / "processes.jsonl"
    restarting = launcher_free_env(MAX_RESTARTS="1")
    _, output = torchrun(out, *job, "--fresh", env=restarting, crash=(*crash, "--process-log", log))
    assert killed_a_worker(output) and (out / ".crash-injected").exists(), output[-5000:]
    processes = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(e["restart"] for e in processes if e["event"] == "start" and e["rank"] == 0) == ["0", "1"]
    # The first attempt trained from scratch (once), the restarted one resumed (only it) and finished.
    assert output.count("epoch 1/2 ") == 1 and output.count("epoch 2/2 ") == 1, output[-5000:]
    assert resumed_from(output) == [("ckpt-00000004.pt", "epoch 2, 0 batches done, step 4")], output[-5000:]


@pytest.mark.timeout(400)
def test_precise_bn_on_a_finished_run_redoes_only_the_final_step(tmp_path):
    out = tmp_path / "run"
    torchrun(out)
    checkpoint = (out / "ckpt-00000004.pt").read_bytes()
    _, output = torchrun(out, "--precise-bn", 3)
    assert "training is complete (step 4)" in output and "epoch 1/1" not in output
    assert "precise BN over 6 batches (3 per rank)" in output
    assert (out / "ckpt-00000004.pt").read_bytes() == checkpoint and not (out / "ckpt-00000008.pt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    precise = metrics["precise_bn"]
    assert precise["batches"] == 6 and precise["batches_per_rank"] == 3 and precise["seconds"] > 0
    assert precise["held_out_accuracy_running_stats"] == metrics["history"][-1]["held_out_accuracy"]
    assert metrics["complete"] == {"epochs": 1, "step": 4, "precise_bn": 3}
    # final_model.pt: the checkpoint's weights with other running statistics.
    trained = torch.load(out / "ckpt-00000004.pt", weights_only=True)["model"]
    final = torch.load(out / "final_model.pt", weights_only=True)
    for key, value in trained.items():
        same = torch.equal(final[key], value)
        assert same != ("running_" in key), key
    _, again = torchrun(out, "--precise-bn", 3)
    assert "already holds this run, complete" in again


@pytest.mark.timeout(500)
def test_compare_mode_trains_three_runs_plots_them_and_a_rerun_starts_nothing(tmp_path):
    """``train_digits.py --compare`` (the Quickstart's main job, here shortened): sync, local, single."""
    out = tmp_path / "compare"
    cmd = [sys.executable, str(TRAIN), "--compare", "--epochs", "1", "--limit-batches", "4", "--no-progress"]
    cmd += ["--out", str(out)]
    code, first = run_command(cmd, timeout=3 * COMMAND_TIMEOUT)
    assert code == 0, first[-5000:]
    summary = json.loads((out / "compare.json").read_text())
    assert {name: (s["world_size"], s["batch_size"]) for name, s in summary.items()} == {
        "sync": (2, 2),
        "local": (2, 2),
        "single": (1, 4),
    }
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "after epoch 1: held-out accuracy sync" in first
    # sync and single do the same math on the same global batches: the same training loss.
    assert summary["sync"]["train_loss"][0] == pytest.approx(summary["single"]["train_loss"][0], rel=1e-3)
    runs = {name: files_of(out / name) for name in summary}

    code, again = run_command(cmd, timeout=COMMAND_TIMEOUT)
    assert code == 0, again[-5000:]
    assert again.count("already holds this run, complete") == 3 and "epoch 1/1" not in again
    assert {name: files_of(out / name) for name in summary} == runs


def test_accuracy_axes_have_fixed_limits_not_an_auto_zoom():
    spec = importlib.util.spec_from_file_location("example_common", REPO / "examples" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    accuracy_limits = common.accuracy_limits
    assert accuracy_limits([0.9055, 0.9083]) == (0.8, 1.0)
    assert accuracy_limits([0.95, 0.97]) == (0.8, 1.0)  # the same range for every trained run
    assert accuracy_limits([0.83, 0.97]) == (0.7, 1.0)
    assert accuracy_limits([0.1, 0.5]) == (0.0, 1.0)


def run_at(out: Path, nproc: int, batch_size: int, epochs: int) -> str:
    """``launch/torchrun_local.sh NPROC train_digits.py`` with the given split of a global batch of 8."""
    flags = ["--epochs", str(epochs), "--limit-batches", "6", "--batch-size", str(batch_size), "--device", "cpu",
             "--no-progress", "--out", str(out)]  # fmt: skip
    returncode, output = run_command(["bash", str(LOCAL), str(nproc), str(TRAIN), *flags], timeout=COMMAND_TIMEOUT)
    assert returncode == 0, output[-5000:]
    return output


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_model.pt", weights_only=True)


@pytest.mark.timeout(900)
def test_a_run_resumes_on_another_number_of_ranks_with_the_same_global_batch(tmp_path):
    # Epoch 1 on 2 ranks x batch 4, epoch 2 resumed on 4 ranks x batch 2: the same global batch of 8.
    run_at(tmp_path / "moved", 2, 4, 1)
    resumed = run_at(tmp_path / "moved", 4, 2, 2)
    assert "(saved at 2 ranks x batch 4, now 4 x 2: the same global batch of 8)" in resumed
    assert resumed_from(resumed) == [("ckpt-00000006.pt", "epoch 2, 0 batches done, step 6")]
    run_at(tmp_path / "two", 2, 4, 2)
    run_at(tmp_path / "four", 4, 2, 2)
    moved, two, four = (final_weights(tmp_path / name) for name in ("moved", "two", "four"))
    # float32: the W = 2 and W = 4 sums differ only in the order of their additions
    for reference in (two, four):
        for key, value in reference.items():
            torch.testing.assert_close(moved[key], value, rtol=1e-4, atol=1e-5)
    # A run on another global batch (2 x 2) trains otherwise: the comparison above can fail.
    run_at(tmp_path / "other", 2, 2, 2)
    other = final_weights(tmp_path / "other")
    assert max((other[k].float() - two[k].float()).abs().max().item() for k in two) > 1e-2


def test_a_checkpoint_of_another_global_batch_is_refused(tmp_path):
    run_at(tmp_path / "run", 2, 4, 1)
    returncode, output = run_command(
        ["bash", str(LOCAL), "2", str(TRAIN), "--epochs", "2", "--limit-batches", "6", "--batch-size", "2",
         "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")],
        timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    assert returncode != 0
    assert "holds checkpoints of another run" in output and "'global_batch_size': (8, 4)" in output
