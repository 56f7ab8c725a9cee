"""Failure behaviour: every rank ends promptly with a clear error, and failed steps change nothing.

Each test runs real gloo ranks (tests/helpers/harness.py) with a short process-group
timeout, makes something go wrong on some of them, and checks what every rank
raised: the error type, the layer named by its module path, the ranks named
where that matters. A hang fails the test through the harness (RanksHung).
Every failing call runs inside :func:`_step_must_fail`, which re-raises the
step's own error only if the running statistics (running_mean, running_var,
num_batches_tracked) are bit for bit what they were before the step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers.harness import RankError, run_ranks, shard
from torch import nn

import syncnorm

PG_TIMEOUT = 5.0  # seconds; every failure here must surface well within this
TIMEOUT = 30.0  # the harness kills the ranks and reports RanksHung after this
CHANNELS = 4
ROOT = Path(__file__).resolve().parents[2]


# --- what runs on every rank ---------------------------------------------------------------------


def _net(channels: int = CHANNELS, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Two synchronised layers named by module path: 'encoder.norm' sees the input, then 'decoder.norm'."""
    net = nn.Sequential(
        OrderedDict(
            encoder=nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(channels), act=nn.ReLU())),
            decoder=nn.Sequential(OrderedDict(linear=nn.Linear(channels, channels), norm=nn.BatchNorm1d(channels))),
        )
    )
    return syncnorm.convert_sync_batchnorm(net).to(dtype)


def _turn_guard_on(net: nn.Module, switch: str) -> None:
    if switch == "api":
        syncnorm.set_check(True)
    elif switch == "layer":
        for module in net.modules():
            if isinstance(module, syncnorm.SyncBatchNorm):
                module.check = True
    else:  # set in the rank itself: a forkserver-started rank (CUDA builds) has not the test's environment
        assert switch == "env"
        os.environ["SYNCNORM_CHECK"] = "1"


def _step_must_fail(watched: nn.Module, step) -> None:
    """Run ``step``, which must raise; re-raise its error if ``watched``'s buffers are untouched."""
    before = {name: t.clone() for name, t in watched.named_buffers()}
    try:
        step()
    except Exception as err:
        changed = [name for name, t in watched.named_buffers() if not torch.equal(t, before[name])]
        if changed:
            raise AssertionError(f"the failed step changed {changed} ({type(err).__name__}: {err})") from err
        raise
    raise AssertionError("the step did not fail")


def _train_step(net: nn.Module, x: torch.Tensor) -> None:
    net(x).square().sum().backward()


def _bad_input(rank, world, case, mode):
    net = _net()
    if mode == "guard":
        _turn_guard_on(net, "api")
    x = {
        "wrong_dims": torch.randn(CHANNELS),
        "channel_count": torch.randn(6, CHANNELS - 1),
        "zero_channels": torch.randn(6, 0),
        "integer_dtype": torch.randint(0, 5, (6, CHANNELS)),
        "empty_global_batch": torch.randn(0, CHANNELS),
        "one_value_per_channel": torch.randn(1 if rank == 0 else 0, CHANNELS),
    }[case]
    _step_must_fail(net, lambda: net(x))


def _bad_input_in_eval(rank, world, mode):
    net = _net().eval()
    if mode == "guard":
        _turn_guard_on(net, "api")
    _step_must_fail(net, lambda: net(torch.randn(CHANNELS)))


def _bad_input_on_rank1(rank, world, switch):
    net = _net()
    if switch != "off":
        _turn_guard_on(net, switch)
    x = torch.randn(6, CHANNELS - 1 if rank == 1 else CHANNELS)
    _step_must_fail(net, lambda: _train_step(net, x))


def _mismatch(rank, world, scenario, switch):
    net = _net(channels=6 if scenario == "channel_counts" and rank == 1 else CHANNELS)
    x = torch.randn(6, net.encoder.norm.num_features)
    if scenario == "dtypes" and rank == 1:
        net, x = net.double(), x.double()
    _turn_guard_on(net, switch)
    if scenario == "eval_vs_train" and rank == 1:
        net.eval()
    if scenario == "skipped_layer" and rank == 1:
        _step_must_fail(net, lambda: net.decoder(x))  # never calls 'encoder.norm'
    elif scenario == "skipped_backward":
        if rank == 0:
            loss = net(x).sum()
            _step_must_fail(net, loss.backward)  # meets rank 1's next forward
        net(x)  # rank 1: a forward whose backward it never runs
        _step_must_fail(net, lambda: net(x))
    else:
        _step_must_fail(net, lambda: _train_step(net, x))


