"""How every benchmark (and ``tools/gpu_check``) measures: the interleaved timer, paired ratios, memory, the machine.

Timing rules, shared so that every table in docs/performance.md means the same thing:

* **Interleaved.** Each repetition runs every variant once, in a fresh random order (the same on
  every rank, from a fixed seed). Timing each variant in a block of its own drifts 2x on a
  shared machine; a fixed or merely rotated order makes one variant always follow the same
  neighbour, and what that neighbour leaves behind (caches, memory the allocator returned)
  biases it.
* **Paired ratios.** A ratio is the median over repetitions of the two variants' times in the
  same repetition, which cancels load that drifts over the run.
* **Device time and host time apart.** The device is synchronised before each start, so the
  clock starts on an idle queue; nothing synchronises between the start and end events, so a
  host-bound variant's launch gaps show as they would in a training loop. The host clock
  around the launches alone gives what the CPU spent issuing the work. On CPU both are the
  same wall time.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

import syncnorm

# The BatchNorm input shapes of ResNet-50, per sample (C, H, W).
RESNET50_SHAPES = ((64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))


class HostEvent:
    """The CPU stand-in for ``torch.cuda.Event``: the time at ``record()`` (CPU ops are synchronous)."""

    def __init__(self) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.at - self.at) * 1e3


class _StreamEvent:
    """A ``torch.cuda.Event`` recorded on one device's current stream, whichever device is current."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event(enable_timing=True)
        self.device = device

    def record(self) -> None:
        self.event.record(torch.cuda.current_stream(self.device))

    def elapsed_time(self, end: _StreamEvent) -> float:
        return self.event.elapsed_time(end.event)


class DeviceClock:
    """What the timer needs of a device: synchronise it, and events that time its queue."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def event(self) -> Any:
        return _StreamEvent(self.device) if self.cuda else HostEvent()


@dataclass
class Timings:
    """Seconds per call, one value per timed repetition: ``device`` from the clock's events, ``host`` launching."""

    device: dict[str, list[float]]
    host: dict[str, list[float]]


def time_interleaved(
    steps: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    *,
    inner: int = 1,
    barrier: Optional[Callable[[], None]] = None,
    clock: Optional[DeviceClock] = None,
    host_clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Time each step ``reps`` times, interleaved (see the module's rules), ``inner`` calls per timing.

    The first ``warmup`` repetitions run the same way and are not kept. ``barrier`` (for example
    ``dist.barrier``) runs before each timed block, outside it, so that every rank times the same
    collective. The garbage collector is off while timing.
    """
    clock = clock or DeviceClock()
    names, order = list(steps), random.Random(0)
    marks: dict[str, list] = {name: [] for name in names}
    host: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for rep in range(warmup + reps):
            for name in order.sample(names, len(names)):
                if barrier is not None:
                    barrier()
                clock.synchronize()
                start, end = clock.event(), clock.event()
                start.record()
                launched = host_clock()
                for _ in range(inner):
                    steps[name]()
                launch = host_clock() - launched
                end.record()
                if rep >= warmup:
                    marks[name].append((start, end))
                    host[name].append(launch / inner)
        clock.synchronize()
    finally:
        gc.enable()
    device = {name: [s.elapsed_time(e) / 1e3 / inner for s, e in marks[name]] for name in names}
    return Timings(device=device, host=host)


def fwd_bwd(module: nn.Module, input: Tensor, grad_output: Tensor) -> Callable[[], None]:
    """One training-mode forward and backward of ``module``, gradients cleared first: a step to time."""

    def step() -> None:
        input.grad = None
        for param in module.parameters():
            param.grad = None
        module(input).backward(grad_output)

    return step


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def paired(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median and quartiles over repetitions of numerator / denominator timed in the same repetition."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    quarter = len(ratios) // 4
    return {"median": median(ratios), "q1": ratios[quarter], "q3": ratios[len(ratios) - 1 - quarter]}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median of :func:`paired`: what the tables quote as "x nn.BatchNorm"."""
    return paired(numerator, denominator)["median"]


def saved_tensor_bytes(module: nn.Module, input: Tensor) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves for backward during one forward.

    ``all``: every distinct storage (deduplicated by data pointer), the input and the
    module's own parameters and buffers included; ``new``: only the storages the
    forward allocated (not the input, not the module's state), i.e. what saving adds.
    """
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() != 0:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = module(input)
    del output
    existing = {t.untyped_storage().data_ptr() for t in [input, *module.parameters(), *module.buffers()]}
    return {
        "all": sum(storages.values()),
        "new": sum(nbytes for pointer, nbytes in storages.items() if pointer not in existing),
    }


def syncnorm_commit() -> str:
    """The commit of the syncnorm that was imported ("+dirty" if its files changed; "unknown" outside git)."""
    where = os.path.dirname(os.path.abspath(syncnorm.__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return (commit + "+dirty" if git("status", "--porcelain", "--", ".") else commit) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> dict:
    """What a measurement ran on, stored beside its numbers."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "syncnorm_commit": syncnorm_commit(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "syncnorm": getattr(syncnorm, "__version__", "?"),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
