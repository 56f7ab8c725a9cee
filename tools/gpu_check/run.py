"""The frame of a ``tools/gpu_check`` run: its sections and budget, the clock, the report files, and
how a section's outcome becomes its status.

A section is a function ``body(run) -> dict`` whose result holds ``checks``: name ->
``{"passed": True | False | None, "measured": str}`` (None: not measurable here, e.g. on CPU).
Its status comes from those checks alone, so a section cannot pass by leaving them out:
"failed" when it raised, reported no checks, or any check is False; "ok" when all are True;
"rehearsed" (CPU) or "incomplete" (CUDA) when some could not be measured; "incomplete (budget)"
when it cut itself short; "not run (budget)" when it did not fit; "killed" by the watchdog.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.measure import RESNET50_SHAPES, machine_description

from . import parts, report

# The budget, from the start of the process (imports included). Two runs and two machine starts
# must fit in 15 minutes of device time, so one run may take at most MAX_RUN_S however it ends.
MAX_RUN_S = 270.0
BUDGET_S = 225.0  # a section starts only if its NEEDS_S fit in what is left of this
GRACE_S = 30.0  # the watchdog thread writes the report and exits this long after the budget
HARD_EXIT_S = 10.0  # faulthandler ends the process this long after that, should the watchdog thread not get to run
WATCHDOG_WORST_S = BUDGET_S + GRACE_S + HARD_EXIT_S
assert WATCHDOG_WORST_S <= MAX_RUN_S

WORLD = 8  # the stand-in's world size for sections b-e
PROFILES = {  # sizes: the GPU run, the CPU rehearsal, and a smoke run (--quick)
    "gpu": dict(batch=32, image=224, shapes=RESNET50_SHAPES, layer_reps=15, layer_inner=4,
                step_reps=10, step_inner=2, graph_warmup=3, graph_steps=4, probe_steps=3, abn=(32, 64, 56, 56, 10),
                rank_timeout=150),
    "cpu": dict(batch=2, image=64, shapes=((64, 28, 28), (256, 14, 14), (512, 7, 7)), layer_reps=5, layer_inner=2,
                step_reps=3, step_inner=1, graph_warmup=2, graph_steps=2, probe_steps=2, abn=(2, 16, 16, 16, 3),
                rank_timeout=300),
    "quick": dict(batch=2, image=32, shapes=((16, 8, 8),), layer_reps=2, layer_inner=1, step_reps=2, step_inner=1,
                  graph_warmup=1, graph_steps=1, probe_steps=2, abn=(2, 8, 8, 8, 2), rank_timeout=150),
}  # fmt: skip
SECTIONS = {
    "a": "correctness: 2 and 4 gloo ranks vs float64 nn.BatchNorm on the global batch",
    "c3": "CUDA graph, fresh process: the first syncnorm call made inside a capture",
    "b": "no host sync: ResNet-50 step, SyncProbe step and every synchronised layer under sync debug mode",
    "c1": "CUDA graph: the whole ResNet-50 step and the SyncProbe step captured, replays vs eager",
    "e": "memory: InPlaceABNSync vs BatchNorm2d + LeakyReLU, activation memory of a training step",
    "c2": "torch.compile(fullgraph=True) and mode='reduce-overhead' vs eager",
    "d1": "speed: per-layer fwd+bwd on ResNet-50 shapes, bandwidth vs copy",
    "d2": "speed: ResNet-50 training step",
}
ORDER = list(SECTIONS)  # executed in this order
# a and c3 run in other processes, started first and joined before the timed sections.
BACKGROUND = ("a", "c3")
JOIN_BEFORE = ("d1", "d2")
# Roughly what each section needs on the GPU, in seconds: one that no longer fits is not run.
# c2 gets what the sections after it leave (it checks before each compile mode).
NEEDS_S = {"a": 0, "c3": 0, "b": 30, "c1": 25, "e": 10, "c2": 45, "d1": 35, "d2": 30}
CPU_NEEDS_SCALE = 0.25  # the CPU rehearsal's sizes are small


def profile_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else ("gpu" if args.device == "cuda" else "cpu")


class Run:
    """The run's settings, clock and report; sections read and write through it."""

    def __init__(self, args: argparse.Namespace, process_start: float, chosen: list[str]) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.sizes = dict(PROFILES[profile_name(args)])
        self.process_start = process_start
        self.deadline = process_start + args.budget_s
        self.standin = parts.OtherRanks(WORLD)
        self.lock = threading.RLock()
        self.chosen = chosen
        self.children: list[Any] = []  # subprocess.Popen objects the watchdog must end
        self.sections: dict[str, dict] = {
            key: {"title": SECTIONS[key], "status": "pending" if key in chosen else "not selected"} for key in SECTIONS
        }
        self.meta = self._meta()

    def _meta(self) -> dict:
        meta: dict[str, Any] = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            **machine_description(),
        }
        if self.args.syncnorm_commit:
            meta["syncnorm_commit"] = self.args.syncnorm_commit + " (given on the command line)"
        elif meta.get("syncnorm_commit", "unknown") == "unknown":
            meta["syncnorm_commit"] = "unknown (no git history here: pass --syncnorm-commit)"
        meta.update(card=torch.cuda.get_device_name() if self.cuda else "none (CPU rehearsal)", device=str(self.device),
                    budget_s=self.args.budget_s, grace_s=self.args.grace_s, world_standin=WORLD, pid=os.getpid(),
                    profile=profile_name(self.args), sizes=self.sizes)  # fmt: skip
        if self.cuda:
            meta.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        for name in ("torchvision", "triton"):
            try:
                meta[name] = __import__(name).__version__
            except Exception as err:  # noqa: BLE001  (any import failure: recorded)
                meta[name] = f"not available ({type(err).__name__})"
        return meta

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def needs_s(self, key: str) -> float:
        return NEEDS_S[key] * (1.0 if self.cuda else CPU_NEEDS_SCALE)

    def reserved_after(self, key: str) -> float:
        """What the chosen sections after ``key`` need: a section that can stop early leaves them this."""
        later = ORDER[ORDER.index(key) + 1 :]
        return sum(self.needs_s(k) for k in later if k in self.chosen and self.sections[k]["status"] == "pending")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def record(self, key: str, **fields: Any) -> None:
        with self.lock:
            self.sections[key].update(fields)
            self.write()

    def targets(self) -> list[dict]:
        return report.targets(self.sections, self.cuda)

    def write(self) -> None:
        with self.lock:
            self.meta["elapsed_s"] = round(time.monotonic() - self.process_start, 1)
            targets = self.targets()
            data = {"meta": self.meta, "targets": targets, "sections": self.sections}
            os.makedirs(self.args.out, exist_ok=True)
            for name, text in (
                ("gpu_check.json", json.dumps(data, indent=1, default=str)),
                ("gpu_check.md", report.markdown(self.meta, targets, self.sections)),
            ):
                path = os.path.join(self.args.out, name)
                with open(path + ".tmp", "w") as handle:
                    handle.write(text)
                os.replace(path + ".tmp", path)


