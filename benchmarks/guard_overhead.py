"""What the guard (SYNCNORM_CHECK) costs per SyncBatchNorm call, on W gloo ranks.

For each shape it times a training forward+backward and an eval forward of one
layer with the guard off and on, interleaved call by call (``measure.time_interleaved``:
a fresh order each repetition, all ranks meeting at a barrier before each timed call), and
prints the medians as a markdown table. The guard adds one fixed-size all_reduce
per synchronised pass, so it should cost about one small collective's latency per
pass: two per training step, one per eval forward (which otherwise sends nothing).
The table's footnote gives that latency on its own, measured in the same run.

    python benchmarks/guard_overhead.py [--reps 200] [--warmup 10] [--world-size 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from measure import machine_description, median, time_interleaved

import syncnorm
from syncnorm.testing import run_ranks

SHAPES = [(8, 64, 28, 28), (256, 512)]
GUARD_PAYLOAD = 15  # int32 values in the guard's all_reduce (see src/syncnorm/guard.py)


def _layer_steps(shape: tuple) -> dict:
    """Guard off / on variants of a training step and of an eval forward of one layer."""
    layer = syncnorm.SyncBatchNorm(shape[1])
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)

    def call(training: bool, check: bool):
        def run() -> None:
            layer.train(training)
            layer.check = check
            if training:
                x.grad = None
                layer(x).backward(dy)
            else:
                with torch.no_grad():
                    layer(x)

        return run

    return {
        (str(shape), label, check): call(training, check)
        for label, training in (("train fwd+bwd", True), ("eval fwd", False))
        for check in (False, True)
    }


def _measure(rank: int, world: int, shapes, reps: int, warmup: int) -> dict:
    payload = torch.zeros(GUARD_PAYLOAD, dtype=torch.int32)
    steps = {("guard all_reduce alone", "-", None): lambda: dist.all_reduce(payload, op=dist.ReduceOp.MAX)}
    for shape in shapes:
        steps.update(_layer_steps(shape))
    times = time_interleaved(steps, reps, warmup, barrier=dist.barrier).device
    return {key: median(values) * 1e3 for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="timed calls of each variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    per_rank = run_ranks(_measure, args.world_size, SHAPES, args.reps, args.warmup, timeout=3600)
    # Every timed call ends in a collective, so the ranks run in step; the slower one sets the pace.
    ms = {key: max(result[key] for result in per_rank) for key in per_rank[0]}

    machine = machine_description()
    print(f"Guard overhead per SyncBatchNorm call, W={args.world_size} gloo, torch {machine['torch']}, "
          f"{machine['cores']} cores ({machine['cpu']}), load average {machine['load_average_1min']}; "
          f"median of {args.reps} interleaved calls\n")  # fmt: skip
    print("| input shape | pass | guard off (ms) | guard on (ms) | overhead (ms) | overhead (%) |")
    print("|---|---|---:|---:|---:|---:|")
    for shape, label, check in ms:
        if check is True:
            off, on = ms[(shape, label, False)], ms[(shape, label, True)]
            print(f"| {shape} | {label} | {off:.3f} | {on:.3f} | {on - off:+.3f} | {100 * (on - off) / off:+.0f}% |")
    alone = ms[("guard all_reduce alone", "-", None)]
    print(f"\nOne guard all_reduce ({GUARD_PAYLOAD} int32, MAX) on its own: {alone:.3f} ms")


if __name__ == "__main__":
    main()
