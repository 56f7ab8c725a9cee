"""Sync vs local BatchNorm at a tiny per-rank batch, against one process on the same global batch.

    python examples/compare_digits.py --nproc 4 --batch-size 2 --epochs 3 --out runs/compare
    (same as: python examples/train_digits.py --compare ...)

Runs examples/train_digits.py three times through launch/torchrun_local.sh, one after the other:

* ``sync``:   NPROC processes x batch B, syncnorm.SyncBatchNorm (statistics over all NPROC*B samples);
* ``local``:  NPROC processes x batch B, plain BatchNorm (statistics over each rank's B samples);
* ``single``: 1 process x batch NPROC*B, plain BatchNorm: the reference.

Every run sees the same samples in the same global batches (DistributedSampler deals one shuffled
order out round-robin), so ``sync`` computes the reference's math, while ``local`` normalises with
B-sample statistics. Writes ``compare.json`` and ``compare.png`` to ``--out``. Run it with plain
python, not under torchrun: it launches torchrun itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4, help="processes of the sync and local runs")
    parser.add_argument("--batch-size", type=int, default=2, help="per-rank batch of the sync and local runs")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02, help="lower than train_digits.py: less epoch-to-epoch noise")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)  # from train_digits.py
    args = parser.parse_args(argv)
    if args.nproc < 1 or args.batch_size < 1:
        parser.error("--nproc and --batch-size must be >= 1")
    return args


def run_training(name: str, nproc: int, norm: str, batch_size: int, args: argparse.Namespace) -> dict:
    """One train_digits.py run under torchrun; returns its metrics.json."""
    out = args.out / name
    command = [
        "bash",
        str(REPO / "launch" / "torchrun_local.sh"),
        str(nproc),
        str(EXAMPLES / "train_digits.py"),
        f"--norm={norm}",
        f"--batch-size={batch_size}",
        f"--epochs={args.epochs}",
        f"--lr={args.lr}",
        f"--momentum={args.momentum}",
        f"--seed={args.seed}",
        f"--device={args.device}",
        f"--out={out}",
    ] + (["--no-progress"] if args.no_progress else [])
    print(f"== {name}: {nproc} x batch {batch_size}, norm={norm}", flush=True)
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    subprocess.run(command, check=True, env=env)
    return json.loads((out / "metrics.json").read_text())


def plot(out: Path, runs: dict[str, dict], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"sync": "o-", "local": "s--", "single": "k:"}
    for name, metrics in runs.items():
        history = metrics["history"]
        epochs = [h["epoch"] for h in history]
        label = f"{name} ({metrics['config']['world_size']} x {metrics['config']['batch_size']})"
        ax_acc.plot(epochs, [h["held_out_accuracy"] for h in history], styles[name], label=label)
        ax_loss.plot(epochs, [h["train_loss"] for h in history], styles[name], label=label)
    ax_acc.set(xlabel="epoch", ylabel="held-out accuracy", title="held-out accuracy (eval mode, running stats)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="training loss (train mode, batch stats)")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise SystemExit("run the comparison with plain python: it starts torchrun itself")
    args.out.mkdir(parents=True, exist_ok=True)
    global_batch = args.nproc * args.batch_size
    runs = {
        "sync": run_training("sync", args.nproc, "sync", args.batch_size, args),
        "local": run_training("local", args.nproc, "local", args.batch_size, args),
        "single": run_training("single", 1, "local", global_batch, args),
    }
    summary = {
        name: {
            "world_size": m["config"]["world_size"],
            "batch_size": m["config"]["batch_size"],
            "held_out_accuracy": [h["held_out_accuracy"] for h in m["history"]],
            "train_loss": [h["train_loss"] for h in m["history"]],
        }
        for name, m in runs.items()
    }
    (args.out / "compare.json").write_text(json.dumps(summary, indent=2))
    title = f"digits: {args.nproc} ranks x batch {args.batch_size} vs 1 process x batch {global_batch}"
    path = plot(args.out, runs, title)
    print(f"\n{'run':<8}{'ranks x batch':>14}  held-out accuracy and training loss per epoch")
    for name, s in summary.items():
        accuracies = "  ".join(f"{a:.4f}" for a in s["held_out_accuracy"])
        losses = "  ".join(f"{x:.4f}" for x in s["train_loss"])
        print(f"{name:<8}{s['world_size']:>7} x {s['batch_size']:<4}  accuracy {accuracies}   train loss {losses}")
    print(f"wrote {path} and {args.out / 'compare.json'}")


if __name__ == "__main__":
    main()
