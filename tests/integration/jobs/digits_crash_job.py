"""examples/train_digits.py's ``main``, with a worker failure injected and each process's start recorded.

    launch/torchrun_local.sh 2 tests/integration/jobs/digits_crash_job.py [--crash-at-step K] [--crash-rank R] \\
        [--process-log FILE] examples/train_digits.py [ITS ARGUMENTS...]

Examples are scripts, not a package: the example and its sibling ``common.py`` are loaded from
their paths, and its ``main`` runs with its own arguments. The example carries no test hooks; this
job watches it through torch's global optimizer step hook.

``--crash-at-step K``: rank R (default: the last rank) kills itself with SIGKILL right after its
K-th optimizer step, once per output folder: the marker file ``.crash-injected`` in the example's
``--out`` records it (time, step, rank), and a restarted group or a later run goes on. K counts the
optimizer steps of this process, which are the run's steps when it starts from scratch.

``--process-log FILE``: every process appends JSON lines to FILE, each with its rank, torchrun's
restart count and the time: ``start`` (also ``launched``, when the process was created per /proc)
and ``first_step`` (when its first optimizer step ended): what a restart's cost is split into.

torchrun's own parser reads the whole command line and rejects a flag that abbreviates one of its
options (``--log`` would be ``--log-dir``): keep this job's flags unambiguous.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional


def process_started_at() -> Optional[float]:
    """When this process was created (Linux /proc; None elsewhere)."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])  # seconds since boot, 10 ms resolution
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: start time
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_example(path: Path):
    # The example imports its sibling common.py by name, as a script run from its folder would;
    # that one module is loaded from its path here, so sys.path stays as it is.
    _load(path.resolve().parent / "common.py", "common")
    return _load(path.resolve(), path.stem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crash-at-step", type=int, metavar="K", help="SIGKILL after this process's K-th step")
    parser.add_argument("--crash-rank", type=int, metavar="R", help="the rank that crashes (default: the last)")
    parser.add_argument("--process-log", type=Path, help="append each process's start and first step to this file")
    parser.add_argument("example", type=Path, help="path of examples/train_digits.py")
    parser.add_argument("example_args", nargs=argparse.REMAINDER, help="the example's arguments")
    args = parser.parse_args()
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    crash_rank = world_size - 1 if args.crash_rank is None else args.crash_rank

    def record(event: str, **fields) -> None:
        if args.process_log is not None:
            line = {"event": event, "rank": rank, "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT"), **fields}
            with open(args.process_log, "a") as f:
                f.write(json.dumps({**line, "time": time.time()}) + "\n")

    record("start", launched=process_started_at())
    example = load_example(args.example)
    out: Path = example.parse_args(args.example_args).out
    steps = 0

    def after_step(optimizer, step_args, step_kwargs) -> None:
        nonlocal steps
        steps += 1
        if steps == 1:
            record("first_step")
        if steps != args.crash_at_step or rank != crash_rank:
            return
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(out / ".crash-injected", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # crashed once already in this folder: the restarted run goes on
        os.write(fd, json.dumps({"time": time.time(), "step": steps, "rank": rank}).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(after_step)
    example.main(args.example_args)


if __name__ == "__main__":
    main()
