"""Train DigitsNet on the scikit-learn digits with syncnorm.SyncBatchNorm under torchrun (or plain python).

    launch/torchrun_local.sh 2 examples/train_digits.py --epochs 3 --out runs/digits
    python examples/train_digits.py --compare --nproc 2 --batch-size 2 --epochs 3 --out runs/digits

Each rank takes its DistributedSampler share of the training split, DDP averages the gradients and
``--norm sync`` normalises every BatchNorm over the global batch. At the end rank 0 writes
``metrics.json``, ``metrics.png`` and ``final_model.pt`` to ``--out``. Beyond a plain loop:

* checkpoints: rank 0 writes them atomically (temporary file + ``os.replace``) every ``--ckpt-every``
  steps and at each epoch end. A (re)started run resumes from the newest checkpoint that loads
  (corrupt ones are skipped with a warning) and skips the batches of the epoch already done. Runs
  are deterministic, so a resumed run ends with bitwise the same weights and BatchNorm buffers as an
  uninterrupted one (given the same world size). Rerunning a finished run says so and exits 0 (it
  only redoes the final step if the outputs are missing or ``--precise-bn`` changed); ``--fresh``
  (or a new ``--out``) trains again from scratch.
* ``--precise-bn N``: before the final evaluation, :func:`syncnorm.precise_bn` replaces the running
  statistics with the population statistics of N training batches per rank; the held-out accuracy
  is reported with both, and ``final_model.pt`` holds the precise ones.
* ``--compare`` (run it with plain python): three runs into ``--out``/{sync,local,single}, syncnorm
  and per-rank BatchNorm at NPROC x batch B (through launch/torchrun_local.sh), and one process on
  the same global batches (the reference); then ``compare.json`` and ``compare.png`` in ``--out``.
  A run whose folder holds it complete is not trained again.

``SYNCNORM_BACKEND`` (gloo|nccl) overrides the backend (default: nccl on CUDA, gloo on CPU). With
bare torchrun and --max-restarts, export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 as launch/*.sh do:
otherwise a restarted group can connect with the previous attempt's addresses (pytorch/pytorch#135712).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import NORM_CHOICES, DigitsNet, load_digits, plot_comparison, plot_run  # examples/common.py
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

import syncnorm

CKPT_FORMAT = 1
# Settings that must match for a checkpoint to be resumable: they fix the data order and the math.
# The global batch, not its split over ranks: with synchronised statistics a run is the same at
# 4 ranks x batch 2 as at 2 x 4 (the sampler deals the same global batches), so it resumes on
# another number of ranks. Per-rank BatchNorm (--norm local) depends on the split: see run_keys.
RESUME_KEYS = ("norm", "global_batch_size", "seed", "lr", "momentum", "limit_batches")
OUTPUTS = ("metrics.json", "metrics.png", "final_model.pt")
DEFAULTS = {"batch_size": 16, "lr": 0.05, "device": "auto", "out": Path("runs/digits")}
COMPARE_DEFAULTS = {"batch_size": 2, "lr": 0.02, "device": "cpu", "out": Path("runs/compare")}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--norm", choices=NORM_CHOICES, default="sync", help="sync: syncnorm.SyncBatchNorm")
    parser.add_argument("--batch-size", type=int, help="per-rank batch size (default 16; --compare: 2)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, help="default 0.05; --compare: 0.02 (less epoch-to-epoch noise)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output folder (default runs/digits; --compare: runs/compare)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto; --compare: cpu")
    parser.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: epoch ends only)")
    parser.add_argument("--limit-batches", type=int, default=0, help="only the first N batches per epoch")
    parser.add_argument("--keep-ckpts", type=int, default=3, help="how many checkpoints to keep")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    precise_help = "before the final evaluation, recompute the BatchNorm statistics over N training batches per rank"
    parser.add_argument("--precise-bn", type=int, default=0, metavar="N", help=precise_help)
    fresh_help = "delete this --out's checkpoints and outputs and train from scratch (ignored on a torchrun restart)"
    parser.add_argument("--fresh", action="store_true", help=fresh_help)
    compare_help = "train sync, local and single runs into --out/{sync,local,single}; plot them to --out/compare.png"
    parser.add_argument("--compare", action="store_true", help=compare_help)
    parser.add_argument("--nproc", type=int, default=2, help="--compare: processes of the sync and local runs")
    args = parser.parse_args(argv)
    for key, value in (COMPARE_DEFAULTS if args.compare else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch_size, args.keep_ckpts, args.nproc) < 1:
        parser.error("--batch-size, --keep-ckpts and --nproc must be >= 1")
    if min(args.epochs, args.ckpt_every, args.limit_batches, args.precise_bn) < 0:
        parser.error("--epochs, --ckpt-every, --limit-batches and --precise-bn must be >= 0")
    return args


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """Join the torchrun group (if launched by torchrun) and pick this rank's device."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    else:
        torch.set_num_threads(1)  # a fixed reduction order, and no oversubscription of shared cores
    if "RANK" not in os.environ:  # plain `python train_digits.py`: one process, no group
        return 0, 1, device
    backend = os.environ.get("SYNCNORM_BACKEND") or ("nccl" if use_cuda else "gloo")
    dist.init_process_group(backend, device_id=device if use_cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def build_model(norm: str, device: torch.device, seed: int, distributed: bool) -> tuple[nn.Module, nn.Module]:
    """Return ``(model, trainable)``: the bare net (for state_dict and eval) and what the loop calls."""
    torch.manual_seed(seed)
    model = DigitsNet(norm=norm).to(device)
    if norm == "sync":
        model = syncnorm.convert_sync_batchnorm(model)
    if not distributed:
        return model, model
    # SyncBatchNorm keeps identical buffers on every rank, so re-broadcasting them each step is a
    # wasted collective; local BatchNorm takes rank 0's before every forward (DDP's default).
    sync_buffers = norm == "local"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.13
        return model, DistributedDataParallel(model, forward_sync_buffers=sync_buffers)
    return model, DistributedDataParallel(model, broadcast_buffers=sync_buffers)


def epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of ``epoch``: a pure function of (seed, epoch, rank), so a restart redraws them."""
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i : i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, device: torch.device) -> tuple[float, float]:
    """Held-out (loss, accuracy) in eval mode: running statistics, no communication.

    Every rank evaluates (cheap here), so the opt-in SYNCNORM_CHECK eval-mode guard, which is a
    collective, sees all ranks; only rank 0's numbers are reported.
    """
    model.eval()
    images, labels = (t.to(device) for t in data.tensors)
    logits = model(images)
    model.train()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


class EpochLoss:
    """Mean training loss of an epoch over all ranks, summed across ranks only at checkpoints.

    ``pending`` is this rank's share since the last fold; ``folded`` (the same on every rank) is the
    all-reduced total so far, in global batches (each rank adds 1/W of its batch's loss and of a
    batch), so a partial epoch carried over to another number of ranks keeps its weight. Folding at
    checkpoints keeps the steps free of extra collectives and lets a checkpoint carry the partial
    epoch's loss.
    """

    def __init__(self, device: torch.device, distributed: bool, world_size: int) -> None:
        self.pending = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of batch losses, batches]
        self.folded = [0.0, 0.0]
        self.distributed = distributed
        self.share = 1.0 / world_size

    def add(self, loss: torch.Tensor) -> None:
        self.pending[0] += loss.detach().double() * self.share
        self.pending[1] += self.share

    def fold(self) -> list[float]:
        if self.distributed:
            dist.all_reduce(self.pending)
        total, count = self.pending.tolist()
        self.pending.zero_()
        self.folded = [self.folded[0] + total, self.folded[1] + count]
        return self.folded

    def finish_epoch(self) -> float:
        total, count = self.fold()
        self.folded = [0.0, 0.0]
        return total / max(count, 1.0)


# ---------------------------------------------------------------- the run folder (rank 0 only)


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` (torch.save, or a str as text) so that ``path`` is absent, old or complete, never partial."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        if isinstance(obj, str):
            f.write(obj.encode())
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoints(out: Path) -> list[Path]:
    """The ``ckpt-<step>.pt`` files in ``out``, newest (highest step) first."""
    found = [(int(p.stem[5:]), p) for p in out.glob("ckpt-*.pt") if p.stem[5:].isdigit()]
    return [path for _, path in sorted(found, reverse=True)]


def load_newest_checkpoint(out: Path) -> Optional[dict]:
    """The newest checkpoint in ``out`` that loads and is complete; corrupt ones are skipped with a warning."""
    for path in checkpoints(out):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
                raise ValueError("not a train_digits checkpoint")
            missing = {"config", "epoch", "batches_done", "step", "model", "optimizer"} - state.keys()
            if missing:
                raise ValueError(f"missing {sorted(missing)}")
        except Exception as exc:  # a truncated zip, a foreign file: any of them means "not usable"
            print(f"WARNING: skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        return {**state, "path": str(path)}
    return None


def run_keys(config: dict) -> tuple[str, ...]:
    """What identifies a run: the global batch; for per-rank BatchNorm (``--norm local``) its split too."""
    return RESUME_KEYS + (("world_size", "batch_size") if config["norm"] == "local" else ())


def saved_config(saved: dict) -> dict:
    """A checkpoint's config, with the global batch derived for checkpoints written before it was stored."""
    if "global_batch_size" not in saved and "world_size" in saved and "batch_size" in saved:
        saved = {**saved, "global_batch_size": saved["world_size"] * saved["batch_size"]}
    return saved


def same_run(saved: dict, config: dict) -> bool:
    saved = saved_config(saved)
    return all(saved.get(key) == config[key] for key in run_keys(config))


def finished_run_message(out: Path, state: Optional[dict], config: dict, args: argparse.Namespace) -> Optional[str]:
    """A message when ``out`` holds this run complete (trained and its outputs written), else None."""
    if state is None or state["epoch"] < args.epochs or state["batches_done"] != 0:
        return None  # nothing yet, or training still to do: start or resume
    if not same_run(state["config"], config):
        return None  # another run's checkpoints: train() says so
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    complete = {"epochs": state["epoch"], "step": state["step"], "precise_bn": args.precise_bn}
    if (
        not same_run(metrics.get("config", {}), config)
        or metrics.get("complete") != complete
        or not all((out / name).exists() for name in OUTPUTS)
    ):
        return None  # trained, but the outputs are missing or were made otherwise: redo the final step only
    return (
        f"{out} already holds this run, complete (epochs: {state['epoch']}, step {state['step']}); its outputs are "
        + ", ".join(str(out / name) for name in OUTPUTS)
        + ". Nothing to do: pass --fresh to train again from scratch, or use a new --out."
    )


# ---------------------------------------------------------------- training


def recompute_batchnorm_statistics(model, sampler, images, held_out, args, history, rank) -> Optional[dict]:
    """--precise-bn: population statistics of N training batches per rank, then the held-out accuracy again.

    The batches are those of a further epoch (a fresh shuffle of each rank's share); the model is
    the bare one (not the DDP wrapper). Every rank evaluates, as after each epoch.
    """
    if not history or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None  # no epoch was trained, or --norm none: nothing to recompute
    started = time.perf_counter()
    result = syncnorm.precise_bn(
        model,
        epoch_batches(sampler, args.epochs, args.batch_size),
        args.precise_bn,
        forward=lambda net, batch: net(images[torch.as_tensor(batch, device=images.device)]),
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    held_out_loss, accuracy = evaluate(model, held_out, images.device)
    before = history[-1]
    if rank == 0:
        print(
            f"precise BN over {result.batches} batches ({result.local_batches} per rank) in {seconds:.2f} s: held-out"
            f" acc {before['held_out_accuracy']:.4f} with running statistics, {accuracy:.4f} with precise"
            f" statistics (held-out loss {before['held_out_loss']:.4f} -> {held_out_loss:.4f})",
            flush=True,
        )
    return {
        "batches_per_rank": result.local_batches,
        "batches": result.batches,
        "seconds": seconds,
        "held_out_loss": held_out_loss,
        "held_out_accuracy": accuracy,
        "held_out_accuracy_running_stats": before["held_out_accuracy"],
        "max_mean_change": result.max_mean_change,
        "max_var_change": result.max_var_change,
    }


def train(args: argparse.Namespace) -> bool:
    """One run (or nothing, when ``--out`` holds it complete); True when it joined a process group."""
    rank, world_size, device = setup_distributed(args.device)
    distributed = dist.is_initialized()
    torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(args.seed)
    out: Path = args.out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a writer that was killed mid-write
            stale.unlink(missing_ok=True)
        # Only on the first attempt: a group that torchrun restarts must resume, not start over.
        if args.fresh and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            for path in [*out.glob("ckpt-*.pt"), *(out / name for name in OUTPUTS)]:
                path.unlink(missing_ok=True)
    config = {
        "norm": args.norm, "global_batch_size": world_size * args.batch_size, "seed": args.seed, "lr": args.lr,
        "momentum": args.momentum, "limit_batches": args.limit_batches, "world_size": world_size,
        "batch_size": args.batch_size,
    }  # fmt: skip

    train_set, held_out = load_digits(seed=args.seed)
    model, trainable = build_model(args.norm, device, args.seed, distributed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    images, labels = (t.to(device) for t in train_set.tensors)
    epoch_loss = EpochLoss(device, distributed, world_size)

    # Rank 0 reads the checkpoint; every rank gets the same one (no shared filesystem needed).
    found = load_newest_checkpoint(out) if rank == 0 else None
    box = [(found, finished_run_message(out, found, config, args)) if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(box, src=0)
    state, finished = box[0]
    if finished:
        if rank == 0:
            print(finished, flush=True)
        return distributed
    epoch, batches_done, step, history = 0, 0, 0, []
    if state is not None:
        saved = saved_config(state["config"])
        mismatch = {k: (saved.get(k), config[k]) for k in run_keys(config) if saved.get(k) != config[k]}
        if mismatch:
            raise SystemExit(f"{out} holds checkpoints of another run (saved, now): {mismatch}; use a new --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, batches_done, step, history = state["epoch"], state["batches_done"], state["step"], state["history"]
        epoch_loss.folded = list(state["loss_sum"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if rank == 0 and epoch >= args.epochs:
            print(f"{state['path']}: training is complete (step {step}); writing the final outputs again", flush=True)
        elif rank == 0:
            where = f"epoch {epoch + 1}, {batches_done} batches done, step {step}"
            saved = state["config"]
            if (saved.get("world_size"), saved.get("batch_size")) != (world_size, args.batch_size):
                where += (
                    f" (saved at {saved.get('world_size')} ranks x batch {saved.get('batch_size')}, now {world_size} x "
                    f"{args.batch_size}: the same global batch of {config['global_batch_size']})"
                )
            print(f"resuming from {state['path']}: {where}", flush=True)

    def checkpoint() -> None:
        loss_so_far = epoch_loss.fold()  # collective: every rank gets here
        if rank == 0:
            state = {
                "format": CKPT_FORMAT,
                "config": config,
                "epoch": epoch,
                "batches_done": batches_done,
                "step": step,
                "model": model.state_dict(),  # includes the BatchNorm running statistics
                "optimizer": optimizer.state_dict(),
                "loss_sum": loss_so_far,
                "history": history,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            }
            atomic_save(state, out / f"ckpt-{step:08d}.pt")
            for old in checkpoints(out)[args.keep_ckpts :]:
                old.unlink(missing_ok=True)

    from tqdm import tqdm

    while epoch < args.epochs:
        started = time.perf_counter()
        batches = epoch_batches(sampler, epoch, args.batch_size)[: args.limit_batches or None]
        show_bar = rank == 0 and not args.no_progress and sys.stderr.isatty()  # a bar in a log file is noise
        desc = f"epoch {epoch + 1}/{args.epochs}"
        bar = tqdm(total=len(batches), initial=batches_done, desc=desc, disable=not show_bar, leave=False)
        for batch in batches[batches_done:]:  # a resumed epoch skips the batches already done
            index = torch.as_tensor(batch, device=device)
            loss = F.cross_entropy(trainable(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, batches_done = step + 1, batches_done + 1
            epoch_loss.add(loss)
            bar.update(1)
            if args.ckpt_every and step % args.ckpt_every == 0 and batches_done < len(batches):
                checkpoint()
        bar.close()
        train_loss = epoch_loss.finish_epoch()
        held_out_loss, accuracy = evaluate(model, held_out, device)
        seconds = time.perf_counter() - started
        losses = {"train_loss": train_loss, "held_out_loss": held_out_loss}
        history.append({"epoch": epoch + 1, **losses, "held_out_accuracy": accuracy, "steps": step, "seconds": seconds})
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{args.epochs}  train loss {train_loss:.4f}  held-out loss {held_out_loss:.4f}"
                f"  held-out acc {accuracy:.4f}  ({seconds:.1f} s)",
                flush=True,
            )
        epoch, batches_done = epoch + 1, 0
        checkpoint()

    precise = None
    if args.precise_bn:
        precise = recompute_batchnorm_statistics(model, sampler, images, held_out, args, history, rank)
    if rank == 0:
        atomic_save(model.state_dict(), out / "final_model.pt")
        metrics = {"config": config, "history": history, "final": history[-1] if history else {}}
        metrics["held_out_images"] = len(held_out)
        if precise is not None:
            metrics["precise_bn"] = precise
        metrics["complete"] = {"epochs": epoch, "step": step, "precise_bn": args.precise_bn}
        plot_run(out / "metrics.png", config, history, precise, len(held_out))
        atomic_save(json.dumps(metrics, indent=2), out / "metrics.json")  # last: its "complete" marks the run done
        print(f"wrote {out / 'metrics.json'}, {out / 'metrics.png'} and {out / 'final_model.pt'}", flush=True)
    return distributed


def leave_group() -> None:
    """Wait for every rank, then end this process without running gloo's teardown.

    Destroying a gloo process group joins gloo's worker threads while holding the GIL, and a worker
    that still holds its last collective takes the GIL to release the tensors Python created: then
    both threads wait forever (seen here as a hang at the very end of 3 in 65 two-rank runs: the
    main thread in ``~ProcessGroupGloo`` -> ``std::thread::join``, a gloo thread in
    ``decref_pyobject``). So the teardown does not run at all: every rank has passed the barrier,
    the outputs are written and closed, stdout and stderr are flushed, and ``os._exit`` ends the
    process; torchrun only needs its exit status. docs/troubleshooting.md has the same for your own
    scripts.
    """
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- --compare


def compare(args: argparse.Namespace) -> None:
    """Sync vs local BatchNorm at NPROC x batch B, and one process on the same NPROC*B global batches.

    DistributedSampler deals one shuffled order out round-robin, so every run sees the same samples
    in the same global batches: ``sync`` computes the reference's math, ``local`` normalises with
    B-sample statistics. The runs are this script, started one after the other.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise SystemExit("run --compare with plain python: it starts torchrun itself")
    script = Path(__file__).resolve()
    launcher = script.parent.parent / "launch" / "torchrun_local.sh"
    passed_on = "epochs lr momentum seed limit_batches device ckpt_every keep_ckpts precise_bn".split()
    shared = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in passed_on]
    shared += ["--no-progress"] * args.no_progress + ["--fresh"] * args.fresh
    runs = {}
    setups = {"sync": (args.nproc, args.batch_size), "local": (args.nproc, args.batch_size)}
    setups["single"] = (1, args.nproc * args.batch_size)  # plain BatchNorm on the global batches: the reference
    for name, (nproc, batch) in setups.items():
        norm = "sync" if name == "sync" else "local"
        out = args.out / name
        print(f"== {name}: {nproc} x batch {batch}, norm={norm} -> {out}", flush=True)
        flags = [*shared, f"--norm={norm}", f"--batch-size={batch}", f"--out={out}"]
        launch = [sys.executable] if nproc == 1 else ["bash", str(launcher), str(nproc)]  # one process: no launcher
        env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}  # torchrun with this interpreter
        subprocess.run([*launch, str(script), *flags], check=True, env=env)
        runs[name] = json.loads((out / "metrics.json").read_text())

    summary = {}
    for name, metrics in runs.items():
        summary[name] = {key: metrics["config"][key] for key in ("world_size", "batch_size")}
        for key in ("held_out_accuracy", "held_out_loss", "train_loss"):
            summary[name][key] = [record[key] for record in metrics["history"]]
    (args.out / "compare.json").write_text(json.dumps(summary, indent=2))
    plot_comparison(args.out / "compare.png", runs, args.epochs, args.lr)
    print(f"\n{'run':<8}{'ranks x batch':>14}  held-out accuracy per epoch | training loss per epoch")
    for name, s in summary.items():
        accuracies, losses = ("  ".join(f"{x:.4f}" for x in s[key]) for key in ("held_out_accuracy", "train_loss"))
        print(f"{name:<8}{s['world_size']:>7} x {s['batch_size']:<4}  accuracy {accuracies} | loss {losses}")
    for index, when in ((0, "after epoch 1"), (-1, "at the end")):
        accuracy = ", ".join(f"{name} {s['held_out_accuracy'][index]:.3f}" for name, s in summary.items())
        loss = ", ".join(f"{name} {s['train_loss'][index]:.3f}" for name, s in summary.items())
        print(f"{when}: held-out accuracy {accuracy}; training loss {loss}")
    print(f"wrote {args.out / 'compare.png'} and {args.out / 'compare.json'}")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.compare:
        compare(args)
    elif train(args):  # a process group to leave (see leave_group)
        leave_group()


if __name__ == "__main__":
    main()
