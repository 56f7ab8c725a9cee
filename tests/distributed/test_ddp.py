"""syncnorm under DistributedDataParallel (CPU, gloo): equivalence, broadcast_buffers=False, checkpointing.

References are single-process ``nn.BatchNorm2d`` training on the global batch in
float64. With equal per-rank batches and a per-rank *mean* loss, DDP's gradient
average equals the gradient of the global mean loss: syncnorm's backward makes
each rank's gradient that of the sum of all ranks' losses, and DDP divides by W.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

# DDP and fully_shard import torch._dynamo on first use (seconds per rank on a loaded 2-core
# machine); importing it here, before the harness forks the ranks, lets every rank inherit it.
import torch._dynamo  # noqa: F401
import torch.nn.functional as F
from helpers.harness import run_ranks, shard
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import syncnorm

WORLD = 2
TOL = dict(rtol=1e-10, atol=1e-12)


class BlockNet(nn.Module):
    """A stem, one block of two conv+BN layers (optionally activation-checkpointed), a head."""

    def __init__(self, channels: int = 4, checkpointed: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.head = nn.Linear(channels, 3)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = checkpoint(self.block, h, use_reentrant=False) if self.checkpointed else self.block(h)
        return self.head(h.mean((2, 3)))


def make_model(dtype: torch.dtype, checkpointed: bool = False, sync: bool = True) -> BlockNet:
    torch.manual_seed(0)  # every rank and the reference start from the same weights
    model = BlockNet(checkpointed=checkpointed).to(dtype)
    return syncnorm.convert_sync_batchnorm(model) if sync else model


def make_batches(steps: int, batch: int, dtype: torch.dtype, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, 5, 5, generator=generator, dtype=dtype) * 3 - 1,
            torch.randn(batch, 3, generator=generator, dtype=dtype),
        )
        for _ in range(steps)
    ]


def train(model: nn.Module, batches, rank: int = 0, world_size: int = 1, lr: float = 0.1) -> None:
    """SGD with momentum on this rank's equal share of each global batch, mean loss."""
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for inputs, targets in batches:
        sizes = [inputs.shape[0] // world_size] * world_size
        optimiser.zero_grad()
        F.mse_loss(model(shard(inputs, rank, sizes)), shard(targets, rank, sizes)).backward()
        optimiser.step()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_ranks_bitwise_equal(states: list[dict[str, torch.Tensor]], what: str) -> None:
    for rank, state in enumerate(states[1:], start=1):
        for name, tensor in state.items():
            assert torch.equal(tensor, states[0][name]), f"{what}: {name} differs between rank 0 and rank {rank}"


# --- DDP equals single-process training on the global batch ------------------------------------


def _ddp_training_rank(rank, world_size, batches):
    model = make_model(torch.float64)
    train(DistributedDataParallel(model), batches, rank, world_size)
    return state_of(model)


def test_ddp_matches_single_process_on_global_batch():
    batches = make_batches(steps=3, batch=8, dtype=torch.float64)
    results = run_ranks(_ddp_training_rank, WORLD, batches, timeout=60)
    reference = make_model(torch.float64, sync=False)
    train(reference, batches)
    expected = state_of(reference)
    for rank, state in enumerate(results):
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, expected[name], **TOL, msg=f"rank {rank} {name}")
    assert_ranks_bitwise_equal(results, "DDP + syncnorm")
    assert not torch.allclose(expected["stem.1.running_mean"], torch.zeros(4, dtype=torch.float64))


# --- broadcast_buffers=False is safe with syncnorm ----------------------------------------------

LONG_STEPS = 50
# torch 2.13 deprecates broadcast_buffers for forward_sync_buffers (whose False still broadcasts
# the buffers once at construction; broadcast_buffers=False skips that too). Test every spelling.
HAS_FORWARD_SYNC_FLAG = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
NO_BROADCAST = {"broadcast_buffers=False": {"broadcast_buffers": False}}
if HAS_FORWARD_SYNC_FLAG:
    NO_BROADCAST["forward_sync_buffers=False"] = {"forward_sync_buffers": False}


def _broadcast_buffers_rank(rank, world_size, batches):
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)

    def run(sync: bool, **ddp_options):
        model = make_model(torch.float32, sync=sync)
        train(DistributedDataParallel(model, **ddp_options), batches, rank, world_size, lr=0.02)
        return state_of(model)

    results = {name: run(sync=True, **options) for name, options in NO_BROADCAST.items()}
    results["default (broadcast every forward)"] = run(sync=True)
    # Control: plain BatchNorm without the broadcast, to show the check below can fail.
    results["plain BatchNorm"] = run(sync=False, broadcast_buffers=False)
    return results


def test_broadcast_buffers_false_keeps_buffers_identical():
    batches = make_batches(steps=LONG_STEPS, batch=4, dtype=torch.float32)
    results = run_ranks(_broadcast_buffers_rank, WORLD, batches, timeout=120)
    with_broadcast = [result["default (broadcast every forward)"] for result in results]
    for name in NO_BROADCAST:
        without = [result[name] for result in results]
        assert_ranks_bitwise_equal(without, f"syncnorm, {name}")
        assert int(without[0]["block.5.num_batches_tracked"]) == LONG_STEPS
        # The broadcast would have changed nothing: with it, every rank ends bitwise where it ends without.
        for rank in range(WORLD):
            for key, tensor in with_broadcast[rank].items():
                assert torch.equal(tensor, without[rank][key]), f"{name}: rank {rank} {key}"
    plain = [result["plain BatchNorm"] for result in results]
    assert not torch.equal(plain[0]["stem.1.running_mean"], plain[1]["stem.1.running_mean"]), (
        "control: plain BatchNorm without the broadcast should drift apart across ranks"
    )


# --- activation checkpointing around a block with SyncBatchNorm -----------------------------------

CHECKPOINT_STEPS = 2


def _checkpointing_rank(rank, world_size, batches):
    results = {}
    for checkpointed in (False, True):
        model = make_model(torch.float64, checkpointed=checkpointed)
        ddp = DistributedDataParallel(model)
        train(ddp, batches, rank, world_size)
        results[checkpointed] = state_of(model)
    return results


@pytest.fixture(scope="module")
def checkpointing_run():
    batches = make_batches(steps=CHECKPOINT_STEPS, batch=6, dtype=torch.float64, seed=9)
    # A hang (ranks disagreeing on the recomputed forward's all_reduce) fails via the harness timeout.
    return run_ranks(_checkpointing_rank, WORLD, batches, timeout=60)


def test_checkpointing_gives_same_parameters_and_consistent_ranks(checkpointing_run):
    for rank, result in enumerate(checkpointing_run):
        for name, tensor in result[True].items():
            if "running" in name or "num_batches" in name:
                continue  # see the next test
            torch.testing.assert_close(tensor, result[False][name], **TOL, msg=f"rank {rank} {name}")
    assert_ranks_bitwise_equal([result[True] for result in checkpointing_run], "checkpointed")


def test_checkpointing_updates_running_statistics_once(checkpointing_run):
    for rank, result in enumerate(checkpointing_run):
        for name, tensor in result[True].items():
            if "running" in name or "num_batches" in name:
                torch.testing.assert_close(tensor, result[False][name], **TOL, msg=f"rank {rank} {name}")
