"""Everything issue 19 asks of one lent GPU, in one run: correctness, host syncs, CUDA graphs, compile, speed.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --device cuda --out OUT [--budget-s 380]
    python benchmarks/gpu_check.py --device cpu --out /tmp/gpucheck [--quick]   # rehearsal

Sections (``--sections`` picks some): a) correctness: 2 and 4 gloo ranks sharing the device
(spawned: CUDA cannot fork), against float64 nn.BatchNorm on the global batch; b) host syncs
of a ResNet-50 training step (sync debug mode); c1) that step captured whole in a CUDA
graph vs eager; c2) torch.compile (fullgraph, and reduce-overhead) vs eager; d1) per-layer
fwd+bwd speed and bandwidth; d2) ResNet-50 step time; e) InPlaceABN memory (when
``syncnorm.InPlaceABN`` exists). b-e run in this one process as rank 0 of W = 8 under torch's
fake process group, with ``IdenticalRanks`` standing in for the collectives.

Robustness: each section is timed and runs in try/except (a failure is recorded, the run goes
on); both reports are rewritten after every section; a section that no longer fits in
``--budget-s`` is skipped and says so; a watchdog writes the report and exits if the run
overruns the budget by ``--grace-s``. On CPU the parts that need CUDA are rehearsed on the
same code paths (graph replay becomes an eager step, syncs are not counted, CUDA events
become perf_counter) or recorded as not run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing
import os
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import _gpu_check_parts as parts
import torch
import torch.distributed as dist
from _bench_common import (
    RESNET50_SHAPES,
    machine_description,
    saved_tensor_bytes,
)  # puts the repo root and tests/ on sys.path
from harness import RankError, run_ranks
from torch import nn

import syncnorm

WORLD = 8  # the stand-in's world size for sections b-e
PROFILES = {  # sizes: the GPU run, the CPU rehearsal, and a smoke run (--quick)
    "gpu": dict(batch=32, image=224, shapes=RESNET50_SHAPES, layer_reps=15, layer_inner=4, step_reps=10,
                step_inner=2, graph_warmup=3, graph_steps=4, probe_steps=3, abn=(32, 64, 56, 56, 6), rank_timeout=240),
    "cpu": dict(batch=2, image=64, shapes=((64, 28, 28), (256, 14, 14), (512, 7, 7)), layer_reps=5, layer_inner=2,
                step_reps=3, step_inner=1, graph_warmup=2, graph_steps=2, probe_steps=2, abn=(2, 16, 16, 16, 3),
                rank_timeout=300),
    "quick": dict(batch=2, image=32, shapes=((16, 8, 8),), layer_reps=2, layer_inner=1, step_reps=2, step_inner=1,
                  graph_warmup=1, graph_steps=1, probe_steps=2, abn=(2, 8, 8, 8, 2), rank_timeout=150),
}  # fmt: skip
SECTIONS = {
    "a": "correctness: 2 and 4 gloo ranks vs float64 nn.BatchNorm on the global batch",
    "b": "no host sync: ResNet-50 training step under sync debug mode",
    "c1": "CUDA graph: the whole ResNet-50 step captured, replays vs eager",
    "c2": "torch.compile(fullgraph=True) and mode='reduce-overhead' vs eager",
    "d1": "speed: per-layer fwd+bwd on ResNet-50 shapes, bandwidth vs copy",
    "d2": "speed: ResNet-50 training step",
    "e": "memory: InPlaceABN vs BatchNorm2d + LeakyReLU",
}
# Roughly what each section needs on the GPU, in seconds: one that no longer fits is skipped.
NEEDS_S = {"a": 20, "b": 25, "c1": 25, "c2": 100, "d1": 40, "d2": 40, "e": 10}
# Executed in this order: a starts in the background first, c2 (compile, CPU-heavy) overlaps
# with it, and a is joined before the timed sections d1 and d2 so nothing else runs then.
ORDER = ["a", "b", "c1", "c2", "d1", "d2", "e"]


class Run:
    """The run's settings, clock and report; sections read and write through it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.sizes = PROFILES["quick" if args.quick else ("gpu" if self.cuda else "cpu")]
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.standin = parts.IdenticalRanks(WORLD)
        self.lock = threading.RLock()
        self.sections: dict[str, dict] = {key: {"title": SECTIONS[key], "status": "not run"} for key in SECTIONS}
        self.meta = self._meta()

    def _meta(self) -> dict:
        meta: dict[str, Any] = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            **machine_description(),
        }
        meta.update(device=str(self.device), budget_s=self.args.budget_s, world_standin=WORLD,
                    profile="quick" if self.args.quick else ("gpu" if self.cuda else "cpu"), sizes=self.sizes)  # fmt: skip
        if self.cuda:
            meta.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        for name in ("torchvision", "triton"):
            try:
                meta[name] = __import__(name).__version__
            except Exception as err:  # noqa: BLE001  (any import failure: recorded)
                meta[name] = f"not available ({type(err).__name__})"
        return meta

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def record(self, key: str, **fields: Any) -> None:
        with self.lock:
            self.sections[key].update(fields)
            self.write()

    def write(self) -> None:
        with self.lock:
            self.meta["elapsed_s"] = round(time.monotonic() - self.start, 1)
            targets = parts.targets(self.sections, self.cuda)
            data = {"meta": self.meta, "targets": targets, "sections": self.sections}
            os.makedirs(self.args.out, exist_ok=True)
            for name, text in (
                ("gpu_check.json", json.dumps(data, indent=1, default=str)),
                ("gpu_check.md", parts.markdown(self.meta, targets, self.sections)),
            ):
                path = os.path.join(self.args.out, name)
                with open(path + ".tmp", "w") as handle:
                    handle.write(text)
                os.replace(path + ".tmp", path)


