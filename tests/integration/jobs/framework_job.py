"""Real two-rank CPU runs under Lightning Fabric, Hugging Face Accelerate and Ray Train (for tests/integration/test_frameworks.py).

    python tests/integration/jobs/framework_job.py fabric --out DIR              (Fabric's own launcher re-runs it for rank 1)
    accelerate launch --multi_gpu --num_processes 2 --mixed_precision no \
        tests/integration/jobs/framework_job.py accelerate [--mixed-precision bf16] --out DIR
    python tests/integration/jobs/framework_job.py ray --out DIR                 (starts and stops a local Ray instance)

Each run follows the recipe of docs/frameworks.md: ``syncnorm.convert_sync_batchnorm(model)`` before the
framework wraps the model, the framework's own data sharding (DistributedSampler or Accelerate's batch
sharding) and its own backward. A float64 ``FrameworkNet`` (float32 under bf16 autocast) takes ``STEPS``
SGD steps with momentum, and each rank saves to ``DIR/<framework>-rank{r}.pt`` the inputs it trained on,
its state after training and what the framework made of the model, so the test can retrain a plain
single-process model on the same global batches.
This file is a script, not a test module: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import syncnorm

WORLD = 2
STEPS = 3
BATCH_PER_RANK = 4  # equal per-rank batches: DDP's gradient average is then the global mean loss's gradient
CHANNELS, SIZE, CLASSES = 3, 4, 3
LR, MOMENTUM = 0.1, 0.9


class FrameworkNet(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> mean-pool -> Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(CHANNELS, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def make_model() -> FrameworkNet:
    """The same initial weights on every rank and in the reference, whatever the default dtype is."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the random draws depend on it (the Fabric job sets float64)
    try:
        torch.manual_seed(0)
        return FrameworkNet().double()
    finally:
        torch.set_default_dtype(default)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS global batches; each sample has its own offset, so one rank's statistics are far from the global ones."""
    gen = torch.Generator().manual_seed(11)
    total = STEPS * WORLD * BATCH_PER_RANK
    offsets = torch.arange(total, dtype=torch.float64).view(-1, 1, 1, 1) * 0.3
    x = torch.randn(total, CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64) * 2.0 + offsets
    y = torch.randint(0, CLASSES, (total,), generator=gen)
    return x, y


def loader(dtype: torch.dtype = torch.float64) -> DataLoader:
    """The loader a user writes for one process; each framework shards it."""
    x, y = make_data()
    return DataLoader(TensorDataset(x.to(dtype), y), batch_size=BATCH_PER_RANK, shuffle=False)


def norm_classes(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__]


def train_steps(model: nn.Module, optimiser: torch.optim.Optimizer, batches: Any, backward: Any) -> list[torch.Tensor]:
    """STEPS optimiser steps on this rank's batches; returns the (inputs, targets) it trained on."""
    seen = []
    for x, y in batches:
        if len(seen) == STEPS:
            break
        seen.append((x.detach().clone(), y.detach().clone()))
        optimiser.zero_grad()
        backward(F.cross_entropy(model(x), y))
        optimiser.step()
    return seen


def record(out: Path, framework: str, rank: int, plain: nn.Module, wrapped: nn.Module, seen: list, **extra) -> None:
    torch.save(
        {
            "seen": seen,
            "state": {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()},
            "classes": norm_classes(plain),
            "wrapper": type(wrapped).__name__,
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "param_dtypes": sorted({str(p.dtype) for p in plain.parameters()}),
            **extra,
        },
        out / f"{framework}-rank{rank}.pt",
    )


# --- Lightning Fabric --------------------------------------------------------------------------


