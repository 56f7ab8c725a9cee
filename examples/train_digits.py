"""Train DigitsNet on the scikit-learn digits with syncnorm.SyncBatchNorm under torchrun (or plain python).

    launch/torchrun_local.sh 2 examples/train_digits.py --epochs 3 --out runs/digits
    python examples/train_digits.py --compare --nproc 2 --batch-size 2 --epochs 3 --out runs/digits

The second line (examples/compare_digits.py) trains three runs into runs/digits/{sync,local,single}
and plots them together: syncnorm and per-rank BatchNorm at per-rank batch 2, and one process on
the same global batch. What follows describes one run.

Each rank takes its DistributedSampler share of the training split, DDP averages the gradients and
``--norm sync`` normalises every BatchNorm over the global batch. What this script adds to a plain loop:

* fault tolerance: rank 0 writes checkpoints atomically (temp file + ``os.replace``) every
  ``--ckpt-every`` steps and at each epoch end; a (re)started run resumes from the newest checkpoint
  that loads, skipping corrupt ones with a warning, and skips the batches of the current epoch that
  were already done. Runs are deterministic, so a resumed run ends with bitwise the same weights and
  BatchNorm buffers as an uninterrupted one (given the same world size);
* ``--precise-bn N``: before the final evaluation, :func:`syncnorm.precise_bn` replaces the running
  statistics with the population statistics of N training batches per rank (all ranks together);
  the held-out accuracy is reported with both, and ``final_model.pt`` holds the precise ones;
* at the end, rank 0 writes ``metrics.json``, ``metrics.png`` (examples/plots.py) and
  ``final_model.pt`` to ``--out`` (the run folder's files: examples/run_state.py).
  Rerunning a finished run with the same ``--out`` says so, names its outputs and exits 0 without
  training (it only redoes the final step if the outputs are missing or ``--precise-bn`` changed);
  ``--fresh`` (or a new ``--out``) trains again from scratch. A run that did not finish resumes.

Environment: ``SYNCNORM_BACKEND`` (gloo|nccl) overrides the backend (default: nccl on CUDA, gloo
on CPU). ``SYNCNORM_EXAMPLE_CRASH_AT_STEP=k`` makes rank ``SYNCNORM_EXAMPLE_CRASH_RANK`` (default:
the last rank) kill itself with SIGKILL after step k, once per output folder (a marker file
records it), so tests can exercise a real worker failure under torchrun. With bare torchrun and
--max-restarts, export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 as launch/*.sh do: otherwise a restarted
group can connect with the previous attempt's addresses and fail (pytorch/pytorch#135712).
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/common.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # syncnorm from a source checkout

from common import NORM_CHOICES, DigitsNet, load_digits  # noqa: E402
from run_state import (  # noqa: E402
    CKPT_FORMAT,
    RESUME_KEYS,
    atomic_save,
    clear_run,
    completion_record,
    finished_run_message,
    load_newest_checkpoint,
    log_event,
    maybe_crash,
    process_started_at,
    save_checkpoint,
    write_metrics,
)

import syncnorm  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--norm", choices=NORM_CHOICES, default="sync", help="sync: syncnorm.SyncBatchNorm")
    parser.add_argument("--batch-size", type=int, default=16, help="per-rank batch size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="output and checkpoint folder")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: epoch ends only)")
    parser.add_argument("--limit-batches", type=int, default=0, help="only the first N batches per epoch")
    parser.add_argument("--keep-ckpts", type=int, default=3, help="how many checkpoints to keep")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compare", action="store_true", help="run examples/compare_digits.py (see its --help)")
    parser.add_argument(
        "--precise-bn",
        type=int,
        default=0,
        metavar="N",
        help="before the final evaluation, recompute the BatchNorm statistics over N training batches per rank",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete this --out's checkpoints and outputs and train from scratch (ignored on a torchrun restart)",
    )
    args = parser.parse_args(argv)
    sizes = (args.epochs, args.ckpt_every, args.limit_batches, args.precise_bn)
    if args.batch_size < 1 or args.keep_ckpts < 1 or min(sizes) < 0:
        parser.error(
            "--batch-size and --keep-ckpts must be >= 1; --epochs, --ckpt-every, --limit-batches, --precise-bn >= 0"
        )
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
        trainable = DistributedDataParallel(model, forward_sync_buffers=sync_buffers)
    else:
        trainable = DistributedDataParallel(model, broadcast_buffers=sync_buffers)
    return model, trainable


def epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of ``epoch``: a pure function of (seed, epoch, rank), so a restart redraws them."""
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i : i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


