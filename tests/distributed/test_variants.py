"""LayerNorm2d, SyncInstanceNorm1d/2d/3d and get_norm against independent references.

References: explicit float64 mean/variance math (LayerNorm2d) and torch's own
nn.InstanceNorm*d run in one process on the global batch (SyncInstanceNorm).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers.harness import RankError, run_ranks, shard
from torch import nn

import syncnorm
from syncnorm.variants import LayerNorm2d, SyncInstanceNorm1d, SyncInstanceNorm2d, SyncInstanceNorm3d, get_norm

DOUBLE = dict(rtol=0, atol=1e-12)
SYNC_CLASSES = {1: SyncInstanceNorm1d, 2: SyncInstanceNorm2d, 3: SyncInstanceNorm3d}
TORCH_CLASSES = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
SPATIAL = {1: (5,), 2: (3, 4), 3: (2, 3, 2)}
NO_BIAS_SUPPORTED = "bias" in inspect.signature(nn.InstanceNorm2d.__init__).parameters


def _offset_batch(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    # Per-channel offsets and scales, so a wrong reduction axis cannot go unnoticed.
    channels = shape[1]
    view = (1, channels) + (1,) * (len(shape) - 2)
    scale = torch.linspace(0.5, 3.0, channels, dtype=torch.float64).view(view)
    offset = torch.linspace(-2.0, 5.0, channels, dtype=torch.float64).view(view)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset


# ---------------------------------------------------------------------------------------------
# LayerNorm2d


def _reference_layer_norm2d(x, weight, bias, eps):
    """Explicit float64 math over dim 1: mean, biased variance, x_hat, affine."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return x_hat * weight.view(view) + bias.view(view), x_hat, var


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 4, 6), (2, 3, 2, 3, 2), (4, 6)])
def test_layer_norm2d_matches_explicit_math_forward_and_backward(shape):
    gen = torch.Generator().manual_seed(0)
    x = _offset_batch(gen, shape).requires_grad_()
    layer = LayerNorm2d(shape[1], eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape[1], generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(shape[1], generator=gen, dtype=torch.float64))
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)

    out = layer(x)
    out.backward(dy)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = layer.weight.detach().clone().requires_grad_()
    b_ref = layer.bias.detach().clone().requires_grad_()
    ref, x_hat, var = _reference_layer_norm2d(x_ref, w_ref, b_ref, 1e-6)
    ref.backward(dy)

    torch.testing.assert_close(out, ref, **DOUBLE)
    torch.testing.assert_close(x.grad, x_ref.grad, **DOUBLE)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, **DOUBLE)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, **DOUBLE)
    # And the closed-form backward over the normalised (channel) axis, with g = gamma * dy
    # because gamma varies along that axis here.
    view = (1, -1) + (1,) * (len(shape) - 2)
    x_hat, g = x_hat.detach(), dy * layer.weight.detach().view(view)
    closed_form = (g - g.mean(1, keepdim=True) - x_hat * (g * x_hat).mean(1, keepdim=True)) / torch.sqrt(
        var.detach() + 1e-6
    )
    reduce_dims = [d for d in range(len(shape)) if d != 1]
    torch.testing.assert_close(x.grad, closed_form, **DOUBLE)
    torch.testing.assert_close(layer.weight.grad, (dy * x_hat).sum(reduce_dims), **DOUBLE)
    torch.testing.assert_close(layer.bias.grad, dy.sum(reduce_dims), **DOUBLE)