def run_fabric(out: Path) -> None:
    from lightning_fabric import Fabric

    # "64-true" runs the model in float64 but casts its outputs to the default dtype, so without this
    # the loss (and the first step of the backward) would be float32.
    torch.set_default_dtype(torch.float64)
    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy="ddp", precision="64-true")
    fabric.launch()  # re-runs this script for rank 1, then joins both into one gloo group
    torch.set_num_threads(1)
    model = syncnorm.convert_sync_batchnorm(make_model())  # before fabric.setup wraps it in DDP
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    wrapped, optimiser = fabric.setup(model, optimiser)
    batches = fabric.setup_dataloaders(loader())  # adds a DistributedSampler (shuffle=False here)
    seen = train_steps(wrapped, optimiser, batches, fabric.backward)
    # _FabricModule around what the strategy made of the model: a DistributedDataParallel
    record(out, "fabric", fabric.global_rank, model, wrapped._forward_module, seen)
    fabric.barrier()  # rank 0 must not leave (and take the group down) before rank 1 has written


# --- Hugging Face Accelerate -------------------------------------------------------------------


def run_accelerate(out: Path, mixed_precision: str) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    # Launched by `accelerate launch --multi_gpu` (torch elastic) or torchrun: MULTI_CPU on gloo.
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    # CPU autocast leaves float64 alone: mixed precision runs start from float32.
    dtype = torch.float64 if mixed_precision == "no" else torch.float32
    model = syncnorm.convert_sync_batchnorm(make_model().to(dtype))  # before accelerator.prepare wraps it in DDP
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    wrapped, optimiser, batches = accelerator.prepare(model, optimiser, loader(dtype))  # batches: sharded per rank
    norm_inputs: list[str] = []
    model.features[1].register_forward_pre_hook(lambda layer, args: norm_inputs.append(str(args[0].dtype)))
    seen = train_steps(wrapped, optimiser, batches, accelerator.backward)
    extra = {
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "norm_input_dtypes": sorted(set(norm_inputs)),
    }
    record(out, "accelerate", accelerator.process_index, accelerator.unwrap_model(wrapped), wrapped, seen, **extra)
    # The ending docs/frameworks.md gives for gloo: end_training() destroys the process group
    # while the DDP wrapper still holds it, and a rank could hang in gloo's teardown (see
    # docs/troubleshooting.md, "Hangs after training finished").
    accelerator.wait_for_everyone()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


# --- Ray Train ---------------------------------------------------------------------------------


def ray_train_loop(config: dict) -> None:
    """Runs on each Ray Train worker (its own process, its rank's slice of the default gloo group)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    model = syncnorm.convert_sync_batchnorm(make_model())  # before prepare_model wraps it in DDP
    wrapped = ray.train.torch.prepare_model(model)
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    batches = ray.train.torch.prepare_data_loader(loader())  # adds a DistributedSampler (shuffle=False here)
    seen = train_steps(wrapped, optimiser, batches, lambda loss: loss.backward())
    rank = ray.train.get_context().get_world_rank()
    record(Path(config["out"]), "ray", rank, model, wrapped, seen, pid=os.getpid())
    dist.barrier()


def run_ray(out: Path) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # A private instance ("local": never join a cluster another test or user started), as small as
    # the job: two CPUs for the two workers, no dashboard, a minimal object store.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    # The local instance's processes inherit this environment: workers import this job module
    # (the training function travels by reference) from its folder, and run one thread each.
    here = Path(__file__).resolve().parent
    os.environ["PYTHONPATH"] = os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])
    os.environ["OMP_NUM_THREADS"] = "1"
    ray.init(
        address="local",
        num_cpus=WORLD,
        object_store_memory=80 * 1024**2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=True,
    )
    try:
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"out": str(out)},
            scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="syncnorm-ray-test", storage_path=str(out / "ray-results")),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=("fabric", "accelerate", "ray"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="Accelerate only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.framework == "accelerate":
        run_accelerate(args.out, args.mixed_precision)
    else:
        {"fabric": run_fabric, "ray": run_ray}[args.framework](args.out)


if __name__ == "__main__":
    main()
