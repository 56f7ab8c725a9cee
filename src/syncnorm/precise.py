"""Precise BatchNorm: population statistics of every BatchNorm's input, over many batches and all ranks.

Running statistics are exponential averages over the last few hundred batches, taken while the
weights still moved. :func:`precise_bn` recomputes them with the final weights, as fvcore's
``update_bn_stats`` and pycls's ``compute_precise_bn_stats`` do, but across ranks: every rank
ends with the same (bitwise) statistics, equal to those of one process that saw every rank's
batches. Per layer and channel, over the n values x_i of the layer's input in every batch of
every rank (each batch normalised as in training, so a layer sees what it saw while training):

    mean = sum x_i / n,        var = sum (x_i - mean)^2 / (n - 1)      (unbiased, as BatchNorm keeps)

How: a forward pre-hook on every ``_BatchNorm`` (so any subclass: timm's ``BatchNormAct2d``,
syncnorm's layers) takes the batch's mean and variance in float64 (``core.local_moments``,
stable for a large mean) and merges them into the rank's running (n, mean, M2) with Chan's
update. At the end one all_reduce of [n, n mean, M2 + n mean^2] per channel, for the whole
model, gives the global sums, from which every rank computes the same result. Ranks may hold
different numbers of batches: nothing communicates until the end.

Except where the normalisation itself is synchronised: a syncnorm layer in training mode
all_reduces in every forward, so every rank must run every forward. Then (``lockstep``) the ranks
agree before each batch, with one small all_reduce, whether all of them have one; when some run
out, all stop (a warning says which ranks had more), so the statistics cover the same number of
batches on every rank, each normalised over the ranks' batches together, as in training.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import collectives, core
from .errors import PreciseBNWarning

__all__ = ["PreciseBNResult", "PreciseBNWarning", "precise_bn"]


@dataclass(frozen=True)
class PreciseBNResult:
    """What :func:`precise_bn` did; the same on every rank, except ``local_batches``.

    ``mean_change`` (per layer, the largest over channels of ``|new mean - old mean| / sqrt(old
    var + eps)``) and ``var_change`` (``|new var - old var| / (old var + eps)``) say how far the
    running statistics were from the population ones.
    """

    batches: int  # batches used, summed over the ranks of the group
    local_batches: int  # batches this rank used
    samples: dict[str, int] = field(default_factory=dict)  # values per channel each layer covered
    mean_change: dict[str, float] = field(default_factory=dict)
    var_change: dict[str, float] = field(default_factory=dict)
    unreached: tuple[str, ...] = ()  # layers no batch reached: statistics kept
    seconds: float = 0.0

    @property
    def max_mean_change(self) -> float:
        return max(self.mean_change.values(), default=0.0)

    @property
    def max_var_change(self) -> float:
        return max(self.var_change.values(), default=0.0)


_CHUNK_ELEMENTS = 1 << 22  # 32 MiB of float64 at a time


class _Moments:
    """A layer's (n, mean, M2) over the batches this rank ran, in float64 (Chan's parallel update)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0  # host int: shapes are known without a device sync
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, input: Tensor) -> None:
        input = input.detach()
        # float64 copies of a few samples at a time: torch's float32 statistics kernel (which
        # local_moments uses for (N, C) input, and on CUDA) loses digits when the mean is large
        # next to the spread, and precision matters more than speed in a once-per-run pass.
        per_sample = max(1, input[0].numel()) if input.shape[0] else 1
        step = max(1, _CHUNK_ELEMENTS // per_sample)
        for start in range(0, input.shape[0], step):
            chunk = input[start : start + step]
            n = chunk.numel() // chunk.shape[1]
            if n:
                self._merge(n, *core.local_moments(chunk.to(torch.float64)))

    def _merge(self, n: int, batch_mean: Tensor, batch_var: Tensor) -> None:
        batch_mean, batch_var = batch_mean.to(self.mean.device), batch_var.to(self.mean.device)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean.add_(delta, alpha=n / total)
        self.m2.add_(batch_var, alpha=n).add_(delta.square_(), alpha=self.count * n / total)
        self.count = total


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def _layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        where = f"'{name}'" if name else "the model itself"
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"syncnorm.precise_bn: {where} is an uninitialised {type(module).__name__}; run one forward "
                "pass first so that its channel count is known"
            )
        if module.track_running_stats and module.running_mean is not None and module.running_var is not None:
            found.append((name or type(module).__name__, module))
    return found


