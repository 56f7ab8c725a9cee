"""SyncBatchNorm against single-process nn.BatchNorm on the global batch (the gold standard).

Each test builds a global batch here, runs syncnorm on W real gloo ranks (each
with its slice), and compares what every rank saw with nn.BatchNorm applied to
the whole batch in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers.harness import RankError, recorded_all_reduces, run_ranks, shard
from torch import nn

import syncnorm

TIGHT = dict(rtol=1e-10, atol=1e-10)


def _run_steps(layer, batches, grads):
    """Train ``layer`` on each batch in turn; record outputs, input grads, param grads, buffers."""

    def copy(t):
        return None if t is None else t.clone()

    steps = []
    for x, dy in zip(batches, grads):
        x = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(x)
        y.backward(dy)
        steps.append(
            dict(
                out=y.detach(),
                dx=x.grad,
                dw=None if layer.weight is None else copy(layer.weight.grad),
                db=None if layer.bias is None else copy(layer.bias.grad),
                mean=copy(layer.running_mean),
                var=copy(layer.running_var),
                nbt=copy(layer.num_batches_tracked),
            )
        )
    return steps


def _reference_steps(batches, grads, bn_kwargs, dims):
    """nn.BatchNorm on each global batch in turn."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dims]
    return _run_steps(cls(batches[0].shape[1], dtype=torch.float64, **bn_kwargs), batches, grads)


def _train_steps(rank, world, batches, grads, sizes, bn_kwargs):
    layer = syncnorm.SyncBatchNorm(batches[0].shape[1], dtype=torch.float64, **bn_kwargs)
    steps = _run_steps(layer, [shard(x, rank, sizes) for x in batches], [shard(dy, rank, sizes) for dy in grads])
    layer.eval()
    eval_out = layer(shard(batches[-1], rank, sizes)).detach()
    return steps, eval_out


def _global_batches(shape, steps, seed=0, scale=3.0, shift=2.0):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift for _ in range(steps)]
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    return batches, grads


def _check_equivalence(sizes, spatial, bn_kwargs, steps=3):
    world = len(sizes)
    batches, grads = _global_batches((sum(sizes), 3, *spatial), steps)
    expected = _reference_steps(batches, grads, bn_kwargs, 2 + len(spatial))
    results = run_ranks(_train_steps, world, batches, grads, sizes, bn_kwargs)
    for rank, (rank_steps, _) in enumerate(results):
        for step, (got, want) in enumerate(zip(rank_steps, expected)):
            where = f"rank {rank} step {step}"
            torch.testing.assert_close(got["out"], shard(want["out"], rank, sizes), **TIGHT, msg=where)
            torch.testing.assert_close(got["dx"], shard(want["dx"], rank, sizes), **TIGHT, msg=where)
            for key in ("mean", "var", "nbt"):
                if want[key] is None:
                    assert got[key] is None
                else:
                    torch.testing.assert_close(got[key], want[key], **TIGHT, msg=f"{where} {key}")
    for step, want in enumerate(expected):
        for key in ("dw", "db"):
            if want[key] is not None:
                summed = sum(rank_steps[step][key] for rank_steps, _ in results)
                torch.testing.assert_close(summed, want[key], **TIGHT, msg=f"step {step} {key}")
    return results, batches, expected


@pytest.mark.parametrize(
    "sizes,spatial",
    [
        ([5], (4, 4)),
        ([3, 5], (4, 4)),
        ([2, 4, 3], (3, 3, 2)),
        ([3, 1, 4, 2], ()),
        ([3, 2, 2], (7,)),
    ],
    ids=["W1", "W2-2d", "W3-3d-odd", "W4-1d", "W3-conv1d"],
)
def test_training_matches_global_batchnorm(sizes, spatial):
    results, batches, expected = _check_equivalence(sizes, spatial, {})
    # Eval mode afterwards uses the (identical) running statistics, like nn.BatchNorm.
    ref = nn.BatchNorm2d(3, dtype=torch.float64).eval()
    ref.running_mean.copy_(expected[-1]["mean"])
    ref.running_var.copy_(expected[-1]["var"])
    for rank, (_, eval_out) in enumerate(results):
        want = torch.nn.functional.batch_norm(
            shard(batches[-1], rank, sizes), ref.running_mean, ref.running_var, None, None, False, 0.0, 1e-5
        )
        torch.testing.assert_close(eval_out, want, **TIGHT)