def _one_rank_in_eval(rank, world, odd_rank):
    net = _net()
    _turn_guard_on(net, "api")
    if rank == odd_rank:
        net.eval()
    _step_must_fail(net, lambda: net(torch.randn(6, CHANNELS)))


def _guarded_steps_match_global_batchnorm(rank, world, switch, x, sizes):
    net = nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(CHANNELS, dtype=torch.float64)))
    net = syncnorm.convert_sync_batchnorm(net)
    _turn_guard_on(net, switch)
    local = shard(x, rank, sizes)
    trained = [net(local).detach() for _ in range(2)]
    net.eval()
    return dict(trained=trained, evaluated=net(local).detach(), enabled=syncnorm.check_enabled())


def _raise_on_rank1(rank, world, where):
    net = _net()
    planted = RuntimeError(f"planted failure on rank {rank}")

    def fail(*_):
        if rank == 1:
            raise planted

    if where == "forward":  # after 'encoder.norm', just before 'decoder.norm'
        net.decoder.linear.register_forward_pre_hook(fail)
        _step_must_fail(net.decoder.norm, lambda: _train_step(net, torch.randn(6, CHANNELS)))
    else:  # between forward and backward
        loss = net(torch.randn(6, CHANNELS)).square().sum()
        fail()
        _step_must_fail(net, loss.backward)


def _killed_before_layer(rank, world):
    net = _net()

    def kill(*_):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    net.encoder.norm.register_forward_pre_hook(kill)
    _step_must_fail(net, lambda: _train_step(net, torch.randn(6, CHANNELS)))


def _silent_peer(rank, world, flag: str):
    net = _net()
    if rank == 1:  # alive but never reaches the layer, until rank 0 has given up
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError("rank 1 released")
    start = time.monotonic()
    try:
        _step_must_fail(net, lambda: _train_step(net, torch.randn(6, CHANNELS)))
    finally:
        with open(flag + ".tmp", "w") as handle:
            handle.write(str(time.monotonic() - start))
        os.replace(flag + ".tmp", flag)


def _non_finite(rank, world, value, planted_ranks):
    net = _net()
    _turn_guard_on(net, "api")
    x = torch.randn(6, CHANNELS)
    if rank in planted_ranks:
        x[3, 2] = value
    _step_must_fail(net, lambda: _train_step(net, x))


def _overflowing_sum(rank, world):
    # Each rank's sum of squares, 6 * (5e153)^2 = 1.5e308, is finite in float64; their total is not.
    net = _net(dtype=torch.float64)
    _turn_guard_on(net, "api")
    x = torch.full((6, CHANNELS), 5e153, dtype=torch.float64)
    _step_must_fail(net, lambda: _train_step(net, x))


# --- checks on what came back ----------------------------------------------------------------------


def _assert_error(result, type_name: str, *fragments: str) -> None:
    assert isinstance(result, RankError), f"expected {type_name}, the rank returned {result!r}"
    assert result.type_name == type_name, result.traceback or str(result)
    for fragment in fragments:
        assert fragment in result.message, f"{fragment!r} not in the message:\n{result.message}"


BAD_INPUT_MESSAGES = {
    "wrong_dims": "expects input of shape (N, C)",
    "channel_count": f"built for {CHANNELS} channels but got input with {CHANNELS - 1} channels",
    "zero_channels": "zero channels",
    "integer_dtype": "needs a floating-point input, got dtype torch.int64",
    "empty_global_batch": "got 0 value(s) per channel over all ranks",
    "one_value_per_channel": "got 1 value(s) per channel over all ranks",
}