def _synchronising(model: nn.Module, layers: list[tuple[str, _BatchNorm]]) -> list[tuple[str, nn.Module]]:
    """Modules that communicate in their own forward during the pass (BatchNorm layers run in training mode)."""
    batchnorms = {id(m) for _, m in layers}
    found = []
    for name, module in model.named_modules():
        in_training = id(module) in batchnorms or module.training
        syncnorm_or_torch_sync = type(module).__module__.startswith("syncnorm.") or isinstance(module, nn.SyncBatchNorm)
        if in_training and syncnorm_or_torch_sync and hasattr(module, "process_group"):
            if collectives.group_size(module.process_group) > 1:
                found.append((name or type(module).__name__, module))
    return found


def _check_groups(synchronising: list[tuple[str, nn.Module]], group: Optional[dist.ProcessGroup]) -> None:
    # Lockstep over `group` keeps a layer's forwards matched only if its ranks all belong to `group`.
    if group is None:
        return
    members = set(dist.get_process_group_ranks(group))
    for name, module in synchronising:
        layer_group = collectives.resolve_group(module.process_group)
        outside = sorted(set(dist.get_process_group_ranks(layer_group)) - members)
        if outside:
            raise ValueError(
                f"syncnorm.precise_bn: layer '{name}' synchronises with ranks {outside}, which are not in "
                f"precise_bn's process_group (ranks {sorted(members)}); they would wait for forwards that never "
                "come. Pass process_group=None (all ranks) or a group that contains every layer's group."
            )


