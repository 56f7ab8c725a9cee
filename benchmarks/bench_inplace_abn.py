"""InPlaceABN: bytes saved for backward and step time, against BatchNorm + LeakyReLU.

Compared, each as the norm + activation of a block (conv 3x3 without bias, then the norm + act):

* ``BN + act``: ``nn.BatchNorm2d`` + ``nn.LeakyReLU(0.01, inplace=True)`` (local statistics);
* ``SyncBN + act``: ``syncnorm.SyncBatchNorm`` + ``nn.LeakyReLU(0.01, inplace=True)``;
* ``InPlaceABN``: ``syncnorm.InPlaceABN`` (out of place) and ``InPlaceABN inplace`` (``inplace=True``).

Memory: the bytes of the distinct storages autograd saves during one training forward
(``measure.saved_tensor_bytes``: a ``saved_tensors_hooks`` counter, each storage once, the
input and the modules' parameters included), at W = 2 so that the synchronised paths run, for
one norm + act pair (its input a conv output), one conv + norm + act block, and a stack of blocks.
Target: the stack's InPlaceABN bytes at most 0.6x those of BN + act.

Time: one forward + backward, per pair and for the stack, at W = 1 and W = 2 (gloo, one thread
per rank, ``syncnorm.testing.run_ranks``), variants interleaved in a fresh random order each
repetition; medians of rank 0, and the median over repetitions of each variant's time over
BN + act's in the same repetition. The pair's input is ``x * 1`` of a leaf (a non-leaf, so that
``inplace=True`` can write over it), for every variant alike.

    python benchmarks/bench_inplace_abn.py            # defaults below, under a minute on 2 cores
    python benchmarks/bench_inplace_abn.py --tiny     # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from measure import machine_description, median, paired_ratio, saved_tensor_bytes, time_interleaved
from torch import nn

import syncnorm
from syncnorm.inplace_abn import InPlaceABN
from syncnorm.testing import run_ranks

BASELINE = "BN + act"
VARIANTS = (BASELINE, "SyncBN + act", "InPlaceABN", "InPlaceABN inplace")
STACK_TARGET = 0.6


def norm_act(name: str, channels: int) -> nn.Module:
    if name == BASELINE:
        return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True))
    if name == "SyncBN + act":
        return nn.Sequential(syncnorm.SyncBatchNorm(channels), nn.LeakyReLU(0.01, inplace=True))
    return InPlaceABN(channels, activation="leaky_relu", activation_param=0.01, inplace=name.endswith("inplace"))


def block(name: str, channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm_act(name, channels))


def stack(name: str, channels: int, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[block(name, channels) for _ in range(blocks)])


class _NonLeafInput(nn.Module):
    """``x * 1`` in front of a pair: its input is then an autograd result, as a conv output is."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * 1.0)


def _memory(shape: tuple[int, ...], blocks: int) -> dict:
    channels = shape[1]
    x = torch.randn(shape) * 2 + 0.5
    saved = {}
    for name in VARIANTS:
        pair_input = x.clone().requires_grad_() * 1.0  # a non-leaf, like a conv output
        saved[name] = {
            "pair": saved_tensor_bytes(norm_act(name, channels).train(), pair_input)["all"],
            "block": saved_tensor_bytes(block(name, channels).train(), x.clone())["all"],
            "stack": saved_tensor_bytes(stack(name, channels, blocks).train(), x.clone())["all"],
        }
    return {"activation_bytes": x.numel() * x.element_size(), "saved": saved}


