"""syncnorm.precise_bn against an independent float64 computation of the population statistics.

The reference walks the test net by hand (its convs and linears, then each BatchNorm's input
normalised with its own batch's mean and biased variance, written out here, not taken from a
BatchNorm layer), records every BatchNorm input, and takes the mean and unbiased variance per
channel of all of them together. It never calls precise_bn. The ranks are real gloo processes.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.harness import run_ranks
from torch import nn

import syncnorm
from syncnorm import collectives
from syncnorm.precise import PreciseBNWarning, precise_bn

TIGHT = dict(rtol=1e-10, atol=1e-12)
LAYERS = ("bn1", "bn2", "bn3")


class BNAct(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (like timm's BatchNormAct2d): normalise, then ReLU."""

    def forward(self, x):
        return F.relu(super().forward(x))


class SyncBNAct(syncnorm.SyncBatchNorm):
    def forward(self, x):
        return F.relu(super().forward(x))


class Net(nn.Module):
    """conv -> BN2d -> ReLU -> conv -> BNAct (momentum=None) -> linear -> BN1d (no affine) -> linear.

    ``side`` is a BatchNorm that no batch reaches.
    """

    def __init__(self, sync: bool = False) -> None:
        super().__init__()
        bn = syncnorm.SyncBatchNorm if sync else None
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = bn(4) if sync else nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.bn2 = SyncBNAct(3, momentum=None) if sync else BNAct(3, momentum=None)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.bn3 = bn(5, affine=False) if sync else nn.BatchNorm1d(5, affine=False)
        self.head = nn.Linear(5, 2)
        self.side = bn(6) if sync else nn.BatchNorm1d(6)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.head(self.bn3(self.fc(x.flatten(1))))


def initial_state() -> dict:
    torch.manual_seed(0)
    net = Net().double()
    gen = torch.Generator().manual_seed(1)
    for name in (*LAYERS, "side"):  # running statistics far from the population ones
        layer = getattr(net, name)
        layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(layer.num_features, generator=gen, dtype=torch.float64) + 0.5)
        layer.num_batches_tracked.fill_(7)
    return net.state_dict()


def make_net(sync: bool, state: dict) -> Net:
    net = Net(sync).double()
    net.load_state_dict(state)
    return net


def make_batches(sizes_per_rank: list[list[int]], seed: int = 3) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(n, 2, 4, 4, generator=gen, dtype=torch.float64) * (1.5 + rank) + 2.0 * rank for n in sizes]
        for rank, sizes in enumerate(sizes_per_rank)
    ]


# ---------------------------------------------------------------------------------------------
# the independent reference


def _normalise(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if x.numel() == 0:
        return x
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + layer.eps)
    if layer.affine:
        y = y * layer.weight.detach().view(shape) + layer.bias.detach().view(shape)
    return y


def reference_stats(state: dict, steps: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Population mean and unbiased variance of each BatchNorm's input; each step normalised on its own."""
    net = make_net(False, state)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}

    def norm(name: str, x: torch.Tensor) -> torch.Tensor:
        seen[name].append(x.transpose(0, 1).reshape(x.shape[1], -1))
        return _normalise(x, getattr(net, name))

    with torch.no_grad():
        for x in steps:
            x = F.relu(norm("bn1", net.conv1(x)))
            x = F.relu(norm("bn2", net.conv2(x)))
            norm("bn3", net.fc(x.flatten(1)))
    out = {}
    for name, chunks in seen.items():
        values = torch.cat(chunks, 1)
        out[name] = (values.mean(1), values.var(1, correction=1))
    return out


def lockstep_steps(batches: list[list[torch.Tensor]], num_batches: int) -> list[torch.Tensor]:
    """Synchronised layers: step t normalises the ranks' t-th batches together, for the shortest rank's count."""
    count = min(num_batches, *(len(b) for b in batches))
    return [torch.cat([rank_batches[t] for rank_batches in batches]) for t in range(count)]