def test_layer_norm2d_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = _offset_batch(gen, (2, 3, 2, 3)).requires_grad_()
    weight = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    layer = LayerNorm2d(3, eps=1e-5, dtype=torch.float64)

    def apply_functional(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(apply_functional, (x, weight, bias))
    assert torch.autograd.gradgradcheck(apply_functional, (x, weight, bias))


@pytest.mark.parametrize(
    "shape, memory_format",
    [((2, 6, 3, 4), torch.channels_last), ((2, 6, 2, 3, 4), torch.channels_last_3d)],
)
def test_layer_norm2d_keeps_the_memory_format(shape, memory_format):
    gen = torch.Generator().manual_seed(2)
    x = _offset_batch(gen, shape).float()
    dy = torch.randn(shape, generator=gen)
    layer = LayerNorm2d(shape[1])
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.uniform_(-1, 1, generator=gen)
    results = {}
    for fmt in (torch.contiguous_format, memory_format):
        xf = x.clone(memory_format=fmt).requires_grad_()
        layer.zero_grad()
        out = layer(xf)
        out.backward(dy.contiguous(memory_format=fmt))
        assert out.is_contiguous(memory_format=fmt)
        results[fmt] = (out.detach(), xf.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
    ref, _, _ = _reference_layer_norm2d(x.double(), layer.weight.double(), layer.bias.double(), layer.eps)
    for got_contiguous, got_channels_last in zip(results[torch.contiguous_format], results[memory_format]):
        torch.testing.assert_close(got_channels_last, got_contiguous, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[memory_format][0].double(), ref.detach(), rtol=0, atol=1e-5)


def test_layer_norm2d_without_affine_state_and_errors():
    layer = LayerNorm2d(4, affine=False)
    assert list(layer.state_dict()) == [] and not isinstance(layer, nn.LayerNorm)
    assert list(LayerNorm2d(4).state_dict()) == ["weight", "bias"]
    x = _offset_batch(torch.Generator().manual_seed(3), (2, 4, 3, 3))
    ref, _, _ = _reference_layer_norm2d(x, torch.ones(4, dtype=x.dtype), torch.zeros(4, dtype=x.dtype), 1e-6)
    torch.testing.assert_close(layer(x), ref, **DOUBLE)
    with pytest.raises(ValueError, match=r"LayerNorm2d\(4\) expects input of shape \(N, 4, \*spatial\)"):
        layer(torch.randn(2, 3, 4, 4))


# ---------------------------------------------------------------------------------------------
# SyncInstanceNorm, one process


def _pair(dims, **kwargs):
    """A SyncInstanceNorm and an nn.InstanceNorm of the same configuration and state."""
    sync = SYNC_CLASSES[dims](3, dtype=torch.float64, **kwargs)
    ref = TORCH_CLASSES[dims](3, dtype=torch.float64, **kwargs)
    gen = torch.Generator().manual_seed(10 + dims)
    with torch.no_grad():
        for tensor in ref.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype))
        if ref.track_running_stats:
            ref.running_mean.uniform_(-1, 1, generator=gen)
            ref.running_var.uniform_(0.5, 2, generator=gen)
    sync.load_state_dict(ref.state_dict())
    return sync, ref


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(affine=True),
        dict(affine=True, track_running_stats=True, momentum=0.3),
        dict(track_running_stats=True, momentum=None),
        pytest.param(
            dict(affine=True, track_running_stats=True, bias=False),
            marks=pytest.mark.skipif(not NO_BIAS_SUPPORTED, reason="torch < 2.13 has no InstanceNorm(bias=False)"),
        ),
    ],
    ids=["defaults", "affine", "tracked", "momentum-None", "no-bias"],
)
def test_instance_norm_single_process_matches_torch(dims, config):
    sync, ref = _pair(dims, **config)
    assert isinstance(sync, TORCH_CLASSES[dims]) and list(sync.state_dict()) == list(ref.state_dict())
    gen = torch.Generator().manual_seed(dims)
    for mode, batch in (("train", 4), ("train", 2), ("train", None), ("eval", 3), ("eval", None)):
        sync.train(mode == "train")
        ref.train(mode == "train")
        x = _offset_batch(gen, (batch or 1, 3, *SPATIAL[dims]))
        x = x if batch else x[0]  # batch None: unbatched (C, *spatial) input
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        outputs, grads = [], []
        for layer in (sync, ref):
            layer.zero_grad()
            xin = x.clone().requires_grad_()
            out = layer(xin)
            out.backward(dy)
            outputs.append(out)
            grads.append([xin.grad] + [p.grad for p in layer.parameters()])
        torch.testing.assert_close(outputs[0], outputs[1], **DOUBLE)
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, **DOUBLE)
        for name, buffer in ref.named_buffers():
            torch.testing.assert_close(getattr(sync, name), buffer, **DOUBLE)