def test_uneven_batches_with_empty_ranks():
    _check_equivalence([0, 4, 0, 3], (2, 3), {})


@pytest.mark.parametrize(
    "bn_kwargs",
    [dict(momentum=None), dict(eps=1e-2, momentum=0.3), dict(affine=False), dict(track_running_stats=False)],
    ids=["cumulative", "eps-momentum", "no-affine", "no-running-stats"],
)
def test_options_match_global_batchnorm(bn_kwargs):
    _check_equivalence([2, 3], (3, 2), bn_kwargs, steps=3)


def _count_and_payload(rank, world, x, needs_input_grad):
    with recorded_all_reduces() as calls:
        layer = syncnorm.SyncBatchNorm(x.shape[1])
        local = x.clone().requires_grad_(needs_input_grad)
        out = layer(local)
        forward_calls = list(calls)
        out.sum().backward()
        backward_calls = calls[len(forward_calls) :]
        layer.eval()
        before_eval = len(calls)
        layer(local)
        layer(local)
        eval_calls = len(calls) - before_eval
    return forward_calls, backward_calls, eval_calls


@pytest.mark.parametrize("world", [2, 3])
def test_one_collective_per_pass_and_payload_independent_of_world(world):
    channels = 6
    x = torch.randn(2, channels, 3, 3)
    for needs_input_grad in (True, False):
        results = run_ranks(_count_and_payload, world, x, needs_input_grad)
        for forward_calls, backward_calls, eval_calls in results:
            assert forward_calls == [(2 * channels + 3, torch.float64)]
            assert backward_calls == ([(2 * channels + 2, torch.float64)] if needs_input_grad else [])
            assert eval_calls == 0


def _global_count_too_small(rank, world, sizes):
    layer = syncnorm.SyncBatchNorm(4)
    before = (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
    try:
        layer(torch.randn(sizes[rank], 4))
    except ValueError as err:
        after = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        return str(err), all(torch.equal(a, b) for a, b in zip(before, after))
    return "no error", False


@pytest.mark.parametrize("sizes", [[1, 0], [0, 0, 0], [0, 1, 0]])
def test_global_count_of_one_raises_on_every_rank(sizes):
    results = run_ranks(_global_count_too_small, len(sizes), sizes, timeout=60)
    for message, unchanged in results:
        assert "at least 2" in message and "SyncBatchNorm#" in message
        assert unchanged


def _large_mean(rank, world, x, sizes):
    layer = syncnorm.SyncBatchNorm(x.shape[1])
    layer(shard(x, rank, sizes))
    return layer.running_var


def test_running_var_stable_when_mean_dwarfs_std():
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(24, 4, 6, 6, generator=gen, dtype=torch.float64)).float()
    sizes = [8, 16]
    expected = 0.9 * 1.0 + 0.1 * x.double().var(dim=(0, 2, 3), unbiased=True)
    for running_var in run_ranks(_large_mean, 2, x, sizes):
        torch.testing.assert_close(running_var.double(), expected, rtol=1e-4, atol=0)
    # The naive float32 sum / sum-of-squares formula fails this test, which is why it exists.
    flat = x.transpose(0, 1).reshape(4, -1)
    n = flat.shape[1]
    naive = (flat.pow(2).sum(1) - flat.sum(1).pow(2) / n) / (n - 1)
    assert not torch.allclose(0.9 + 0.1 * naive.double(), expected, rtol=1e-4, atol=0)


def _eval_without_collectives(rank, world, x):
    with recorded_all_reduces() as calls:
        layer = syncnorm.SyncBatchNorm(x.shape[1]).eval()
        layer.running_mean.uniform_()
        outs = [layer(x) for _ in range(rank + 1)]  # ranks run different numbers of eval batches
        no_stats = syncnorm.SyncBatchNorm(x.shape[1], track_running_stats=False).eval()
        local_stats_out = no_stats(x)
    return len(calls), outs[-1], layer.running_mean, local_stats_out


def test_eval_mode_never_communicates():
    x = torch.randn(4, 3, 5)
    for calls, out, running_mean, local_out in run_ranks(_eval_without_collectives, 2, x):
        assert calls == 0
        want = torch.nn.functional.batch_norm(x, running_mean, torch.ones(3), torch.ones(3), torch.zeros(3), False)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(local_out, nn.BatchNorm1d(3, track_running_stats=False)(x))