def run_section(run: Run, key: str, body: Callable[[Run], dict], started: float | None = None) -> None:
    """Run one section and record it.

    ``started``: when a background section began (its seconds count from there). Such a section
    is always joined, whatever budget is left: it is already running, and the watchdog bounds it.
    """
    left = run.left_s()
    if started is None and left < NEEDS_S[key] * (0.25 if not run.cuda else 1.0):
        run.record(key, status="skipped", reason=f"budget: {left:.0f} s left, the section needs about {NEEDS_S[key]} s")
        print(f"== [{key}] SKIPPED: {left:.0f} s of budget left", flush=True)
        return
    print(f"== [{key}] {SECTIONS[key]}  ({left:.0f} s of budget left)", flush=True)
    run.record(key, status="running")
    start = time.perf_counter() if started is None else started
    try:
        result = body(run)
        run.sync()  # an asynchronous CUDA error belongs to this section
        status = result.pop("status", "ok")
        run.record(key, status=status, seconds=round(time.perf_counter() - start, 1), result=result)
    except Exception as err:  # noqa: BLE001  (record it and go on with the next section)
        run.record(key, status="failed", seconds=round(time.perf_counter() - start, 1),
                   error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])  # fmt: skip
        traceback.print_exc()
    gc.collect()  # the section's models and graphs go before the next one starts
    if run.cuda:
        torch.cuda.empty_cache()
    print(f"   [{key}] {run.sections[key]['status']} in {run.sections[key].get('seconds', 0)} s", flush=True)


# ---------------------------------------------------------------------------------------------
# a) correctness on real gloo ranks


def start_correctness(run: Run) -> Callable[[], dict]:
    """Start the 2- and 4-rank runs in background threads; returns the function that joins them."""
    outcomes: dict[int, Any] = {}

    def one(world: int) -> None:
        cases = parts.correctness_cases(world, run.args.quick)
        try:
            outcomes[world] = run_ranks(parts.correctness_rank, world, cases, run.device.type, timeout=run.sizes["rank_timeout"],
                                        pg_timeout=60, expect_errors=True, start_method="spawn")  # fmt: skip
        except Exception as err:  # noqa: BLE001  (hung ranks: recorded)
            outcomes[world] = f"{type(err).__name__}: {str(err)[:2000]}"

    threads = [threading.Thread(target=one, args=(world,), daemon=True) for world in (2, 4)]
    for thread in threads:
        thread.start()

    def join(run: Run) -> dict:
        for thread in threads:  # past the budget the watchdog ends the run: wait for it, not less
            thread.join(max(1.0, run.left_s() + run.args.grace_s + 5.0))
        result: dict[str, Any] = {"worlds": {}}
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
        failed = any("error" in w or w["passed"] < w["total"] for w in result["worlds"].values())
        result["status"] = "failed" if failed else "ok"
        return result

    return join


# ---------------------------------------------------------------------------------------------
# b) host syncs


def count_syncs(run: Run, step: Callable) -> dict:
    """Synchronisations of one call under sync debug mode "warn", with where they come from."""
    run.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    run.sync()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs)
    return {"syncs": len(syncs), "where": dict(where.most_common(8))}


def error_mode(run: Run, step: Callable) -> str:
    run.sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "passed"
    except RuntimeError as err:
        return f"raised: {str(err)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        run.sync()