def local_steps(batches: list[list[torch.Tensor]], num_batches: int) -> list[torch.Tensor]:
    """Plain layers: every rank's first num_batches batches, each normalised on its own."""
    return [b for rank_batches in batches for b in rank_batches[:num_batches]]


# ---------------------------------------------------------------------------------------------
# the ranks


class CollectiveCounter:
    """Counts torch.distributed collectives and syncnorm's all_reduces by purpose (calls pass through)."""

    # all_reduce is counted at the ProcessGroup, which every all_reduce reaches (syncnorm's direct calls too).
    NAMES = ("broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "barrier")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.purposes: list[str] = []
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            real = getattr(dist, name)
            self._saved[name] = real
            setattr(dist, name, self._wrap(name, real))
        real_reduce = collectives.all_reduce
        self._saved["collectives"] = real_reduce

        def counted(tensor, group, *, what, **kwargs):
            self.purposes.append(what)
            return real_reduce(tensor, group, what=what, **kwargs)

        collectives.all_reduce = counted
        real_allreduce = dist.ProcessGroup.allreduce
        self._saved["ProcessGroup.allreduce"] = dist.ProcessGroup.__dict__["allreduce"]  # the bound descriptor

        def counted_allreduce(group, *args, **kwargs):
            self.calls.append("all_reduce")
            return real_allreduce(group, *args, **kwargs)

        dist.ProcessGroup.allreduce = counted_allreduce
        return self

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        collectives.all_reduce = self._saved.pop("collectives")
        dist.ProcessGroup.allreduce = self._saved.pop("ProcessGroup.allreduce")
        for name, real in self._saved.items():
            setattr(dist, name, real)


def _stats_of(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def _precise_on_rank(rank, world, batches, state, sync, num_batches, kwargs):
    net = make_net(sync, state).train()
    with warnings.catch_warnings(record=True) as caught, CollectiveCounter() as counter:
        warnings.simplefilter("always")
        result = precise_bn(net, batches[rank], num_batches, progress=False, **kwargs)
    return {
        "stats": _stats_of(net),
        "result": result,
        "warnings": [(w.category.__name__, str(w.message)) for w in caught],
        "calls": counter.calls,
        "purposes": counter.purposes,
    }


def _assert_matches(got: dict, want: dict, tol=TIGHT) -> None:
    for name in LAYERS:
        torch.testing.assert_close(got[f"{name}.running_mean"], want[name][0], **tol, msg=f"{name} mean")
        torch.testing.assert_close(got[f"{name}.running_var"], want[name][1], **tol, msg=f"{name} var")


def _assert_bitwise_equal_across_ranks(results: list[dict]) -> None:
    for rank, r in enumerate(results[1:], 1):
        for key, value in results[0]["stats"].items():
            assert torch.equal(r["stats"][key], value), f"rank {rank} {key} differs from rank 0"


def _assert_untouched_besides_stats(results: list[dict], state: dict) -> None:
    for r in results:
        for key in ("side.running_mean", "side.running_var"):  # reached by no batch: kept
            assert torch.equal(r["stats"][key], state[key])
        for name in (*LAYERS, "side"):
            assert int(r["stats"][f"{name}.num_batches_tracked"]) == 7
        assert any(c == "PreciseBNWarning" and "'side'" in m for c, m in r["warnings"])


UNEVEN = {
    1: [[4, 0, 3, 5]],
    2: [[4, 0, 3, 5], [2, 6]],
    3: [[4, 0, 3, 5], [2, 6], [3, 3, 2, 2, 4]],
}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plain_batchnorm_uneven_counts_and_sizes_match_float64_reference(world):
    batches, state, num_batches = make_batches(UNEVEN[world]), initial_state(), 4
    results = run_ranks(_precise_on_rank, world, batches, state, False, num_batches, {})
    _assert_matches(results[0]["stats"], reference_stats(state, local_steps(batches, num_batches)))
    _assert_bitwise_equal_across_ranks(results)
    _assert_untouched_besides_stats(results, state)
    # Nothing communicates before the end: one all_reduce for the whole model (none on one rank).
    for r in results:
        assert r["calls"] == (["all_reduce"] if world > 1 else []), r["calls"]
    expected_batches = sum(min(num_batches, len(b)) for b in batches)
    assert [r["result"].batches for r in results] == [expected_batches] * world
    assert [r["result"].local_batches for r in results] == [min(num_batches, len(b)) for b in batches]


@pytest.mark.parametrize("world", [2, 3])
def test_syncnorm_layers_run_in_lockstep_and_match_float64_reference(world):
    batches, state, num_batches = make_batches(UNEVEN[world]), initial_state(), 4
    results = run_ranks(_precise_on_rank, world, batches, state, True, num_batches, {})
    steps = lockstep_steps(batches, num_batches)
    assert len(steps) == 2  # rank 1 has two batches; rank 0's second batch is empty
    _assert_matches(results[0]["stats"], reference_stats(state, steps))
    _assert_bitwise_equal_across_ranks(results)
    _assert_untouched_besides_stats(results, state)
    # Rank 0 says that the others had more batches than were used.
    assert any("ran out of batches after 2" in m for _, m in results[0]["warnings"]), results[0]["warnings"]
    for r in results:
        # Per step: one all_reduce per synchronised layer (3) and one agreement; a last agreement
        # that stops; then one all_reduce for the whole model.
        assert r["purposes"] == ["batch agreement", *["forward statistics"] * 3] * 2 + [
            "batch agreement",
            "precise-BN statistics",
        ]
        assert r["calls"] == ["all_reduce"] * len(r["purposes"])
        assert r["result"].local_batches == 2


def test_single_process_on_concatenated_batches_equals_distributed_syncnorm_run():
    sizes = [[3, 5, 0], [4, 2, 6], [2, 2, 3]]
    batches, state = make_batches(sizes, seed=5), initial_state()
    distributed = run_ranks(_precise_on_rank, 3, batches, state, True, 3, {})
    single = make_net(False, state).train()
    concatenated = [torch.cat([b[t] for b in batches]) for t in range(3)]
    with pytest.warns(PreciseBNWarning, match="'side'"):
        precise_bn(single, concatenated, 3, progress=False)
    for key, value in _stats_of(single).items():
        torch.testing.assert_close(distributed[0]["stats"][key], value, **TIGHT, msg=key)
    _assert_bitwise_equal_across_ranks(distributed)


def _large_mean_on_rank(rank, world, data, dims):
    dtype = data[rank][0].dtype
    layer = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(3, dtype=dtype)
    precise_bn(nn.Sequential(layer), data[rank], 10, progress=False)
    return layer.running_mean.clone(), layer.running_var.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [2, 4])
def test_mean_ten_thousand_times_the_std_stays_right(dims, dtype):
    gen = torch.Generator().manual_seed(9)
    shape = (3,) if dims == 2 else (3, 5, 5)
    data = [
        [(torch.randn(n, *shape, generator=gen, dtype=torch.float64) + 1e4 + 0.5 * rank).to(dtype) for n in sizes]
        for rank, sizes in enumerate([[7, 3], [5, 9, 2]])
    ]
    results = run_ranks(_large_mean_on_rank, 2, data, dims)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    values = torch.cat([b.double().transpose(0, 1).reshape(3, -1) for rank in data for b in rank], 1)
    mean, var = values.mean(1), values.var(1)
    assert ((var.sqrt() / mean) < 2e-4).all()  # the test's premise: mean/std about 1e4
    # float32 buffers round to 6e-8; the float64 sums lose about 1e-16 * (mean/std)^2 = 1e-8.
    tol = 1e-7 if dtype == torch.float64 else 3e-7
    torch.testing.assert_close(results[0][0].double(), mean, rtol=1e-12 if dtype == torch.float64 else 1e-7, atol=0)
    torch.testing.assert_close(results[0][1].double(), var, rtol=tol, atol=0)


def _untouched_on_rank(rank, world, batches, state):
    net = make_net(True, state)
    net.eval()
    net.conv2.train()  # a mixed mode that must come back as it was
    net.bn3.momentum = 0.3
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)
    net.conv1.bias.requires_grad_(False)
    net.register_buffer("other", torch.arange(3.0))
    params = {k: v.clone() for k, v in net.named_parameters()}
    modes = {k: m.training for k, m in net.named_modules()}
    classes = {k: type(m) for k, m in net.named_modules()}
    result = precise_bn(net, batches[rank], 4, progress=False)
    return dict(
        params_same=all(torch.equal(v, params[k]) for k, v in net.named_parameters()),
        grads_same=all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in net.parameters()),
        requires_grad=net.conv1.bias.requires_grad,
        modes_same={k: m.training for k, m in net.named_modules()} == modes,
        classes_same={k: type(m) for k, m in net.named_modules()} == classes,
        momenta=(net.bn1.momentum, net.bn2.momentum, net.bn3.momentum),
        other=net.other.clone(),
        stats=_stats_of(net),
        result=result,
    )