@pytest.mark.parametrize("mode", ["train", "guard"])
@pytest.mark.parametrize("case", list(BAD_INPUT_MESSAGES))
def test_bad_input_on_every_rank_raises_the_same_value_error(case, mode):
    results = run_ranks(_bad_input, 2, case, mode, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    for result in results:
        _assert_error(result, "ValueError", "layer 'encoder.norm'", BAD_INPUT_MESSAGES[case])
    assert results[0].message == results[1].message


@pytest.mark.parametrize(
    "mode",
    ["eval", "guard"],
)
def test_bad_input_in_eval_mode_raises_value_error(mode):
    results = run_ranks(_bad_input_in_eval, 2, mode, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    for result in results:
        _assert_error(result, "ValueError", "layer 'encoder.norm'", BAD_INPUT_MESSAGES["wrong_dims"])


@pytest.mark.parametrize("switch", ["off", "api"])
def test_bad_input_on_one_rank_fails_that_rank_at_once_and_the_others_promptly(switch):
    results = run_ranks(_bad_input_on_rank1, 2, switch, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    _assert_error(results[1], "ValueError", "layer 'encoder.norm'", BAD_INPUT_MESSAGES["channel_count"])
    what = "consistency-guard" if switch == "api" else "forward statistics"
    _assert_error(results[0], "SyncNormCollectiveError", f"the {what} all_reduce of layer 'encoder.norm'", "rank 0")


MISMATCHES = {
    # scenario: (switch, what rank 0's line of the report says, what rank 1's says)
    "eval_vs_train": (
        "env",
        "layer 'encoder.norm' forward statistics, train mode",
        "layer 'encoder.norm' forward statistics, eval mode",
    ),
    "skipped_layer": ("api", "layer 'encoder.norm' forward statistics", "layer 'decoder.norm' forward statistics"),
    "channel_counts": ("layer", f"{CHANNELS} channels", "6 channels"),
    "dtypes": ("api", "torch.float32", "torch.float64"),
    "skipped_backward": (
        "api",
        "layer 'decoder.norm' backward gradient sums",
        "layer 'encoder.norm' forward statistics",
    ),
}


def _report_line(message: str, rank: int) -> str:
    lines = [line for line in message.splitlines() if line.startswith(f"  rank {rank}: ")]
    assert len(lines) == 1, message
    return lines[0]


@pytest.mark.parametrize("scenario", list(MISMATCHES))
def test_guard_names_the_layer_and_the_ranks_that_differ(scenario):
    switch, *reported = MISMATCHES[scenario]
    results = run_ranks(_mismatch, 2, scenario, switch, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    where = {"skipped_layer": ["encoder.norm", "decoder.norm"], "skipped_backward": ["decoder.norm", "encoder.norm"]}
    for rank, result in enumerate(results):
        layer = where.get(scenario, ["encoder.norm"] * 2)[rank]
        _assert_error(
            result,
            "SyncNormMismatchError",
            f"ranks disagree at layer '{layer}' (where rank {rank} is)",
            "ranks [1] differ from rank 0",
        )
        for described, fragment in enumerate(reported):
            assert fragment in _report_line(result.message, described), result.message


@pytest.mark.parametrize("odd_rank, reference", [(0, 1), (2, 0)])
def test_guard_names_the_rank_that_differs_from_the_majority(odd_rank, reference):
    results = run_ranks(_one_rank_in_eval, 3, odd_rank, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    for result in results:
        _assert_error(result, "SyncNormMismatchError", f"ranks [{odd_rank}] differ from rank {reference}")
        for rank in range(3):
            mode = "eval" if rank == odd_rank else "train"
            assert f"forward statistics, {mode} mode" in _report_line(result.message, rank), result.message


@pytest.mark.parametrize("switch", ["env", "api", "layer"])
def test_guarded_steps_agree_with_global_batchnorm(switch):
    """No false alarm: with the guard on, matching ranks train and evaluate as nn.BatchNorm does."""
    sizes = [5, 3]
    x = torch.randn(sum(sizes), CHANNELS, dtype=torch.float64) * 3 + 1
    results = run_ranks(_guarded_steps_match_global_batchnorm, 2, switch, x, sizes, timeout=TIMEOUT)
    reference = nn.BatchNorm1d(CHANNELS, dtype=torch.float64)
    trained = [reference(x).detach() for _ in range(2)]
    evaluated = reference.eval()(x).detach()
    for rank, result in enumerate(results):
        assert result["enabled"] == (switch != "layer")
        for got, want in zip(result["trained"], trained):
            torch.testing.assert_close(got, shard(want, rank, sizes), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result["evaluated"], shard(evaluated, rank, sizes), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_peer_raising_mid_step_gives_a_named_collective_error(where):
    results = run_ranks(_raise_on_rank1, 2, where, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    _assert_error(results[1], "RuntimeError", "planted failure on rank 1")
    what = "forward statistics" if where == "forward" else "backward gradient"
    _assert_error(
        results[0],
        "SyncNormCollectiveError",
        f"the {what} all_reduce of layer 'decoder.norm'",
        "rank 0",
        "run every rank with SYNCNORM_CHECK=1",  # the guard is off here: the message points to it
    )


def test_killed_peer_gives_a_named_collective_error():
    results = run_ranks(_killed_before_layer, 2, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    _assert_error(results[1], "NoResult", "exited with code -9")
    _assert_error(results[0], "SyncNormCollectiveError", "layer 'encoder.norm'", "failed on rank 0", "SYNCNORM_CHECK=1")


def test_silent_peer_fails_the_others_at_the_process_group_timeout(tmp_path):
    flag = str(tmp_path / "rank0-gave-up")
    results = run_ranks(_silent_peer, 2, flag, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    _assert_error(results[0], "SyncNormCollectiveError", "layer 'encoder.norm'", "failed on rank 0", "Timed out")
    _assert_error(results[1], "RuntimeError", "rank 1 released")
    waited = float(Path(flag).read_text())
    # It waited for the timeout (nothing else ended it), and not much longer: no hang past it.
    assert PG_TIMEOUT * 0.9 <= waited <= PG_TIMEOUT + 15, waited


@pytest.mark.parametrize("planted_ranks", [(1,), (0, 1)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_guard_names_the_layer_and_the_ranks(value, planted_ranks):
    results = run_ranks(
        _non_finite, 2, value, planted_ranks, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT
    )
    for rank, result in enumerate(results):
        _assert_error(
            result,
            "SyncNormNonFiniteError",
            f"layer 'encoder.norm' on rank {rank}, channels [2]",
            f"ranks {list(planted_ranks)} brought non-finite local statistics",
        )


def test_non_finite_guard_tells_an_overflowing_sum_from_bad_input():
    results = run_ranks(_overflowing_sum, 2, expect_errors=True, timeout=TIMEOUT, pg_timeout=PG_TIMEOUT)
    for rank, result in enumerate(results):
        _assert_error(
            result,
            "SyncNormNonFiniteError",
            f"layer 'encoder.norm' on rank {rank}, channels [0, 1, 2, 3]",
            "every rank's local statistics were finite: their sum over ranks overflowed",
        )


@pytest.mark.slow
def test_soak_script_smoke(tmp_path):
    """A few steps of tools/soak.py: runs end to end and finds the statistics identical on every rank."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "soak.py"), "--steps", "20", "--every", "10"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "running statistics bitwise identical on every rank at 2 of 2 checks" in completed.stdout


# --- ranks at different layers: named without the guard, on every rank ------------------------


def _layer_pair(kind: str) -> list[torch.nn.Module]:
    if kind == "SyncBatchNorm":
        layers = [syncnorm.SyncBatchNorm(8), syncnorm.SyncBatchNorm(8)]
    elif kind == "InPlaceABN":
        layers = [syncnorm.InPlaceABN(8), syncnorm.InPlaceABN(8)]
    else:
        layers = [syncnorm.SyncInstanceNorm2d(8, track_running_stats=True) for _ in range(2)]
    for name, layer in zip(("block1.bn", "block2.bn"), layers):
        layer.layer_name = name
    return layers


def _ranks_at_different_layers(rank, world, kind, pass_):
    syncnorm.set_check(False)
    layers = _layer_pair(kind)
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    before = [(layer.running_mean.clone(), layer.num_batches_tracked.clone()) for layer in layers]
    try:
        if pass_ == "forward":
            layers[rank](x)  # rank 0 at block1, rank 1 at block2 (a skipped block, per-rank control flow)
        else:
            outputs = [layer(x) for layer in layers]  # the same forwards on both ranks
            before = [(layer.running_mean.clone(), layer.num_batches_tracked.clone()) for layer in layers]
            outputs[rank].sum().backward()  # each rank backpropagates through another layer
        outcome = "no error"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    unchanged = all(
        torch.equal(layer.running_mean, mean) and torch.equal(layer.num_batches_tracked, steps)
        for layer, (mean, steps) in zip(layers, before)
    )
    return outcome, unchanged


@pytest.mark.parametrize(
    "kind,pass_",
    [("SyncBatchNorm", "forward"), ("SyncBatchNorm", "backward"), ("InPlaceABN", "forward"),
     ("InPlaceABN", "backward"), ("SyncInstanceNorm2d", "forward")],
)  # fmt: skip
def test_ranks_at_different_layers_raise_on_every_rank_without_the_guard(kind, pass_):
    results = run_ranks(_ranks_at_different_layers, 2, kind, pass_, timeout=90)
    what = {"forward": "forward statistics", "backward": "backward gradient"}[pass_]
    if kind == "SyncInstanceNorm2d":
        what = "running statistics"
    for rank, (outcome, unchanged) in enumerate(results):
        assert outcome.startswith("SyncNormMismatchError"), outcome
        assert f"at layer 'block{rank + 1}.bn'" in outcome and what in outcome, outcome
        assert "SYNCNORM_CHECK=1" in outcome, outcome
        assert unchanged, "running statistics or the step count changed in a failed call"
