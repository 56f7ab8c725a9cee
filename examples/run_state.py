"""The run folder of examples/train_digits.py: checkpoints, the completion record, the event log, metrics.json.

Everything here runs on rank 0 only (or in examples/compare_digits.py, which reads run folders)
and needs no process group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

CKPT_PREFIX, CKPT_SUFFIX = "ckpt-", ".pt"
CKPT_FORMAT = 1
CRASH_MARKER = ".crash-injected"
# Settings that must match for a checkpoint to be resumable: they fix the data order and the math.
RESUME_KEYS = ("norm", "batch_size", "world_size", "seed", "lr", "momentum", "limit_batches")


def checkpoint_files(out: Path) -> list[Path]:
    """Checkpoints in ``out``, newest (highest step) first."""
    found = []
    for path in out.glob(f"{CKPT_PREFIX}*{CKPT_SUFFIX}"):
        step = path.name[len(CKPT_PREFIX) : -len(CKPT_SUFFIX)]
        if step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found, reverse=True)]


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` (torch.save, or a str as text) so that ``path`` is absent, old or complete, never partial."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        if isinstance(obj, str):
            f.write(obj.encode())
        else:
            import torch  # here, not at the top: compare_digits.py reads run folders without torch

            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_newest_checkpoint(out: Path) -> Optional[dict]:
    """The newest checkpoint in ``out`` that loads and is complete; corrupt ones are skipped with a warning."""
    import torch

    for path in checkpoint_files(out):
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
        state["path"] = str(path)
        return state
    return None


def save_checkpoint(out: Path, keep: int, state: dict) -> None:
    atomic_save(state, out / f"{CKPT_PREFIX}{state['step']:08d}{CKPT_SUFFIX}")
    for old in checkpoint_files(out)[keep:]:
        old.unlink(missing_ok=True)


OUTPUTS = ("metrics.json", "metrics.png", "final_model.pt")


def completion_record(state: dict, precise_bn: int) -> dict:
    """What metrics.json records about a finished run, to recognise it when it is run again."""
    return {"epochs": state["epoch"], "step": state["step"], "precise_bn": precise_bn}


def finished_run_message(out: Path, state: Optional[dict], config: dict, args: argparse.Namespace) -> Optional[str]:
    """A message when ``out`` holds this run complete (trained and its outputs written), else None."""
    if state is None or state["epoch"] < args.epochs or state["batches_done"] != 0:
        return None  # nothing yet, or training still to do: start or resume
    if any(state["config"].get(k) != config[k] for k in RESUME_KEYS):
        return None  # another run's checkpoints: the resume check below says so
    metrics = completed_run(out, config, state["epoch"], args.precise_bn)
    if metrics is None or metrics["complete"] != completion_record(state, args.precise_bn):
        return None  # trained, but the outputs are missing or were made otherwise: redo the final step only
    return (
        f"{out} already holds this run, complete (epochs: {state['epoch']}, step {state['step']}); its outputs are "
        + ", ".join(str(out / name) for name in OUTPUTS)
        + ". Nothing to do: pass --fresh to train again from scratch, or use a new --out."
    )


def clear_run(out: Path) -> None:
    """--fresh: remove what an earlier run left in ``out`` (only this script's own files)."""
    for path in [*out.glob(f"{CKPT_PREFIX}*{CKPT_SUFFIX}"), *(out / name for name in (*OUTPUTS, "events.jsonl"))]:
        path.unlink(missing_ok=True)


def log_event(out: Path, **event: Any) -> None:
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def process_started_at() -> Optional[float]:
    """When this process was created (Linux /proc; None elsewhere): splits a restart's cost into parts."""
    try:
        uptime = float(open("/proc/uptime").read().split()[0])  # seconds since boot, 10 ms resolution
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: start time
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def maybe_crash(out: Path, step: int, rank: int, world_size: int) -> None:
    """Test hook: SIGKILL this worker once at the configured step (see train_digits.py's docstring)."""
    crash_at = os.environ.get("SYNCNORM_EXAMPLE_CRASH_AT_STEP")
    if not crash_at or int(crash_at) != step:
        return
    if rank != int(os.environ.get("SYNCNORM_EXAMPLE_CRASH_RANK", world_size - 1)):
        return
    out.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out / CRASH_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # already crashed once: the restarted run goes on
    os.write(fd, json.dumps({"time": time.time(), "step": step, "rank": rank}).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def completed_run(out: Path, config: dict, epochs: int, precise_bn: int = 0) -> Optional[dict]:
    """``out``'s metrics.json when it records this run complete and its outputs exist, else None.

    The quick check that needs no checkpoint: what compare_digits.py uses to skip a finished run
    without starting torchrun; train_digits.py itself checks the checkpoint as well.
    """
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    complete = metrics.get("complete") or {}
    same = all(metrics.get("config", {}).get(k) == config[k] for k in RESUME_KEYS)
    if not same or complete.get("epochs") != epochs or complete.get("precise_bn") != precise_bn:
        return None
    return metrics if all((out / name).exists() for name in OUTPUTS) else None


def write_metrics(
    out: Path,
    config: dict,
    history: list[dict],
    complete: Optional[dict] = None,
    precise_bn: Optional[dict] = None,
    held_out_images: Optional[int] = None,
) -> None:
    """metrics.json and metrics.png (losses and held-out accuracy per epoch); metrics.json last."""
    from plots import plot_run

    starts = []
    if (out / "events.jsonl").exists():
        starts = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    metrics = {"config": config, "history": history, "final": history[-1] if history else {}, "events": starts}
    if held_out_images is not None:
        metrics["held_out_images"] = held_out_images
    if precise_bn is not None:
        metrics["precise_bn"] = precise_bn
    metrics["complete"] = complete
    plot_run(out / "metrics.png", config, history, precise_bn, held_out_images)
    atomic_save(json.dumps(metrics, indent=2), out / "metrics.json")  # last: its "complete" marks the run done