def _low_precision(rank, world, x, sizes, dtype, use_autocast):
    layer = syncnorm.SyncBatchNorm(x.shape[1])
    local = shard(x, rank, sizes).to(dtype).requires_grad_()
    if use_autocast:
        conv = nn.Conv2d(x.shape[1], x.shape[1], 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(x.shape[1]).view(x.shape[1], x.shape[1], 1, 1))
        with torch.autocast("cpu", dtype=dtype):
            out = layer(conv(local))
    else:
        out = layer(local)
    out.float().sum().backward()
    return out.detach(), local.grad, layer.running_mean, layer.running_var, layer.weight.dtype


@pytest.mark.parametrize(
    "dtype,use_autocast",
    [(torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp16", "bf16", "bf16-autocast"],
)
def test_half_precision_inputs_keep_float32_statistics(dtype, use_autocast):
    sizes = [3, 5]
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2 + 1
    ref = nn.BatchNorm2d(4, dtype=torch.float64)
    xr = x.to(dtype).double().requires_grad_()
    out_ref = ref(xr)
    out_ref.sum().backward()
    for rank, (out, grad, mean, var, param_dtype) in enumerate(
        run_ranks(_low_precision, 2, x, sizes, dtype, use_autocast)
    ):
        assert out.dtype == dtype and grad.dtype == dtype
        assert mean.dtype == torch.float32 and param_dtype == torch.float32
        torch.testing.assert_close(out.double(), shard(out_ref.detach(), rank, sizes), rtol=0.02, atol=0.03)
        torch.testing.assert_close(mean.double(), ref.running_mean, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(var.double(), ref.running_var, rtol=1e-2, atol=1e-3)


def _channels_last(rank, world, x, sizes, memory_format):
    layer = syncnorm.SyncBatchNorm(x.shape[1], dtype=torch.float64)
    local = shard(x, rank, sizes).contiguous(memory_format=memory_format).requires_grad_()
    out = layer(local)
    out.backward(torch.ones_like(out))
    return out.detach(), out.is_contiguous(memory_format=memory_format), local.grad


@pytest.mark.parametrize(
    "memory_format,shape", [(torch.channels_last, (6, 5, 4, 3)), (torch.channels_last_3d, (6, 5, 2, 3, 2))]
)
def test_channels_last_in_channels_last_out(memory_format, shape):
    sizes = [2, 4]
    x = torch.randn(*shape, dtype=torch.float64)
    ref = nn.BatchNorm2d(5, dtype=torch.float64) if len(shape) == 4 else nn.BatchNorm3d(5, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    out_ref = ref(xr)
    out_ref.backward(torch.ones_like(out_ref))
    for rank, (out, kept, grad) in enumerate(run_ranks(_channels_last, 2, x, sizes, memory_format)):
        assert kept
        torch.testing.assert_close(out, shard(out_ref.detach(), rank, sizes), **TIGHT)
        torch.testing.assert_close(grad, shard(xr.grad, rank, sizes), **TIGHT)


def _run_bitwise_pair(x_steps, bn_kwargs):
    ours = syncnorm.SyncBatchNorm(x_steps[0].shape[1], **bn_kwargs)
    ref = nn.BatchNorm2d(x_steps[0].shape[1], **bn_kwargs)
    for x in x_steps:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = ours(a), ref(b)
        out_a.square().sum().backward()
        out_b.square().sum().backward()
        assert torch.equal(out_a, out_b) and torch.equal(a.grad, b.grad)
    for name, buf in ref.named_buffers():
        assert torch.equal(buf, dict(ours.named_buffers())[name]), name
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)
    return True


def test_without_torch_distributed_it_is_exactly_batchnorm():
    assert not dist.is_initialized()
    x_steps = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    assert _run_bitwise_pair(x_steps, {})
    assert _run_bitwise_pair(x_steps, dict(momentum=None))


def _single_rank_group(rank, world, x_steps):
    return _run_bitwise_pair(x_steps, {})


def test_group_of_one_rank_is_exactly_batchnorm():
    x_steps = [torch.randn(4, 3, 5, 5) for _ in range(2)]
    assert run_ranks(_single_rank_group, 1, x_steps) == [True]


@pytest.mark.parametrize(
    "shape,match",
    [
        ((4,), "2-D tensor|1-D tensor"),
        ((4, 5, 3), "built for 3 channels but got input with 5"),
        ((4, 0, 3), "zero channels"),
    ],
)
def test_bad_input_is_a_clear_value_error(shape, match):
    layer = syncnorm.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(*shape))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.int64))


