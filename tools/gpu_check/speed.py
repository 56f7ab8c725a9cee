"""Sections d1, d2 and e of ``tools/gpu_check``: per-layer speed and bandwidth, ResNet-50 step time,
InPlaceABN activation memory. Each returns its result with ``checks`` (see ``run.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import syncnorm
from benchmarks.measure import DeviceClock, fwd_bwd, median, paired, saved_tensor_bytes, time_interleaved

from . import models, parts
from .report import check
from .run import Run

TIMING_NOTE = (
    "per call, median over interleaved repetitions; the device is synchronised before each repetition's start "
    "event and not inside it (ms: CUDA events around the calls, so host-bound launch gaps count; host ms: "
    "perf_counter around the launches alone); ratios are medians of per-repetition ratios"
)

# ---------------------------------------------------------------------------------------------
# d1) per layer


def section_layer_speed(run: Run) -> dict:
    impls = ["nn.BatchNorm", "syncnorm"] + (["torch.nn.SyncBatchNorm"] if run.cuda else [])
    result: dict[str, Any] = {"impls": impls, "rows": [], "standin_check": {}, "timing": TIMING_NOTE}
    batch, clock = run.sizes["batch"], DeviceClock(run.device)

    def layers(channels: int) -> dict[str, nn.Module]:
        made = {"nn.BatchNorm": nn.BatchNorm2d(channels), "syncnorm": syncnorm.SyncBatchNorm(channels)}
        if run.cuda:
            made["torch.nn.SyncBatchNorm"] = nn.SyncBatchNorm(channels)
        return {name: layer.to(run.device) for name, layer in made.items() if name in impls}

    with run.standin.patched():
        # The stand-in gives real numbers: each implementation equals nn.BatchNorm on the local batch.
        x = (torch.randn(8, 16, 5, 5, device=run.device) * 2 + 1).requires_grad_()
        dy = torch.randn_like(x)
        outs = {}
        for name, layer in layers(16).items():
            out = layer(x)
            out.backward(dy)
            outs[name] = (out.detach(), x.grad.clone())
            x.grad = None
        for name, (out, grad) in outs.items():
            errors: dict[str, float] = {}
            parts.track_error(errors, "output", out, outs["nn.BatchNorm"][0])
            parts.track_error(errors, "grad_input", grad, outs["nn.BatchNorm"][1])
            result["standin_check"][name] = errors
        standin_ok = all(max(e.values()) <= 1e-4 for e in result["standin_check"].values())
        combos = [
            (d, f) for d in (torch.float32, torch.bfloat16) for f in (torch.contiguous_format, torch.channels_last)
        ]
        for dtype, layout in combos:
            for shape in run.sizes["shapes"]:
                if run.left_s() - run.reserved_after("d1") < 5:
                    result["budget_cut"] = f"rows from {dtype} {layout} {shape} on not run"
                    break
                result["rows"].append(_layer_row(run, clock, layers, impls, batch, dtype, layout, shape))
    rows, shapes = result["rows"], run.sizes["shapes"]
    key = "syncnorm / torch.nn.SyncBatchNorm"
    ratios = [(row["ratios"][key]["median"], row) for row in rows if key in row["ratios"]]
    expected = len(combos) * len(shapes)
    if not run.cuda:
        vs_torch = check(None, "torch.nn.SyncBatchNorm needs CUDA")
    elif not standin_ok:
        vs_torch = check(False, "stand-in check failed: the implementations did not compute the same numbers")
    elif not ratios:
        vs_torch = check(None, "no rows measured")
    else:
        worst, row = max(ratios, key=lambda item: item[0])
        wins = sum(value <= 1.0 for value, _ in ratios)
        text = f"worst {worst:.3f} ({row['dtype']} {row['layout']} {tuple(row['shape'])}); <= 1 on {wins}/{len(ratios)} rows"
        vs_torch = check(
            False if worst > 1.0 else (True if len(ratios) == expected else None), text + f" of {expected}"
        )
    result["checks"] = {
        "standin": check(standin_ok, "each implementation vs nn.BatchNorm on the local batch within 1e-4"),
        "vs_torch_sync": vs_torch,
        "bandwidth": _bandwidth(rows, run.cuda),
    }
    return result


def _bandwidth(rows: list[dict], cuda: bool) -> dict:
    """syncnorm's worst bandwidth fraction over the rows within 2.5x of the largest tensor."""
    if not rows:
        return check(None, "no rows measured")
    largest = max(row["numel"] for row in rows)
    large = [row for row in rows if row["numel"] >= 0.4 * largest]
    low = min(large, key=lambda row: row["bandwidth_vs_copy"]["syncnorm"])
    value = low["bandwidth_vs_copy"]["syncnorm"]
    shapes = sorted({tuple(row["shape"]) for row in large})
    return check(
        (value >= 0.70) if cuda else None,
        f"min {100 * value:.0f}% ({low['dtype']} {low['layout']} {tuple(low['shape'])}) over {len(large)} rows of {shapes}",
    )


