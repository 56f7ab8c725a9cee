"""Sync vs local BatchNorm at a tiny per-rank batch, against one process on the same global batch.

    python examples/train_digits.py --compare --nproc 2 --batch-size 2 --epochs 3 --out runs/digits
    (same as: python examples/compare_digits.py ...; these are the defaults)

Runs examples/train_digits.py three times, one after the other, each into its own folder of ``--out``:

* ``sync``:   NPROC processes x batch B through launch/torchrun_local.sh, syncnorm.SyncBatchNorm
  (statistics over all NPROC*B samples of a step);
* ``local``:  the same, with plain torch BatchNorm (statistics over each rank's B samples);
* ``single``: 1 plain python process x batch NPROC*B, plain BatchNorm: the reference.

Every run sees the same samples in the same global batches (DistributedSampler deals one shuffled
order out round-robin), so ``sync`` computes the reference's math, while ``local`` normalises with
B-sample statistics. Writes ``compare.json`` and ``compare.png`` (held-out accuracy, held-out loss
and training loss per epoch, the three runs on each panel) to ``--out``. A run whose folder already
holds it complete is not started again (``--fresh`` trains all three again). Run this with plain
python, not under torchrun: it starts torchrun itself.
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
sys.path.insert(0, str(EXAMPLES))  # run_state.py, plots.py

from plots import plot_comparison  # noqa: E402
from run_state import completed_run  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the sync and local runs")
    parser.add_argument("--batch-size", type=int, default=2, help="per-rank batch of the sync and local runs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.02, help="lower than train_digits.py: less epoch-to-epoch noise")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-batches", type=int, default=0, help="only the first N global batches per epoch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--fresh", action="store_true", help="train all three runs again from scratch")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)  # from train_digits.py
    args = parser.parse_args(argv)
    if args.nproc < 1 or args.batch_size < 1 or args.epochs < 1 or args.limit_batches < 0:
        parser.error("--nproc, --batch-size and --epochs must be >= 1, --limit-batches >= 0")
    return args


def run_training(name: str, nproc: int, norm: str, batch_size: int, args: argparse.Namespace) -> dict:
    """One train_digits.py run (under torchrun unless it is one process); returns its metrics.json."""
    out = args.out / name
    setting = {"norm": norm, "batch_size": batch_size, "world_size": nproc, "seed": args.seed}
    setting.update(lr=args.lr, momentum=args.momentum, limit_batches=args.limit_batches)
    print(f"== {name}: {nproc} x batch {batch_size}, norm={norm} -> {out}", flush=True)
    if not args.fresh:
        done = completed_run(out, setting, args.epochs)
        if done is not None:
            print(f"{out} already holds this run, complete: not started again (--fresh trains it again)", flush=True)
            return done
    flags = [
        f"--norm={norm}",
        f"--batch-size={batch_size}",
        f"--epochs={args.epochs}",
        f"--lr={args.lr}",
        f"--momentum={args.momentum}",
        f"--seed={args.seed}",
        f"--limit-batches={args.limit_batches}",
        f"--device={args.device}",
        f"--out={out}",
    ]
    flags += ["--no-progress"] * args.no_progress + ["--fresh"] * args.fresh
    script = str(EXAMPLES / "train_digits.py")
    if nproc == 1:  # one process needs no launcher (and starts faster without one)
        command = [sys.executable, script, *flags]
    else:
        command = ["bash", str(REPO / "launch" / "torchrun_local.sh"), str(nproc), script, *flags]
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    subprocess.run(command, check=True, env=env)
    return json.loads((out / "metrics.json").read_text())


def summary_lines(summary: dict[str, dict]) -> list[str]:
    """The per-epoch table, then the comparison in one line each for the first and the last epoch."""
    lines = [f"{'run':<8}{'ranks x batch':>14}  held-out accuracy per epoch | training loss per epoch"]
    for name, s in summary.items():
        accuracies = "  ".join(f"{a:.4f}" for a in s["held_out_accuracy"])
        losses = "  ".join(f"{x:.4f}" for x in s["train_loss"])
        lines.append(f"{name:<8}{s['world_size']:>7} x {s['batch_size']:<4}  accuracy {accuracies} | loss {losses}")
    for index, when in ((0, "after epoch 1"), (-1, "at the end")):
        accuracy = ", ".join(f"{name} {s['held_out_accuracy'][index]:.3f}" for name, s in summary.items())
        loss = ", ".join(f"{name} {s['train_loss'][index]:.3f}" for name, s in summary.items())
        lines.append(f"{when}: held-out accuracy {accuracy}; training loss {loss}")
    return lines


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
            "held_out_loss": [h["held_out_loss"] for h in m["history"]],
            "train_loss": [h["train_loss"] for h in m["history"]],
        }
        for name, m in runs.items()
    }
    (args.out / "compare.json").write_text(json.dumps(summary, indent=2))
    path = args.out / "compare.png"
    plot_comparison(path, runs, args.epochs, args.lr)
    print("\n" + "\n".join(summary_lines(summary)))
    print(f"wrote {path} and {args.out / 'compare.json'}")


if __name__ == "__main__":
    main()
