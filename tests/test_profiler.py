"""syncnorm.profile: calls, payload bytes and time of syncnorm's collectives, per layer and pass, on gloo ranks.

The bytes are checked against the payload formula (forward 2C + 3 float64 values, backward 2C + 2),
the time against a rank that is slowed down on purpose.
"""

from __future__ import annotations

import time

import pytest
import torch
from harness import run_ranks
from torch import nn

import syncnorm
from syncnorm import profiler


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return syncnorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 7, 1), nn.BatchNorm2d(7))
    )


def _steps(rank, world_size, steps, slow_rank_delay):
    model = make_model()
    x = torch.randn(4, 3, 6, 6)
    with syncnorm.profile() as prof:
        for _ in range(steps):
            if rank == 1 and slow_rank_delay:
                time.sleep(slow_rank_delay)  # rank 0 waits for it in the first collective
            model(x).sum().backward()
    model(x).sum().backward()  # after the block: not recorded
    return prof.summary(), prof.table(), profiler.active() is None


def test_each_layer_and_pass_is_counted_with_its_payload_bytes():
    (summary, table, off), _ = run_ranks(_steps, 2, 3, 0.0)
    rows = {(row["layer"], row["pass"]): row for row in summary["layers"]}
    expected = {}
    for layer, channels in (("1", 5), ("4", 7)):
        expected[(layer, "forward statistics")] = 3 * (2 * channels + 3) * 8
        expected[(layer, "backward gradient")] = 3 * (2 * channels + 2) * 8
    assert {key: row["payload_bytes"] for key, row in rows.items()} == expected
    assert all(row["calls"] == 3 for row in rows.values())
    assert summary["calls"] == 12 and summary["payload_bytes"] == sum(expected.values())
    assert summary["world_size"] == 2 and off
    assert 0.0 < summary["collective_share"] < 1.0
    assert "forward statistics" in table and "W = 2" in table


def test_the_share_of_time_in_collectives_grows_when_another_rank_is_slow():
    (fast, _, _), _ = run_ranks(_steps, 2, 5, 0.0)
    (slow, _, _), _ = run_ranks(_steps, 2, 5, 0.1)
    assert slow["collective_seconds"] > 5 * 0.08  # rank 0 waited for rank 1's sleeps
    assert slow["collective_share"] > fast["collective_share"]
    assert 0.0 < slow["collective_share"] < 1.0


def test_profiles_do_not_nest_and_nothing_is_recorded_outside_one():
    assert profiler.active() is None
    with syncnorm.profile():
        with pytest.raises(RuntimeError, match="do not nest"):
            with syncnorm.profile():
                pass
    assert profiler.active() is None