def _milliseconds(seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    return {name: [1e3 * value for value in values] for name, values in seconds.items()}


def _layer_row(run: Run, clock: DeviceClock, layers: Callable[[int], dict], impls: list[str], batch: int,
               dtype: torch.dtype, layout: torch.memory_format, shape: tuple[int, ...]) -> dict:  # fmt: skip
    x = torch.randn(batch, *shape, device=run.device, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    dy = torch.randn_like(x)
    fns: dict[str, Callable[[], Any]] = {"copy": lambda: x.detach().clone()}
    fns.update({name: fwd_bwd(layer, x, dy) for name, layer in layers(shape[0]).items()})
    timed = time_interleaved(fns, run.sizes["layer_reps"], 1, inner=run.sizes["layer_inner"], clock=clock)
    times, host_ms = _milliseconds(timed.device), _milliseconds(timed.host)
    nbytes = x.numel() * x.element_size()
    row = {"dtype": str(dtype).replace("torch.", ""), "layout": "channels_last" if layout == torch.channels_last else "NCHW",
           "shape": [batch, *shape], "numel": x.numel(), "ms": {n: median(t) for n, t in times.items()},
           "host_ms": {n: median(t) for n, t in host_ms.items()},
           "copy_GBps": 2 * nbytes / median(times["copy"]) / 1e6, "ratios": {}, "bandwidth_vs_copy": {}}  # fmt: skip
    for name in impls:
        # fwd+bwd moves at least 8 x the tensor (fwd: read x twice, write y; bwd: read dy and
        # x twice, write dx); a copy moves 2 x: bandwidth fraction = 4 t_copy / t_layer.
        row["bandwidth_vs_copy"][name] = 4 * median([c / t for c, t in zip(times["copy"], times[name])])
    row["ratios"]["syncnorm / nn.BatchNorm"] = paired(times["syncnorm"], times["nn.BatchNorm"])
    if "torch.nn.SyncBatchNorm" in times:
        row["ratios"]["syncnorm / torch.nn.SyncBatchNorm"] = paired(times["syncnorm"], times["torch.nn.SyncBatchNorm"])
    print(f"   {row['dtype']:8} {row['layout']:13} {tuple(row['shape'])}: "
          + "  ".join(f"{n} {ms:.3f} ms" for n, ms in row["ms"].items()), flush=True)  # fmt: skip
    return row


# ---------------------------------------------------------------------------------------------
# d2) the ResNet-50 step


def section_step_speed(run: Run) -> dict:
    base, source = models.resnet50()
    batch, image = run.sizes["batch"], run.sizes["image"]
    result: dict[str, Any] = {"model": source, "batch_per_rank": batch, "image": image, "timing": TIMING_NOTE}
    with run.standin.patched():
        steps: dict[str, Callable[[], Any]] = {}
        for variant in ["nn.BatchNorm", "syncnorm"] + (["torch.nn.SyncBatchNorm"] if run.cuda else []):
            steps[variant] = models.ResNetStep(models.variant_model(base, variant), run.device, batch, image)
        if run.cuda:
            graphed = models.ResNetStep(models.variant_model(base, "syncnorm"), run.device, batch, image)
            steps["syncnorm + CUDA graph"] = models.GraphedStep(graphed, [(graphed.x.clone(), graphed.y.clone())] * 3)
        timed = time_interleaved(
            steps, run.sizes["step_reps"], 1, inner=run.sizes["step_inner"], clock=DeviceClock(run.device)
        )
    times, host_ms = _milliseconds(timed.device), _milliseconds(timed.host)
    result["ms"] = {name: median(t) for name, t in times.items()}
    result["host_ms"] = {name: median(t) for name, t in host_ms.items()}
    result["ratios"] = {
        f"{name} / nn.BatchNorm": paired(times[name], times["nn.BatchNorm"]) for name in times if name != "nn.BatchNorm"
    }
    if "torch.nn.SyncBatchNorm" in times:
        result["ratios"]["syncnorm / torch.nn.SyncBatchNorm"] = paired(
            times["syncnorm"], times["torch.nn.SyncBatchNorm"]
        )

    def ratio(key: str, limit: float, strict: bool) -> dict:
        if key not in result["ratios"]:
            return check(None, f"no {key} (needs CUDA)")
        value = result["ratios"][key]
        ok = value["median"] < limit if strict else value["median"] <= limit
        return check(ok if run.cuda else None, f"{value['median']:.3f} (quartiles {value['q1']:.3f}-{value['q3']:.3f})")

    result["checks"] = {
        "vs_batchnorm": ratio("syncnorm / nn.BatchNorm", 1.03, False),
        "vs_torch_sync": ratio("syncnorm / torch.nn.SyncBatchNorm", 1.0, True),
    }
    return result


# ---------------------------------------------------------------------------------------------
# e) InPlaceABN memory

BASELINE = "nn.BatchNorm2d + LeakyReLU(inplace)"
TARGET_VARIANT = "syncnorm.InPlaceABNSync"
ABN_MEMORY_TARGET = 0.6
# Each variant: one norm + activation after every conv of the stack. The baseline is the cheaper
# BatchNorm + activation (the in-place activation saves one tensor fewer than the out-of-place one).
MEMORY_VARIANTS: dict[str, Callable[[int], nn.Module]] = {
    BASELINE: lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True)),
    "nn.BatchNorm2d + LeakyReLU": lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01)),
    "syncnorm.SyncBatchNorm + LeakyReLU(inplace)": lambda c: nn.Sequential(syncnorm.SyncBatchNorm(c), nn.LeakyReLU(0.01, inplace=True)),
    TARGET_VARIANT: lambda c: syncnorm.InPlaceABNSync(c, activation="leaky_relu", activation_param=0.01),
    "syncnorm.InPlaceABNSync(inplace=True)": lambda c: syncnorm.InPlaceABNSync(c, activation="leaky_relu", activation_param=0.01, inplace=True),
}  # fmt: skip


