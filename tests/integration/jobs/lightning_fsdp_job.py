"""A sharded Lightning run with syncnorm; tests/integration/test_lightning_sharded.py launches it.

Lightning starts the other ranks itself by re-running this script, so it has to be a
standalone program. Two modes:

* ``fsdp``: the "fsdp" strategy (FSDP1) with ``plugins=[SyncNormPlugin()]``, which Lightning
  applies in ``FSDPStrategy.setup`` and reverts at teardown.
* ``model_parallel``: ``ModelParallelStrategy`` (FSDP2), which applies no layer-sync plugin;
  ``configure_model`` converts with ``self.device_mesh["data_parallel"]`` and calls
  ``fully_shard`` per block and at the root (the README recipe).

Each rank trains the same tiny conv net on its own equal slice of every global batch (no
distributed sampler: the slices are chosen here, so the test knows exactly which samples
made up each global batch), then writes ``<out>/rank<r>.pt``: the full (unsharded)
parameters, the BatchNorm buffers, and the BatchNorm classes seen while training and after
``fit``.

    python tests/integration/jobs/lightning_fsdp_job.py {fsdp,model_parallel} OUT_FOLDER
"""

from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import syncnorm
from syncnorm.lightning import SyncNormPlugin

WORLD = 2
PER_RANK = 4
STEPS = 3
LR = 0.1
# Lightning's FSDP precision plugin has no "64-true"; ModelParallelStrategy leaves dtypes alone.
DTYPES = {"fsdp": torch.float32, "model_parallel": torch.float64}


def make_net(dtype: torch.dtype) -> nn.Sequential:
    """Two conv+BN blocks and a head, each a child that FSDP2 can shard on its own."""
    torch.manual_seed(0)

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return nn.Sequential(block(3, 4), block(4, 4), head).to(dtype)


def global_batches(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS global batches of WORLD * PER_RANK samples, concatenated in step order."""
    generator = torch.Generator().manual_seed(21)
    inputs = torch.randn(STEPS * WORLD * PER_RANK, 3, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1
    targets = torch.randn(STEPS * WORLD * PER_RANK, 3, generator=generator, dtype=torch.float64)
    return inputs.to(dtype), targets.to(dtype)


def rank_slice(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank r's PER_RANK samples of every global batch, in step order."""
    per_step = tensor.view(STEPS, WORLD, PER_RANK, *tensor.shape[1:])
    return per_step[:, rank].reshape(STEPS * PER_RANK, *tensor.shape[1:])


def batchnorm_classes(net: nn.Module) -> list[str]:
    return [type(m).__name__ for m in net.modules() if "BatchNorm" in type(m).__name__]


class TinyModule(pl.LightningModule):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.dtype_ = DTYPES[mode]
        self.net = make_net(self.dtype_)
        self.seen: dict = {}

    def configure_model(self) -> None:
        if self.mode != "model_parallel":
            return
        from torch.distributed.fsdp import fully_shard

        data_parallel = self.device_mesh["data_parallel"]
        syncnorm.convert_sync_batchnorm(self, process_group=data_parallel)
        for block in self.net:
            fully_shard(block, mesh=data_parallel)
        fully_shard(self.net, mesh=data_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_start(self) -> None:
        layers = [m for m in self.net.modules() if isinstance(m, syncnorm.SyncBatchNorm)]
        self.seen["classes_while_training"] = batchnorm_classes(self.net)
        self.seen["sync_ranks"] = [
            dist.get_process_group_ranks(syncnorm.resolve_group(m.process_group)) for m in layers
        ]

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.mse_loss(self(inputs), targets)  # mean over the local batch: see the test's docstring

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    def train_dataloader(self):
        inputs, targets = global_batches(self.dtype_)
        rank = self.trainer.global_rank
        return DataLoader(TensorDataset(rank_slice(inputs, rank), rank_slice(targets, rank)), batch_size=PER_RANK)

    def on_train_end(self) -> None:
        # Still sharded here; every rank joins the gathers.
        if self.mode == "model_parallel":
            params = {name: p.full_tensor() for name, p in self.net.named_parameters()}
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(self.trainer.strategy.model, writeback=False):
                params = {name: p.detach().clone() for name, p in self.net.named_parameters()}
        self.seen["params"] = {name: p.detach().clone() for name, p in params.items()}
        self.seen["buffers"] = {name: b.detach().clone() for name, b in self.net.named_buffers()}


def make_trainer(mode: str) -> pl.Trainer:
    if mode == "fsdp":
        sharding: dict = {"strategy": "fsdp", "plugins": [SyncNormPlugin()]}
    else:
        from pytorch_lightning.strategies import ModelParallelStrategy

        sharding = {"strategy": ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)}
    return pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        precision="32-true",
        max_steps=STEPS,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        **sharding,
    )


def main(mode: str, out_folder: str) -> None:
    module = TinyModule(mode)
    trainer = make_trainer(mode)
    trainer.fit(module)
    result = dict(module.seen, rank=trainer.global_rank, world_size=trainer.world_size)
    result["classes_after_fit"] = batchnorm_classes(module.net)
    torch.save(result, os.path.join(out_folder, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