def section_status(result: Any, cuda: bool) -> tuple[str, list[str]]:
    """A section's status from its checks, and the names of the checks that missed."""
    checks = result.get("checks") if isinstance(result, dict) else None
    if not isinstance(checks, dict) or not checks:
        return "failed", ["(the section reported no checks)"]
    missed = [name for name, check in checks.items() if not isinstance(check, dict) or check.get("passed") is False]
    if missed:
        return "failed", missed
    if result.get("budget_cut"):
        return "incomplete (budget)", []
    if all(check.get("passed") is True for check in checks.values()):
        return "ok", []
    return ("incomplete" if cuda else "rehearsed"), []


def run_section(run: Run, key: str, body: Callable[[Run], dict], started: float | None = None) -> None:
    """Run one section and record it.

    ``started``: when a background section began (its seconds count from there). Such a section
    is always joined, whatever budget is left: it is already running, and the watchdog bounds it.
    """
    left = run.left_s()
    if started is None and left < run.needs_s(key):
        run.record(
            key,
            status="not run (budget)",
            reason=f"{left:.0f} s of budget left, it needs about {run.needs_s(key):.0f} s",
        )
        print(f"== [{key}] NOT RUN (budget): {left:.0f} s left", flush=True)
        return
    print(f"== [{key}] {SECTIONS[key]}  ({left:.0f} s of budget left)", flush=True)
    run.record(key, status="running")
    start = time.perf_counter() if started is None else started
    try:
        result = body(run)
        run.sync()  # an asynchronous CUDA error belongs to this section
        status, missed = section_status(result, run.cuda)
        fields: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - start, 1), "result": result}
        if missed:
            fields["missed"] = missed
        if result.get("budget_cut"):
            fields["reason"] = result["budget_cut"]
        run.record(key, **fields)
    except Exception as err:  # noqa: BLE001  (record it and go on with the next section)
        run.record(key, status="failed", seconds=round(time.perf_counter() - start, 1),
                   error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])  # fmt: skip
        traceback.print_exc()
    gc.collect()  # the section's models and graphs go before the next one starts
    if run.cuda:
        torch.cuda.empty_cache()
    section = run.sections[key]
    print(f"   [{key}] {section['status']} in {section.get('seconds', 0)} s"
          + (f"; missed: {', '.join(section['missed'])}" if "missed" in section else ""), flush=True)  # fmt: skip
