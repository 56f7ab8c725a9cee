"""Exact global-batch statistics make training independent of how the global batch is split.

The same global batches, in the same sample order, trained by DDP at W = 4 x batch 2 and at
W = 2 x batch 4 (and by one process on the whole batch, the reference) end with the same
weights and BatchNorm statistics, in float64, to 1e-10 relative. Per-rank BatchNorm does not:
its statistics depend on the split.
"""

from __future__ import annotations

import torch
import torch._dynamo  # noqa: F401  (DDP imports it on first use: once here, not in every rank)
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import syncnorm

GLOBAL_BATCH = 8
STEPS = 3


def make_model(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3),
    ).double()  # fmt: skip
    return syncnorm.convert_sync_batchnorm(model) if sync else model


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (torch.randn(GLOBAL_BATCH, 3, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1,
         torch.randn(GLOBAL_BATCH, 3, generator=generator, dtype=torch.float64))
        for _ in range(STEPS)
    ]  # fmt: skip


def train(model: nn.Module, batches, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """SGD with momentum on the mean loss; rank r takes samples r*b .. (r+1)*b - 1 of each global batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // world_size
    for inputs, targets in batches:
        local = slice(rank * share, (rank + 1) * share)
        optimizer.zero_grad()
        F.mse_loss(model(inputs[local]), targets[local]).backward()
        optimizer.step()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _rank(rank: int, world_size: int, sync: bool) -> dict[str, torch.Tensor]:
    model = make_model(sync)
    ddp = DistributedDataParallel(model)
    state = train(ddp, global_batches(), rank, world_size)
    return {key.removeprefix("module."): value for key, value in state.items()}


def largest_relative_difference(a: dict, b: dict) -> float:
    return max(
        ((a[key] - b[key]).abs().max() / b[key].abs().max().clamp_min(1e-30)).item()
        for key in b
        if b[key].is_floating_point()
    )


def test_w4_by_2_and_w2_by_4_end_with_the_same_weights_and_statistics_as_one_process(world):
    reference = train(make_model(sync=False), global_batches(), 0, 1)
    four = world(_rank, 4, True, timeout=300)
    two = world(_rank, 2, True, timeout=300)
    for state in four + two:
        assert state.keys() == reference.keys()
        assert largest_relative_difference(state, reference) < 1e-10
        assert torch.equal(state["1.num_batches_tracked"], reference["1.num_batches_tracked"])
    print(f"W=4 vs W=2: largest relative difference {largest_relative_difference(four[0], two[0]):.3g}")
    print(f"W=4 vs one process: {largest_relative_difference(four[0], reference):.3g}")


def test_per_rank_batchnorm_depends_on_the_split(world):
    # The control: without synchronisation the split changes the statistics, so the test above
    # can fail.
    four = world(_rank, 4, False, timeout=300)
    two = world(_rank, 2, False, timeout=300)
    assert largest_relative_difference(four[0], two[0]) > 1e-3