def leave_group() -> None:
    """Wait for every rank, then end this process without running gloo's teardown.

    Destroying a gloo process group joins gloo's worker threads while holding the GIL. Each worker
    still holds the last collective it ran, and dropping it releases tensors that Python created,
    which takes the GIL: then both threads wait forever. Seen here as a hang at the very end of 3
    in 65 two-rank runs (the main thread in ``~ProcessGroupGloo`` -> ``std::thread::join``, a gloo
    thread in ``decref_pyobject`` waiting for the GIL). Keeping the barrier's Work alive until the
    group is destroyed covers only the worker thread that ran the barrier, and gloo has two. So the
    teardown does not run at all: every rank has passed the barrier, the outputs are written and
    closed, stdout and stderr are flushed, and ``os._exit`` ends the process; torchrun only needs
    its exit status. docs/troubleshooting.md has the same for your own scripts.
    """
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def broadcast_state(state: Any, distributed: bool) -> Any:
    """Rank 0 reads the checkpoint; everybody gets the same one (no shared filesystem needed)."""
    if not distributed:
        return state
    box = [state]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- training


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
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def recompute_batchnorm_statistics(
    model: nn.Module,
    sampler: DistributedSampler,
    images: torch.Tensor,
    held_out: TensorDataset,
    args: argparse.Namespace,
    history: list,
    rank: int,
) -> Optional[dict]:
    """--precise-bn: population statistics of N training batches per rank, then the held-out accuracy again.

    The batches are those of a further epoch (a fresh shuffle of each rank's share); the model is
    the bare one (not the DDP wrapper). Every rank evaluates, as after each epoch.
    """
    if not history or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None  # no epoch was trained, or --norm none: nothing to recompute
    device = images.device
    batches = epoch_batches(sampler, args.epochs, args.batch_size)
    started = time.perf_counter()
    result = syncnorm.precise_bn(
        model,
        batches,
        args.precise_bn,
        forward=lambda net, batch: net(images[torch.as_tensor(batch, device=device)]),
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    held_out_loss, accuracy = evaluate(model, held_out, device)
    record = {
        "batches_per_rank": result.local_batches,
        "batches": result.batches,
        "seconds": seconds,
        "held_out_loss": held_out_loss,
        "held_out_accuracy": accuracy,
        "held_out_accuracy_running_stats": history[-1]["held_out_accuracy"],
        "max_mean_change": result.max_mean_change,
        "max_var_change": result.max_var_change,
    }
    if rank == 0:
        print(
            f"precise BN over {result.batches} batches ({result.local_batches} per rank) in {seconds:.2f} s: held-out"
            f" acc {history[-1]['held_out_accuracy']:.4f} with running statistics, {accuracy:.4f} with precise"
            f" statistics (held-out loss {history[-1]['held_out_loss']:.4f} -> {held_out_loss:.4f})",
            flush=True,
        )
    return record


class EpochLoss:
    """Mean training loss of an epoch over all ranks, summed across ranks only when it is needed.

    ``pending`` is this rank's share since the last fold; ``folded`` (the same on every rank) is the
    all-reduced total so far. Folding at checkpoints keeps the steps free of extra collectives and
    lets a checkpoint carry the partial epoch's loss.
    """

    def __init__(self, device: torch.device, distributed: bool) -> None:
        self.pending = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of batch losses, batches]
        self.folded = [0.0, 0.0]
        self.distributed = distributed

    def add(self, loss: torch.Tensor) -> None:
        self.pending[0] += loss.detach().double()
        self.pending[1] += 1

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
            clear_run(out)
    config = {k: getattr(args, k) for k in ("norm", "batch_size", "seed", "lr", "momentum", "limit_batches")}
    config["world_size"] = world_size

    train_set, held_out = load_digits(seed=args.seed)
    model, trainable = build_model(args.norm, device, args.seed, distributed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    images, labels = (t.to(device) for t in train_set.tensors)
    epoch_loss = EpochLoss(device, distributed)

    found = load_newest_checkpoint(out) if rank == 0 else None
    state, finished = broadcast_state(
        (found, finished_run_message(out, found, config, args)) if rank == 0 else None, distributed
    )
    if finished:
        if rank == 0:
            print(finished, flush=True)
        return distributed
    epoch, batches_done, step, history = 0, 0, 0, []
    if state is not None:
        mismatch = {k: (state["config"][k], config[k]) for k in RESUME_KEYS if state["config"][k] != config[k]}
        if mismatch:
            raise SystemExit(f"{out} holds checkpoints of another run (saved, now): {mismatch}; use a new --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, batches_done, step, history = state["epoch"], state["batches_done"], state["step"], state["history"]
        epoch_loss.folded = list(state["loss_sum"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
    if rank == 0:
        resumed = state["path"] if state else None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        log_event(out, event="start", resumed_from=resumed, step=step, restart=restart, launched=process_started_at())
        if resumed and epoch >= args.epochs:
            print(
                f"{resumed}: training is complete (step {step}); writing the final outputs again, as they are "
                "missing or were made with another --precise-bn",
                flush=True,
            )
        elif resumed:
            print(f"resuming from {resumed}: epoch {epoch + 1}, {batches_done} batches done, step {step}", flush=True)

    def checkpoint() -> None:
        loss_so_far = epoch_loss.fold()  # collective: every rank gets here
        if rank != 0:
            return
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
            "sampler": {"seed": args.seed, "epoch": epoch, "batches_done": batches_done},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        save_checkpoint(out, args.keep_ckpts, state)

    from tqdm import tqdm

    first_step_logged = False
    while epoch < args.epochs:
        started = time.perf_counter()
        batches = epoch_batches(sampler, epoch, args.batch_size)
        if args.limit_batches:
            batches = batches[: args.limit_batches]
        bar = tqdm(
            total=len(batches),
            initial=batches_done,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=rank != 0 or args.no_progress or not sys.stderr.isatty(),  # a bar in a log file is noise
            leave=False,
            dynamic_ncols=True,
        )
        for batch in batches[batches_done:]:  # a resumed epoch skips the batches already done
            index = torch.as_tensor(batch, device=device)
            loss = F.cross_entropy(trainable(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            batches_done += 1
            epoch_loss.add(loss)
            bar.update(1)
            if rank == 0 and not first_step_logged:
                log_event(out, event="first_step", step=step)
                first_step_logged = True
            maybe_crash(out, step, rank, world_size)
            if args.ckpt_every and step % args.ckpt_every == 0 and batches_done < len(batches):
                checkpoint()
        bar.close()
        train_loss = epoch_loss.finish_epoch()
        held_out_loss, accuracy = evaluate(model, held_out, device)
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_loss": train_loss, "held_out_loss": held_out_loss}
        history.append({**record, "held_out_accuracy": accuracy, "steps": step, "seconds": seconds})
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
        complete = completion_record({"epoch": epoch, "step": step}, args.precise_bn)
        # metrics.json last: its "complete" marks the run done
        write_metrics(out, config, history, complete, precise, held_out_images=len(held_out))
        print(f"wrote {out / 'metrics.json'}, {out / 'metrics.png'} and {out / 'final_model.pt'}", flush=True)
    return distributed


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--compare" in argv:  # compare_digits.py has its own flags (--nproc ...): hand over before parsing
        from compare_digits import main as compare_main

        compare_main(argv)
        return
    if train(parse_args(argv)):  # a process group to leave (see leave_group)
        leave_group()


if __name__ == "__main__":
    main()
