"""The examples' plots: ``metrics.png`` (one run of train_digits.py) and ``compare.png`` (compare_digits.py).

Both read the ``history`` records of ``metrics.json``. Accuracy axes have fixed limits, never an
auto-zoom onto noise: 0.8 to 1 for trained runs, lower only to show a value below 0.85
(:func:`accuracy_limits`); one held-out image is worth 1/360 of accuracy here. Loss axes start at 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

NORM_NAMES = {"sync": "syncnorm.SyncBatchNorm", "local": "torch BatchNorm", "none": "no normalisation"}
TRAIN_LOSS = "training (epoch mean, train mode: batch statistics)"
HELD_OUT_LOSS = "held-out (end of epoch, eval mode: running statistics)"


def accuracy_limits(values: Iterable[float]) -> tuple[float, float]:
    """``(low, 1)``: ``low`` is 0.8, or lower where a value is below 0.85 (a multiple of 0.1, 0 at the least).

    So the plots of trained runs share one range (0.8 to 1), and a value is never drawn at an edge.
    """
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _epoch_axis(ax, epochs: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    if epochs:
        ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)


def _accuracy_axis(ax, values: list[float], held_out_images: Optional[int]) -> None:
    ax.set_ylim(*accuracy_limits(values))
    images = f" ({held_out_images} images)" if held_out_images else ""
    ax.set_ylabel(f"held-out accuracy{images}")
    ax.grid(alpha=0.3)


def plot_run(
    path: Path,
    config: dict,
    history: list[dict],
    precise_bn: Optional[dict] = None,
    held_out_images: Optional[int] = None,
) -> None:
    """metrics.png: losses and held-out accuracy per epoch of one run."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    accuracies = [h["held_out_accuracy"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label=TRAIN_LOSS)
    ax_loss.plot(epochs, [h["held_out_loss"] for h in history], "s--", label=HELD_OUT_LOSS)
    ax_loss.set(ylabel="cross-entropy", title="loss")
    ax_loss.set_ylim(bottom=0)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize="small", loc="upper right")
    ax_acc.plot(epochs, accuracies, "o-", clip_on=False, label="running statistics (as trained)")
    if len(history) <= 12:
        for epoch, accuracy in zip(epochs, accuracies):
            ax_acc.annotate(
                f"{accuracy:.3f}", (epoch, accuracy), textcoords="offset points", xytext=(0, -14), ha="center"
            )
    drawn = list(accuracies)
    if precise_bn is not None and epochs:
        drawn.append(precise_bn["held_out_accuracy"])
        ax_acc.plot(
            [epochs[-1]],
            [precise_bn["held_out_accuracy"]],
            "*",
            markersize=12,
            clip_on=False,
            label=f"after precise BN over {precise_bn['batches']} batches: {precise_bn['held_out_accuracy']:.3f}",
        )
        ax_acc.legend(fontsize="small", loc="lower right")
    _accuracy_axis(ax_acc, drawn, held_out_images)
    ax_acc.set_title("held-out accuracy (eval mode)")
    for ax in (ax_loss, ax_acc):
        _epoch_axis(ax, epochs)
    limit = f", first {config['limit_batches']} batches per epoch" if config.get("limit_batches") else ""
    fig.suptitle(f"digits: {run_label(config)}, {len(history)} epochs, lr {config['lr']}{limit}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMPARE_STYLES = {  # the reference under the others: wide and pale, so that a run on top of it stays visible
    "single": dict(color="0.6", linewidth=7, alpha=0.5, solid_capstyle="round", zorder=1),
    "sync": dict(color="C0", marker="o", linestyle="-", zorder=3),
    "local": dict(color="C3", marker="s", linestyle="--", zorder=2),
}
COMPARE_NAMES = {"sync": "sync", "local": "local", "single": "single, the reference"}


def plot_comparison(path: Path, runs: dict[str, dict], epochs: int, lr: float) -> None:
    """compare.png: held-out accuracy, held-out loss and training loss of the runs, one line per run."""
    plt = _pyplot()
    fig, (ax_acc, ax_held, ax_train) = plt.subplots(1, 3, figsize=(15, 4.8))
    ax_train.sharey(ax_held)
    accuracies, all_epochs, held_out_images = [], [], None
    for name, metrics in runs.items():
        history = metrics["history"]
        x = [h["epoch"] for h in history]
        all_epochs += x
        accuracies += [h["held_out_accuracy"] for h in history]
        held_out_images = held_out_images or metrics.get("held_out_images")
        final = f"; final acc {history[-1]['held_out_accuracy']:.3f}" if history else ""
        label = f"{COMPARE_NAMES.get(name, name)}: {run_label(metrics['config'])}{final}"
        style = COMPARE_STYLES.get(name, {})
        ax_acc.plot(x, [h["held_out_accuracy"] for h in history], label=label, clip_on=False, **style)
        ax_held.plot(x, [h["held_out_loss"] for h in history], **style)
        ax_train.plot(x, [h["train_loss"] for h in history], **style)
    _accuracy_axis(ax_acc, accuracies, held_out_images)
    ax_acc.set_title("held-out accuracy (eval mode)")
    if held_out_images:
        note = f"one image = {1 / held_out_images:.4f}"
        ax_acc.text(0.98, 0.03, note, transform=ax_acc.transAxes, ha="right", fontsize="small", color="0.4")
    ax_held.set(title="held-out loss (end of epoch, eval mode)", ylabel="cross-entropy")
    ax_train.set(title="training loss (epoch mean, train mode)", ylabel="cross-entropy")
    ax_held.set_ylim(bottom=0)
    for ax in (ax_acc, ax_held, ax_train):
        _epoch_axis(ax, all_epochs)
        ax.grid(alpha=0.3)
    ax_train.tick_params(labelleft=True)
    fig.legend(loc="lower center", ncol=1, frameon=False)
    sync = runs.get("sync", next(iter(runs.values())))["config"]
    world, batch = sync["world_size"], sync["batch_size"]
    fig.suptitle(
        f"digits, {epochs} epochs, lr {lr}, the same global batches of {world * batch}: {world} processes x batch"
        f" {batch} (sync, local) or 1 process x batch {world * batch} (single)\nBatchNorm statistics over the"
        f" global batch (sync, single) or over each rank's {batch} samples (local)"
    )
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