def test_touches_nothing_but_the_running_statistics():
    batches, state = make_batches([[4, 3], [5, 2]]), initial_state()
    results = run_ranks(_untouched_on_rank, 2, batches, state)
    for r in results:
        assert r["params_same"] and r["grads_same"] and r["modes_same"] and r["classes_same"]
        assert r["requires_grad"] is False
        assert r["momenta"] == (0.1, None, 0.3)
        assert torch.equal(r["other"], torch.arange(3.0))
        assert r["result"].unreached == ("side",)
        assert set(r["result"].mean_change) == set(LAYERS) and r["result"].max_mean_change > 0
    _assert_untouched_besides_stats([dict(r, warnings=[("PreciseBNWarning", "'side'")]) for r in results], state)
    # In eval mode too the layers normalised with batch statistics, synchronised (lockstep).
    _assert_matches(results[0]["stats"], reference_stats(state, lockstep_steps(batches, 4)))


class FailingBatches:
    """Batches that raise on the given rank when batch ``at`` is fetched."""

    def __init__(self, batches, fail: bool, at: int) -> None:
        self.batches, self.fail, self.at = batches, fail, at

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if self.fail and i == self.at:
                raise OSError("disk gone")
            yield b


def _failing_on_rank(rank, world, batches, state, sync, where):
    net = make_net(sync, state).train()
    before = _stats_of(net)
    source = FailingBatches(batches[rank], fail=(rank == 1 and where == "load"), at=1)

    def forward(model, batch):
        if rank == 1 and where == "forward" and batch.shape[0] == 2:
            raise RuntimeError("forward broke")
        return model(batch)

    try:
        precise_bn(net, source, 4, forward=forward, progress=False)
    except Exception as err:
        return type(err).__name__, str(err), all(torch.equal(v, before[k]) for k, v in _stats_of(net).items())
    return "no error", "", False


