"""CUDA checks; each test skips cleanly on a machine without a GPU (CI has none).

* Two ranks share one GPU over gloo (NCCL needs a GPU per rank): numbers equal
  global-batch nn.BatchNorm in float64, and half precision keeps float32 stats.
* One process with torch's "fake" backend exercises the W > 1 code path with no
  peer: no host synchronisation (sync debug mode "error"), CUDA-graph capture and
  fullgraph compile. The fake backend proves nothing about the numbers.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.harness import run_ranks, shard
from torch import nn

import syncnorm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda_steps(rank, world, batches, sizes, dtype):
    torch.cuda.set_device(0)
    layer = syncnorm.SyncBatchNorm(
        batches[0].shape[1], device="cuda", dtype=torch.float64 if dtype == torch.float64 else None
    )
    outs = []
    for x in batches:
        local = shard(x, rank, sizes).to("cuda", dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = layer(local)
        out.float().square().sum().backward()
        outs.append((out.detach().cpu(), local.grad.cpu(), out.is_contiguous(memory_format=torch.channels_last)))
    return outs, layer.running_mean.cpu(), layer.running_var.cpu()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_two_ranks_on_one_gpu_match_global_batchnorm(dtype):
    sizes = [3, 5]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 4, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    ref = nn.BatchNorm2d(4, dtype=torch.float64)
    expected = []
    for x in batches:
        xr = x.to(dtype).double().requires_grad_()
        out = ref(xr)
        out.square().sum().backward()
        expected.append((out.detach(), xr.grad))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-2, atol=5e-2)
    if dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-4)
    for rank, (outs, mean, var) in enumerate(run_ranks(_cuda_steps, 2, batches, sizes, dtype, start_method="spawn")):
        for (out, grad, channels_last), (want_out, want_grad) in zip(outs, expected):
            assert channels_last and out.dtype == dtype
            torch.testing.assert_close(out.double(), shard(want_out, rank, sizes), **tol)
            torch.testing.assert_close(grad.double(), shard(want_grad, rank, sizes), **tol)
        torch.testing.assert_close(mean.double(), ref.running_mean, **tol)
        torch.testing.assert_close(var.double(), ref.running_var, **tol)


_FAKE_GROUP_SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist, syncnorm
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    net = syncnorm.convert_sync_batchnorm(net).cuda()
    net[1].momentum = None  # the cumulative average must stay on the device too
    x = torch.randn(4, 3, 16, 16, device="cuda", requires_grad=True)
    net(x).sum().backward()  # warm-up outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    net(x).sum().backward()
    torch.cuda.set_sync_debug_mode(0)
    # CUDA graph capture of a whole training step.
    static_x = torch.randn(4, 3, 16, 16, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            net(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        net(static_x).sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    compiled = torch.compile(net, fullgraph=True)
    compiled(x).sum().backward()
    print("FAKE-GROUP-CHECKS-OK")
    """
)


def test_no_host_sync_cuda_graph_and_compile_on_the_synchronised_path():
    done = subprocess.run([sys.executable, "-c", _FAKE_GROUP_SCRIPT], capture_output=True, text=True, timeout=600)
    assert "FAKE-GROUP-CHECKS-OK" in done.stdout, done.stdout + done.stderr