def _bad_input_everywhere(rank, world, shape):
    calls = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or real_all_reduce(*a, **k)
    try:
        syncnorm.SyncBatchNorm(3)(torch.randn(*shape))
    except ValueError as err:
        return str(err), len(calls)
    finally:
        dist.all_reduce = real_all_reduce
    return "no error", len(calls)


def test_bad_input_raises_before_any_collective_on_every_rank():
    for message, calls in run_ranks(_bad_input_everywhere, 2, (4, 5, 2)):
        assert "built for 3 channels" in message and calls == 0


def _gradcheck_turn(rank, world, inputs, probes, checking_rank):
    """gradcheck of the op on one rank while the others run the same calls with fixed inputs.

    The checked scalar is the sum over ALL ranks of <output_r, probe_r>: the forward of the
    checking rank changes every rank's output through the global statistics, so only the
    global sum has the derivative the synchronised backward computes.
    """
    x_fixed, weight, bias = inputs[rank]
    checking = rank == checking_rank

    def global_objective(x, w, b):
        if checking:
            out = syncnorm.functional.sync_batch_norm(x, None, None, w, b, True)
        else:  # same calls, inputs pinned: 0 * x keeps the backward path (and its all_reduce)
            out = syncnorm.functional.sync_batch_norm(x_fixed + 0 * x, None, None, weight + 0 * w, bias + 0 * b, True)
        local = (out * probes[rank]).sum()
        total = local.detach().clone()
        dist.all_reduce(total)
        if checking:
            return local + (total - local.detach())
        # Value exactly 0 (so this rank's own gradcheck sees a constant), while its probe still
        # flows into the synchronised backward as this rank's dy.
        return local - local.detach()

    args = tuple(t.clone().requires_grad_() for t in (x_fixed, weight, bias))
    return torch.autograd.gradcheck(global_objective, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_across_ranks():
    gen = torch.Generator().manual_seed(7)
    world = 2
    # Parameters are replicated (as DDP and FSDP keep them); the data differ per rank.
    weight, bias = (
        torch.rand(2, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(2, generator=gen, dtype=torch.float64),
    )
    inputs = [(torch.randn(3, 2, 2, generator=gen, dtype=torch.float64) * (r + 1), weight, bias) for r in range(world)]
    probes = [torch.randn(3, 2, 2, generator=gen, dtype=torch.float64) for _ in range(world)]
    for checking_rank in range(world):
        assert run_ranks(_gradcheck_turn, world, inputs, probes, checking_rank, timeout=180) == [True] * world


def test_harness_reports_rank_errors():
    results = run_ranks(_raise_on_rank_one, 2, expect_errors=True)
    assert results[0] == "fine"
    assert isinstance(results[1], RankError) and results[1].message == "planted"


def _raise_on_rank_one(rank, world):
    if rank == 1:
        raise RuntimeError("planted")
    return "fine"


def _cumulative_average_after(rank, world, batches, steps_before, dtype):
    layer = syncnorm.SyncBatchNorm(batches.shape[-1], momentum=None).to(dtype)
    layer.num_batches_tracked.fill_(steps_before)
    layer(shard(batches, rank, [2] * world).to(dtype))
    return layer.running_mean.double(), layer.running_var.double()


def test_cumulative_momentum_counts_steps_past_float16_range():
    # momentum=None averages with 1 / steps; a step count held in the float16 buffers' dtype
    # overflows past 65504, which would freeze the running statistics.
    dtype, steps_before = torch.float16, 70_000
    batches = torch.tensor([[100.0, -4.0], [300.0, 4.0], [200.0, 0.0], [400.0, 8.0]])
    reference = nn.BatchNorm1d(2, momentum=None).double()
    reference.num_batches_tracked.fill_(steps_before)
    reference(batches.double())
    for running_mean, running_var in run_ranks(_cumulative_average_after, 2, batches, steps_before, dtype):
        torch.testing.assert_close(running_mean, reference.running_mean, rtol=1e-2, atol=0)
        torch.testing.assert_close(running_var, reference.running_var, rtol=1e-2, atol=0)