def _rank(rank, world, shape, blocks, reps, warmup, measure_memory) -> dict | None:
    syncnorm.set_check(False)
    channels = shape[1]
    torch.manual_seed(10 + rank)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    pairs = {name: _NonLeafInput(norm_act(name, channels)).train() for name in VARIANTS}
    stacks = {name: stack(name, channels, blocks).train() for name in VARIANTS}

    def step(module: nn.Module):
        def run() -> None:
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(dy)

        return run

    result = {"world": world}
    for what, modules in (("pair", pairs), ("stack", stacks)):
        times = time_interleaved({n: step(m) for n, m in modules.items()}, reps, warmup, barrier=dist.barrier).device
        result[what] = {name: [t * 1e3 for t in values] for name, values in times.items()}
    if measure_memory:
        result["memory"] = _memory(shape, blocks)
    return result if rank == 0 else None


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def report(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    machine = machine_description()
    lines = [
        "# InPlaceABN: saved bytes and step time against BatchNorm + LeakyReLU",
        f"Shape per rank {'x'.join(map(str, args.shape))}, stack of {args.blocks} conv 3x3 + norm + act blocks; "
        f"{args.reps} repetitions after {args.warmup} warm-up. {machine['cpu']}, {machine['cores']} cores, "
        f"torch {machine['torch']}, syncnorm at {machine['syncnorm_commit']}, gloo, 1 thread per rank; {seconds:.0f} s.",
    ]
    memory = next(r["memory"] for r in results if "memory" in r)
    saved = memory["saved"]
    lines += [
        "",
        f"## Saved for backward by one training forward (W = 2; one activation = {_mb(memory['activation_bytes'])})",
        "",
        "| variant | pair (norm + act) | ratio | block (conv + norm + act) | ratio | stack | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        cells = [name]
        for part in ("pair", "block", "stack"):
            cells += [_mb(saved[name][part]), f"{saved[name][part] / saved[BASELINE][part]:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    for name in ("InPlaceABN", "InPlaceABN inplace"):
        ratio = saved[name]["stack"] / saved[BASELINE]["stack"]
        verdict = "ok" if ratio <= STACK_TARGET else "MISS"
        lines.append(f"\n{name}: stack saves {ratio:.3f}x of BN + act (target <= {STACK_TARGET}): {verdict}")
    lines += [
        "",
        "## Forward + backward time (rank 0 medians; ratio: paired median vs BN + act)",
        "",
        "| W | what | " + " | ".join(f"{n} ms" for n in VARIANTS) + " | "
        + " | ".join(f"{n} / BN" for n in VARIANTS[1:]) + " |",
        "|" + "---:|" * (2 + 2 * len(VARIANTS) - 1),
    ]  # fmt: skip
    for result in results:
        for what in ("pair", "stack"):
            times = result[what]
            cells = [str(result["world"]), what] + [f"{median(times[n]):.2f}" for n in VARIANTS]
            cells += [f"{paired_ratio(times[n], times[BASELINE]):.2f}x" for n in VARIANTS[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8,64,32,32", help="per-rank activation shape N,C,H,W (default 8,64,32,32)")
    parser.add_argument("--blocks", type=int, default=4, help="conv + norm + act blocks in the stack (default 4)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--tiny", action="store_true", help="small shape, 2 repetitions: a smoke run")
    parser.add_argument("--out", default="", help="folder to write inplace_abn.md and inplace_abn.json into")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape, args.blocks, args.reps, args.warmup = "2,8,8,8", 2, 2, 1
    args.shape = tuple(int(v) for v in args.shape.split(","))
    worlds = [int(w) for w in args.worlds.split(",")]
    started = time.monotonic()
    results = []
    for world in worlds:
        print(f"[{time.monotonic() - started:5.1f} s] W = {world} ...", flush=True)
        run = run_ranks(_rank, world, args.shape, args.blocks, args.reps, args.warmup, world == 2 or len(worlds) == 1,
                        timeout=1800, pg_timeout=600)  # fmt: skip
        results.append(run[0])
    text = report(results, args, time.monotonic() - started)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "inplace_abn.md"), "w") as handle:
            handle.write(text)
        with open(os.path.join(args.out, "inplace_abn.json"), "w") as handle:
            json.dump({"args": vars(args), "machine": machine_description(), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
