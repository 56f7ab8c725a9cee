"""The benchmark suite runs, checks its own baselines, and writes what it claims: as subprocesses.

No timing is asserted here (speed targets live in benchmarks/bench_norm.py's report). The smoke
preset must check its baselines before timing (the naive baseline is a synchronised BatchNorm,
the sync floor moves syncnorm's payloads: ``benchmarks/_baseline_checks.py``), write its tables
and plots, and write a communication model whose traffic follows the ring formulas.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from helpers.harness import run_split

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_preset_writes_tables_and_plots(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, os.path.join(BENCHMARKS, "bench_norm.py"), "--quick", "--tiny", "--out", str(out)]
    returncode, stdout, stderr = run_split(command, timeout=240)
    assert returncode == 0, stderr[-4000:]
    assert "baselines checked: naive = float64 nn.BatchNorm on the global batch" in stdout

    for name in ("micro_ratios.png", "e2e_step.png", "comm_model.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    _check_comm_model(json.loads((out / "comm_model.json").read_text()))
    report = json.loads((out / "results.json").read_text())
    cases = [entry["case"] for entry in report["micro"] if entry["world"] == 1]
    assert len(cases) == 3
    variants = {"nn.BatchNorm", "sync floor", "naive", "syncnorm"}
    for world in (1, 2, 4):
        entries = [entry for entry in report["micro"] if entry["world"] == world]
        assert [entry["case"] for entry in entries] == cases
        for entry in entries:
            assert set(entry["times_ms"]) == variants
            assert all(len(times) == 2 and min(times) > 0 for times in entry["times_ms"].values())
    memory = [entry for entry in report["micro"] if "saved_bytes" in entry]
    assert [entry["world"] for entry in memory] == [2, 2, 2]
    assert set(report["e2e"]["times_ms"]) == {"nn.BatchNorm", "syncnorm", "naive"}

    markdown = (out / "results.md").read_text()
    assert markdown.count("| 1 | ") == 3 and markdown.count("| 2 | ") >= 3 and markdown.count("| 4 | ") == 3
    assert "Saved for backward" in markdown and "Training step" in markdown
    assert "| 1024 | ResNet-50 (53 layers) |" in (out / "comm_model.md").read_text()

    # --replot redraws the PNGs from the JSON alone
    for name in ("micro_ratios.png", "e2e_step.png", "comm_model.png"):
        (out / name).unlink()
    command = [sys.executable, os.path.join(BENCHMARKS, "bench_norm.py"), "--replot", "--out", str(out)]
    returncode, _, stderr = run_split(command, timeout=120)
    assert returncode == 0, stderr[-4000:]
    for name in ("micro_ratios.png", "e2e_step.png", "comm_model.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "--quick --tiny" in markdown


def _check_comm_model(model: dict) -> None:
    """Per layer and step: a ring all_reduce sends every byte of the payload at most twice; the
    all_gather design one row of 2C + 1 float32 per peer, plus its gradient all_reduce."""
    measured = model["measured_payloads"]
    rows = [row for row in model["rows"] if isinstance(row["channels"], int)]
    assert {row["world"] for row in rows} >= {2, 1024}
    for row in rows:
        world, channels = row["world"], row["channels"]
        calls = [call for which in ("forward", "backward") for call in measured[str(channels)][which]]
        payload = sum(numel * torch.empty(0, dtype=getattr(torch, dtype.split(".")[-1])).element_size()
                      for numel, dtype in calls)  # fmt: skip
        assert math.isclose(row["syncnorm"], 2 * (world - 1) / world * payload, rel_tol=1e-12), row
        assert row["syncnorm"] < 2 * payload, row
        assert row["all_gather"] >= (world - 1) * (2 * channels + 1) * 4, row


def test_host_cost_benchmark_checks_its_floor_against_syncnorm_and_writes_every_row(tmp_path):
    out = tmp_path / "host.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "bench_host.py"), "--floor", "--repeats", "2"]
    returncode, stdout, stderr = run_split([*command, "--json", str(out)], timeout=240)
    assert returncode == 0, stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    layers = {"nn.BatchNorm", "syncnorm", "floor (bare ops)"}
    for shape in ([32, 64], [8, 64, 4, 4], [8, 256, 14, 14]):
        found = {row["layer"]: row for row in rows if row["shape"] == shape}
        assert set(found) == layers, (shape, sorted(found))
        assert all(row["host_us"] > 0 and row["aten_ops_forward"] > 0 for row in found.values())
