"""``python -m syncnorm doctor``: check a cluster's ranks agree, and measure what synchronising a model costs.

Run it the way training runs, under torchrun, on every node::

    torchrun --nproc-per-node 8 --nnodes 2 ... -m syncnorm doctor --model torchvision:resnet50

Every rank reports its torch and syncnorm versions, backend, world size and the settings that
change how synchronisation behaves (``SYNCNORM_CHECK``, syncnorm's wait-warning threshold, NCCL's
blocking wait and async error handling, the process group's timeout). A rank that differs from
rank 0 fails the check, named. Then it measures the bandwidth of one large all_reduce, and times
syncnorm's all_reduce for every payload the model's
BatchNorm layers send (forward ``2C + 3`` and backward ``2C + 2`` float64 values), over the
whole world and within each node (``LOCAL_WORLD_SIZE`` consecutive ranks, what
``syncnorm.new_sync_groups(LOCAL_WORLD_SIZE)`` would synchronise over), and prints the cost per
training step and plain advice. ``--json`` prints the same as JSON. The exit status is 1 when a
check failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import collectives

# Settings every rank must agree on; each is (name, how to read it on a rank).
_NCCL_VARIABLES = ("TORCH_NCCL_BLOCKING_WAIT", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_TIMEOUT")


def rank_facts() -> dict[str, Any]:
    """What this rank reports: versions, backend, world size and the settings that matter."""
    import syncnorm

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "syncnorm": syncnorm.__version__,
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "SYNCNORM_CHECK": os.environ.get("SYNCNORM_CHECK", ""),
        "wait_warning_s": collectives.wait_warning_seconds(),
        "pg_timeout_s": _group_timeout_seconds(),
    }
    for name in _NCCL_VARIABLES:
        facts[name] = os.environ.get(name, "")
    return facts


def _group_timeout_seconds() -> Optional[float]:
    try:
        timeout = dist.distributed_c10d._get_default_timeout(dist.get_backend())
        options = getattr(dist.group.WORLD, "options", None)
        timeout = getattr(options, "_timeout", timeout)
        return timeout.total_seconds()
    except Exception:  # private API: report it as unknown rather than fail the check
        return None


def disagreements(all_facts: list[dict[str, Any]]) -> list[str]:
    """One line per setting on which some rank differs from rank 0, naming the ranks."""
    problems = []
    for key, expected in all_facts[0].items():
        odd = [rank for rank, facts in enumerate(all_facts) if facts.get(key) != expected]
        if odd:
            values = ", ".join(f"rank {rank}: {all_facts[rank].get(key)!r}" for rank in odd)
            problems.append(f"{key} differs from rank 0's {expected!r} on {values}")
    return problems


def load_model(spec: str) -> nn.Module:
    """``torchvision:NAME``, ``timm:NAME`` or ``module:factory`` (a callable returning the model)."""
    source, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"syncnorm doctor: --model wants SOURCE:NAME, e.g. torchvision:resnet50, got {spec!r}")
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name)
    if source == "timm":
        import timm

        return timm.create_model(name)
    factory = getattr(importlib.import_module(source), name)
    return factory()


def payload_sizes(model: nn.Module) -> list[tuple[str, int]]:
    """(layer, channels) of every BatchNorm-like layer that syncnorm would synchronise."""
    return [(path, module.num_features) for path, module in model.named_modules() if isinstance(module, _BatchNorm)]


def time_all_reduce(numel: int, group: Optional[dist.ProcessGroup], device: torch.device, repeats: int) -> float:
    """Median seconds of one float64 all_reduce of ``numel`` values through syncnorm's wrapper."""
    tensor = torch.zeros(numel, dtype=torch.float64, device=device)
    group = group or dist.group.WORLD
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier(group=group)
        started = time.perf_counter()
        collectives.all_reduce(tensor, group, layer="doctor", what="timing")
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def measure(layers: list[tuple[str, int]], device: torch.device, repeats: int, local_size: int) -> dict[str, Any]:
    sizes = sorted({size for _, channels in layers for size in (2 * channels + 3, 2 * channels + 2)})
    world = {size: time_all_reduce(size, None, device, repeats) for size in sizes}
    local_group = None
    local = None
    world_size = dist.get_world_size()
    if 1 < local_size < world_size and world_size % local_size == 0:
        local_group = collectives.new_sync_groups(local_size)
        local = {size: time_all_reduce(size, local_group, device, repeats) for size in sizes}

    def per_step(times: dict[int, float]) -> float:
        return sum(times[2 * c + 3] + times[2 * c + 2] for _, c in layers)

    # Bandwidth, from one large all_reduce: what a ring all_reduce moves per rank over its time.
    large = 1 << 20  # float64 values: 8 MiB
    large_seconds = time_all_reduce(large, None, device, max(2, repeats // 5))
    bandwidth = 2 * (world_size - 1) / world_size * large * 8 / large_seconds if world_size > 1 else 0.0
    return {
        "payload_sizes": sizes,
        "bandwidth_bytes_per_s": bandwidth,
        "world_seconds_by_size": world,
        "local_seconds_by_size": local,
        "step_seconds_world": per_step(world),
        "step_seconds_local": per_step(local) if local is not None else None,
        "local_size": local_size if local is not None else None,
    }


def advice(report: dict[str, Any]) -> list[str]:
    lines = []
    cost = report.get("cost")
    if report["problems"]:
        lines.append("Fix the settings that differ first: ranks that disagree hang or fail in ways that name no cause.")
    if cost is not None:
        per_step = cost["step_seconds_world"]
        lines.append(
            f"Synchronising the {report['layers']} BatchNorm layers costs about {per_step * 1e3:.2f} ms per training "
            f"step on this world of {report['facts'][0]['world_size']} (two all_reduces per layer, latency-bound: the "
            "payloads are small). Compare that with your step time: below a few percent, synchronise everything."
        )
        local = cost["step_seconds_local"]
        if local is not None:
            saved = per_step - local
            lines.append(
                f"Within each node ({cost['local_size']} ranks, syncnorm.new_sync_groups({cost['local_size']})) it "
                f"costs {local * 1e3:.2f} ms: {saved * 1e3:.2f} ms less per step, at the price of statistics over "
                f"a node's batch instead of the global one."
            )
    if report["facts"][0]["SYNCNORM_CHECK"] not in ("", "0"):
        lines.append("SYNCNORM_CHECK is on: the guard adds a collective per layer; turn it off once a run is healthy.")
    return lines


def run(options: argparse.Namespace) -> dict[str, Any]:
    facts = rank_facts()
    all_facts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(all_facts, facts)
    report: dict[str, Any] = {"facts": all_facts, "problems": disagreements(all_facts), "layers": 0, "cost": None}
    if options.model and not report["problems"]:
        # Every rank builds the model and says whether it could, before any timing collective:
        # a package missing on one node must be a finding, not a hang of the others.
        try:
            layers, failure = payload_sizes(load_model(options.model)), None
        except (Exception, SystemExit) as error:
            layers, failure = [], f"{type(error).__name__}: {error}"
        failures: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        report["problems"] += [
            f"--model {options.model} could not be built on rank {rank}: {text}"
            for rank, text in enumerate(failures)
            if text is not None
        ]
    if options.model and not report["problems"]:
        report["layers"] = len(layers)
        report["model"] = options.model
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        local_size = options.node_size or int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        report["cost"] = measure(layers, device, options.repeats, local_size) if layers else None
    report["advice"] = advice(report)
    return report


def format_report(report: dict[str, Any]) -> str:
    facts = report["facts"]
    first = facts[0]
    lines = [
        f"syncnorm doctor: {len(facts)} ranks, backend {first['backend']}, torch {first['torch']}, "
        f"syncnorm {first['syncnorm']}",
        f"settings on rank 0: SYNCNORM_CHECK={first['SYNCNORM_CHECK'] or '(unset)'}, wait warning "
        f"{first['wait_warning_s']:g} s, process group timeout {first['pg_timeout_s']} s, "
        + ", ".join(f"{name}={first[name] or '(unset)'}" for name in _NCCL_VARIABLES),
    ]
    if report["problems"]:
        lines += ["FAILED: the ranks disagree:"] + [f"  {problem}" for problem in report["problems"]]
    else:
        lines.append("ok: every rank agrees on versions, backend, world size and settings")
    cost = report.get("cost")
    if cost is not None:
        lines.append(
            f"bandwidth over the world: {cost['bandwidth_bytes_per_s'] / 1e6:.0f} MB/s per rank "
            "(ring all_reduce of 8 MiB)"
        )
        lines.append(f"model {report['model']}: {report['layers']} BatchNorm layers")
        lines.append(f"{'payload (float64 values)':>26} {'world ms':>10} {'node ms':>9}")
        for size in cost["payload_sizes"]:
            local = cost["local_seconds_by_size"]
            node = f"{local[size] * 1e3:9.3f}" if local is not None else f"{'-':>9}"
            lines.append(f"{size:>26} {cost['world_seconds_by_size'][size] * 1e3:>10.3f} {node}")
    lines += [f"- {line}" for line in report["advice"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m syncnorm doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="torchvision:NAME, timm:NAME or module:factory; its BatchNorm payloads are timed"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed all_reduces per payload size (default 20)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (rank 0)")
    parser.add_argument("--backend", help="when the process group is not initialised yet (default: nccl on GPUs)")
    parser.add_argument(
        "--node-size", type=int, help="ranks per node for the node-local timing (default: LOCAL_WORLD_SIZE)"
    )
    options = parser.parse_args(argv)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            print("syncnorm doctor: run it under torchrun (or with RANK/WORLD_SIZE/MASTER_ADDR set)", file=sys.stderr)
            return 2
        backend = options.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    report = run(options)
    if dist.get_rank() == 0:
        print(json.dumps(report, indent=1) if options.json else format_report(report), flush=True)
    failed = bool(report["problems"])
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0
