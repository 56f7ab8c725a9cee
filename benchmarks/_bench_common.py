"""Building blocks of the benchmark suite: the compared variants, the end-to-end model, plots.

How they are timed is in ``measure.py``.

The variants run inside rank processes started by
``syncnorm.testing.run_ranks`` (a real gloo group). The comparison variants are written
here, not imported:

* ``nn.BatchNorm`` on the local batch: the compute floor;
* :class:`SyncFloor`: local ``nn.BatchNorm`` plus the two all_reduces syncnorm
  really does (payload sizes passed in from ``comm_model.syncnorm_payloads``, which
  measures them from syncnorm itself): the floor for any one-all_reduce-per-pass design;
* :class:`NaiveSyncBatchNorm`: detectron2's NaiveSyncBatchNorm algorithm (mean and
  mean of squares, one all_reduce through autograd, normalise with plain ops),
  written from the algorithm's description.
"""

from __future__ import annotations

import textwrap
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from measure import median, paired
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# ---------------------------------------------------------------------------------------------
# comparison variants


class _DifferentiableAllReduce(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        summed = tensor.clone()
        dist.all_reduce(summed, group=group)
        return summed

    @staticmethod
    def backward(ctx, grad: Tensor):
        summed = grad.clone()
        dist.all_reduce(summed, group=ctx.group)
        return summed, None


class NaiveSyncBatchNorm(_BatchNorm):
    """The naive autograd design: all_reduce [mean, mean of x^2], normalise with autograd ops.

    Assumes the same batch size on every rank (as the design does). Never takes a
    fast path at one rank, so at W = 1 it shows the cost of the algorithm itself.
    """

    def __init__(self, num_features: int, process_group: Optional[dist.ProcessGroup] = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        pass

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        group = self.process_group or dist.group.WORLD
        channels = input.shape[1]
        reduce_dims = [0] + list(range(2, input.dim()))
        mean = input.mean(dim=reduce_dims)
        mean_of_squares = (input * input).mean(dim=reduce_dims)
        both = _DifferentiableAllReduce.apply(torch.cat([mean, mean_of_squares]), group)
        both = both * (1.0 / dist.get_world_size(group))
        mean, mean_of_squares = torch.split(both, channels)
        var = mean_of_squares - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        shape = (1, channels) + (1,) * (input.dim() - 2)
        return input * scale.view(shape) + shift.view(shape)


class _AllReduceInBackward(torch.autograd.Function):
    """Identity whose backward does one all_reduce of a fresh buffer, as syncnorm's backward does."""

    @staticmethod
    def forward(ctx, tensor: Tensor, numel: int, dtype: torch.dtype, group: dist.ProcessGroup) -> Tensor:
        ctx.numel, ctx.dtype, ctx.group = numel, dtype, group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        dist.all_reduce(torch.zeros(ctx.numel, dtype=ctx.dtype, device=grad.device), group=ctx.group)
        return grad, None, None, None


class SyncFloor(nn.Module):
    """Local ``nn.BatchNorm`` plus one all_reduce per pass, with syncnorm's own payloads."""

    def __init__(self, norm: _BatchNorm, payloads: dict, group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.norm = norm
        self.group = group or dist.group.WORLD
        self.payloads = payloads  # {"forward": (numel, dtype), "backward": (numel, dtype)}

    def forward(self, input: Tensor) -> Tensor:
        numel, dtype = self.payloads["forward"]
        dist.all_reduce(torch.zeros(numel, dtype=dtype, device=input.device), group=self.group)
        numel, dtype = self.payloads["backward"]
        return _AllReduceInBackward.apply(self.norm(input), numel, dtype, self.group)


def plain_batchnorm(channels: int, ndim: int) -> _BatchNorm:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim](channels)


def convert_to_naive(module: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm*`` for :class:`NaiveSyncBatchNorm`, keeping its parameters."""
    if isinstance(module, _BatchNorm):
        naive = NaiveSyncBatchNorm(module.num_features, eps=module.eps, momentum=module.momentum)
        naive.load_state_dict(module.state_dict())
        return naive.to(module.weight.device)
    for name, child in module.named_children():
        module.add_module(name, convert_to_naive(child))
    return module


# ---------------------------------------------------------------------------------------------
# the end-to-end model (torchvision is not a dependency)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, one BasicBlock per stage, global pooling, linear head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            blocks.append(BasicBlock(in_channels, width, 1 if index == 0 else 2))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------
# plots


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# One colour per variant in every benchmark plot.
VARIANT_COLOURS = {"nn.BatchNorm": "tab:gray", "syncnorm": "tab:blue", "sync floor": "tab:green",
                   "naive": "tab:orange", "torch.nn.SyncBatchNorm": "tab:red"}  # fmt: skip
VARIANT_NOTES = {
    "sync floor": "sync floor: nn.BatchNorm + syncnorm's two all_reduces (the least a synchronised layer pays)",
    "naive": "naive: detectron2's NaiveSyncBatchNorm algorithm",
}


def _spread(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """(median, q1, q3) of the paired ratios, for an error bar."""
    ratio = paired(numerator, denominator)
    return ratio["median"], ratio["q1"], ratio["q3"]


def _setting(meta: dict | None) -> str:
    if not meta:
        return ""
    machine = meta.get("machine", {})
    return (f"{meta.get('device', '?')}, gloo, {meta.get('threads', '?')} thread(s) per rank, "
            f"{machine.get('cores', '?')} cores, torch {machine.get('torch', '?')}, syncnorm {machine.get('syncnorm_commit', '?')}")  # fmt: skip


def plot_micro_ratios(micro: list[dict], baseline: str, path: str, meta: dict | None = None) -> None:
    """One panel per world size: each variant's time over ``baseline`` per case, median and quartiles.

    Points on a log axis shared by every panel (bars on a log axis have no meaningful length);
    the line at 1 is ``baseline``."""
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    # Drawn about as wide as the docs' content column shows it (8 in at 100 dpi), so the labels
    # keep their point size on the page instead of being scaled down.
    worlds = sorted({entry["world"] for entry in micro})
    figure, axes = plt.subplots(len(worlds), 1, figsize=(8, 3.9 * len(worlds) + 1.6), squeeze=False, sharey=True)
    names = [name for name in micro[0]["times_ms"] if name != baseline]
    for axis, world in zip(axes[:, 0], worlds):
        entries = [entry for entry in micro if entry["world"] == world]
        width = 0.7 / len(names)
        for index, name in enumerate(names):
            spreads = [_spread(e["times_ms"][name], e["times_ms"][baseline]) for e in entries if name in e["times_ms"]]
            positions = [i + (index - (len(names) - 1) / 2) * width for i in range(len(spreads))]
            mid = [m for m, _, _ in spreads]
            errors = [[m - lo for m, lo, _ in spreads], [hi - m for m, _, hi in spreads]]
            axis.errorbar(positions, mid, yerr=errors, fmt="o", markersize=4, capsize=2, linewidth=1,
                          color=VARIANT_COLOURS.get(name), label=name)  # fmt: skip
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xticks(range(len(entries)), [e["case"] for e in entries], rotation=45, ha="right", fontsize=10)
        axis.tick_params(axis="y", labelsize=10)
        axis.set_ylabel(f"time / {baseline}", fontsize=11)
        axis.set_title(f"W = {world}: fwd+bwd over {baseline} (median, quartiles)", fontsize=12)
        axis.grid(axis="y", which="major", alpha=0.3)
    ticks = [0.5, 1, 2, 5, 10, 20, 50, 100]
    for axis in axes[:, 0]:
        axis.yaxis.set_major_locator(FixedLocator(ticks))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())
    notes = [VARIANT_NOTES[n] for n in names if n in VARIANT_NOTES]
    axes[0, 0].legend(loc="upper left", fontsize=10, ncol=len(names))
    figure.suptitle(
        "Per-layer cost\n" + textwrap.fill(_setting(meta), 90), fontsize=10, x=0.01, ha="left", va="top", y=0.995
    )
    if notes:
        figure.text(0.01, 0.005, textwrap.fill("; ".join(notes), 100), fontsize=9)
    figure.tight_layout(rect=(0, 0.035, 1, 0.965))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_step_ratios(e2e: dict, baseline: str, path: str, meta: dict | None = None) -> None:
    """Each variant's training-step time over ``baseline``: median and quartiles, with the absolute medians."""
    plt = pyplot()
    names = list(e2e["times_ms"])
    spreads = [_spread(e2e["times_ms"][name], e2e["times_ms"][baseline]) for name in names]
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    for index, (name, (mid, lo, hi)) in enumerate(zip(names, spreads)):
        axis.bar(index, mid, 0.6, color=VARIANT_COLOURS.get(name, "tab:purple"))
        axis.errorbar(index, mid, yerr=[[mid - lo], [hi - mid]], color="black", capsize=3, linewidth=1)
        axis.annotate(f"{mid:.2f}x\n{median(e2e['times_ms'][name]):.0f} ms", (index, hi), ha="center", va="bottom",
                      fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    axis.set_xticks(range(len(names)), names)
    axis.set_ylim(0, max(hi for _, _, hi in spreads) * 1.3)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_ylabel(f"step time / {baseline} (same repetition)")
    axis.set_title(f"tiny ResNet, DDP training step, W = {e2e['world']}: median and quartiles", fontsize=10)
    if meta:
        figure.text(0.01, 0.01, _setting(meta), fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
