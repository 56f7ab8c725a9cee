"""Graph breaks and step time under torch.compile: syncnorm vs torch.nn.SyncBatchNorm.

Two gloo ranks on CPU (``syncnorm.testing.run_ranks`` starts them). For each normalisation layer the
same small conv net is explained with ``torch._dynamo.explain`` (graph and break counts),
then, where it runs, one training step is timed eager and compiled, interleaved, medians.
torch.nn.SyncBatchNorm refuses CPU input in training, so only its graph breaks are
reported, from a trace that stops at that error if it must.

    python benchmarks/compile_step.py [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo
from measure import median, time_interleaved
from torch import nn

import syncnorm
from syncnorm.testing import run_ranks


def _net() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*layers)


def _explain(model: nn.Module, x: torch.Tensor) -> str:
    try:
        result = torch._dynamo.explain(model)(x)
    except Exception as err:  # torch.nn.SyncBatchNorm on CPU
        return f"trace failed: {type(err).__name__}: {str(err).splitlines()[0][:90]}"
    return f"{result.graph_count} graphs, {result.graph_break_count} breaks"


def _rank_job(rank: int, world: int, steps: int) -> dict:
    x = torch.randn(8, 3, 16, 16)
    report = {
        "syncnorm": _explain(syncnorm.convert_sync_batchnorm(_net()), x),
        "torch.nn.SyncBatchNorm": _explain(nn.SyncBatchNorm.convert_sync_batchnorm(_net()), x),
    }
    eager = syncnorm.convert_sync_batchnorm(_net())
    compiled = torch.compile(syncnorm.convert_sync_batchnorm(_net()), fullgraph=True)
    optimisers = {
        name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in (("eager", eager), ("compiled", compiled))
    }
    models = {"eager": eager, "compiled": compiled}
    start = time.perf_counter()
    models["compiled"](x).sum().backward()  # compile once, outside the timing
    report["compile_s"] = time.perf_counter() - start

    def train_step(name: str):
        def run() -> None:
            optimisers[name].zero_grad()
            models[name](x).sum().backward()
            optimisers[name].step()

        return run

    times = time_interleaved({name: train_step(name) for name in models}, steps, warmup=3).device
    report.update({f"{name}_ms": 1e3 * median(t) for name, t in times.items()})
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    report = run_ranks(_rank_job, 2, args.steps, timeout=900)[0]
    print("| layer | torch._dynamo.explain on the same 4-BN conv net (2 gloo ranks) |")
    print("|---|---|")
    for name in ("syncnorm", "torch.nn.SyncBatchNorm"):
        print(f"| {name} | {report[name]} |")
    print(f"\nsyncnorm training step, W=2, batch 8x3x16x16 per rank, median of {args.steps} (interleaved):")
    print(
        f"eager {report['eager_ms']:.2f} ms | compiled {report['compiled_ms']:.2f} ms | ratio {report['compiled_ms'] / report['eager_ms']:.2f} | first compile {report['compile_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
