"""syncnorm.profile: calls, payload bytes and time of syncnorm's collectives, per layer and pass, on gloo ranks.

The bytes are checked against the payload formula (forward 2C + 3 float64 values, backward 2C + 2),
the time against a rank that is slowed down on purpose.
"""

from __future__ import annotations

import time

import pytest
import torch
from helpers.harness import run_ranks
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


def _lightning_fit(rank, world_size, tmp_path):
    import os

    import pytorch_lightning as pl

    from syncnorm.lightning import ProfileCallback

    # torchrun's variables: Lightning then takes the process group this runner made (no spawning).
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # fmt: skip

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, batch_idx):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = ProfileCallback()
    trainer = pl.Trainer(
        accelerator="cpu", devices=world_size, strategy="ddp", max_epochs=2, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    batches = [torch.randn(4, 3, 6, 6) for _ in range(6)]  # Lightning's DistributedSampler: 3 per rank
    trainer.fit(Module(), torch.utils.data.DataLoader(batches, batch_size=None))
    logged = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("syncnorm/")}
    return logged, callback.last.summary()


def test_the_lightning_callback_logs_each_epochs_collectives(tmp_path):
    pytest.importorskip("pytorch_lightning")
    for logged, summary in run_ranks(_lightning_fit, 2, tmp_path, timeout=300):
        # the last epoch: 3 steps x 2 layers x (forward + backward)
        assert logged["syncnorm/calls"] == summary["calls"] == 12
        assert logged["syncnorm/payload_bytes"] == 3 * ((2 * 5 + 3) + (2 * 5 + 2) + (2 * 7 + 3) + (2 * 7 + 2)) * 8
        assert 0.0 < logged["syncnorm/collective_share"] < 1.0