def section_no_host_sync(run: Run) -> dict:
    base, source = parts.resnet50()
    batch, image = run.sizes["batch"], run.sizes["image"]
    result: dict[str, Any] = {"model": source, "batch_per_rank": batch, "image": image, "variants": {}}
    variants = ["nn.BatchNorm", "syncnorm"] + (["torch.nn.SyncBatchNorm"] if run.cuda else [])
    for variant in variants:
        step = parts.TrainStep(parts.variant_model(base, variant), run.device, batch, image)
        with run.standin.patched():
            step()  # warm-up: optimizer state, cuDNN handles
            before = Counter(run.standin.calls)
            entry = count_syncs(run, step) if run.cuda else {"syncs": "not measured (needs CUDA)", "ran": bool(step())}
            entry["collectives"] = dict(Counter(run.standin.calls) - before)
        result["variants"][variant] = entry
        del step
    result["error_mode"] = {}
    for label, patched in (
        ("syncnorm, stand-in collectives", True),
        ("syncnorm, fake backend's own collectives", False),
    ):
        step = parts.TrainStep(parts.variant_model(base, "syncnorm"), run.device, batch, image)
        with run.standin.patched() if patched else _nothing():
            step()
            result["error_mode"][label] = error_mode(run, step) if run.cuda else "not run (sync debug mode needs CUDA)"
        del step
    if not run.cuda:
        result["status"] = "rehearsed"
    return result


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# c) CUDA graphs and compile


def section_cuda_graph(run: Run) -> dict:
    base = syncnorm.convert_sync_batchnorm(parts.resnet50()[0])
    with run.standin.patched():
        result = parts.graph_equals_eager(base, run.device, run.sizes["batch"], run.sizes["image"],
                                          run.sizes["graph_steps"], run.sizes["graph_warmup"])  # fmt: skip
    floor_loss, floor_state = (
        result["loss_rel_diff"]["eager_again (floor)"],
        result["state_rel_diff"]["eager_again (floor)"],
    )
    result["criterion"] = "graph vs eager <= 4 x (eager vs eager) + 1e-3 (loss), + 1e-4 (parameters and buffers)"
    result["equal"] = (result["loss_rel_diff"]["graph"] <= 4 * floor_loss + 1e-3
                       and result["state_rel_diff"]["graph"] <= 4 * floor_state + 1e-4)  # fmt: skip
    result["status"] = ("ok" if result["equal"] else "failed") if run.cuda else "rehearsed"
    return result


