"""Every check syncnorm needs from one lent GPU, in one run: correctness, host syncs, CUDA graphs, compile,
speed, memory; a report that cannot read PASS for something that did not happen.

    PYTHONUNBUFFERED=1 timeout -s KILL 268 python -m tools.gpu_check --device cuda --out OUT --syncnorm-commit SHA
    python -m tools.gpu_check --device cpu --out /tmp/gpucheck [--quick]   # rehearsal

Sections (``--sections`` picks some), in the order they run:

* a) correctness: 2 and 4 gloo ranks sharing the device (spawned: CUDA cannot fork), against
  float64 nn.BatchNorm on the global batch, with the op's own output and input-gradient strides;
* c3) a fresh interpreter per model (``fresh.py``) makes syncnorm's very first call
  inside a CUDA graph capture, replays vs eager;
* b) no host sync (sync debug mode): the ResNet-50 training step, the SyncProbe step (an empty
  rank and a one-sample rank included) and every synchronised layer alone (empty rank, one value
  per channel);
* c1) the whole ResNet-50 step and the SyncProbe step captured in one CUDA graph, replays vs eager;
* e) InPlaceABNSync activation memory vs BatchNorm2d + LeakyReLU on a conv stack;
* c2) torch.compile(fullgraph=True) and mode="reduce-overhead" vs eager (0 cudagraph skips);
* d1) per-layer fwd+bwd speed and bandwidth; d2) ResNet-50 step time.

a and c3 run in other processes, started first and joined before d1; b-e run here as rank 0 of
W = 8 under torch's fake process group, with a stand-in for the collectives (``IdenticalRanks``,
``OtherRanks`` in ``parts.py``). The models are in ``models.py``; the
section bodies in ``correctness.py`` (a), ``fresh.py`` (c3),
``sections.py`` (b, c1, c2) and ``speed.py`` (e, d1, d2); the report in
``report.py``; the budget and statuses in ``run.py``.

Budget: counted from the start of this process. A section starts only if it fits in
``--budget-s`` (otherwise "not run (budget)"); both reports are rewritten after every section;
at budget + ``--grace-s`` a watchdog thread marks what runs "killed", writes the report, ends the
child processes and exits (code 3); 10 s later faulthandler ends the process even if that thread
could not run. On CUDA budget + grace + 10 s may not pass 270 s (two runs and two machine starts
fit in 15 minutes of device time). Exit codes: 0 every chosen section ran and every check passed
(on CPU: rehearsed), 1 a section failed or a target missed, 2 usage, 3 watchdog, 4 incomplete.
On CPU the parts that need CUDA run on the same code paths (graph replay becomes an eager step,
syncs are not counted, CUDA events become perf_counter) and give no verdict.
"""

from __future__ import annotations

import time

PROCESS_START = time.monotonic()  # before the imports: the budget counts them

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from . import correctness, fresh, report, sections, speed  # noqa: E402
from .run import (  # noqa: E402
    BACKGROUND,
    BUDGET_S,
    GRACE_S,
    HARD_EXIT_S,
    JOIN_BEFORE,
    MAX_RUN_S,
    ORDER,
    SECTIONS,
    WATCHDOG_WORST_S,
    WORLD,
    Run,
    run_section,
)