class _Progress:
    """A tqdm bar on a terminal with tqdm installed, else a line on stderr at every tenth of the way.

    A bar redraws itself with carriage returns, which fill a log file when stderr is redirected.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.bar, self.enabled = total, 0, None, enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc="precise BN", leave=False, dynamic_ncols=True)

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (self.done * 10) // self.total != ((self.done - 1) * 10) // self.total:
            print(f"precise BN: {self.done}/{self.total} batches", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def precise_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    process_group: collectives.SyncGroup = None,
    progress: bool = True,
    lockstep: Optional[bool] = None,
) -> PreciseBNResult:
    """Set every BatchNorm's running statistics to the population statistics of its input, over all ranks.

    Runs up to ``num_batches`` batches of ``batches`` (fewer if it runs out) through the model on
    every rank of ``process_group``, with every ``_BatchNorm`` layer in training mode (batch
    statistics, synchronised where the layer synchronises) and every other module in the mode it
    is in: call ``model.eval()`` first for the deterministic inputs evaluation sees (dropout
    off), ``model.train()`` to reproduce training's. Then sets each layer's ``running_mean`` and
    ``running_var`` to the exact mean and unbiased variance per channel of every value that
    reached it, on every rank, bitwise identical across ranks.

    Touches nothing else: no gradients; parameters, ``num_batches_tracked``, momentum, every other
    buffer and every module's train/eval flag are as before. A layer that no batch reached keeps
    its statistics (a :class:`PreciseBNWarning` names it). On an error nothing is changed.

    Communication: one all_reduce for the whole model at the end, so ranks may hold different
    numbers of batches. With ``lockstep`` (default: when a layer synchronises in its forward, as
    syncnorm's layers do on more than one rank) also one small all_reduce before each batch, so
    that all ranks run the same number of forwards (the fewest any rank has; a warning names the
    ranks that had more) instead of hanging. Pass ``lockstep=True`` when the forward communicates
    in other ways (FSDP). A DDP-wrapped model is run through ``model.module`` (DDP's forward would
    broadcast buffers).

    Args:
        model: the model, on its device; it stays where it is.
        batches: an iterable of batches (a DataLoader); iterated once, from the start.
        num_batches: at most this many batches per rank.
        forward: ``forward(model, batch)`` runs one batch (move it to the device, unpack a dict or
            a tuple); default ``model(batch)``. Its return value is ignored.
        process_group: the ranks whose batches make up the population (default: all).
        progress: a progress bar on the group's first rank (tqdm, when installed).
        lockstep: ``None`` decides as above; ``True``/``False`` forces it.

    Returns:
        PreciseBNResult: the batches used, the samples per layer, and how far the statistics moved.
    """
    started = time.perf_counter()
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"syncnorm.precise_bn: num_batches must be a positive int, got {num_batches!r}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    layers = _layers(model)
    if not layers:
        raise ValueError(
            "syncnorm.precise_bn: the model has no BatchNorm layer with running statistics (track_running_stats=True)"
        )
    resolved = collectives.resolve_group(process_group)
    world = 1 if resolved is None else dist.get_world_size(resolved)
    me = 0 if resolved is None else dist.get_rank(resolved)
    group = resolved if world > 1 else None  # None: nothing to communicate
    synchronising = _synchronising(model, layers)
    _check_groups(synchronising, resolved)
    lockstep = (bool(synchronising) if lockstep is None else lockstep) and group is not None
    run = forward or _default_forward
    device = layers[0][1].running_mean.device

    flags = {module: module.training for module in model.modules()}
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    moments = [_Moments(m.num_features, m.running_mean.device) for _, m in layers]
    hooks = [
        m.register_forward_pre_hook(_recorder(acc, m.num_features), with_kwargs=True)
        for (_, m), acc in zip(layers, moments)
    ]
    local_batches, failure = 0, None
    bar = _Progress(num_batches, progress and me == 0)
    try:
        for _, module in layers:
            module.train()
        with torch.no_grad():
            iterator = iter(batches)
            for _ in range(num_batches):
                batch, fetch_error = _next_batch(iterator)
                if lockstep:
                    have = batch is not _END
                    if not _all_ranks_have_a_batch(have, fetch_error, group, world, me, local_batches, device):
                        break
                elif fetch_error is not None:
                    raise fetch_error
                elif batch is _END:
                    break
                run(model, batch)
                local_batches += 1
                bar.update()
    except Exception as err:
        failure = err
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
        for module, training in flags.items():
            module.train(training)
        for buffer, value in saved:
            buffer.copy_(value)
    if failure is not None and (lockstep or group is None):
        # In lockstep a peer may still be inside a layer's collective: joining another one could
        # pair with it. Every rank fails on its own (peers at the layer's timeout, with its message).
        raise failure

    payload = _pack(moments, local_batches, failure is not None, world, me, device)
    if group is not None:
        collectives.all_reduce(payload, group, layer=layers[0][0], what="precise-BN statistics")
    failed = [r for r in range(world) if payload[r] != 0]
    if failed:
        if failure is not None:
            raise failure
        raise RuntimeError(
            f"syncnorm.precise_bn: rank(s) {failed} of the group failed while running their batches (their own "
            "error says why); no statistics were changed on any rank"
        )
    return _apply(layers, payload[world:], local_batches, started)


_END = object()


def _next_batch(iterator: Any) -> tuple[Any, Optional[Exception]]:
    try:
        return next(iterator), None
    except StopIteration:
        return _END, None
    except Exception as err:  # a data-loading failure: in lockstep the other ranks must hear of it
        return _END, err


def _recorder(moments: _Moments, channels: int) -> Callable:
    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input = args[0] if args else kwargs.get("input")
        # Malformed input is left to the layer itself, which raises with its own message.
        if isinstance(input, Tensor) and input.is_floating_point() and input.dim() >= 2 and input.shape[1] == channels:
            moments.add(input)

    return record


def _all_ranks_have_a_batch(
    have: bool,
    error: Optional[Exception],
    group: dist.ProcessGroup,
    world: int,
    me: int,
    done: int,
    device: torch.device,
) -> bool:
    """Lockstep: one all_reduce of [has a batch, failed] per rank; True when every rank goes on."""
    slots = torch.zeros(2 * world, dtype=torch.int64, device=device)
    slots[me] = int(have)
    slots[world + me] = int(error is not None)
    collectives.all_reduce(slots, group, layer="precise_bn", what="batch agreement")
    has, failed = slots[:world].tolist(), slots[world:].tolist()
    if any(failed):
        if error is not None:
            raise error
        raise RuntimeError(
            f"syncnorm.precise_bn: rank(s) {[r for r in range(world) if failed[r]]} failed to load batch "
            f"{done + 1} (their own error says why); no statistics were changed on any rank"
        )
    if all(has):
        return True
    if any(has) and me == 0:
        warnings.warn(
            f"syncnorm.precise_bn: rank(s) {[r for r in range(world) if not has[r]]} ran out of batches after {done}, "
            f"while rank(s) {[r for r in range(world) if has[r]]} had more. The model has layers that synchronise "
            f"in every forward, so every rank used {done} batches; give every rank at least num_batches batches "
            "to use them all.",
            PreciseBNWarning,
            stacklevel=3,
        )
    return False


def _pack(moments: list[_Moments], batches: int, failed: bool, world: int, me: int, device: torch.device) -> Tensor:
    """[failed flag per rank, batches, then per layer the core's [n, n mean (C), M2 + n mean^2 (C)]], float64."""
    flags = [0.0] * (world + 1)
    flags[me], flags[world] = float(failed), float(batches)
    parts = [torch.tensor(flags, dtype=torch.float64, device=device)]
    for acc in moments:
        if failed:
            acc = _Moments(acc.mean.numel(), device)  # a failed rank adds nothing
        mean, m2 = acc.mean.to(device), acc.m2.to(device)
        parts.append(core.pack(acc.count, mean * acc.count, m2.addcmul(mean, mean, value=acc.count)))
    return torch.cat(parts)


def _apply(layers: list[tuple[str, _BatchNorm]], sums: Tensor, local_batches: int, started: float) -> PreciseBNResult:
    """Write the statistics from the reduced sums (the same on every rank, so the result is too)."""
    batches = int(sums[0])
    samples, mean_change, var_change, unreached = {}, {}, {}, []
    offset = 1
    with torch.no_grad():
        for name, layer in layers:
            channels = layer.num_features
            count = sums[offset]
            total, sq = (
                sums[offset + 1 : offset + 1 + channels],
                sums[offset + 1 + channels : offset + 1 + 2 * channels],
            )
            offset += 1 + 2 * channels
            n = int(count)
            samples[name] = n
            if n < 2:
                unreached.append(name)
                continue
            mean = total / count
            # sum (x - mean)^2 = sum x^2 - n mean^2: float64 holds the cancellation for mean/std up to ~1e6.
            var = ((sq - count * mean * mean).clamp_min_(0) / (count - 1)).to(layer.running_var.device)
            mean = mean.to(layer.running_mean.device)
            old_mean, old_var = layer.running_mean.double(), layer.running_var.double()
            mean_change[name] = float(((mean - old_mean).abs() / (old_var + layer.eps).sqrt()).max())
            var_change[name] = float(((var - old_var).abs() / (old_var + layer.eps)).max())
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    if unreached:
        warnings.warn(
            f"syncnorm.precise_bn: no batch reached layer(s) {unreached} (fewer than 2 values per channel on all "
            "ranks together); their running statistics are left as they were",
            PreciseBNWarning,
            stacklevel=3,
        )
    return PreciseBNResult(
        batches=batches,
        local_batches=local_batches,
        samples=samples,
        mean_change=mean_change,
        var_change=var_change,
        unreached=tuple(unreached),
        seconds=time.perf_counter() - started,
    )