@pytest.mark.parametrize("sync,where", [(True, "load"), (False, "load"), (False, "forward")])
def test_a_failing_rank_fails_every_rank_without_a_hang_and_changes_nothing(sync, where):
    batches, state = make_batches([[4, 3, 3], [5, 2, 3]]), initial_state()
    results = run_ranks(_failing_on_rank, 2, batches, state, sync, where, timeout=60)
    own = ("OSError", "disk gone") if where == "load" else ("RuntimeError", "forward broke")
    assert results[1][:2] == own and results[1][2]
    assert results[0][0] == "RuntimeError" and "rank(s) [1]" in results[0][1] and results[0][2], results[0]


def _group_mismatch_on_rank(rank, world, state):
    singletons = [dist.new_group([0]), dist.new_group([1])]
    net = make_net(True, state).train()
    try:
        precise_bn(net, [torch.randn(3, 2, 4, 4, dtype=torch.float64)], 1, process_group=singletons[rank])
    except ValueError as err:
        return str(err)
    return "no error"


def test_layers_synchronising_outside_the_group_are_refused_before_any_collective():
    results = run_ranks(_group_mismatch_on_rank, 2, initial_state(), timeout=60)
    assert all("layer 'bn1' synchronises with ranks" in r and "not in precise_bn's process_group" in r for r in results)