def _memory_variant(run: Run, make: Callable[[int], nn.Module]) -> dict:
    batch, channels, height, width, depth = run.sizes["abn"]
    blocks = [
        m for _ in range(depth) for m in (nn.Conv2d(channels, channels, 3, padding=1, bias=False), make(channels))
    ]
    model = nn.Sequential(*blocks).to(run.device)
    x = torch.randn(batch, channels, height, width, device=run.device)  # data: needs no gradient
    entry: dict[str, Any] = {"repr": " ".join(repr(blocks[1]).split())[:200]}
    model(x).sum().backward()  # warm-up: grads allocated, as in a training loop
    entry["saved_for_backward_MiB"] = round(saved_tensor_bytes(model, x)["all"] / 2**20, 4)
    if run.cuda:
        run.sync()
        torch.cuda.reset_peak_memory_stats()
        before_forward = torch.cuda.memory_allocated()
        model(x).sum().backward()
        run.sync()
        entry["activation_MiB"] = round((torch.cuda.max_memory_allocated() - before_forward) / 2**20, 2)
    return entry


def section_memory(run: Run) -> dict:
    batch, channels, height, width, depth = run.sizes["abn"]
    result: dict[str, Any] = {
        "model": f"{depth} x (3x3 conv + norm + activation), input {(batch, channels, height, width)} float32, leaky_relu 0.01",
        "measure": "activation memory = torch.cuda.max_memory_allocated() during one fwd+bwd (after "
        "reset_peak_memory_stats) - torch.cuda.memory_allocated() before the forward; grads already allocated",
        "variants": {},
    }
    with run.standin.patched():
        for name, make in MEMORY_VARIANTS.items():
            try:
                result["variants"][name] = _memory_variant(run, make)
            except Exception as err:  # noqa: BLE001  (recorded, and the section fails)
                result["variants"][name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    variants = result["variants"]
    errors = [name for name, v in variants.items() if "error" in v]
    ours, baseline = variants.get(TARGET_VARIANT, {}), variants.get(BASELINE, {})
    if "activation_MiB" in ours and "activation_MiB" in baseline:
        ratio = ours["activation_MiB"] / baseline["activation_MiB"]
        memory = check(
            ratio <= ABN_MEMORY_TARGET,
            f"{ratio:.3f}x ({ours['activation_MiB']:.1f} / {baseline['activation_MiB']:.1f} MiB)",
        )
    else:
        saved = [v.get("saved_for_backward_MiB") for v in (ours, baseline)]
        text = "not measured: " + (f"errors in {errors}" if errors else "needs CUDA")
        if None not in saved:
            text += f"; saved for backward {saved[0] / saved[1]:.3f}x of {BASELINE}"
        memory = check(None, text)  # the section fails through variants_ran, and the row with it
    result["checks"] = {
        "variants_ran": check(not errors, f"errors in {errors}" if errors else f"all {len(variants)} variants ran"),
        "abn_memory": memory,
    }
    return result
