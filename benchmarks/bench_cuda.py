"""CUDA kernels of the synchronised path: syncnorm vs nn.BatchNorm vs torch.nn.SyncBatchNorm.

One process, torch's "fake" process group with world size 2: the W > 1 code path
runs with its collectives returning at once, so this measures the kernels and
the per-call overhead, not the network. Achieved memory bandwidth is reported
against the device's copy bandwidth (x.clone(): one read + one write).

    python benchmarks/bench_cuda.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from measure import RESNET50_SHAPES, DeviceClock, median, time_interleaved
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

import syncnorm

SHAPES = [(32, *shape) for shape in RESNET50_SHAPES] + [(8, 256, 56, 56), (256, 512)]


def _time(fn, reps: int = 30) -> float:
    """Median milliseconds of one call, from CUDA events."""
    return 1e3 * median(time_interleaved({"call": fn}, reps, warmup=5, clock=DeviceClock("cuda")).device["call"])


def _layers(channels: int, ndim: int) -> dict[str, nn.Module]:
    plain = nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d
    return {
        "nn.BatchNorm": plain(channels).cuda(),
        "syncnorm": syncnorm.SyncBatchNorm(channels).cuda(),
        "torch.nn.SyncBatchNorm": nn.SyncBatchNorm(channels).cuda(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    rows = []
    for shape in SHAPES:
        x = torch.randn(*shape, device="cuda", dtype=dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        copy_ms = _time(lambda: x.clone())
        row = {"shape": list(shape), "copy_ms": copy_ms}
        for name, layer in _layers(shape[1], len(shape)).items():
            xg = x.detach().requires_grad_()
            try:
                fwd_ms = _time(lambda: layer(xg))
                out = layer(xg)
                bwd_ms = _time(lambda: out.backward(dy, retain_graph=True))
            except Exception as err:  # torch's SyncBatchNorm may refuse the fake group
                row[name] = f"failed: {type(err).__name__}"
                continue
            # Minimal traffic: forward reads x twice (statistics, normalise) and writes y;
            # backward reads dy and x twice (reduce, elementwise) and writes dx.
            row[name] = {
                "fwd_ms": fwd_ms,
                "bwd_ms": bwd_ms,
                "fwd_bw_vs_copy": (3 * nbytes / fwd_ms) / (2 * nbytes / copy_ms),
                "bwd_bw_vs_copy": (5 * nbytes / bwd_ms) / (2 * nbytes / copy_ms),
            }
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"cuda_{args.dtype}.json"), "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, handle, indent=1)
    names = ["nn.BatchNorm", "syncnorm", "torch.nn.SyncBatchNorm"]
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  (fake group, W=2: no network)")
    print(
        "| shape | "
        + " | ".join(f"{n} fwd+bwd ms" for n in names)
        + " | syncnorm / BN | syncnorm fwd BW % | syncnorm bwd BW % |"
    )
    print("|---" * (len(names) + 4) + "|")
    for row in rows:
        cells = []
        for n in names:
            r = row.get(n)
            cells.append(f"{r['fwd_ms'] + r['bwd_ms']:.3f}" if isinstance(r, dict) else str(r))
        ours, base = row.get("syncnorm"), row.get("nn.BatchNorm")
        ratio = (
            (ours["fwd_ms"] + ours["bwd_ms"]) / (base["fwd_ms"] + base["bwd_ms"])
            if isinstance(ours, dict) and isinstance(base, dict)
            else float("nan")
        )
        fbw = 100 * ours["fwd_bw_vs_copy"] if isinstance(ours, dict) else float("nan")
        bbw = 100 * ours["bwd_bw_vs_copy"] if isinstance(ours, dict) else float("nan")
        print(f"| {tuple(row['shape'])} | " + " | ".join(cells) + f" | {ratio:.2f} | {fbw:.0f} | {bbw:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
