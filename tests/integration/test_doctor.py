"""``python -m syncnorm doctor`` under real torchrun (gloo, CPU): its report, its JSON, and a planted mismatch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers.harness import free_port, launcher_free_env, run_split

TIMEOUT = 240
MODELS = """
from torch import nn


def small():
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64))
"""
# Runs the doctor's entry point with another syncnorm version reported on rank 1: planted from
# outside, as a user's stale install on one node would be.
PLANTED = """
import os, sys
import syncnorm
from syncnorm import doctor

if os.environ["RANK"] == "1":
    syncnorm.__version__ = "0.0.0-stale"
sys.exit(doctor.main(sys.argv[1:]))
"""


def torchrun(tmp_path: Path, nproc: int, *args: str) -> tuple[int, str, str]:
    (tmp_path / "tinymodels.py").write_text(MODELS)
    (tmp_path / "planted_doctor.py").write_text(PLANTED)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), *args]  # fmt: skip
    # The user's own model module is found on PYTHONPATH, as the doctor's --model expects.
    return run_split(command, timeout=TIMEOUT, env=launcher_free_env(PYTHONPATH=str(tmp_path)), cwd=tmp_path)


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_doctor_on_two_ranks_times_the_models_payloads_and_prints_json(tmp_path):
    code, stdout, stderr = torchrun(tmp_path, 2, "-m", "syncnorm", "doctor", "--model", "tinymodels:small", "--json",
                                    "--repeats", "5")  # fmt: skip
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout)
    assert [facts["world_size"] for facts in report["facts"]] == [2, 2]
    assert report["problems"] == [] and report["layers"] == 2
    # forward 2C + 3 and backward 2C + 2 float64 values, for C = 16 and 64
    assert report["cost"]["payload_sizes"] == [34, 35, 130, 131]
    assert all(seconds > 0 for seconds in report["cost"]["world_seconds_by_size"].values())
    assert report["cost"]["step_seconds_world"] > 0 and report["advice"]
    assert report["cost"]["bandwidth_bytes_per_s"] > 0


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_doctor_on_three_ranks_reports_in_words_and_times_node_groups(tmp_path):
    code, stdout, stderr = torchrun(tmp_path, 3, "-m", "syncnorm", "doctor", "--model", "tinymodels:small",
                                    "--repeats", "3")  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert "syncnorm doctor: 3 ranks, backend gloo" in stdout
    assert "ok: every rank agrees on versions, backend, world size and settings" in stdout
    assert "costs about" in stdout and "per training step on this world of 3" in stdout
    assert "bandwidth over the world:" in stdout


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_doctor_on_four_ranks_in_nodes_of_two_times_both(tmp_path):
    code, stdout, stderr = torchrun(tmp_path, 4, "-m", "syncnorm", "doctor", "--model", "tinymodels:small", "--json",
                                    "--repeats", "3", "--node-size", "2")  # fmt: skip
    assert code == 0, stderr[-3000:]
    cost = json.loads(stdout)["cost"]
    assert cost["local_size"] == 2 and cost["step_seconds_local"] > 0
    assert set(cost["local_seconds_by_size"]) == set(cost["world_seconds_by_size"])


@pytest.mark.timeout(TIMEOUT + 60)
def test_a_rank_with_another_syncnorm_version_fails_the_doctor_and_is_named(tmp_path):
    code, stdout, stderr = torchrun(tmp_path, 2, "planted_doctor.py")
    assert code != 0
    assert "FAILED: the ranks disagree:" in stdout
    assert "syncnorm differs from rank 0's '0.1.0' on rank 1: '0.0.0-stale'" in stdout


@pytest.mark.models
@pytest.mark.timeout(TIMEOUT + 60)
def test_the_doctor_takes_a_torchvision_model_by_name(tmp_path):
    pytest.importorskip("torchvision")
    code, stdout, stderr = torchrun(tmp_path, 2, "-m", "syncnorm", "doctor", "--model", "torchvision:resnet18",
                                    "--json", "--repeats", "3")  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert json.loads(stdout)["layers"] == 20  # resnet18's BatchNorm2d layers
