"""Soak run: many training steps of a small conv net with synchronised BatchNorm on W gloo ranks.

Watches two things that short tests cannot see:
* memory: each rank's resident set size, sampled every ``--every`` steps, must stay flat
  (first sample vs last, and the largest);
* agreement: every ``--every`` steps all ranks gather the bit patterns of every running
  statistic (running_mean, running_var, num_batches_tracked) and compare them; they must
  be identical on every rank at every check. DDP runs with ``broadcast_buffers=False``,
  so nothing but syncnorm keeps them equal.

Batches are uneven across ranks and change size from step to step; every check also runs
one eval forward. Exits with status 1 if any check finds a difference.

    python tools/soak.py [--steps 2000] [--every 100] [--world-size 2] [--check] [--no-ddp]
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import syncnorm
from syncnorm.testing import run_ranks

CLASSES = 10


def _net() -> nn.Module:
    """Four BatchNorm layers (three 2-D, one 1-D), converted to syncnorm's."""
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 32, bias=False),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, CLASSES),
    )
    return syncnorm.convert_sync_batchnorm(net)


def _batch(step: int, rank: int, size: int, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at this step: 3-12 images, labels from a fixed linear teacher (learnable)."""
    generator = torch.Generator().manual_seed(step * 1009 + rank)
    batch = 3 + (step * (rank + 2) + rank) % 10
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = (images.mean((2, 3)) @ teacher).argmax(1)
    return images, labels


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _statistics_bits(net: nn.Module) -> torch.Tensor:
    """Every running statistic as exact bit patterns, in one int64 vector."""
    parts = []
    for module in net.modules():
        if isinstance(module, syncnorm.SyncBatchNorm):
            parts += [module.running_mean.view(torch.int32), module.running_var.view(torch.int32)]
            parts.append(module.num_batches_tracked.reshape(1))
    return torch.cat([p.to(torch.int64) for p in parts])


def _identical_on_every_rank(net: nn.Module) -> bool:
    mine = _statistics_bits(net)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(other, gathered[0]) for other in gathered)


def _ddp_without_buffer_sync(net: nn.Module) -> nn.Module:
    # Buffers are synced once at construction (identical anyway: same seed), never per forward.
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers.
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(net, forward_sync_buffers=False)
    return ddp(net, broadcast_buffers=False)


def _soak(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)  # same initial weights on every rank, with or without DDP
    teacher = torch.randn(3, CLASSES)
    net = _net()
    if args.check:
        syncnorm.set_check(True)
    model = _ddp_without_buffer_sync(net) if args.ddp else net
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    rss, losses, checks, differing = [], [], 0, []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = _batch(step, rank, args.size, teacher)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % args.every == 0:
            checks += 1
            if not _identical_on_every_rank(net):
                differing.append(step)
            model.eval()
            with torch.no_grad():
                model(_batch(-step, rank, args.size, teacher)[0])
            model.train()
            rss.append((step, _rss_mib()))
    elapsed = time.perf_counter() - start
    window = min(len(losses), 100)
    return dict(
        rss=rss,
        checks=checks,
        differing=differing,
        elapsed=elapsed,
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="steps between memory samples and rank comparisons")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--check", action="store_true", help="turn the consistency/non-finite guard on")
    parser.add_argument("--no-ddp", dest="ddp", action="store_false", help="plain model, no DistributedDataParallel")
    args = parser.parse_args()
    results = run_ranks(_soak, args.world_size, args, timeout=600 + 2.0 * args.steps)

    print(f"soak: {args.steps} steps, W={args.world_size} gloo, DDP={'on' if args.ddp else 'off'}, "
          f"guard={'on' if args.check else 'off'}, torch {torch.__version__}")  # fmt: skip
    for rank, result in enumerate(results):
        samples = [mib for _, mib in result["rss"]]
        if samples:
            first, last, top = samples[0], samples[-1], max(samples)
            print(f"rank {rank}: {result['elapsed']:.1f} s ({1e3 * result['elapsed'] / args.steps:.1f} ms/step); "
                  f"RSS first {first:.1f} MiB (step {result['rss'][0][0]}), last {last:.1f} MiB, "
                  f"max {top:.1f} MiB, last - first {last - first:+.1f} MiB; "
                  f"mean loss first/last 100 steps {result['first_loss']:.3f} / {result['last_loss']:.3f}")  # fmt: skip
        print(f"rank {rank}: RSS every {args.every} steps (MiB): " + " ".join(f"{mib:.1f}" for mib in samples))
    differing = sorted({step for result in results for step in result["differing"]})
    checks = results[0]["checks"]
    if differing:
        print(f"FAIL: running statistics differ between ranks at steps {differing}")
        return 1
    print(f"running statistics bitwise identical on every rank at {checks} of {checks} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
