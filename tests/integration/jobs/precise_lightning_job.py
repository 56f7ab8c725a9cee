"""A real two-rank Lightning fit with PreciseBNCallback, for tests/integration/test_precise_lightning.py (run as a script).

    python tests/integration/jobs/precise_lightning_job.py --out DIR

Two CPU ranks ("ddp", gloo) train a small float64 net with dropout for two epochs on explicitly
split data (rank r: ``TRAIN_SHARDS[r]`` samples in batches of ``BATCH``, no shuffling), with
syncnorm's plugin and ``PreciseBNCallback(every_n_epochs=1)``. Each rank saves to
``DIR/rank{r}.pt`` the state at the start of every validation (after the callback ran) and
after fit, with the callback's history, so that the test can recompute the population
statistics from the recorded weights on its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from syncnorm.lightning import SyncNormPlugin
from syncnorm.lightning_precise import PreciseBNCallback
from syncnorm.testing import shard

TRAIN_SHARDS = (6, 5)  # rank 1's last batch is short
BATCH = 3
NUM_BATCHES = 2
EPOCHS = 2
CHANNELS, SIZE, CLASSES = 2, 4, 3


def make_data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    total = sum(TRAIN_SHARDS)
    offsets = torch.arange(total, dtype=torch.float64).view(-1, 1, 1, 1) * 0.3
    return {
        "train_x": torch.randn(total, CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64) * 2 + offsets,
        "train_y": torch.randint(0, CLASSES, (total,), generator=gen),
        "val_x": torch.randn(4, CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64),
        "val_y": torch.randint(0, CLASSES, (4,), generator=gen),
    }


class DropNet(pl.LightningModule):
    """Conv -> BatchNorm2d -> ReLU -> Flatten -> Dropout -> Linear -> BatchNorm1d -> Linear, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(CHANNELS, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(3 * SIZE * SIZE, 4),
            nn.BatchNorm1d(4),
            nn.Linear(4, CLASSES),
        ).double()
        self.data = make_data()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        rank = self.trainer.global_rank
        data = TensorDataset(*(shard(self.data[key], rank, TRAIN_SHARDS) for key in ("train_x", "train_y")))
        return DataLoader(data, batch_size=BATCH, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.data["val_x"], self.data["val_y"]), batch_size=4)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Recorder(pl.Callback):
    """After PreciseBNCallback in the list: records what validation and the end of fit see."""

    def __init__(self, out: Path, precise: PreciseBNCallback) -> None:
        self.out, self.precise = out, precise
        self.record: dict = {"at_validation": []}

    def on_validation_epoch_start(self, trainer, pl_module):
        self.record["at_validation"].append((trainer.current_epoch, trainer.global_step, snapshot(pl_module)))

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit":
            self.record["final"] = snapshot(pl_module)
            self.record["history"] = self.precise.history
            self.record["classes"] = [type(m).__name__ for m in pl_module.modules() if "BatchNorm" in type(m).__name__]
            self.record["modes"] = [m.training for m in pl_module.modules()]
            torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = DropNet()
    precise = PreciseBNCallback(num_batches=NUM_BATCHES, every_n_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[SyncNormPlugin()],
        callbacks=[precise, Recorder(args.out, precise)],
        max_epochs=EPOCHS,
        precision="64-true",
        logger=CSVLogger(args.out, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        log_every_n_steps=1,
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    trainer.strategy.barrier("results-written")


if __name__ == "__main__":
    main()
