"""Host cost per layer: the time the CPU spends issuing one fwd+bwd, and how many aten ops it issues.

At tiny shapes the compute is negligible, so what is timed is Python, dispatch and
kernel-launch overhead: what bounds small-batch training on GPUs, where every kernel
is launched from the host. The synchronised path runs at W = 8 under torch's "fake"
process group (its collectives return at once), so communication is left out and
only syncnorm's own overhead is measured. At (8, 256, 14, 14) the compute dominates:
that row is the synchronised path's own cost next to nn.BatchNorm's kernels.

    python benchmarks/bench_host.py [--device cpu|cuda] [--json out.json]

One thread. Each repetition times a block of calls of nn.BatchNorm and of each other
layer, interleaved (``measure.time_interleaved``), and the ratio is the median over
repetitions of the per-repetition ratios: timing each layer in a block of its own drifts
2x on a shared machine. Reports per shape: microseconds per fwd+bwd (median), the
median per-pair ratio to nn.BatchNorm, and the aten ops per pass counted with a
``TorchDispatchMode`` (what the layer asks the dispatcher for, forward / backward;
the backward counts include the three gradient accumulations, input, weight and bias).
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.distributed as dist
from _host_floor import BareSyncBatchNorm
from measure import DeviceClock, median, paired, syncnorm_commit, time_interleaved
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import syncnorm

TINY_SHAPES = ((32, 64), (8, 64, 4, 4))
MEDIUM_SHAPES = ((8, 256, 14, 14),)
RESNET50_LAYER_SHAPES = ((32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7))
FAKE_WORLD = 8


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


FLOOR = "floor (bare ops)"  # _host_floor.BareSyncBatchNorm: the same step without a layer's features


def _layer(kind: str, channels: int, ndim: int, device: str) -> nn.Module:
    if kind == FLOOR:
        return BareSyncBatchNorm(channels, dist.group.WORLD).to(device)
    if kind == "nn.BatchNorm":
        return (nn.BatchNorm1d if ndim == 2 else nn.BatchNorm2d)(channels).to(device)
    if kind in ("syncnorm", PROFILING):
        return syncnorm.SyncBatchNorm(channels).to(device)
    return nn.SyncBatchNorm(channels).to(device)


def _count_ops(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[int, int]:
    forward, backward = _CountOps(), _CountOps()
    with forward:
        out = layer(x)
    with backward:
        out.backward(grad)
    return len(forward.ops), len(backward.ops)


PROFILING = "syncnorm, profiling"  # the same layer inside ``with syncnorm.profile()``


def _check_floor(floor: nn.Module, reference: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """The floor must compute what syncnorm computes: output, gradients and running statistics."""
    results = []
    for layer in (floor, reference):
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, layer.num_features))
            layer.bias.copy_(torch.linspace(-0.5, 0.5, layer.num_features))
        x.grad = None
        output = layer(x)
        output.backward(grad)
        results.append((output, x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var))
        layer.weight.grad = layer.bias.grad = None
    x.grad = None
    for name, got, want in zip(("output", "d input", "d weight", "d bias", "running mean", "running var"), *results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"floor's {name}: {m}")


def measure(
    device: str, shapes, repeats: int, inner_ops: int, with_profiler: bool = False, with_floor: bool = False
) -> list[dict]:
    kinds = ["nn.BatchNorm", "syncnorm"] + (["torch.nn.SyncBatchNorm"] if device == "cuda" else [])
    kinds += [PROFILING] if with_profiler else []
    kinds += [FLOOR] if with_floor else []
    rows = []
    for shape in shapes:
        x = torch.randn(shape, device=device, requires_grad=True)
        grad = torch.randn(shape, device=device)
        layers = {kind: _layer(kind, shape[1], len(shape), device) for kind in kinds}
        if with_floor:
            _check_floor(layers[FLOOR], layers["syncnorm"], x, grad)
        ops = {}
        for kind, layer in layers.items():
            layer(x).backward(grad)  # warm up (and let the fake group settle)
            ops[kind] = _count_ops(layer, x, grad)
        # Enough calls per block that a block takes ~inner_ops x a tiny layer's time.
        inner = max(1, inner_ops // max(1, x.numel() // 4096))

        def block(kind: str):
            layer, context = layers[kind], syncnorm.profile if kind == PROFILING else contextlib.nullcontext

            def run() -> None:
                with context():
                    for _ in range(inner):
                        layer(x).backward(grad)

            return run

        timed = time_interleaved({kind: block(kind) for kind in kinds}, repeats, clock=DeviceClock(device))
        # Host time: what the CPU spent issuing the work (no synchronise inside a block).
        times = {kind: [seconds / inner * 1e6 for seconds in timed.host[kind]] for kind in kinds}
        for kind in kinds:
            ratio = paired(times[kind], times["nn.BatchNorm"])
            rows.append(
                {
                    "shape": list(shape),
                    "layer": kind,
                    "host_us": round(median(times[kind]), 1),
                    "ratio_to_batchnorm": round(ratio["median"], 3),
                    "ratio_quartiles": [round(ratio["q1"], 3), round(ratio["q3"], 3)],
                    "aten_ops_forward": ops[kind][0],
                    "aten_ops_backward": ops[kind][1],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=200, help="interleaved pairs per shape")
    parser.add_argument("--inner", type=int, default=10, help="calls per timed block at tiny shapes")
    parser.add_argument("--large", action="store_true", help="also the ResNet-50 layer shapes (slow on CPU)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument(
        "--profiler", action="store_true", help=f"also '{PROFILING}': the layer inside syncnorm.profile()"
    )
    parser.add_argument(
        "--floor", action="store_true", help=f"also '{FLOOR}': syncnorm's CPU step without a layer's features"
    )
    options = parser.parse_args()
    torch.set_num_threads(1)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_WORLD)
    shapes = TINY_SHAPES + MEDIUM_SHAPES + (RESNET50_LAYER_SHAPES if options.large else ())
    rows = measure(options.device, shapes, options.repeats, options.inner, options.profiler, options.floor)
    commit = syncnorm_commit()
    print(
        f"host time per fwd+bwd, W={FAKE_WORLD} (fake group), {options.device}, torch {torch.__version__}, "
        f"syncnorm {commit}"
    )
    print(f"{options.repeats} interleaved pairs per shape; x BN: median per-pair ratio [quartiles]")
    print(f"{'shape':>18} {'layer':>24} {'host us':>9} {'x BN':>7} {'quartiles':>15} {'ops fwd/bwd':>12}")
    for row in rows:
        quartiles = "[{:.2f}, {:.2f}]".format(*row["ratio_quartiles"])
        print(
            f"{str(tuple(row['shape'])):>18} {row['layer']:>24} {row['host_us']:>9} "
            f"{row['ratio_to_batchnorm']:>7.2f} {quartiles:>15} "
            f"{row['aten_ops_forward']:>5}/{row['aten_ops_backward']:<5}"
        )
    if options.json:
        with open(options.json, "w") as handle:
            record = {
                "device": options.device,
                "torch": torch.__version__,
                "syncnorm_commit": commit,
                "repeats": options.repeats,
                "rows": rows,
            }
            json.dump(record, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
