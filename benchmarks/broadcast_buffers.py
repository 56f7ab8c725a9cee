"""What ``DistributedDataParallel(broadcast_buffers=False)`` saves per step when BatchNorm is syncnorm's.

With syncnorm every rank updates its running statistics from the same all-reduced
sums, so the buffers are already identical (tests/distributed/test_ddp.py proves it bitwise)
and DDP's default broadcast of all buffers from rank 0 before each forward is
redundant. This script measures that broadcast's share of a training step.

Setup: W=2 gloo ranks on CPU (``syncnorm.testing.run_ranks``), a small ResNet-style conv net
with several BatchNorm layers converted to syncnorm, one thread per rank. Two
DDP copies of the same model, one with the broadcast (torch's default) and one
without, take turns step by step (``measure.time_interleaved``) so that load from other
processes hits both alike; each step starts after a barrier and counts as long as its
slower rank. The table shows medians and quartiles, plus the
broadcast alone (DDP's own buffer-broadcast helper, timed by itself).

On torch >= 2.13 the flag is ``forward_sync_buffers`` (``broadcast_buffers`` is
deprecated there, and its ``False`` also skips the one broadcast at construction);
the script uses whichever this torch has.

    python benchmarks/broadcast_buffers.py [--pairs 200]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics

import torch
import torch._dynamo  # noqa: E402, F401  (DDP imports it lazily; load it once before the ranks fork)
import torch.distributed as dist
import torch.nn.functional as F
from measure import time_interleaved
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import syncnorm
from syncnorm.testing import run_ranks


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def small_resnet(width: int, blocks: int, classes: int = 10) -> nn.Sequential:
    """Stem conv+BN, ``blocks`` residual blocks (two conv+BN each), pooled linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[ResidualBlock(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


# torch 2.13 renamed the per-forward part of broadcast_buffers to forward_sync_buffers (and
# deprecated the old name, whose False also skips the buffer broadcast at construction).
SYNC_FLAG = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else "broadcast_buffers"
)


def _rank(rank, world_size, options):
    torch.manual_seed(0)
    base = syncnorm.convert_sync_batchnorm(small_resnet(options.width, options.blocks))
    variants = {flag: DistributedDataParallel(copy.deepcopy(base), **{SYNC_FLAG: flag}) for flag in (True, False)}
    optimisers = {flag: torch.optim.SGD(model.parameters(), lr=0.01) for flag, model in variants.items()}
    generator = torch.Generator().manual_seed(100 + rank)
    inputs = torch.randn(options.batch, 3, options.size, options.size, generator=generator)
    labels = torch.randint(0, 10, (options.batch,), generator=generator)

    def step(flag: bool):
        model, optimiser = variants[flag], optimisers[flag]

        def run() -> None:
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), labels).backward()
            optimiser.step()

        return run

    steps = {
        True: step(True),
        False: step(False),
        # What DDP runs before each forward when the flag is on (its private helper, timed alone).
        "broadcast": variants[True]._default_broadcast_coalesced,
    }
    # A barrier before each timed call starts both ranks together, so neither times the other's lag.
    timings = time_interleaved(steps, options.pairs, options.warmup, barrier=dist.barrier).device
    buffers = list(base.buffers())
    return {
        "timings": timings,
        "buffers": len(buffers),
        "buffer_values": sum(b.numel() for b in buffers),
        "bn_layers": sum(isinstance(m, syncnorm.SyncBatchNorm) for m in base.modules()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="interleaved step pairs (one step of each setting)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="samples per rank")
    parser.add_argument("--size", type=int, default=16, help="image side")
    parser.add_argument("--width", type=int, default=16, help="channels")
    parser.add_argument("--blocks", type=int, default=3, help="residual blocks (2 BN layers each)")
    options = parser.parse_args()

    world_size = 2
    results = run_ranks(_rank, world_size, options, timeout=1800, pg_timeout=300)
    # A step is as slow as its slowest rank.
    per_step = {
        key: [max(result["timings"][key][i] for result in results) * 1e3 for i in range(options.pairs)]
        for key in (True, False, "broadcast")
    }
    median = {key: statistics.median(values) for key, values in per_step.items()}
    quartiles = {key: statistics.quantiles(values, n=4) for key, values in per_step.items()}
    info = results[0]
    print(
        f"W={world_size} gloo CPU, torch {torch.__version__}, 1 thread/rank; small ResNet: {info['bn_layers']} "
        f"syncnorm BN layers, {info['buffers']} buffers ({info['buffer_values']} values); batch {options.batch}/rank "
        f"of 3x{options.size}x{options.size}; {options.pairs} interleaved step pairs\n"
    )
    print("| timed | median (ms) | quartiles (ms) |")
    print("|---|---|---|")
    labels = {True: f"step, {SYNC_FLAG}=True", False: f"step, {SYNC_FLAG}=False", "broadcast": "buffer broadcast alone"}
    for key, label in labels.items():
        low, _, high = quartiles[key]
        print(f"| {label} | {median[key]:.2f} | {low:.2f} - {high:.2f} |")
    saved = median[True] - median[False]
    # The two settings ran in the same repetition: their difference is the least load-sensitive number.
    paired_saved = statistics.median(on - off for on, off in zip(per_step[True], per_step[False]))
    print(
        f"\nratio of medians False/True: {median[False] / median[True]:.3f}; saved per step: {saved:.2f} ms "
        f"({100 * saved / median[True]:.1f}%); median of paired differences: {paired_saved:.2f} ms"
    )


if __name__ == "__main__":
    main()
