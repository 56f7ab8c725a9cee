"""What bench_norm.py compares against is what it claims to be: checked before anything is timed.

* the naive baseline is a synchronised BatchNorm: on 2 gloo ranks its outputs, input gradients,
  summed weight gradients and running mean equal float64 ``nn.BatchNorm`` on the global batch;
* the sync floor sends exactly syncnorm's all_reduce payloads, measured from syncnorm, and
  computes local ``nn.BatchNorm``;
* the saved-for-backward probe counts each storage once, and tells new storages from the input's.

A failed check ends the run before any table is written.
"""

from __future__ import annotations

import torch
from _bench_common import NaiveSyncBatchNorm, SyncFloor
from measure import saved_tensor_bytes
from torch import nn

from syncnorm.testing import recorded_all_reduces, run_ranks, shard

CHANNELS, SIZES = 5, [4, 4]


def _naive_rank(rank: int, world_size: int, global_input, grad_output):
    layer = NaiveSyncBatchNorm(CHANNELS)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        layer.bias.copy_(torch.linspace(-1, 1, CHANNELS))
    local = shard(global_input, rank, SIZES).clone().requires_grad_(True)
    output = layer(local)
    output.backward(shard(grad_output, rank, SIZES))
    return output.detach(), local.grad, layer.weight.grad, layer.running_mean, layer.running_var


def _check_naive() -> None:
    generator = torch.Generator().manual_seed(0)
    global_input = torch.randn(sum(SIZES), CHANNELS, 3, 3, generator=generator) * 3 + 2
    grad_output = torch.randn(global_input.shape, generator=generator)
    results = run_ranks(_naive_rank, len(SIZES), global_input, grad_output, timeout=120)

    reference = nn.BatchNorm2d(CHANNELS).double()
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        reference.bias.copy_(torch.linspace(-1, 1, CHANNELS))
    expected_input = global_input.double().requires_grad_(True)
    expected = reference(expected_input)
    expected.backward(grad_output.double())

    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([r[0] for r in results]).double(), expected.detach(), **close)
    torch.testing.assert_close(torch.cat([r[1] for r in results]).double(), expected_input.grad, **close)
    # each rank holds its share of the weight gradient; the shares add up to the global one
    torch.testing.assert_close(sum(r[2] for r in results).double(), reference.weight.grad, **close)
    torch.testing.assert_close(results[0][3].double(), reference.running_mean, rtol=1e-5, atol=1e-6)
    # the naive design tracks the biased variance (nn.BatchNorm the unbiased one): n / (n - 1) apart
    n = global_input.numel() // CHANNELS
    torch.testing.assert_close(results[0][4].double(), 0.9 + (reference.running_var - 0.9) * (n - 1) / n)


def _floor_rank(rank: int, world_size: int, payloads: dict):
    floor = SyncFloor(nn.BatchNorm2d(6), {which: calls[0] for which, calls in payloads.items()})
    local = torch.randn(3, 6, 4, 4, requires_grad=True)
    with recorded_all_reduces() as recorded:
        output = floor(local)
        forward_calls = list(recorded)
        output.backward(torch.ones_like(output))
    return forward_calls, recorded[len(forward_calls) :], output.detach(), nn.BatchNorm2d(6)(local.detach())


def _check_floor(payloads: dict) -> None:
    for forward_calls, backward_calls, output, plain in run_ranks(_floor_rank, 2, payloads, timeout=120):
        assert forward_calls == payloads["forward"], (forward_calls, payloads["forward"])
        assert backward_calls == payloads["backward"], (backward_calls, payloads["backward"])
        torch.testing.assert_close(output, plain)


class _SquareThenScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x * x) * self.scale  # mul saves x twice (one storage) and, next, x*x and scale


def _check_saved_bytes() -> None:
    saved = saved_tensor_bytes(_SquareThenScale(), torch.randn(10, 4, requires_grad=True))
    assert saved == {"all": 40 * 4 + 40 * 4 + 4 * 4, "new": 40 * 4}, saved


def check_baselines(payloads_of_6_channels: dict) -> str:
    """Run every check (raises ``AssertionError`` on a failure); returns the line the run prints."""
    _check_naive()
    _check_floor(payloads_of_6_channels)
    _check_saved_bytes()
    return (
        "baselines checked: naive = float64 nn.BatchNorm on the global batch (2 ranks); "
        "sync floor sends syncnorm's payloads; saved-bytes probe counts each storage once"
    )
