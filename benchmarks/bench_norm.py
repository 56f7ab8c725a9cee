"""syncnorm benchmark suite: per-layer fwd+bwd, saved-for-backward memory, a training step, comm model.

One run measures, side by side with interleaved repetitions (medians, rank 0's clock):

* per layer, W = 1, 2, 4 ranks (gloo): syncnorm against nn.BatchNorm on the local
  batch, the sync floor (nn.BatchNorm + syncnorm's two all_reduces), the naive
  autograd SyncBN, and torch.nn.SyncBatchNorm where it runs (CUDA only);
* bytes saved for backward by one forward (W = 2), syncnorm against nn.BatchNorm;
* a tiny ResNet's DDP training step at W = 2, syncnorm against local BatchNorm;
* the communication model (``comm_model.py``).

Writes results.md, results.json, per_layer_ms.csv and PNG plots into --out. This machine is noisy:
read the ratios, not the absolute times.

    python benchmarks/bench_norm.py --quick          # representative subset (default)
    python benchmarks/bench_norm.py --full           # every shape, more repetitions
    python benchmarks/bench_norm.py --quick --tiny   # seconds; what tests/integration/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import comm_model
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _baseline_checks import check_baselines
from _bench_common import (
    NaiveSyncBatchNorm,
    SyncFloor,
    TinyResNet,
    convert_to_naive,
    plain_batchnorm,
    plot_micro_ratios,
    plot_step_ratios,
)
from measure import (
    RESNET50_SHAPES,
    DeviceClock,
    fwd_bwd,
    machine_description,
    median,
    paired_ratio,
    saved_tensor_bytes,
    time_interleaved,
)
from torch import nn

import syncnorm
from syncnorm.testing import run_ranks

BASELINE, FLOOR, NAIVE, OURS, TORCH_SYNC = "nn.BatchNorm", "sync floor", "naive", "syncnorm", "torch SyncBN"
W1_TARGET, FLOOR_TARGET, NAIVE_TARGET = 1.05, 1.25, 0.8
# Layers this small take well under a millisecond at W = 1, where a scheduler hiccup is the size
# of the effect being measured; they get --small-reps-factor times the repetitions (cheaply).
SMALL_LAYER_NUMEL = 1 << 20


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    channels_last: bool = False

    @property
    def label(self) -> str:
        kind = "NHWC" if self.channels_last else ("BN1d" if len(self.shape) == 2 else "NCHW")
        return f"{kind} {'x'.join(map(str, self.shape))}"


def cases_for(preset: str, tiny: bool) -> list[Case]:
    if tiny:
        return [Case((2, 8, 6, 6)), Case((8, 16)), Case((2, 8, 6, 6), True)]
    if preset == "full":
        conv = [Case((batch,) + shape) for batch in (2, 8, 32) for shape in RESNET50_SHAPES]
        extra = [Case((256, 256)), Case((256, 512))]
        return conv + extra + [Case(shape, True) for shape in ((8, 256, 56, 56), (8, 1024, 14, 14), (32, 512, 28, 28))]
    shapes = (
        (2, 64, 112, 112),
        (2, 2048, 7, 7),
        (8, 256, 56, 56),
        (8, 1024, 14, 14),
        (32, 512, 28, 28),
        (32, 2048, 7, 7),
    )
    return [Case(shape) for shape in shapes] + [Case((256, 512)), Case((8, 256, 56, 56), True)]


def _device(rank: int, kind: str) -> torch.device:
    return torch.device(kind, rank % torch.cuda.device_count()) if kind == "cuda" else torch.device("cpu")


def _variants(case: Case, payloads: dict, device: torch.device) -> dict[str, nn.Module]:
    channels, ndim = case.shape[1], len(case.shape)
    floor_payloads = {which: calls[0] for which, calls in payloads[channels].items()}
    modules = {
        BASELINE: plain_batchnorm(channels, ndim),
        FLOOR: SyncFloor(plain_batchnorm(channels, ndim), floor_payloads),
        NAIVE: NaiveSyncBatchNorm(channels),
        OURS: syncnorm.SyncBatchNorm(channels),
    }
    if device.type == "cuda":
        modules[TORCH_SYNC] = nn.SyncBatchNorm(channels)
    return {name: module.to(device).train() for name, module in modules.items()}


def _micro_rank(rank, world, cases, payloads, reps, small_factor, warmup, device_kind, measure_memory) -> list | None:
    syncnorm.set_check(False)  # the default; the guard's extra collectives are opt-in
    device = _device(rank, device_kind)
    results = []
    for case in cases:
        torch.manual_seed(100 + rank)
        x = torch.randn(case.shape, device=device) * 2 + 0.5
        if case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad_output = torch.randn_like(x)
        modules = _variants(case, payloads, device)
        steps = {name: fwd_bwd(module, x, grad_output) for name, module in modules.items()}
        case_reps = reps * small_factor if x.numel() <= SMALL_LAYER_NUMEL else reps
        times = time_interleaved(steps, case_reps, warmup, barrier=dist.barrier, clock=DeviceClock(device)).device
        entry = {"world": world, "case": case.label, "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}
        if measure_memory:
            entry["input_bytes"] = x.numel() * x.element_size()
            entry["saved_bytes"] = {name: saved_tensor_bytes(modules[name], x) for name in (BASELINE, NAIVE, OURS)}
        results.append(entry)
        del x, grad_output, modules, steps
    return results if rank == 0 else None


def _e2e_rank(rank, world, widths, batch, image, reps, warmup, device_kind) -> dict | None:
    syncnorm.set_check(False)
    # torch >= 2.13 calls broadcast_buffers deprecated but still documents it as the way to skip
    # the buffer broadcast at construction as well; that is what is wanted here.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    device = _device(rank, device_kind)
    torch.manual_seed(0)  # same initial weights on every rank
    base = TinyResNet(widths)
    models = {
        BASELINE: copy.deepcopy(base),
        OURS: syncnorm.convert_sync_batchnorm(copy.deepcopy(base)),
        NAIVE: convert_to_naive(copy.deepcopy(base)),
    }
    if device.type == "cuda":
        models[TORCH_SYNC] = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
    device_ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers=False for all: the comparison is the norm layers, not DDP's buffer broadcast.
    ddp = {
        name: nn.parallel.DistributedDataParallel(model.to(device), device_ids=device_ids, broadcast_buffers=False)
        for name, model in models.items()
    }
    optimisers = {name: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) for name, model in ddp.items()}
    torch.manual_seed(1 + rank)
    inputs = torch.randn(batch, 3, image, image, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)

    def train_step(name: str):
        def step() -> None:
            optimisers[name].zero_grad(set_to_none=True)
            F.cross_entropy(ddp[name](inputs), labels).backward()
            optimisers[name].step()

        return step

    steps = {name: train_step(name) for name in ddp}
    times = time_interleaved(steps, reps, warmup, barrier=dist.barrier, clock=DeviceClock(device)).device
    return {"world": world, "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}} if rank == 0 else None


# ---------------------------------------------------------------------------------------------
# report


def _medians(entry: dict) -> dict[str, float]:
    return {name: median(values) for name, values in entry["times_ms"].items()}


def _ratio(entry: dict, numerator: str, denominator: str) -> float:
    return paired_ratio(entry["times_ms"][numerator], entry["times_ms"][denominator])


def _micro_table(micro: list[dict]) -> tuple[str, int, int]:
    has_torch = any(TORCH_SYNC in entry["times_ms"] for entry in micro)
    names = [BASELINE, FLOOR, NAIVE, OURS] + ([TORCH_SYNC] if has_torch else [])
    header = ["W", "case"] + [f"{n} ms" for n in names] + ["ours/BN", "ours/floor", "ours/naive", "target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    met = total = 0
    for entry in micro:
        med = _medians(entry)
        vs_bn, vs_floor, vs_naive = (_ratio(entry, OURS, other) for other in (BASELINE, FLOOR, NAIVE))
        if entry["world"] == 1:
            checks = [(vs_bn <= W1_TARGET, f"<= {W1_TARGET} BN")]
        else:
            checks = [
                (vs_floor <= FLOOR_TARGET, f"<= {FLOOR_TARGET} floor"),
                (vs_naive <= NAIVE_TARGET, f"<= {NAIVE_TARGET} naive"),
            ]
        met += sum(ok for ok, _ in checks)
        total += len(checks)
        verdict = ", ".join(("ok " if ok else "MISS ") + text for ok, text in checks)
        cells = [str(entry["world"]), entry["case"]] + [f"{med[n]:.3f}" for n in names]
        lines.append("| " + " | ".join(cells + [f"{vs_bn:.2f}", f"{vs_floor:.2f}", f"{vs_naive:.2f}", verdict]) + " |")
    return "\n".join(lines), met, total


def _memory_table(micro: list[dict]) -> str:
    lines = [
        "| case | input | nn.BatchNorm saved (new) | syncnorm saved (new) | naive saved (new) | syncnorm - nn.BatchNorm | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for entry in micro:
        if "saved_bytes" not in entry:
            continue
        saved = entry["saved_bytes"]
        extra = saved[OURS]["all"] - saved[BASELINE]["all"]
        cells = [entry["case"], _mb(entry["input_bytes"])]
        cells += [f"{_mb(saved[n]['all'])} ({saved[n]['new']} B)" for n in (BASELINE, OURS, NAIVE)]
        cells += [f"{extra:+d} B", "ok" if extra <= 0 else "MISS"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3f} MB"


def _e2e_table(e2e: dict) -> str:
    med = _medians(e2e)
    lines = ["| variant | median step ms | vs local BatchNorm |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:.2f} | {_ratio(e2e, name, BASELINE):.2f}x |" for name, value in med.items()]
    return "\n".join(lines)


def write_report(out: str, meta: dict, micro: list[dict], e2e: dict | None, comm: dict | None) -> str:
    table, met, total = _micro_table(micro)
    parts = [
        "# syncnorm benchmark results",
        f"Command: `{meta['command']}`  ",
        f"syncnorm at commit {meta['machine']['syncnorm_commit']}.  ",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, torch {meta['machine']['torch']}, "
        f"device {meta['device']}, {meta['threads']} thread(s) per rank, gloo; load average "
        f"{meta['load_before']} before, {meta['load_after']} after; {meta['seconds']:.0f} s.  ",
        f"Times: medians of {meta['reps']} repetitions ({meta['reps'] * meta['small_reps_factor']} for layers of at most "
        f"{SMALL_LAYER_NUMEL} elements) after {meta['warmup']} warm-up, on rank 0's clock, the "
        "variants interleaved in a fresh random order each repetition. Ratios: median over repetitions of the "
        "ratio of two variants timed in the same repetition.",
        "",
        f"## Per layer, forward + backward ({met}/{total} targets met)",
        "sync floor = nn.BatchNorm on the local batch + syncnorm's two all_reduces (same payloads); "
        "naive = detectron2's NaiveSyncBatchNorm algorithm (autograd all_reduce of [mean, mean of squares]).",
        "",
        table,
    ]
    if not any(TORCH_SYNC in entry["times_ms"] for entry in micro):
        parts += ["", "torch.nn.SyncBatchNorm: skipped, it runs on CUDA only (rerun with --device cuda)."]
    if any("saved_bytes" in entry for entry in micro):
        parts += [
            "",
            "## Saved for backward by one forward (W = 2)",
            "Distinct storages autograd keeps (input and the layer's parameters and buffers included); "
            "in brackets the bytes of storages the forward itself allocated.",
            "",
            _memory_table(micro),
        ]
    if e2e:
        parts += ["", f"## Training step, tiny ResNet, DDP, W = {e2e['world']}", "", _e2e_table(e2e)]
    if comm:
        parts += [
            "",
            "## Communication per layer per training step (bytes per rank, ring algorithms)",
            "",
            comm["markdown"],
        ]
    text = "\n".join(parts) + "\n"
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump({"meta": meta, "micro": micro, "e2e": e2e}, handle, indent=1)
    write_per_layer_csv(micro, os.path.join(out, "per_layer_ms.csv"))
    plot_micro_ratios(micro, BASELINE, os.path.join(out, "micro_ratios.png"), meta)
    if e2e:
        plot_step_ratios(e2e, BASELINE, os.path.join(out, "e2e_step.png"), meta)
    return text


def write_per_layer_csv(micro: list[dict], path: str) -> None:
    """The raw per-layer times, one row per world size, shape and variant: median and quartiles in ms."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["world", "case", "variant", "median_ms", "q1_ms", "q3_ms", "repetitions"])
        for entry in micro:
            for variant, times in entry["times_ms"].items():
                ordered = sorted(times)
                quartile = [ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]]
                writer.writerow(
                    [entry["world"], entry["case"], variant, f"{median(times):.4f}"]
                    + [f"{value:.4f}" for value in quartile]
                    + [len(times)]
                )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="syncnorm benchmarks (see the module docstring)")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick", help="representative shapes")
    preset.add_argument("--full", dest="preset", action="store_const", const="full", help="every shape")
    parser.set_defaults(preset="quick")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 2 repetitions: a smoke run")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 quick, 15 full)")
    parser.add_argument(
        "--small-reps-factor",
        type=int,
        default=None,
        help=f"repetitions multiplier for layers of at most {SMALL_LAYER_NUMEL} elements (default 5, 1 with --tiny)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: micro, e2e, comm")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="folder for results.md/.json, micro_ratios.png, e2e_step.png and comm_model.* (default: "
        "benchmarks/results, the committed results: give another folder for --tiny or trial runs)",
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the PNGs from the results.json and comm_model.json in --out"
    )
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.tiny else {"quick": 10, "full": 15}[args.preset])
    args.small_reps_factor = args.small_reps_factor or (1 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    return args


def replot(out: str) -> None:
    """Redraw the PNGs and per_layer_ms.csv of an earlier run from its JSON files (no measurement)."""
    if not os.path.exists(os.path.join(out, "results.json")):
        raise SystemExit(f"bench_norm --replot: no results.json in {out}; run the benchmark into that folder first")
    with open(os.path.join(out, "results.json")) as handle:
        results = json.load(handle)
    write_per_layer_csv(results["micro"], os.path.join(out, "per_layer_ms.csv"))
    plot_micro_ratios(results["micro"], BASELINE, os.path.join(out, "micro_ratios.png"), results["meta"])
    if results.get("e2e"):
        plot_step_ratios(results["e2e"], BASELINE, os.path.join(out, "e2e_step.png"), results["meta"])
    comm_json = os.path.join(out, "comm_model.json")
    if os.path.exists(comm_json):
        with open(comm_json) as handle:
            comm_model.plot(json.load(handle), os.path.join(out, "comm_model.png"))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        replot(args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    worlds = [int(w) for w in args.worlds.split(",")]
    cases = cases_for(args.preset, args.tiny)
    started = time.monotonic()
    meta = {
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_norm.py"] + sys.argv[1:]),
        "machine": machine_description(),
        "device": args.device,
        "threads": args.threads,
        "reps": args.reps,
        "small_reps_factor": args.small_reps_factor,
        "warmup": args.warmup,
        "load_before": round(os.getloadavg()[0], 2),
        "cases": [asdict(case) for case in cases],
    }
    generous = 600 + 60 * args.reps * args.small_reps_factor * len(cases)
    run = {"timeout": generous, "pg_timeout": 600, "threads": args.threads}
    # syncnorm's real all_reduce payloads, measured once: the sync floor and the comm model use them.
    payloads = comm_model.syncnorm_payloads([6] + [case.shape[1] for case in cases] + comm_model.MODEL_CHANNEL_SET)
    print(check_baselines(payloads[6]), flush=True)
    micro: list[dict] = []
    if "micro" not in skip:
        memory_world = next((w for w in worlds if w > 1), None)
        for world in worlds:
            print(f"[{time.monotonic() - started:6.1f} s] per-layer benchmark, W = {world} ...", flush=True)
            micro += run_ranks(
                _micro_rank,
                world,
                cases,
                payloads,
                args.reps,
                args.small_reps_factor,
                args.warmup,
                args.device,
                world == memory_world,
                **run,
            )[0]
    e2e = None
    if "e2e" not in skip:
        print(f"[{time.monotonic() - started:6.1f} s] training step benchmark, W = 2 ...", flush=True)
        widths, batch, image = ((4, 8), 4, 8) if args.tiny else ((16, 32, 64), 32, 32)
        e2e = run_ranks(
            _e2e_rank, 2, widths, batch, image, max(args.reps, 2 if args.tiny else 20), args.warmup, args.device, **run
        )[0]
    print(f"[{time.monotonic() - started:6.1f} s] communication model ...", flush=True)
    comm = comm_model.run(args.out, payloads) if "comm" not in skip else None
    meta["load_after"] = round(os.getloadavg()[0], 2)
    meta["seconds"] = time.monotonic() - started
    print(write_report(args.out, meta, micro, e2e, comm))


if __name__ == "__main__":
    main()