def _progress_on_rank(rank, world, progress):
    captured = io.StringIO()
    net = nn.Sequential(nn.BatchNorm1d(2))
    with contextlib.redirect_stderr(captured):
        precise_bn(net, [torch.randn(4, 2)] * 3, 3, progress=progress)
    return captured.getvalue()


def test_progress_on_the_first_rank_only_as_lines_when_not_a_terminal_and_off_with_progress_false():
    shown = run_ranks(_progress_on_rank, 2, True)
    assert "precise BN" in shown[0] and shown[1] == ""
    # stderr is not a terminal here: lines, not a bar that redraws itself with carriage returns
    assert "\r" not in shown[0] and "precise BN: 3/3 batches" in shown[0]
    assert run_ranks(_progress_on_rank, 2, False) == ["", ""]


def _ddp_on_rank(rank, world, batches, state):
    net = make_net(False, state)
    net.side.requires_grad_(False)  # DDP refuses parameters that never get a gradient otherwise
    ddp = nn.parallel.DistributedDataParallel(net)  # broadcast_buffers=True: a collective in its forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreciseBNWarning)
        precise_bn(ddp, batches[rank], 4, progress=False)
    return _stats_of(net)


def test_ddp_wrapped_model_runs_its_module_so_uneven_counts_do_not_hang():
    batches, state = make_batches(UNEVEN[2]), initial_state()
    results = run_ranks(_ddp_on_rank, 2, batches, state, timeout=60)
    _assert_matches(results[0], reference_stats(state, local_steps(batches, 4)))
    assert all(torch.equal(results[1][k], v) for k, v in results[0].items())


def test_forward_callable_takes_dict_batches():
    state, [batches] = initial_state(), make_batches([[4, 3, 5]])
    as_tensors, as_dicts = make_net(False, state), make_net(False, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreciseBNWarning)
        precise_bn(as_tensors, batches, 3, progress=False)
        dicts = [{"image": x, "label": torch.zeros(len(x))} for x in batches]
        precise_bn(as_dicts, dicts, 3, forward=lambda model, batch: model(batch["image"]), progress=False)
    assert all(torch.equal(v, _stats_of(as_tensors)[k]) for k, v in _stats_of(as_dicts).items())
    _assert_matches(_stats_of(as_dicts), reference_stats(state, batches))


def test_bad_arguments_raise_before_anything_runs():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_batches must be a positive int"):
            precise_bn(net, [torch.randn(3, 2)], bad)
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics"):
        precise_bn(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)), [], 1)
    with pytest.raises(ValueError, match="uninitialised LazyBatchNorm1d"):
        precise_bn(nn.Sequential(nn.LazyBatchNorm1d()), [torch.randn(3, 2)], 1)


def test_no_batch_at_all_keeps_every_layer_and_warns():
    net = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.warns(PreciseBNWarning, match=r"no batch reached layer\(s\) \['0'\]"):
        result = precise_bn(net, [], 5, progress=False)
    assert result.batches == 0 and torch.equal(net[0].running_var, torch.ones(2))


def test_errors_in_the_forward_restore_everything_on_one_process():
    net = make_net(False, initial_state()).train()
    before = _stats_of(net)
    batches = [torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)]
    with pytest.raises(RuntimeError):
        precise_bn(net, batches, 2, progress=False)  # the second batch has the wrong channel count
    assert all(torch.equal(v, before[k]) for k, v in _stats_of(net).items())
    assert net.training and all(m.training for m in net.modules())