BODIES: dict[str, Callable[[Run], dict]] = {
    "b": sections.section_no_host_sync,
    "c1": sections.section_cuda_graph,
    "e": speed.section_memory,
    "c2": sections.section_compile,
    "d1": speed.section_layer_speed,
    "d2": speed.section_step_speed,
}
STARTERS: dict[str, Callable[[Run], Callable[[Run], dict]]] = {
    "a": correctness.start_correctness,
    "c3": fresh.start_fresh_graph_case,
}
__all__ = ["BUDGET_S", "GRACE_S", "HARD_EXIT_S", "MAX_RUN_S", "WATCHDOG_WORST_S", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--out", required=True, help="folder for gpu_check.md, gpu_check.json and the fresh-process logs"
    )
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="sections start only within this (from process start)"
    )
    parser.add_argument(
        "--grace-s", type=float, default=GRACE_S, help="watchdog: write the report and exit this long after the budget"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and fewer cases (a smoke run)")
    parser.add_argument("--sections", default=",".join(ORDER), help="comma-separated subset of " + ",".join(ORDER))
    parser.add_argument("--compile-backend", default="", help="default: inductor (aot_eager for --quick on CPU)")
    parser.add_argument(
        "--syncnorm-commit", default="", help="the commit to report where the checkout has no git history"
    )
    args = parser.parse_args(argv)
    worst = args.budget_s + args.grace_s + HARD_EXIT_S
    if args.device == "cuda" and worst > MAX_RUN_S:
        parser.error(
            f"--budget-s + --grace-s + {HARD_EXIT_S:.0f} s = {worst:.0f} s: a GPU run may take at most {MAX_RUN_S:.0f} s"
        )
    unknown = set(args.sections.split(",")) - set(ORDER)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {ORDER}")
    return args


def start_watchdog(run: Run) -> threading.Timer:
    """At budget + grace: mark what runs "killed" and what waits "not run (budget)", write, end the children, exit 3."""

    def overrun() -> None:
        with run.lock:
            for section in run.sections.values():
                if section["status"] in ("running", "started in background"):
                    section.update(
                        status="killed",
                        reason=f"the run passed budget + grace ({run.args.budget_s + run.args.grace_s:.0f} s)",
                    )
                elif section["status"] == "pending":
                    section.update(status="not run (budget)", reason="the watchdog ended the run first")
            run.write()
            print(report.summary(run.meta, run.targets(), run.sections, run.cuda), flush=True)
        for child in multiprocessing.active_children():  # the correctness ranks, if still running
            child.kill()
        for proc in run.children:  # the fresh-process graph cases
            if proc.poll() is None:
                proc.kill()
        print("gpu_check: WATCHDOG: budget + grace passed; report written, exiting", flush=True)
        os._exit(3)

    limit = run.args.budget_s + run.args.grace_s
    # The last resort, should this thread not get to run: a C thread that needs no GIL.
    faulthandler.dump_traceback_later(max(1.0, limit + HARD_EXIT_S - (time.monotonic() - PROCESS_START)), exit=True)
    watchdog = threading.Timer(max(0.0, limit - (time.monotonic() - PROCESS_START)), overrun)
    watchdog.daemon = True
    watchdog.start()
    return watchdog


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False", flush=True)
        return 2
    if args.device == "cuda":
        torch.cuda.set_device(0)
    chosen = [key for key in ORDER if key in args.sections.split(",")]
    run = Run(args, PROCESS_START, chosen)
    print(f"gpu_check: card {run.meta['card']}, torch {torch.__version__}, syncnorm {run.meta['syncnorm_commit']}, "
          f"sections {chosen}, budget {args.budget_s:.0f} s + grace {args.grace_s:.0f} s from process start", flush=True)  # fmt: skip
    watchdog = start_watchdog(run)
    run.write()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    joins: dict[str, tuple[Callable[[Run], dict], float]] = {}
    for key in (k for k in chosen if k in BACKGROUND):
        print(f"== [{key}] {SECTIONS[key]}: started in the background", flush=True)
        started = time.perf_counter()
        try:
            joins[key] = (STARTERS[key](run), started)
            run.record(key, status="started in background")
        except Exception as err:  # noqa: BLE001  (recorded as the section's failure)
            run.record(key, status="failed", error=f"could not start: {type(err).__name__}: {err}")
    for key in (k for k in chosen if k not in BACKGROUND):
        if key in JOIN_BEFORE:
            for background, (join, started) in list(joins.items()):  # nothing else runs during the timings
                print(f"== [{background}] joining", flush=True)
                run_section(run, background, join, started)
                del joins[background]
        run_section(run, key, BODIES[key])
    for background, (join, started) in joins.items():
        run_section(run, background, join, started)
    watchdog.cancel()
    faulthandler.cancel_dump_traceback_later()
    run.write()
    rows = run.targets()
    print(report.summary(run.meta, rows, run.sections, run.cuda), flush=True)
    return report.overall(run.sections, rows, run.cuda)[0]


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # no gloo or fake-group destructors at interpreter exit
