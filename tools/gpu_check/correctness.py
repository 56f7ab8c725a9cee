"""Section a of ``tools/gpu_check``: correctness on 2 and 4 real gloo ranks sharing the device, against
float64 nn.BatchNorm on the global batch: output, input and parameter gradients, running
statistics, eval output, and the strides of the output and input gradient as the op returns them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import syncnorm
from syncnorm.testing import RankError, run_ranks, shard

from .parts import layout_problems, track_error
from .report import check

if TYPE_CHECKING:
    from .run import Run

# ---------------------------------------------------------------------------------------------
# correctness on real gloo ranks, against float64 nn.BatchNorm on the global batch

LAYOUTS = {
    "nc": ((6,), torch.contiguous_format),
    "nchw": ((5, 4, 3), torch.contiguous_format),
    "channels_last": ((5, 4, 3), torch.channels_last),
    "channels_last_3d": ((3, 4, 3, 2), torch.channels_last_3d),
}
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
_FULL_MODES = [
    ("float32", "plain"),
    ("bfloat16", "autocast"),
    ("float16", "autocast"),
    ("bfloat16", "half_weights"),
    ("float16", "half_weights"),
    ("bfloat16", "half_layer"),
]


def correctness_cases(world: int, quick: bool) -> list[dict]:
    """The cases each rank runs: layouts x dtypes (autocast, half weights), affine, momentum, rank sizes."""
    uneven = {2: [3, 5], 4: [2, 3, 0, 3]}.get(world, [2] * world)
    cases: list[dict] = []

    def add(layout, dtype="float32", mode="plain", affine=True, momentum=0.1, sizes=None):
        sizes = sizes or uneven
        name = f"W{world} {layout} {dtype} {mode}{'' if affine else ' affine=False'}"
        name += f"{' momentum=None' if momentum is None else ''} sizes={sizes}"
        cases.append(
            dict(name=name, layout=layout, dtype=dtype, mode=mode, affine=affine, momentum=momentum, sizes=sizes)
        )

    if quick:
        for layout in ("nc", "channels_last"):
            add(layout)
            add(layout, "bfloat16", "autocast")
        add("nc", momentum=None)
        return cases
    for layout in LAYOUTS:
        for dtype, mode in _FULL_MODES:
            add(layout, dtype, mode)
        add(layout, affine=False)
        add(layout, "bfloat16", "autocast", affine=False)
        add(layout, momentum=None)
    add("channels_last", "float64")
    add("nchw", sizes=[4] * world)
    # Ranks holding one value per channel (the edge of the at-most-one-value rule); at W=2 one rank holds 2, since the
    # input gradient of a batch of exactly 2 values is identically zero (nothing to compare).
    add("nc", sizes=[1] * world if world > 2 else [1, 2])
    add("nchw", sizes=[0] * (world - 1) + [6])
    return cases


def _run_case(rank: int, world: int, case: dict, device: torch.device) -> dict:
    shape, layout = LAYOUTS[case["layout"]]
    dtype, mode, sizes = getattr(torch, case["dtype"]), case["mode"], case["sizes"]
    channels, total = shape[0], sum(sizes)
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    batches = []
    for _ in range(2):
        # The values the layer really sees (rounded to its dtype), mean large next to the spread.
        x = (torch.randn(total, *shape, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype).double()
        batches.append((x, torch.randn(total, *shape, generator=gen, dtype=torch.float64)))
    reference_cls = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape) + 1]
    kwargs = dict(momentum=case["momentum"], affine=case["affine"])
    reference = reference_cls(channels, dtype=torch.float64, **kwargs)
    layer_dtype = dtype if dtype == torch.float64 or mode == "half_layer" else torch.float32
    ours = syncnorm.SyncBatchNorm(channels, device=device, dtype=layer_dtype, **kwargs)
    if case["affine"]:
        param_dtype = dtype if mode in ("half_weights", "half_layer") else layer_dtype
        for name, values in (
            ("weight", 1 + 0.5 * torch.randn(channels, generator=gen)),
            ("bias", torch.randn(channels, generator=gen)),
        ):
            values = values.to(param_dtype)
            setattr(ours, name, nn.Parameter(values.to(device)))
            with torch.no_grad():
                getattr(reference, name).copy_(values.double())
    autocast = torch.autocast(device.type, dtype=dtype) if mode == "autocast" else contextlib.nullcontext()
    errors: dict = {}
    notes: list[str] = []
    for x, g in batches:
        xr = x.clone().requires_grad_()
        want = reference(xr)
        (want * g).sum().backward()
        local = shard(x, rank, sizes).to(device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
        # The input gradient as the op returns it: AccumulateGrad would give local.grad the input's
        # strides whatever the op returned, so a layout check on local.grad could never fire.
        returned: list[Tensor] = []
        hook = local.register_hook(returned.append)
        with autocast:
            out = ours(local)
        (out.double() * shard(g, rank, sizes).to(device)).sum().backward()
        hook.remove()
        track_error(errors, "output", out, shard(want, rank, sizes))
        track_error(errors, "grad_input", local.grad, shard(xr.grad, rank, sizes))
        if out.dtype != dtype:
            notes.append(f"output dtype {out.dtype}")
        notes += layout_problems(local, out, returned[0] if returned else None)
        for name in ("weight", "bias") if case["affine"] else ():
            param = getattr(ours, name)
            if param.grad is not None and param.grad.dtype != param.dtype:
                notes.append(f"grad_{name} dtype {param.grad.dtype} != {param.dtype}")
            summed = (param.grad if param.grad is not None else torch.zeros_like(param)).detach().double().cpu()
            dist.all_reduce(summed)  # syncnorm's parameter gradients are each rank's share
            track_error(errors, f"grad_{name}", summed, getattr(reference, name).grad)
            param.grad = getattr(reference, name).grad = None
        track_error(errors, "running_mean", ours.running_mean, reference.running_mean)
        track_error(errors, "running_var", ours.running_var, reference.running_var)
        if int(ours.num_batches_tracked) != int(reference.num_batches_tracked):
            notes.append(f"num_batches_tracked {int(ours.num_batches_tracked)} != {int(reference.num_batches_tracked)}")
    ours.eval()
    reference.eval()
    x = batches[0][0]
    with torch.no_grad(), autocast:
        out = ours(shard(x, rank, sizes).to(device=device, dtype=dtype).contiguous(memory_format=layout))
    track_error(errors, "eval_output", out, shard(reference(x), rank, sizes))
    tolerance = TOLERANCE[case["dtype"]]
    return {"errors": errors, "notes": sorted(set(notes)), "ok": max(errors.values()) <= tolerance and not notes}


def correctness_rank(rank: int, world: int, cases: list[dict], device_type: str) -> list[dict]:
    """Every case on this rank; a failing case is recorded, and all ranks learn that it failed."""
    if device_type == "cuda":
        torch.cuda.set_device(0)  # every rank shares the one GPU; collectives go through gloo
    device = torch.device(device_type)
    results = []
    for case in cases:
        start = time.perf_counter()
        try:
            outcome = _run_case(rank, world, case, device)
        except Exception as err:
            outcome = {"errors": {}, "notes": [f"{type(err).__name__}: {str(err)[:400]}"], "ok": False}
        failed = torch.tensor([0.0 if outcome["ok"] else 1.0])
        dist.all_reduce(failed)
        outcome.update(case=case["name"], failed_ranks=int(failed), seconds=time.perf_counter() - start)
        results.append(outcome)
    return results


# ---------------------------------------------------------------------------------------------
# a) correctness on real gloo ranks


def start_correctness(run: Run) -> Callable[[Run], dict]:
    """Start the 2- and 4-rank runs in background threads; returns the function that joins them."""
    outcomes: dict[int, Any] = {}
    rank_timeout = min(run.sizes["rank_timeout"], max(30.0, run.left_s() - 10.0))

    def one(world: int) -> None:
        cases = correctness_cases(world, run.args.quick)
        try:
            outcomes[world] = run_ranks(correctness_rank, world, cases, run.device.type, timeout=rank_timeout,
                                        pg_timeout=60, expect_errors=True, start_method="spawn")  # fmt: skip
        except Exception as err:  # noqa: BLE001  (hung ranks: recorded)
            outcomes[world] = f"{type(err).__name__}: {str(err)[:2000]}"

    threads = [threading.Thread(target=one, args=(world,), daemon=True) for world in (2, 4)]
    for thread in threads:
        thread.start()

    def join(run: Run) -> dict:
        for thread in threads:  # past the budget the watchdog ends the run: wait for it, not less
            thread.join(max(1.0, run.left_s() + run.args.grace_s + 5.0))
        result: dict[str, Any] = {"worlds": {}, "tolerance": TOLERANCE}
        for world in (2, 4):
            ranks = outcomes.get(world, "still running when the budget ran out")
            if isinstance(ranks, str) or any(isinstance(r, RankError) for r in ranks):
                result["worlds"][world] = {"error": ranks if isinstance(ranks, str) else [str(r) for r in ranks]}
                continue
            cases = []
            for per_rank in zip(*ranks):
                errors: dict[str, float] = {}
                for outcome in per_rank:
                    for name, value in outcome["errors"].items():
                        errors[name] = max(errors.get(name, 0.0), value)
                notes = sorted({note for outcome in per_rank for note in outcome["notes"]})
                worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", float("nan"))
                cases.append({"case": per_rank[0]["case"], "ok": all(o["ok"] for o in per_rank), "worst": worst,
                              "errors": errors, "notes": notes})  # fmt: skip
            result["worlds"][world] = {"cases": cases, "passed": sum(c["ok"] for c in cases), "total": len(cases)}
        text = "; ".join(
            f"W={world}: " + (f"{w['passed']}/{w['total']} cases" if "cases" in w else "ranks failed")
            for world, w in result["worlds"].items()
        )
        passed = all(w.get("passed", -1) == w.get("total") for w in result["worlds"].values())
        result["checks"] = {"correctness": check(passed, text + " (output, grads, running stats, layouts)")}
        return result

    return join
