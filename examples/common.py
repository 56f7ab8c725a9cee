"""What the digits examples share: the scikit-learn digits data set, a small conv net, and the plots.

Importing this module has no side effects (no data is loaded, no process group is touched, and
matplotlib is only imported by the plot functions). The scripts import it as a sibling module:
``python examples/train_digits.py`` puts ``examples/`` on ``sys.path``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["NORM_CHOICES", "DigitsNet", "load_digits", "plot_run", "plot_comparison"]

NORM_CHOICES = ("sync", "local", "none")


def load_digits(seed: int = 0, held_out_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Return ``(train, held_out)`` datasets of the 8x8 scikit-learn digits (bundled, no download).

    Images are float32 tensors of shape ``(N, 1, 8, 8)``: pixel values scaled to [0, 1] and then
    standardised with the mean and standard deviation of the *training* split (so no held-out
    information leaks into training). Labels are int64. The split is stratified by class and
    fixed by ``seed``, so every rank of a distributed run builds exactly the same split.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, held_out_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=held_out_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, held_out_idx = torch.as_tensor(train_idx), torch.as_tensor(held_out_idx)
    images = (images - images[train_idx].mean()) / images[train_idx].std()
    return (
        TensorDataset(images[train_idx].contiguous(), labels[train_idx].contiguous()),
        TensorDataset(images[held_out_idx].contiguous(), labels[held_out_idx].contiguous()),
    )


class DigitsNet(nn.Module):
    """A small conv net for 8x8 digits: three conv+norm+ReLU blocks, a max-pool, global average pool, linear.

    ``norm`` picks the normalisation: ``"sync"`` and ``"local"`` both build ``nn.BatchNorm2d``
    (convert ``"sync"`` with :func:`syncnorm.convert_sync_batchnorm` once the process group exists),
    ``"none"`` uses ``nn.Identity``. There is no dropout, so a training run is fully determined by
    its seed and data order.
    """

    def __init__(self, norm: str = "sync", num_classes: int = 10) -> None:
        super().__init__()
        if norm not in NORM_CHOICES:
            raise ValueError(f"norm must be one of {NORM_CHOICES}, got {norm!r}")
        self.norm = norm

        def block(cin: int, cout: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            return [conv, nn.Identity() if norm == "none" else nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16),
            *block(16, 32),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            *block(32, 32),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


# ---------------------------------------------------------------- plots
# Both read the ``history`` records of metrics.json. Accuracy axes have fixed limits, never an
# auto-zoom onto noise (one held-out image is worth 1/360 of accuracy here); loss axes start at 0.

NORM_NAMES = {"sync": "syncnorm.SyncBatchNorm", "local": "torch BatchNorm", "none": "no normalisation"}
COMPARE_STYLES = {  # the reference under the others: wide and pale, so that a run on top of it stays visible
    "single": dict(color="0.6", linewidth=7, alpha=0.5, solid_capstyle="round", zorder=1),
    "sync": dict(color="C0", marker="o", linestyle="-", zorder=3),
    "local": dict(color="C3", marker="s", linestyle="--", zorder=2),
}


def accuracy_limits(values: Iterable[float]) -> tuple[float, float]:
    """``(low, 1)``: ``low`` is 0.8, or lower where a value is below 0.85 (a multiple of 0.1, 0 at the least)."""
    smallest = min(values, default=0.0)
    return max(0.0, min(0.8, math.floor(10 * smallest - 0.5) / 10)), 1.0


def run_label(config: dict) -> str:
    """``"syncnorm.SyncBatchNorm, 2 processes x batch 16 (global batch 32)"``."""
    world, batch = config["world_size"], config["batch_size"]
    norm = NORM_NAMES.get(config["norm"], config["norm"])
    if config["norm"] == "local" and world > 1:
        norm = "torch BatchNorm per rank"
    processes = "1 process" if world == 1 else f"{world} processes"
    return f"{norm}, {processes} x batch {batch} (global batch {world * batch})"


def _figure(panels: int, size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=size)


def _save(fig, path: Path, ax_acc, epochs: list[int], accuracies: list[float], images: Optional[int], **layout) -> None:
    """The axes' common setup (integer epochs, a grid, the fixed accuracy range), then write ``path``."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
    ax_acc.set_ylim(*accuracy_limits(accuracies))
    ax_acc.set_ylabel("held-out accuracy" + (f" ({images} images)" if images else ""))
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(
    path: Path, config: dict, history: list[dict], precise_bn: Optional[dict], held_out_images: Optional[int]
) -> None:
    """metrics.png of one run: losses and held-out accuracy per epoch (and the precise-BN result, if any)."""
    fig, (ax_loss, ax_acc) = _figure(2, (11, 4.2))
    epochs = [h["epoch"] for h in history]
    accuracies = [h["held_out_accuracy"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="training (epoch mean, train mode)")
    ax_loss.plot(epochs, [h["held_out_loss"] for h in history], "s--", label="held-out (end of epoch, eval mode)")
    ax_loss.set(ylabel="cross-entropy", title="loss", ylim=(0, None))
    ax_loss.legend(fontsize="small", loc="upper right")
    ax_acc.plot(epochs, accuracies, "o-", clip_on=False, label="running statistics (as trained)")
    ax_acc.set_title("held-out accuracy (eval mode)")
    if len(history) <= 12:
        for epoch, accuracy in zip(epochs, accuracies):
            ax_acc.annotate(
                f"{accuracy:.3f}", (epoch, accuracy), textcoords="offset points", xytext=(0, -14), ha="center"
            )
    if precise_bn is not None and epochs:
        accuracies = [*accuracies, precise_bn["held_out_accuracy"]]
        label = f"after precise BN over {precise_bn['batches']} batches: {precise_bn['held_out_accuracy']:.3f}"
        ax_acc.plot([epochs[-1]], [accuracies[-1]], "*", markersize=12, clip_on=False, label=label)
        ax_acc.legend(fontsize="small", loc="lower right")
    limit = f", first {config['limit_batches']} batches per epoch" if config.get("limit_batches") else ""
    fig.suptitle(f"digits: {run_label(config)}, {len(history)} epochs, lr {config['lr']}{limit}")
    _save(fig, path, ax_acc, epochs, accuracies, held_out_images)


def plot_comparison(path: Path, runs: dict[str, dict], epochs: int, lr: float) -> None:
    """compare.png: held-out accuracy, held-out loss and training loss of the runs (metrics.json each)."""
    fig, (ax_acc, ax_held, ax_train) = _figure(3, (15, 4.8))
    ax_train.sharey(ax_held)
    all_epochs, accuracies, held_out_images = [], [], None
    for name, metrics in runs.items():
        history, style = metrics["history"], COMPARE_STYLES.get(name, {})
        x = [h["epoch"] for h in history]
        all_epochs += x
        accuracies += [h["held_out_accuracy"] for h in history]
        held_out_images = held_out_images or metrics.get("held_out_images")
        final = f"; final acc {history[-1]['held_out_accuracy']:.3f}" if history else ""
        label = f"{name}{', the reference' * (name == 'single')}: {run_label(metrics['config'])}{final}"
        ax_acc.plot(x, [h["held_out_accuracy"] for h in history], label=label, clip_on=False, **style)
        ax_held.plot(x, [h["held_out_loss"] for h in history], **style)
        ax_train.plot(x, [h["train_loss"] for h in history], **style)
    ax_acc.set_title("held-out accuracy (eval mode)")
    if held_out_images:
        note = f"one image = {1 / held_out_images:.4f}"
        ax_acc.text(0.98, 0.03, note, transform=ax_acc.transAxes, ha="right", fontsize="small", color="0.4")
    ax_held.set(title="held-out loss (end of epoch, eval mode)", ylabel="cross-entropy", ylim=(0, None))
    ax_train.set(title="training loss (epoch mean, train mode)", ylabel="cross-entropy")
    ax_train.tick_params(labelleft=True)
    fig.legend(loc="lower center", ncol=1, frameon=False)
    sync = runs.get("sync", next(iter(runs.values())))["config"]
    world, batch = sync["world_size"], sync["batch_size"]
    fig.suptitle(
        f"digits, {epochs} epochs, lr {lr}, the same global batches of {world * batch}: {world} processes x batch"
        f" {batch} (sync, local) or 1 process x batch {world * batch} (single)\nBatchNorm statistics over the"
        f" global batch (sync, single) or over each rank's {batch} samples (local)"
    )
    _save(fig, path, ax_acc, all_epochs, accuracies, held_out_images, rect=(0, 0.17, 1, 1))
