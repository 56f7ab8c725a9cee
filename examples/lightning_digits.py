"""Train DigitsNet on the scikit-learn digits with PyTorch Lightning and synchronised BatchNorm.

    python examples/lightning_digits.py --devices 2 --epochs 2                 # Lightning starts the ranks
    torchrun --nproc-per-node 2 examples/lightning_digits.py --devices 2       # torchrun starts them

``--use plugin`` (default) passes ``plugins=[SyncNormPlugin()]``: the "ddp"/"fsdp" strategies swap
every BatchNorm for ``syncnorm.SyncBatchNorm`` before wrapping the model and swap them back when
``fit`` ends; a ``SyncNormCallback`` rides along as the health monitor. ``--use callback`` passes the
callback alone, which converts the layers in its ``setup``. Either way each BatchNorm normalises
over the global batch (``--batch-size`` per rank times the number of ranks), on CPU (gloo) or GPU (NCCL).
Needs ``pip install "syncnorm[lightning,examples]"``.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from common import DigitsNet, load_digits
from torch.utils.data import DataLoader

from syncnorm.lightning import SyncNormCallback, SyncNormPlugin


class DigitsClassifier(pl.LightningModule):
    """DigitsNet with plain BatchNorm2d; the plugin or the callback makes them synchronised."""

    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = DigitsNet(norm="sync")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        # The held-out split (360 images) divides evenly among 2, 3, 4 ... ranks, so the mean over
        # ranks of equal-sized shards is the accuracy on the whole split.
        self.log("val_loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == labels).double().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class PrintProgress(pl.Callback):
    """One line per epoch on global rank 0 (the progress bar is off to keep multi-rank output readable)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        line = f"epoch {trainer.current_epoch}  val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}"
        if "syncnorm/global_batch_size" in m:
            line += f"  global_batch {m['syncnorm/global_batch_size']:.0f}  max_drift {m['syncnorm/max_drift']:.1e}"
        print(f"{line}  ({time.perf_counter() - self.start:.1f}s)", flush=True)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="processes per node (= torchrun --nproc-per-node)")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (NCCL)")
    parser.add_argument("--strategy", default="ddp", help="ddp, ddp_spawn, fsdp, ...")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use", choices=("plugin", "callback"), default="plugin")
    parser.add_argument("--check-every", type=int, default=10, help="steps between running-statistics checks")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # several ranks share a few CPU cores
    pl.seed_everything(args.seed, workers=True, verbose=False)
    train, held_out = load_digits(seed=args.seed)
    monitor = SyncNormCallback(check_every_n_steps=args.check_every)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        plugins=[SyncNormPlugin()] if args.use == "plugin" else None,
        callbacks=[monitor, PrintProgress()],
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = DigitsClassifier(lr=args.lr, momentum=args.momentum)
    # Lightning adds a DistributedSampler (shuffled for training) to each loader in DDP.
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(held_out, batch_size=256)
    trainer.fit(model, train_loader, val_loader)
    if trainer.is_global_zero:
        norms = sorted({type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__})
        print(
            f"done: {trainer.world_size} ranks x batch {args.batch_size} with --use {args.use}; "
            f"BatchNorm classes after fit: {norms}",
            flush=True,
        )


if __name__ == "__main__":
    main()