def section_compile(run: Run) -> dict:
    from torch._dynamo.utils import counters

    backend = run.args.compile_backend or ("aot_eager" if run.args.quick and not run.cuda else "inductor")
    torch.manual_seed(0)
    base = syncnorm.convert_sync_batchnorm(parts.CompileProbe())
    result: dict[str, Any] = {"backend": backend, "modes": {}}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the same conv numerics in eager and compiled code
    try:
        with run.standin.patched():
            eager = copy.deepcopy(base).to(run.device)
            want = parts.probe_steps(eager, eager, run.device, run.sizes["probe_steps"])
            for mode in ("default", "reduce-overhead"):
                if run.left_s() < 30:
                    result["modes"][mode] = {"skipped": f"budget: {run.left_s():.0f} s left"}
                    continue
                model = copy.deepcopy(base).to(run.device)
                skips = counters["inductor"]["cudagraph_skips"]
                start = time.perf_counter()
                compiled = torch.compile(
                    model, fullgraph=True, backend=backend, mode=None if mode == "default" else mode
                )
                try:
                    got = parts.probe_steps(compiled, model, run.device, run.sizes["probe_steps"])
                except Exception as err:  # noqa: BLE001
                    result["modes"][mode] = {"error": f"{type(err).__name__}: {str(err)[:1500]}"}
                    continue
                errors: dict[str, float] = {}
                for step_want, step_got in zip(want, got):
                    for name, tensor in step_want.items():
                        parts._track(errors, name, step_got[name], tensor)
                worst = max(errors.items(), key=lambda kv: kv[1])
                result["modes"][mode] = {"seconds": round(time.perf_counter() - start, 1), "worst": worst,
                                         "equal": worst[1] <= 1e-3, "errors": errors,
                                         "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips}  # fmt: skip
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    result["criterion"] = (
        "every output, input grad, parameter grad and buffer within 1e-3 (relative to its max) of eager, each step"
    )
    done = [m for m in result["modes"].values() if "equal" in m]
    result["status"] = "ok" if len(done) == 2 and all(m["equal"] for m in done) else "failed"
    return result


# ---------------------------------------------------------------------------------------------
# d) speed


def section_layer_speed(run: Run) -> dict:
    impls = ["nn.BatchNorm", "syncnorm"] + (["torch.nn.SyncBatchNorm"] if run.cuda else [])
    result: dict[str, Any] = {"impls": impls, "rows": [], "standin_check": {}}
    batch = run.sizes["batch"]

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
            parts._track(errors, "output", out, outs["nn.BatchNorm"][0])
            parts._track(errors, "grad_input", grad, outs["nn.BatchNorm"][1])
            result["standin_check"][name] = errors
        result["standin_ok"] = all(max(e.values()) <= 1e-4 for e in result["standin_check"].values())
        for dtype in (torch.float32, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                for shape in run.sizes["shapes"]:
                    if run.left_s() < 15:
                        result["skipped_rows"] = f"budget ran out at {dtype} {layout} {shape}"
                        return result
                    x = torch.randn(batch, *shape, device=run.device, dtype=dtype).contiguous(memory_format=layout)
                    x.requires_grad_()
                    dy = torch.randn_like(x)
                    fns = {"copy": lambda x=x: x.detach().clone()}
                    fns.update({name: parts.layer_fwd_bwd(layer, x, dy) for name, layer in layers(shape[0]).items()})
                    times = parts.time_interleaved(
                        fns, run.device, run.sizes["layer_reps"], run.sizes["layer_inner"], 3
                    )
                    nbytes = x.numel() * x.element_size()
                    row = {"dtype": str(dtype).replace("torch.", ""), "layout": "channels_last" if layout == torch.channels_last else "NCHW",
                           "shape": [batch, *shape], "numel": x.numel(), "ms": {n: parts.median(t) for n, t in times.items()},
                           "copy_GBps": 2 * nbytes / parts.median(times["copy"]) / 1e6, "ratios": {}, "bandwidth_vs_copy": {}}  # fmt: skip
                    for name in impls:
                        # fwd+bwd moves at least 8 x the tensor (fwd: read x twice, write y; bwd: read dy and
                        # x twice, write dx); a copy moves 2 x: bandwidth fraction = 4 t_copy / t_layer.
                        row["bandwidth_vs_copy"][name] = 4 * parts.median(
                            [c / t for c, t in zip(times["copy"], times[name])]
                        )
                    row["ratios"]["syncnorm / nn.BatchNorm"] = parts.paired(times, "syncnorm", "nn.BatchNorm")
                    if "torch.nn.SyncBatchNorm" in times:
                        row["ratios"]["syncnorm / torch.nn.SyncBatchNorm"] = parts.paired(
                            times, "syncnorm", "torch.nn.SyncBatchNorm"
                        )
                    result["rows"].append(row)
                    print(f"   {row['dtype']:8} {row['layout']:13} {tuple(row['shape'])}: "
                          + "  ".join(f"{n} {ms:.3f} ms" for n, ms in row["ms"].items()), flush=True)  # fmt: skip
                    del x, dy, fns
    if not run.cuda:
        result["status"] = "rehearsed"
    return result


def section_step_speed(run: Run) -> dict:
    base, source = parts.resnet50()
    batch, image = run.sizes["batch"], run.sizes["image"]
    result: dict[str, Any] = {"model": source, "batch_per_rank": batch, "image": image}
    with run.standin.patched():
        steps: dict[str, Callable] = {}
        for variant in ["nn.BatchNorm", "syncnorm"] + (["torch.nn.SyncBatchNorm"] if run.cuda else []):
            steps[variant] = parts.TrainStep(parts.variant_model(base, variant), run.device, batch, image)
        if run.cuda:
            graphed = parts.TrainStep(parts.variant_model(base, "syncnorm"), run.device, batch, image)
            steps["syncnorm + CUDA graph"] = parts.GraphedStep(graphed, [(graphed.x.clone(), graphed.y.clone())] * 3)
        times = parts.time_interleaved(steps, run.device, run.sizes["step_reps"], run.sizes["step_inner"], 2)
    result["ms"] = {name: parts.median(t) for name, t in times.items()}
    result["ratios"] = {
        f"{name} / nn.BatchNorm": parts.paired(times, name, "nn.BatchNorm") for name in times if name != "nn.BatchNorm"
    }
    if "torch.nn.SyncBatchNorm" in times:
        result["ratios"]["syncnorm / torch.nn.SyncBatchNorm"] = parts.paired(
            times, "syncnorm", "torch.nn.SyncBatchNorm"
        )
    if not run.cuda:
        result["status"] = "rehearsed"
    return result


# ---------------------------------------------------------------------------------------------
# e) InPlaceABN memory


def section_memory(run: Run) -> dict:
    batch, channels, height, width, depth = run.sizes["abn"]
    norms: dict[str, Callable[[int], nn.Module]] = {
        "nn.BatchNorm2d + LeakyReLU": lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01)),
        "nn.BatchNorm2d + LeakyReLU(inplace)": lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True)),
        "syncnorm.SyncBatchNorm + LeakyReLU(inplace)": lambda c: nn.Sequential(syncnorm.SyncBatchNorm(c), nn.LeakyReLU(0.01, inplace=True)),
    }  # fmt: skip
    result: dict[str, Any] = {
        "model": f"{depth} x (3x3 conv + norm), input {(batch, channels, height, width)} float32",
        "variants": {},
    }
    result["inplace_abn"] = "syncnorm.InPlaceABN, default activation"
    norms["syncnorm InPlaceABN"] = lambda c: syncnorm.InPlaceABN(c)
    norms["syncnorm InPlaceABN(inplace=True)"] = lambda c: syncnorm.InPlaceABN(c, inplace=True)
    with run.standin.patched():
        for name, make in norms.items():
            try:
                blocks = [
                    m
                    for _ in range(depth)
                    for m in (nn.Conv2d(channels, channels, 3, padding=1, bias=False), make(channels))
                ]
                model = nn.Sequential(*blocks).to(run.device)
                x = torch.randn(batch, channels, height, width, device=run.device, requires_grad=True)
                entry: dict[str, Any] = {"repr": " ".join(repr(blocks[1]).split())[:200]}
                model(x).sum().backward()  # warm-up: grads allocated, as in a training loop
                entry["saved_for_backward_MiB"] = saved_tensor_bytes(model, x)["all"] / 2**20
                if run.cuda:
                    run.sync()
                    torch.cuda.reset_peak_memory_stats()
                    floor = torch.cuda.memory_allocated()
                    model(x).sum().backward()
                    run.sync()
                    entry["peak_step_MiB"] = (torch.cuda.max_memory_allocated() - floor) / 2**20
                result["variants"][name] = entry
                del model, x
            except Exception as err:  # noqa: BLE001
                result["variants"][name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    return result


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", required=True, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=380.0, help="whole-run budget; later sections are skipped")
    parser.add_argument("--grace-s", type=float, default=40.0, help="watchdog: exit this long after the budget")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and fewer cases (a smoke run)")
    parser.add_argument("--sections", default=",".join(ORDER), help="comma-separated subset of " + ",".join(ORDER))
    parser.add_argument("--compile-backend", default="", help="default: inductor (aot_eager for --quick on CPU)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False", flush=True)
        return 2
    if args.device == "cuda":
        torch.cuda.set_device(0)
    run = Run(args)
    chosen = [key for key in ORDER if key in args.sections.split(",")]
    print(
        f"gpu_check: {run.meta.get('gpu', 'CPU')}, torch {torch.__version__}, sections {chosen}, budget {args.budget_s:.0f} s",
        flush=True,
    )

    def overrun() -> None:
        with run.lock:
            for section in run.sections.values():
                if section["status"] in ("running", "started in background"):
                    section.update(
                        status="killed", reason=f"the run passed budget + grace ({args.budget_s + args.grace_s:.0f} s)"
                    )
            run.write()
        for child in multiprocessing.active_children():  # the correctness ranks, if still running
            child.kill()
        print("gpu_check: WATCHDOG: budget + grace passed; report written, exiting", flush=True)
        os._exit(3)

    watchdog = threading.Timer(args.budget_s + args.grace_s, overrun)
    watchdog.daemon = True
    watchdog.start()
    run.write()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    bodies = {"b": section_no_host_sync, "c1": section_cuda_graph, "c2": section_compile,
              "d1": section_layer_speed, "d2": section_step_speed, "e": section_memory}  # fmt: skip
    join_correctness = None
    if "a" in chosen:
        print(f"== [a] {SECTIONS['a']}: started in the background", flush=True)
        started = time.perf_counter()
        run.record("a", status="started in background")
        join_correctness = start_correctness(run)
    for key in chosen:
        if key == "a":
            continue
        if key in ("d1", "d2", "e") and join_correctness is not None:
            bodies_a = join_correctness
            join_correctness = None
            print("== [a] joining the correctness ranks", flush=True)
            run_section(run, "a", bodies_a, started)
        run_section(run, key, bodies[key])
    if join_correctness is not None:
        run_section(run, "a", join_correctness, started)
    watchdog.cancel()
    run.write()
    print(parts.summary(run.meta, parts.targets(run.sections, run.cuda), run.sections), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # no gloo or fake-group destructors at interpreter exit
