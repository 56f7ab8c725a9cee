"""The benchmark suite runs, and what it compares against is what it claims to be.

No timing is asserted here (speed targets live in benchmarks/bench_norm.py's report):
these tests check that the smoke preset produces its tables and plots, that the
naive baseline really is a synchronised BatchNorm, that the sync floor moves exactly
syncnorm's all_reduce payloads, and that the payloads match the documented design.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.harness import recorded_all_reduces, run_ranks, shard
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import _bench_common  # noqa: E402
import comm_model  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_preset_writes_tables_and_plots(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, os.path.join(BENCHMARKS, "bench_norm.py"), "--quick", "--tiny", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr[-4000:]

    for name in ("micro_ratios.png", "e2e_step.png", "comm_model.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
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
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr[-4000:]
    for name in ("micro_ratios.png", "e2e_step.png", "comm_model.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "--quick --tiny" in markdown


def test_syncnorm_payloads_are_the_documented_sizes():
    # The design: forward [count, sum x, sum x^2] in float64, backward [sum dy, sum dy*x_hat] in the stats dtype.
    payloads = comm_model.syncnorm_payloads([3, 64])
    for channels in (3, 64):
        assert payloads[channels]["forward"] == [(2 * channels + 3, torch.float64)]
        assert payloads[channels]["backward"] == [(2 * channels + 2, torch.float64)]
    assert comm_model.payload_bytes(payloads[64]["forward"]) == (2 * 64 + 3) * 8


def _naive_rank(rank, world_size, global_input, grad_output, sizes):
    layer = _bench_common.NaiveSyncBatchNorm(global_input.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, global_input.shape[1]))
        layer.bias.copy_(torch.linspace(-1, 1, global_input.shape[1]))
    local = shard(global_input, rank, sizes).clone().requires_grad_(True)
    output = layer(local)
    output.backward(shard(grad_output, rank, sizes))
    return output.detach(), local.grad, layer.weight.grad, layer.running_mean, layer.running_var


def test_naive_baseline_is_a_synchronised_batchnorm():
    torch.manual_seed(0)
    global_input = torch.randn(8, 5, 3, 3) * 3 + 2
    grad_output = torch.randn_like(global_input)
    results = run_ranks(_naive_rank, 2, global_input, grad_output, [4, 4])

    reference = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 1.5, 5))
        reference.bias.copy_(torch.linspace(-1, 1, 5))
    expected_input = global_input.double().requires_grad_(True)
    expected = reference(expected_input)
    expected.backward(grad_output.double())

    output = torch.cat([r[0] for r in results]).double()
    grad_input = torch.cat([r[1] for r in results]).double()
    torch.testing.assert_close(output, expected.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_input, expected_input.grad, rtol=1e-4, atol=1e-4)
    # Each rank holds its share of the weight gradient; the shares add up to the global one.
    torch.testing.assert_close((results[0][2] + results[1][2]).double(), reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][3].double(), reference.running_mean, rtol=1e-5, atol=1e-6)
    # The design tracks the biased variance (nn.BatchNorm tracks the unbiased one): n / (n - 1) apart.
    n = global_input.numel() // 5
    torch.testing.assert_close(results[0][4].double(), 0.9 + (reference.running_var - 0.9) * (n - 1) / n)


def _floor_rank(rank, world_size, payloads):
    floor_payloads = {which: calls[0] for which, calls in payloads[6].items()}
    floor = _bench_common.SyncFloor(nn.BatchNorm2d(6), floor_payloads)
    plain = nn.BatchNorm2d(6)
    local = torch.randn(3, 6, 4, 4, requires_grad=True)
    with recorded_all_reduces() as recorded:
        output = floor(local)
        forward_calls = list(recorded)
        output.backward(torch.ones_like(output))
    return forward_calls, recorded[len(forward_calls) :], output.detach(), plain(local.detach())


def test_sync_floor_moves_syncnorm_payloads_around_local_batchnorm():
    payloads = comm_model.syncnorm_payloads([6])
    for forward_calls, backward_calls, output, plain in run_ranks(_floor_rank, 2, payloads):
        assert forward_calls == payloads[6]["forward"]
        assert backward_calls == payloads[6]["backward"]
        torch.testing.assert_close(output, plain)


class _SquareThenScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x * x) * self.scale  # mul saves x twice (one storage) and, next, x*x and scale


def test_saved_tensor_bytes_counts_distinct_storages():
    x = torch.randn(10, 4, requires_grad=True)
    saved = _bench_common.saved_tensor_bytes(_SquareThenScale(), x)
    assert saved == {"all": 40 * 4 + 40 * 4 + 4 * 4, "new": 40 * 4}


@pytest.mark.parametrize("world", [1, 2, 1024])
def test_comm_model_ring_traffic(world):
    payloads = {256: {"forward": [(513, torch.float64)], "backward": [(512, torch.float32)]}}
    traffic = comm_model.per_layer_bytes(256, world, payloads)
    if world == 1:
        assert traffic == {"syncnorm": 0.0, "all_gather": 0.0}
        return
    # A ring all_reduce sends every byte of the payload at most twice; an all_gather one row per peer.
    assert traffic["syncnorm"] < 2 * (513 * 8 + 512 * 4)
    assert traffic["all_gather"] >= (world - 1) * 513 * 4
