"""A real multi-process Lightning run for tests/integration/test_lightning.py (run as a script, not collected by pytest).

    python tests/integration/jobs/lightning_job.py --out DIR --strategy ddp --mode plugin [--eval] [--plant-drift]

Two CPU ranks train a tiny float64 net for one step with lr=0 on explicitly split data (rank r
gets ``TRAIN_SHARDS[r]`` samples as one batch), so the test can recompute the BatchNorm statistics
with a plain single-process model. Each rank saves what it saw to ``DIR/fit-rank{r}.pt`` (written
in teardown, or on_exception when the run fails); with ``--eval`` ("ddp" only) it then runs
``trainer.validate`` and ``trainer.test`` and saves ``DIR/eval-rank{r}.pt``. The "ddp" strategy
re-runs this script for rank 1; "ddp_spawn" spawns workers that import it.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from syncnorm.lightning import SyncNormCallback, SyncNormPlugin
from syncnorm.testing import shard

TRAIN_SHARDS = (5, 3)  # unequal, so per-rank and global statistics differ in mean and variance
EVAL_SHARD = 3
CHANNELS, SIZE, CLASSES = 2, 4, 3


def make_data() -> dict[str, torch.Tensor]:
    """The fixed data of every run: train samples with a different offset each, eval and probe sets."""
    gen = torch.Generator().manual_seed(7)
    total = sum(TRAIN_SHARDS)
    offsets = torch.arange(total, dtype=torch.float64).view(-1, 1, 1, 1) * 0.4
    return {
        "train_x": torch.randn(total, CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64) * 1.5 + offsets,
        "train_y": torch.randint(0, CLASSES, (total,), generator=gen),
        "eval_x": torch.randn(2 * EVAL_SHARD, CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64) + 1.0,
        "eval_y": torch.randint(0, CLASSES, (2 * EVAL_SHARD,), generator=gen),
        "probe_x": torch.randn(4, CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64) * 2.0,
    }


class TinyNet(pl.LightningModule):
    """Conv -> BatchNorm2d -> ReLU -> Linear -> BatchNorm1d -> Linear, in float64."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(CHANNELS, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * SIZE * SIZE, 5),
            nn.BatchNorm1d(5),
            nn.Linear(5, CLASSES),
        ).double()
        self.data = make_data()
        self.seen_batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_batches.append(x.detach().cpu().clone())
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def _loader(self, x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...]) -> DataLoader:
        # Each rank gets its shard explicitly (use_distributed_sampler=False), as one batch.
        rank = self.trainer.global_rank
        return DataLoader(TensorDataset(shard(x, rank, sizes), shard(y, rank, sizes)), batch_size=sizes[rank])

    def train_dataloader(self):
        return self._loader(self.data["train_x"], self.data["train_y"], TRAIN_SHARDS)

    def val_dataloader(self):
        return self._loader(self.data["eval_x"], self.data["eval_y"], (EVAL_SHARD, EVAL_SHARD))

    def test_dataloader(self):
        return self.val_dataloader()


def norm_classes(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module.modules() if "BatchNorm" in type(m).__name__]


class PlantDrift(pl.Callback):
    """Test-only: changes rank 1's running_mean after each step, before SyncNormCallback checks it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.net[1].running_mean[0] += 0.5


class SnapshotAfterStep(pl.Callback):
    """First in the callback list: copies the state after step 1, before PlantDrift touches it."""

    def __init__(self, record: dict) -> None:
        self.record = record

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "state_after_step" not in self.record:
            self.record["state_after_step"] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}


class Recorder(pl.Callback):
    """Last in the callback list: saves what this rank saw during fit to ``out/fit-rank{r}.pt``.

    Works in spawned workers too; teardown runs after the other callbacks' teardown, so it
    sees the model as fit leaves it.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.record: dict = {}
        self.snapshot = SnapshotAfterStep(self.record)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            # SyncNormCallback.setup has run (callbacks run in list order); the strategy has not wrapped yet.
            self.record["model_at_setup"] = type(trainer.strategy.model).__name__
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")

    def on_train_start(self, trainer, pl_module):
        self.record["classes_in_fit"] = norm_classes(pl_module)
        self.record["model_in_fit"] = type(trainer.strategy.model).__name__

    def on_train_end(self, trainer, pl_module):
        pl_module.eval()
        with torch.no_grad():
            self.record["probe_out"] = pl_module(pl_module.data["probe_x"])
        pl_module.train()
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("syncnorm/")}

    def _save(self, trainer, pl_module):
        self.record["batches"] = pl_module.seen_batches
        self.record["state"] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        self.record["classes_after_fit"] = norm_classes(pl_module)
        if hasattr(self, "_catcher"):
            self.record["warnings"] = [(w.category.__name__, str(w.message)) for w in self._caught]
            self._catcher.__exit__(None, None, None)
            del self._catcher
        torch.save(self.record, self.out / f"fit-rank{trainer.global_rank}.pt")

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit":
            self._save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.record["error"] = (type(exception).__name__, str(exception))
        self._save(trainer, pl_module)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--mode", choices=("plugin", "callback", "both"), default="plugin")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--on-drift", choices=("warn", "raise"), default="warn")
    parser.add_argument("--plant-drift", action="store_true")
    parser.add_argument("--eval", action="store_true", help="checkpoint, then trainer.validate and trainer.test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = TinyNet()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(model.state_dict(), args.out / "initial_state.pt")
    plugins = [SyncNormPlugin(group_size=args.group_size)] if args.mode in ("plugin", "both") else []
    recorder = Recorder(args.out)
    callbacks: list[pl.Callback] = [recorder.snapshot] + ([PlantDrift()] if args.plant_drift else [])
    if args.mode in ("callback", "both"):
        group = {} if args.mode == "both" else {"group_size": args.group_size}
        callbacks.append(SyncNormCallback(check_every_n_steps=1, on_drift=args.on_drift, **group))
    callbacks.append(recorder)
    if args.eval:
        callbacks.append(ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=1, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=args.strategy,
        plugins=plugins,
        callbacks=callbacks,
        max_steps=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=args.eval,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0 if not args.eval else None,
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    if args.eval:
        results = {
            "validate": trainer.validate(model, verbose=False),
            "test": trainer.test(model, verbose=False),
            "classes": norm_classes(model),
        }
        torch.save(results, args.out / f"eval-rank{trainer.global_rank}.pt")
        trainer.strategy.barrier("eval-results-written")  # rank 0 must not exit before rank 1 wrote


if __name__ == "__main__":
    main()
