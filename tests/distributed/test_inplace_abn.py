"""InPlaceABN against single-process float64 nn.BatchNorm2d + activation on the global batch.

Each multi-rank test builds a global batch here, runs InPlaceABN on W real gloo ranks (each
with its slice) and compares what every rank saw with nn.BatchNorm2d followed by the
activation applied to the whole batch in float64, with the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo  # noqa: F401  (DDP imports it lazily: seconds in every forked rank otherwise)
import torch.distributed as dist
import torch.nn.functional as F
from helpers.harness import recorded_all_reduces, run_ranks, sgd_on_shards, shard
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import syncnorm
from syncnorm.functional import inplace_abn
from syncnorm.inplace_abn import InPlaceABN, InPlaceABNSync

TIGHT = dict(rtol=1e-10, atol=1e-10)
ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("leaky_relu", 0.3), ("elu", 0.5)]
GAMMA = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)  # a negative one too: it must stay negative
BETA = torch.tensor([0.1, -0.5, 0.3], dtype=torch.float64)


def activation_fn(activation: str, param: float):
    return {
        "leaky_relu": lambda t: F.leaky_relu(t, param),
        "elu": lambda t: F.elu(t, param),
        "identity": lambda t: t,
    }[activation]


def make_reference(channels: int, gamma=GAMMA, beta=BETA, cls=nn.BatchNorm2d, **bn_kwargs) -> nn.BatchNorm2d:
    ref = cls(channels, dtype=torch.float64, **bn_kwargs)
    with torch.no_grad():
        ref.weight.copy_(gamma)
        ref.bias.copy_(beta)
    return ref


def run_steps(forward, params, buffers_of, batches, grads, through_op: bool):
    """Forward/backward each batch; ``through_op`` feeds a non-leaf (x * 1), which in-place may overwrite."""
    steps = []
    for x, dy in zip(batches, grads):
        x = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        h = x * 1.0 if through_op else x
        y = forward(h)
        wrote_over_input = y.data_ptr() == h.data_ptr() and h.numel() > 0
        out = y.detach().clone()
        y.backward(dy)
        steps.append(
            dict(out=out, dx=x.grad, dw=params[0].grad.clone(), db=params[1].grad.clone(), buffers=buffers_of())
        )
        steps[-1]["in_place"] = wrote_over_input
    return steps


def reference_steps(batches, grads, activation, param, **bn_kwargs):
    cls = nn.BatchNorm2d if batches[0].dim() == 4 else nn.BatchNorm1d
    ref = make_reference(batches[0].shape[1], cls=cls, **bn_kwargs)
    act = activation_fn(activation, param)
    steps = run_steps(
        lambda h: act(ref(h)), [ref.weight, ref.bias], lambda: [b.clone() for b in ref.buffers()], batches, grads, True
    )
    ref.eval()
    return steps, ref


def _abn_rank(rank, world, batches, grads, sizes, configs, bn_kwargs):
    results = {}
    for activation, param, inplace in configs:
        layer = InPlaceABN(3, activation=activation, activation_param=param, inplace=inplace, dtype=torch.float64,
                           **bn_kwargs)  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(GAMMA)
            layer.bias.copy_(BETA)
        steps = run_steps(
            layer, [layer.weight, layer.bias], lambda layer=layer: [b.clone() for b in layer.buffers()],
            [shard(x, rank, sizes) for x in batches], [shard(dy, rank, sizes) for dy in grads], True,
        )  # fmt: skip
        layer.eval()
        x = shard(batches[-1], rank, sizes).clone().requires_grad_()
        eval_out = layer(x * 1.0)
        eval_out.backward(shard(grads[-1], rank, sizes))
        results[activation, param, inplace] = steps, eval_out.detach(), x.grad
    return results


def check_against_reference(sizes, configs, bn_kwargs=None, steps=2, shape=(3, 4, 3)):
    bn_kwargs = bn_kwargs or {}
    gen = torch.Generator().manual_seed(len(sizes) * 10 + sum(sizes))
    batches = [torch.randn(sum(sizes), *shape, generator=gen, dtype=torch.float64) * 2 + 0.5 for _ in range(steps)]
    grads = [torch.randn(sum(sizes), *shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    results = run_ranks(_abn_rank, len(sizes), batches, grads, sizes, configs, bn_kwargs)
    for activation, param, inplace in configs:
        expected, ref = reference_steps(batches, grads, activation, param, **bn_kwargs)
        x = batches[-1].clone().requires_grad_()
        eval_want = activation_fn(activation, param)(ref(x))
        eval_want.backward(grads[-1])
        for rank, result in enumerate(results):
            rank_steps, eval_out, eval_dx = result[activation, param, inplace]
            for step, (got, want) in enumerate(zip(rank_steps, expected)):
                where = f"{activation}({param}) inplace={inplace} rank {rank} step {step}"
                assert got["in_place"] == (inplace and sizes[rank] > 0), where
                torch.testing.assert_close(got["out"], shard(want["out"], rank, sizes), **TIGHT, msg=where)
                torch.testing.assert_close(got["dx"], shard(want["dx"], rank, sizes), **TIGHT, msg=where)
                for got_buf, want_buf in zip(got["buffers"], want["buffers"]):
                    torch.testing.assert_close(got_buf, want_buf, **TIGHT, msg=f"{where} buffers")
            if bn_kwargs.get("track_running_stats", True):
                torch.testing.assert_close(eval_out, shard(eval_want.detach(), rank, sizes), **TIGHT)
                torch.testing.assert_close(eval_dx, shard(x.grad, rank, sizes), **TIGHT)
            else:  # no running statistics: eval normalises each rank's own batch, as nn.BatchNorm would
                local = shard(batches[-1], rank, sizes).clone().requires_grad_()
                want = activation_fn(activation, param)(ref(local))
                want.backward(shard(grads[-1], rank, sizes))
                torch.testing.assert_close(eval_out, want.detach(), **TIGHT)
                torch.testing.assert_close(eval_dx, local.grad, **TIGHT)
        for step, want in enumerate(expected):
            for key in ("dw", "db"):  # each rank holds its share; DDP sums (and averages) them
                summed = sum(result[activation, param, inplace][0][step][key] for result in results)
                torch.testing.assert_close(summed, want[key], **TIGHT, msg=f"{activation} step {step} {key}")


ALL_CONFIGS = [(a, p, inplace) for a, p in ACTIVATIONS for inplace in (False, True)]


@pytest.mark.parametrize(
    "sizes,configs",
    [([5], ALL_CONFIGS), ([3, 5], ALL_CONFIGS), ([2, 4, 3], ALL_CONFIGS[:6]), ([0, 4, 3], ALL_CONFIGS[:4])],
    ids=["W1", "W2", "W3-uneven", "W3-empty-rank"],
)
def test_matches_global_batchnorm_plus_activation(sizes, configs):
    check_against_reference(sizes, configs)


def test_options_cumulative_momentum_no_running_stats_and_2d_input():
    check_against_reference([3, 2], [("leaky_relu", 0.01, True)], dict(momentum=None), steps=3)
    check_against_reference([3, 2], [("elu", 1.0, False)], dict(eps=1e-2, momentum=0.3))
    check_against_reference([3, 2], [("leaky_relu", 0.1, True)], dict(track_running_stats=False))
    check_against_reference([4, 3], [("leaky_relu", 0.01, False), ("elu", 1.0, True)], shape=(3,))


def test_outside_torch_distributed_it_is_local_batchnorm_plus_activation():
    assert not dist.is_initialized()
    for activation, param in ACTIVATIONS:
        expected, _ = reference_steps(*_batches((4, 3, 5, 5)), activation, param)
        layer = InPlaceABN(3, activation=activation, activation_param=param, inplace=True, dtype=torch.float64)
        layer.load_state_dict(make_reference(3).state_dict())
        got = run_steps(
            layer, [layer.weight, layer.bias], lambda layer=layer: list(layer.buffers()), *_batches((4, 3, 5, 5)), True
        )
        for g, w in zip(got, expected):
            assert g["in_place"]
            for key in ("out", "dx", "dw", "db"):
                torch.testing.assert_close(g[key], w[key], **TIGHT, msg=f"{activation} {key}")


def _batches(shape, steps=2, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 - 1 for _ in range(steps)],
        [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)],
    )


# --- tiny gamma -----------------------------------------------------------------------------------


def test_tiny_gamma_is_floored_at_eps_keeping_its_sign_and_still_trains():
    eps = 1e-5
    gamma = torch.tensor([0.0, 3e-7, -4e-6, 0.8, -0.9], dtype=torch.float64)
    floored = torch.tensor([eps, eps, -eps, 0.8, -0.9], dtype=torch.float64)
    beta = torch.tensor([0.2, -0.3, 0.1, 0.0, 0.5], dtype=torch.float64)
    x, dy = (t[0] for t in _batches((6, 5, 4, 4)))
    for activation, param in ACTIVATIONS[:3]:
        act = activation_fn(activation, param)
        layer = InPlaceABN(5, eps=eps, activation=activation, activation_param=param, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(gamma)
            layer.bias.copy_(beta)
        xs = x.clone().requires_grad_()
        out = layer(xs)
        out.backward(dy)
        # The rule: exactly BatchNorm + activation with gamma' = sign(gamma) max(|gamma|, eps), and
        # gamma's gradient is the gradient with respect to gamma'.
        ref = make_reference(5, floored, beta, eps=eps)
        xr = x.clone().requires_grad_()
        want = act(ref(xr))
        want.backward(dy)
        for got_t, want_t in ((out, want), (xs.grad, xr.grad), (layer.weight.grad, ref.weight.grad)):
            torch.testing.assert_close(got_t, want_t, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **TIGHT)
        # Channels with |gamma| >= eps are plain BatchNorm with the given gamma.
        plain = act(make_reference(5, gamma, beta, eps=eps)(x))
        torch.testing.assert_close(out[:, 3:], plain[:, 3:], **TIGHT)
        assert (out[:, 0] - plain[:, 0]).abs().max() <= eps * 4  # |x_hat| < 4 here
        # The zero gamma gets BatchNorm's gradient, so it trains away from zero (not a dead channel).
        assert layer.weight.grad[0].abs() > 1e-3


# --- refusals and the in-place rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    "activation,param,match",
    [
        ("relu", 0.0, "not invertible.*leaky_relu.*0.01"),
        ("leaky_relu", 0.0, "not invertible"),
        ("leaky_relu", -0.1, "not invertible"),
        ("elu", 0.0, "alpha"),
        ("gelu", 0.0, "choose one of"),
    ],
)
def test_non_invertible_activations_are_refused(activation, param, match):
    with pytest.raises(ValueError, match=match):
        InPlaceABN(4, activation=activation, activation_param=param)
    with pytest.raises(ValueError, match=match):
        inplace_abn(torch.randn(4, 4), None, None, training=True, activation=activation, activation_param=param)


def test_bad_input_is_a_clear_value_error():
    layer = InPlaceABN(3)
    with pytest.raises(ValueError, match=r"InPlaceABN#\d+' was built for 3 channels but got input with 5"):
        layer(torch.randn(4, 5, 2))
    with pytest.raises(ValueError, match="at least 2"):
        layer(torch.randn(1, 3))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(3))


def test_in_place_only_on_an_intermediate_result_that_is_not_a_view():
    layer = InPlaceABN(3, inplace=True)
    leaf = torch.randn(4, 3, 2, 2, requires_grad=True)
    data = torch.randn(4, 3, 2, 2)
    for given, in_place in ((leaf, False), (data, False), (leaf * 2, True), ((leaf * 2)[:, :3], False)):
        before = given.detach().clone()
        out = layer(given)
        assert (out.data_ptr() == given.data_ptr()) == in_place
        if not in_place:
            assert torch.equal(given.detach(), before)  # the user's tensor is untouched
    channels_last = (leaf * 2).contiguous(memory_format=torch.channels_last)
    out = layer(channels_last)
    assert out.data_ptr() == channels_last.data_ptr() and out.is_contiguous(memory_format=torch.channels_last)
    # An input that another op saved for its backward: autograd refuses at backward, nothing silent.
    saved_by_sigmoid = torch.sigmoid(leaf)
    out = layer(saved_by_sigmoid)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _saved_storages(fn, input):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = fn(input)
    return storages, output


@pytest.mark.parametrize("inplace", [False, True])
def test_only_the_output_is_saved_not_the_input(inplace):
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    layer = InPlaceABN(8, inplace=inplace)
    conv_out = x * 1.0
    input_bytes = conv_out.untyped_storage().nbytes()
    storages, output = _saved_storages(layer, conv_out)
    if not inplace:
        assert conv_out.untyped_storage().data_ptr() not in storages
    assert output.untyped_storage().data_ptr() in storages
    # The output plus O(C) statistics and parameters, nothing else.
    assert sum(storages.values()) - output.untyped_storage().nbytes() <= 64 * 8
    # Control: BatchNorm + in-place LeakyReLU saves both the input and the output.
    storages, _ = _saved_storages(nn.Sequential(nn.BatchNorm2d(8), nn.LeakyReLU(inplace=True)), x * 1.0)
    assert sum(storages.values()) >= 2 * input_bytes


# --- collectives, precision, state ----------------------------------------------------------------


def _collectives_and_state(rank, world, x):
    group = dist.new_group([0, 1])
    with recorded_all_reduces() as calls:
        layer = InPlaceABNSync(x.shape[1], process_group=group)
        out = layer(x.clone().requires_grad_())
        forward = list(calls)
        out.sum().backward()
        backward = calls[len(forward) :]
        layer.eval()
        before = len(calls)
        for _ in range(rank + 1):  # ranks run different numbers of eval batches
            layer(x)
        eval_calls = len(calls) - before
    shares_group = copy.deepcopy(layer).process_group is group
    # A wrong channel count: a clear error before any collective.
    with recorded_all_reduces() as calls_before_error:
        try:
            InPlaceABN(x.shape[1]).train()(x[:, :2])
            error = "no error"
        except ValueError as err:
            error = str(err)
    return forward, backward, eval_calls, shares_group, error, len(calls_before_error)


def test_one_collective_each_way_none_in_eval_and_copies_share_the_group():
    channels = 5
    results = run_ranks(_collectives_and_state, 2, torch.randn(3, channels, 2, 2))
    for forward, backward, eval_calls, shares_group, error, calls_before_error in results:
        assert forward == [(2 * channels + 3, torch.float64)]
        assert backward == [(2 * channels + 2, torch.float64)]
        assert eval_calls == 0 and shares_group
        assert "built for 5 channels but got input with 2" in error and calls_before_error == 0


def _half_rank(rank, world, x, sizes, dtype):
    layer = InPlaceABN(x.shape[1], inplace=True)
    local = shard(x, rank, sizes).to(dtype).requires_grad_()
    out = layer(local * 1)
    out.float().backward(torch.ones_like(out, dtype=torch.float32))
    return out.detach(), local.grad, layer.running_mean, layer.running_var, layer.weight.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_float32_statistics(dtype):
    sizes = [3, 5]
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2 + 1
    ref = nn.BatchNorm2d(4, dtype=torch.float64)
    xr = x.to(dtype).double().requires_grad_()
    out_ref = F.leaky_relu(ref(xr), 0.01)
    out_ref.backward(torch.ones_like(out_ref))
    results = run_ranks(_half_rank, 2, x, sizes, dtype)
    tol = dict(rtol=0.02, atol=0.03) if dtype == torch.float16 else dict(rtol=0.05, atol=0.08)
    for rank, (out, grad, mean, var, _) in enumerate(results):
        assert out.dtype == dtype and grad.dtype == dtype and mean.dtype == var.dtype == torch.float32
        torch.testing.assert_close(out.double(), shard(out_ref.detach(), rank, sizes), **tol)
        torch.testing.assert_close(grad.double(), shard(xr.grad, rank, sizes), **tol)
        torch.testing.assert_close(mean.double(), ref.running_mean, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(var.double(), ref.running_var, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(sum(r[4] for r in results).double(), ref.weight.grad, rtol=0.02, atol=0.05)


def test_state_dict_is_batchnorm2d_and_convert_leaves_it_alone():
    bn = make_reference(3)
    bn.running_mean.uniform_()
    abn = InPlaceABN(3, dtype=torch.float64)
    abn.load_state_dict(bn.state_dict())
    assert abn.state_dict().keys() == bn.state_dict().keys()
    nn.BatchNorm2d(3, dtype=torch.float64).load_state_dict(abn.state_dict())
    model = nn.Sequential(nn.Conv2d(3, 3, 1), abn, nn.BatchNorm2d(3))
    syncnorm.convert_sync_batchnorm(model)
    assert model[1] is abn and isinstance(model[2], syncnorm.SyncBatchNorm)
    syncnorm.revert_sync_batchnorm(model)
    assert model[1] is abn and type(model[2]) is nn.BatchNorm2d
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(abn.eval()(x), F.leaky_relu(bn.eval()(x), 0.01), **TIGHT)


# --- gradcheck across ranks -----------------------------------------------------------------------


def _gradcheck_turn(rank, world, inputs, probes, checking_rank, activation, param):
    """gradcheck on one rank while the others run the same calls with pinned inputs (see test_core)."""
    x_fixed, weight, bias = inputs[rank]
    checking = rank == checking_rank

    def global_objective(x, w, b):
        if not checking:
            x, w, b = x_fixed + 0 * x, weight + 0 * w, bias + 0 * b
        out = inplace_abn(x * 1.0, None, None, w, b, True, activation=activation, activation_param=param,
                          inplace=True)  # fmt: skip
        local = (out * probes[rank]).sum()
        total = local.detach().clone()
        dist.all_reduce(total)
        return local + (total - local.detach()) if checking else local - local.detach()

    args = tuple(t.clone().requires_grad_() for t in (x_fixed, weight, bias))
    return torch.autograd.gradcheck(global_objective, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.1), ("elu", 1.0)])
def test_gradcheck_across_ranks(activation, param):
    gen = torch.Generator().manual_seed(11)
    weight = torch.tensor([0.9, -1.4], dtype=torch.float64)
    bias = torch.randn(2, generator=gen, dtype=torch.float64)
    inputs = [(torch.randn(3, 2, 2, generator=gen, dtype=torch.float64) * (r + 1), weight, bias) for r in range(2)]
    probes = [torch.randn(3, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2)]
    for checking_rank in range(2):
        results = run_ranks(_gradcheck_turn, 2, inputs, probes, checking_rank, activation, param, timeout=180)
        assert results == [True, True]


# --- DDP and torch.compile ------------------------------------------------------------------------


def small_net(abn: bool) -> nn.Module:
    torch.manual_seed(0)

    def norm(channels):
        if abn:
            return InPlaceABN(channels, inplace=True)
        return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True))

    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), norm(6), nn.Conv2d(6, 6, 3, padding=1), norm(6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).double()  # fmt: skip


def _ddp_rank(rank, world, batches):
    model = small_net(abn=True)
    sgd_on_shards(DistributedDataParallel(model), batches, rank, world)
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def test_ddp_training_equals_one_process_with_batchnorm_and_leaky_relu():
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(8, 3, 5, 5, generator=gen, dtype=torch.float64) * 2, torch.randn(8, 3, generator=gen))
        for _ in range(3)
    ]
    batches = [(x, y.double()) for x, y in batches]
    reference = small_net(abn=False)
    sgd_on_shards(reference, batches)
    expected = [t.detach() for t in (*reference.parameters(), *reference.buffers())]
    for rank, state in enumerate(run_ranks(_ddp_rank, 2, batches, timeout=90)):
        assert len(state) == len(expected)
        for index, (got, want) in enumerate(zip(state, expected)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"rank {rank} tensor {index}")


def _compiled_rank(rank, world, inputs):
    torch._dynamo.reset()
    eager = small_net(abn=True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(inputs[rank])
    xs = [inputs[rank].clone().requires_grad_() for _ in range(2)]
    outs = [eager(xs[0]), compiled(xs[1])]
    for out in outs:
        out.square().sum().backward()
    pairs = [(outs[0].detach(), outs[1].detach()), (xs[0].grad, xs[1].grad)]
    pairs += [(a.grad, b.grad) for a, b in zip(eager.parameters(), compiled_model.parameters())]
    pairs += list(zip(eager.buffers(), compiled_model.buffers()))
    eager.eval()
    compiled.eval()
    pairs.append((eager(inputs[rank]).detach(), compiled(inputs[rank]).detach()))
    return explained.graph_break_count, pairs


@pytest.mark.compile
def test_fullgraph_compile_equals_eager_on_two_ranks():
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2 + rank, 3, 5, 5, generator=gen, dtype=torch.float64) for rank in range(2)]
    for breaks, pairs in run_ranks(_compiled_rank, 2, inputs, timeout=280):
        assert breaks == 0
        for eager_t, compiled_t in pairs:
            torch.testing.assert_close(compiled_t, eager_t, rtol=1e-9, atol=1e-10)


def _guarded_rank(rank, world, x, eval_on_rank_one):
    layer = InPlaceABN(x.shape[1], inplace=True, dtype=torch.float64)
    layer.check = True
    if eval_on_rank_one and rank == 1:
        layer.eval()
    try:
        leaf = x.clone().requires_grad_()
        out = layer(leaf * 1.0)
        out.backward(torch.ones_like(out))
        layer.eval()
        return out.detach(), leaf.grad, layer(x)
    except syncnorm.SyncNormMismatchError as err:
        return str(err)


def test_consistency_guard_passes_agreeing_ranks_and_names_a_rank_left_in_eval():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    ref = make_reference(3, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    xr = torch.cat([x, x]).requires_grad_()
    want = F.leaky_relu(ref(xr), 0.01)
    want.backward(torch.ones_like(want))
    for out, grad, _ in run_ranks(_guarded_rank, 2, x, False):
        torch.testing.assert_close(out, want[:4].detach(), **TIGHT)
        torch.testing.assert_close(grad, xr.grad[:4], **TIGHT)
    for message in run_ranks(_guarded_rank, 2, x, True, timeout=60):
        assert "ranks disagree" in message and "InPlaceABN#" in message and "eval mode" in message


@pytest.mark.parametrize("inplace", [False, True])
def test_activation_checkpointing_gives_the_same_gradients_and_updates_running_stats_once(inplace):
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 1
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), InPlaceABN(4, inplace=inplace)).double()
        leaf = x.clone().requires_grad_()
        out = checkpoint(block, leaf, use_reentrant=False) if checkpointed else block(leaf)
        out.square().sum().backward()
        results.append([leaf.grad, *(p.grad for p in block.parameters()), *block[1].buffers()])
    assert int(results[1][-1]) == 1
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain, **TIGHT)


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
@pytest.mark.parametrize("batch", [3, 0], ids=["batch3", "empty"])
def test_backward_op_gives_the_strides_its_fake_kernel_promises(activation, batch):
    # Compiled code holds the op to its fake kernel's empty_like(output); a channels_last output
    # meeting a contiguous grad must not hand back the grad's layout.
    output = torch.randn(batch, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(batch, 4, 3, 5)
    stats = torch.zeros(4), torch.ones(4), torch.full((1,), max(batch, 1) * 15.0, dtype=torch.float64)
    param = 1.0 if activation == "elu" else 0.01
    grad_input, _, _ = torch.ops.syncnorm.inplace_abn_backward(
        grad, output, torch.ones(4), torch.zeros(4), *stats, 1e-5, activation, param, "", "probe", False, True, True
    )
    assert grad_input.shape == output.shape
    assert grad_input.stride() == torch.empty_like(output).stride()