def test_instance_norm_gradcheck():
    sync, _ = _pair(2, affine=True, track_running_stats=True)
    x = _offset_batch(torch.Generator().manual_seed(4), (2, 3, 2, 3)).requires_grad_()
    params = {name: p.detach().clone().requires_grad_() for name, p in sync.named_parameters()}

    def apply(x, weight, bias):
        return torch.func.functional_call(sync, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(apply, (x, params["weight"], params["bias"]))


def test_instance_norm_empty_batch_keeps_running_stats_and_gives_zero_grads():
    sync, _ = _pair(2, affine=True, track_running_stats=True)
    before = (sync.running_mean.clone(), sync.running_var.clone())
    x = torch.empty(0, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    out = sync(x)
    out.sum().backward()
    assert out.shape == x.shape
    torch.testing.assert_close(sync.weight.grad, torch.zeros(3, dtype=torch.float64), **DOUBLE)
    torch.testing.assert_close(sync.bias.grad, torch.zeros(3, dtype=torch.float64), **DOUBLE)
    assert torch.equal(sync.running_mean, before[0]) and torch.equal(sync.running_var, before[1])


def test_instance_norm_bad_input_names_the_layer():
    sync = SyncInstanceNorm1d(3, track_running_stats=True)
    with pytest.raises(ValueError, match=rf"layer '{sync.layer_name}'.*more than 1 of them"):
        sync(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match=rf"layer '{sync.layer_name}' was built for 3 channels"):
        with pytest.warns(UserWarning, match="does not match num_features"):  # torch's warning comes first
            sync(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):  # torch's own dimension check
        sync(torch.randn(2, 3, 4, 5))


# ---------------------------------------------------------------------------------------------
# SyncInstanceNorm across ranks


def _train_steps(layer, batches, grads, take=lambda t: t):
    """Forward + backward per batch (``take`` picks this rank's slice); what each step left behind."""
    steps = []
    for x_global, dy_global in zip(batches, grads):
        layer.zero_grad()
        x = take(x_global).clone().requires_grad_()
        out = layer(x)
        out.backward(take(dy_global))
        steps.append(
            dict(out=out.detach(), x_grad=x.grad, weight_grad=layer.weight.grad.clone(),
                 bias_grad=layer.bias.grad.clone(), running_mean=layer.running_mean.clone(),
                 running_var=layer.running_var.clone())
        )  # fmt: skip
    return steps


def _instance_norm_rank(rank, world_size, sizes, data, check=False):
    syncnorm.set_check(check)
    results = {}
    for dims, (state, batches, grads, eval_batch) in data.items():
        layer = SYNC_CLASSES[dims](3, momentum=0.3, affine=True, track_running_stats=True, dtype=torch.float64)
        layer.load_state_dict(state)
        steps = _train_steps(layer, batches, grads, lambda t: shard(t, rank, sizes))
        layer.eval()
        # Ranks run different numbers of eval batches: eval must not communicate (with the
        # guard on it does join the check, so then every rank runs the same ones).
        for _ in range(0 if check else rank):
            layer(shard(eval_batch, rank, sizes))
        results[dims] = dict(steps=steps, eval_out=layer(shard(eval_batch, rank, sizes)))
    return results


def _instance_norm_problem(total, num_steps=3):
    """Per dims: initial state, global batches, output grads, eval batch; and nn.InstanceNorm's results."""
    data, reference = {}, {}
    for dims in (1, 2, 3):
        _, ref = _pair(dims, momentum=0.3, affine=True, track_running_stats=True)
        gen = torch.Generator().manual_seed(100 + dims)
        shape = (total, 3, *SPATIAL[dims])
        batches = [_offset_batch(gen, shape) for _ in range(num_steps)]
        grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(num_steps)]
        eval_batch = _offset_batch(gen, shape)
        data[dims] = ({k: v.clone() for k, v in ref.state_dict().items()}, batches, grads, eval_batch)
        steps = _train_steps(ref, batches, grads)
        reference[dims] = dict(steps=steps, eval_out=ref.eval()(eval_batch).detach())
    return data, reference


def _assert_matches_reference(results, reference):
    for dims, want in reference.items():
        for step, want_step in enumerate(want["steps"]):
            got = [r[dims]["steps"][step] for r in results]
            for key in ("out", "x_grad"):  # each rank's slice of the global result
                torch.testing.assert_close(torch.cat([g[key] for g in got]), want_step[key], **DOUBLE)
            for key in ("weight_grad", "bias_grad"):  # local shares sum to the global gradient
                torch.testing.assert_close(sum(g[key] for g in got), want_step[key], **DOUBLE)
            for key in ("running_mean", "running_var"):
                for g in got:
                    torch.testing.assert_close(g[key], want_step[key], **DOUBLE)
                    assert torch.equal(g[key], got[0][key]), f"{key} differs between ranks (dims={dims})"
        eval_out = torch.cat([r[dims]["eval_out"] for r in results])
        torch.testing.assert_close(eval_out, want["eval_out"], **DOUBLE)


@pytest.mark.parametrize("sizes", [[4], [2, 2], [2, 1, 3], [0, 3]], ids=["W1", "W2", "W3-uneven", "W2-empty-rank"])
def test_instance_norm_across_ranks_matches_torch_on_the_global_batch(sizes):
    data, reference = _instance_norm_problem(sum(sizes))
    results = run_ranks(_instance_norm_rank, len(sizes), sizes, data)
    _assert_matches_reference(results, reference)


def test_instance_norm_with_the_guard_on_matches_torch():
    sizes = [1, 2]
    data, reference = _instance_norm_problem(sum(sizes), num_steps=2)
    _assert_matches_reference(run_ranks(_instance_norm_rank, 2, sizes, data, True), reference)


def _one_rank_in_eval(rank, world_size):
    syncnorm.set_check(True)
    layer = SyncInstanceNorm2d(3, track_running_stats=True)
    layer.train(rank == 0)
    layer(torch.randn(2, 3, 4, 4))
    return "no error"


def test_guard_names_a_rank_left_in_eval_mode():
    results = run_ranks(_one_rank_in_eval, 2, expect_errors=True, timeout=60)
    for result in results:
        assert isinstance(result, RankError) and result.type_name == "SyncNormMismatchError", result
        assert "running statistics" in result.message and "eval mode" in result.message


def _subgroup_rank(rank, world_size, x_global):
    layer = SyncInstanceNorm1d(3, track_running_stats=True, process_group=syncnorm.new_sync_groups(2))
    layer(shard(x_global, rank, [2] * world_size).float())
    return layer.running_mean, layer.running_var


def test_instance_norm_process_group_limits_the_running_stats_average():
    x_global = _offset_batch(torch.Generator().manual_seed(5), (8, 3, 5))
    results = run_ranks(_subgroup_rank, 4, x_global)
    for block in range(2):  # ranks {0, 1} and {2, 3}: each pair averages over its own 4 instances
        ref = nn.InstanceNorm1d(3, track_running_stats=True, dtype=torch.float64)
        ref(x_global[4 * block : 4 * block + 4])
        for rank in (2 * block, 2 * block + 1):
            torch.testing.assert_close(results[rank][0], ref.running_mean.float(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(results[rank][1], ref.running_var.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_variants_on_cuda_match_the_cpu_reference():
    for dims in (1, 2, 3):
        sync, ref = _pair(dims, affine=True, track_running_stats=True, momentum=0.3)
        sync.cuda()
        x = _offset_batch(torch.Generator().manual_seed(dims), (3, 3, *SPATIAL[dims]))
        out = sync(x.cuda().requires_grad_())
        torch.testing.assert_close(out.cpu(), ref(x), **DOUBLE)
        torch.testing.assert_close(sync.running_var.cpu(), ref.running_var, **DOUBLE)
    layer = LayerNorm2d(6).cuda()
    x = _offset_batch(torch.Generator().manual_seed(6), (2, 6, 5, 7))
    want, _, _ = _reference_layer_norm2d(x, torch.ones(6, dtype=x.dtype), torch.zeros(6, dtype=x.dtype), layer.eps)
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = layer(x.float().cuda().contiguous(memory_format=fmt))
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# get_norm and conversion


@pytest.mark.parametrize(
    "name, cls",
    [("bn", nn.BatchNorm2d), ("syncbn", syncnorm.SyncBatchNorm), ("ln2d", LayerNorm2d), ("in", nn.InstanceNorm2d),
     ("syncin", SyncInstanceNorm2d), ("gn", nn.GroupNorm), ("", nn.Identity), (None, nn.Identity)],
)  # fmt: skip
def test_get_norm_builds_each_layer(name, cls):
    layer = get_norm(name, 64)
    assert type(layer) is cls
    x = torch.randn(2, 64, 3, 3)
    if cls is not nn.Identity:
        channel_count = getattr(layer, "num_features", None) or getattr(layer, "num_channels", None)
        assert channel_count == 64
    assert layer(x).shape == x.shape


def test_get_norm_forwards_kwargs_and_picks_group_counts():
    assert get_norm("gn", 64).num_groups == 32
    for channels, groups in ((48, 16), (3, 1), (100, 4), (96, 32)):  # gcd(32, C): always divides C
        assert get_norm("gn", channels).num_groups == groups
    assert get_norm("gn", 64, num_groups=4, eps=1e-3).num_groups == 4
    assert get_norm("ln2d", 8, eps=1e-3, affine=False).eps == 1e-3
    layer = get_norm("syncin", 8, affine=True, track_running_stats=True)
    assert layer.affine and layer.track_running_stats
    assert get_norm("BN", 8).momentum == 0.1


def test_get_norm_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError) as info:
        get_norm("batchnorm", 8)
    for name in ("'bn'", "'syncbn'", "'ln2d'", "'in'", "'syncin'", "'gn'", "'' / None"):
        assert name in str(info.value)


def test_convert_sync_batchnorm_leaves_the_variants_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.InstanceNorm2d(8), SyncInstanceNorm2d(8),
        LayerNorm2d(8), nn.GroupNorm(2, 8),
    )  # fmt: skip
    untouched = list(model)[2:]
    syncnorm.convert_sync_batchnorm(model)
    assert type(model[1]) is syncnorm.SyncBatchNorm
    assert all(a is b for a, b in zip(list(model)[2:], untouched))
    syncnorm.revert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d
    assert all(a is b for a, b in zip(list(model)[2:], untouched))
