"""torch.compile: syncnorm compiles with fullgraph=True and gives the eager results.

Compiling costs tens of seconds on two cores, so these few tests each do
several checks on one small model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from helpers.harness import recorded_all_reduces, run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import syncnorm

pytestmark = pytest.mark.compile


def _small_net(norm=nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def _compiled_equals_eager(rank, world, inputs):
    torch._dynamo.reset()
    eager = syncnorm.convert_sync_batchnorm(_small_net()).double()
    compiled_model = copy.deepcopy(eager)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(inputs[rank][0])
    compiled = torch.compile(compiled_model, fullgraph=True)
    results = []
    for x in inputs[rank]:
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [eager(xs[0]), compiled(xs[1])]
        for out in outs:
            out.square().sum().backward()
        results.append((outs[0].detach(), outs[1].detach(), xs[0].grad, xs[1].grad))
    buffers = [(a, b) for a, b in zip(eager.buffers(), compiled_model.buffers())]
    grads = [(a.grad, b.grad) for a, b in zip(eager.parameters(), compiled_model.parameters())]
    # Eval under compile: running statistics, and no collective at all.
    with recorded_all_reduces() as calls:
        compiled.eval()
        eager.eval()
        eval_pair = (eager(inputs[rank][0]).detach(), compiled(inputs[rank][0]).detach())
    return explained.graph_break_count, explained.graph_count, results, buffers, grads, eval_pair, len(calls)


def test_fullgraph_compile_matches_eager_on_two_ranks():
    gen = torch.Generator().manual_seed(0)
    inputs = [
        [torch.randn(2 + rank, 3, 6, 6, generator=gen, dtype=torch.float64) for _ in range(2)] for rank in range(2)
    ]
    for breaks, graphs, steps, buffers, grads, (eval_eager, eval_compiled), eval_calls in run_ranks(
        _compiled_equals_eager, 2, inputs, timeout=280
    ):
        assert breaks == 0 and graphs == 1
        for out_e, out_c, dx_e, dx_c in steps:
            torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(dx_c, dx_e, rtol=1e-10, atol=1e-10)
        for eager_buf, compiled_buf in buffers:
            torch.testing.assert_close(compiled_buf, eager_buf, rtol=1e-10, atol=1e-10)
        for eager_grad, compiled_grad in grads:
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(eval_compiled, eval_eager, rtol=1e-10, atol=1e-10)
        assert eval_calls == 0


def _ddp_compiled_vs_eager(rank, world, x):
    torch._dynamo.reset()
    eager = DDP(syncnorm.convert_sync_batchnorm(_small_net()).double())
    compiled_ddp = DDP(syncnorm.convert_sync_batchnorm(_small_net()).double())
    explained = torch._dynamo.explain(DDP(syncnorm.convert_sync_batchnorm(_small_net()).double()))(x[rank])
    reasons = [str(reason) for reason in explained.break_reasons]
    compiled = torch.compile(compiled_ddp)
    outs = []
    for model in (eager, compiled):
        out = model(x[rank])
        out.square().sum().backward()
        outs.append(
            (
                out.detach(),
                [p.grad for p in compiled_ddp.parameters()]
                if model is compiled
                else [p.grad for p in eager.parameters()],
            )
        )
    buffers = [(a, b) for a, b in zip(eager.buffers(), compiled_ddp.buffers())]
    return reasons, outs, buffers


def test_ddp_compile_matches_eager_and_syncnorm_causes_no_break():
    x = [torch.randn(3, 3, 6, 6, dtype=torch.float64) for _ in range(2)]
    for reasons, ((out_e, grads_e), (out_c, grads_c)), buffers in run_ranks(_ddp_compiled_vs_eager, 2, x, timeout=280):
        # DDP's own optimizer may split the graph at bucket boundaries; none of it is syncnorm's doing.
        assert not [r for r in reasons if "syncnorm" in r.lower()], reasons
        torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-10)
        for g_e, g_c in zip(grads_e, grads_c):
            torch.testing.assert_close(g_c, g_e, rtol=1e-9, atol=1e-10)
        for b_e, b_c in buffers:
            torch.testing.assert_close(b_c, b_e, rtol=1e-10, atol=1e-10)


class _Scale(nn.Module):
    """A parameter before the norms, so the input gradient flows through a graph, not a leaf.

    Not a convolution: Inductor's convolution backward fails its own stride check on an empty
    batch (torch's bug, seen with no syncnorm layer in the model).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(1, channels, 1, 1))

    def forward(self, x):
        return x * self.scale


def _empty_rank_compiled_vs_eager(rank, world, inputs, memory_format):
    torch._dynamo.reset()
    eager = nn.Sequential(
        _Scale(3), syncnorm.SyncBatchNorm(3), syncnorm.InPlaceABN(3, activation="elu"),
        syncnorm.InPlaceABN(3, activation="identity"), syncnorm.InPlaceABN(3),
    ).double()  # fmt: skip
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    results = []
    for model in (eager, compiled):
        x = inputs[rank].to(memory_format=memory_format).requires_grad_()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, [p.grad for p in model.parameters()], list(model.buffers())))
    return results


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
def test_fullgraph_compile_with_an_empty_rank_matches_eager(memory_format):
    # An empty rank's backward returns fresh zero sums (one tensor as both d weight and d bias
    # fails the custom op's aliasing check), and every op's result keeps the strides its fake
    # kernel promised, empty tensors included (Inductor asserts them).
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.empty(0, 3, 5, 5, dtype=torch.float64), torch.randn(3, 3, 5, 5, generator=gen, dtype=torch.float64)]
    for (out_e, dx_e, grads_e, bufs_e), (out_c, dx_c, grads_c, bufs_c) in run_ranks(
        _empty_rank_compiled_vs_eager, 2, inputs, memory_format, timeout=280
    ):
        torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dx_c, dx_e, rtol=1e-9, atol=1e-10)
        for g_e, g_c in zip(grads_e, grads_c):
            torch.testing.assert_close(g_c, g_e, rtol=1e-9, atol=1e-10)
        for b_e, b_c in zip(bufs_e, bufs_c):
            torch.testing.assert_close(b_c, b_e, rtol=1e-10, atol=1e-10)
