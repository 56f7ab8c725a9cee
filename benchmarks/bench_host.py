"""Host cost per layer: the time the CPU spends issuing one fwd+bwd, and how many aten ops it issues.

At tiny shapes the compute is negligible, so what is timed is Python, dispatch and
kernel-launch overhead: what bounds small-batch training on GPUs, where every kernel
is launched from the host. The synchronised path runs at W = 8 under torch's "fake"
process group (its collectives return at once), so communication is left out and
only syncnorm's own overhead is measured. One thread, interleaved repetitions, median.

    python benchmarks/bench_host.py [--device cpu|cuda] [--json out.json]

Reports per shape: microseconds per fwd+bwd for nn.BatchNorm, syncnorm and (on CUDA)
torch.nn.SyncBatchNorm, the ratio to nn.BatchNorm, and the aten ops counted with a
``TorchDispatchMode`` (what the layer asks the dispatcher for, in forward and backward).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import syncnorm  # noqa: E402

TINY_SHAPES = ((32, 64), (8, 64, 4, 4))
RESNET50_LAYER_SHAPES = ((32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7))
FAKE_WORLD = 8


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _layer(kind: str, channels: int, ndim: int, device: str) -> nn.Module:
    if kind == "nn.BatchNorm":
        return (nn.BatchNorm1d if ndim == 2 else nn.BatchNorm2d)(channels).to(device)
    if kind == "syncnorm":
        return syncnorm.SyncBatchNorm(channels).to(device)
    return nn.SyncBatchNorm(channels).to(device)


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        layer(x).backward(grad)

    return run


def measure(device: str, shapes, repeats: int, inner: int) -> list[dict]:
    kinds = ["nn.BatchNorm", "syncnorm"] + (["torch.nn.SyncBatchNorm"] if device == "cuda" else [])
    rows = []
    for shape in shapes:
        x = torch.randn(shape, device=device, requires_grad=True)
        grad = torch.randn(shape, device=device)
        steps = {kind: _step(_layer(kind, shape[1], len(shape), device), x, grad) for kind in kinds}
        ops = {}
        for kind, run in steps.items():
            run()  # warm up (and let the fake group settle)
            counter = _CountOps()
            with counter:
                run()
            ops[kind] = len(counter.ops)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(repeats):
            for kind, run in steps.items():  # interleaved, so drift hits all alike
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(inner):
                    run()
                # Host time: what the CPU spent issuing the work (no synchronise inside).
                times[kind].append((time.perf_counter() - start) / inner * 1e6)
                if device == "cuda":
                    torch.cuda.synchronize()
        base = statistics.median(times["nn.BatchNorm"])
        for kind in kinds:
            us = statistics.median(times[kind])
            rows.append(
                {
                    "shape": list(shape),
                    "layer": kind,
                    "host_us": round(us, 1),
                    "ratio_to_batchnorm": round(us / base, 2),
                    "aten_ops": ops[kind],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=50)
    parser.add_argument("--large", action="store_true", help="also the ResNet-50 layer shapes (slow on CPU)")
    parser.add_argument("--json", help="write the rows here")
    options = parser.parse_args()
    torch.set_num_threads(1)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_WORLD)
    shapes = TINY_SHAPES + (RESNET50_LAYER_SHAPES if options.large else ())
    rows = measure(options.device, shapes, options.repeats, options.inner)
    print(f"host time per fwd+bwd, W={FAKE_WORLD} (fake group), {options.device}, torch {torch.__version__}")
    print(f"{'shape':>22} {'layer':>24} {'host us':>9} {'x BN':>6} {'aten ops':>9}")
    for row in rows:
        print(
            f"{str(tuple(row['shape'])):>22} {row['layer']:>24} {row['host_us']:>9} "
            f"{row['ratio_to_batchnorm']:>6} {row['aten_ops']:>9}"
        )
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"device": options.device, "torch": torch.__version__, "rows": rows}, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
