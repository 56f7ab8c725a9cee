"""Sections b, c1 and c2 of ``tools/gpu_check``: host syncs, CUDA graphs, compile. Each returns its result
with ``checks`` (see ``run.py``)."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

import syncnorm

from . import models, parts
from .report import all_of, check, cudagraphs_check
from .run import Run

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


@contextlib.contextmanager
def sync_debug_error(run: Run) -> Iterator[None]:
    """Any host synchronisation inside raises (CUDA); on CPU, nothing to check."""
    if not run.cuda:
        yield
        return
    run.sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def error_mode(run: Run, call: Callable[[], Any]) -> str:
    """Run ``call`` under sync_debug_error: "passed", "raised: ..." (a host sync) or "error: ..." (anything else).

    On CPU the call runs without the check and its exceptions propagate."""
    if not run.cuda:
        call()
        return "not run (sync debug mode needs CUDA)"
    try:
        with sync_debug_error(run):
            call()
        return "passed"
    except RuntimeError as err:
        kind = "raised" if "synchroniz" in str(err).lower() else "error"
        return f"{kind}: {str(err)[:300]}"
    finally:
        run.sync()


@contextlib.contextmanager
def rank_collectives(run: Run, others_hold_data: bool, record: Callable[[], Any] | None) -> Iterator[None]:
    """The stand-in's collectives: identical ranks, or (others_hold_data) W - 1 ranks replaying what
    ``record`` sent, a full batch of the same layers."""
    with run.standin.patched():
        if not others_hold_data:
            yield
            return
        assert record is not None, "a rank beside ranks holding data needs what a full rank sends"
        with run.standin.recording():
            record()
        with run.standin.replaying():
            yield


def resnet50_syncs(run: Run) -> dict:
    base, source = models.resnet50()
    batch, image = run.sizes["batch"], run.sizes["image"]
    result: dict[str, Any] = {"model": source, "batch_per_rank": batch, "image": image, "variants": {}}
    for variant in ["nn.BatchNorm", "syncnorm"] + (["torch.nn.SyncBatchNorm"] if run.cuda else []):
        step = models.ResNetStep(models.variant_model(base, variant), run.device, batch, image)
        with run.standin.patched():
            step()  # warm-up: optimizer state, cuDNN handles
            before = Counter(run.standin.calls)
            entry = count_syncs(run, step) if run.cuda else {"syncs": "not counted (needs CUDA)", "ran": bool(step())}
            entry["collectives"] = dict(Counter(run.standin.calls) - before)
        result["variants"][variant] = entry
        del step
    result["error_mode"] = {}
    for label, patched in (
        ("syncnorm, stand-in collectives", True),
        ("syncnorm, fake backend's own collectives", False),
    ):
        step = models.ResNetStep(models.variant_model(base, "syncnorm"), run.device, batch, image)
        with run.standin.patched() if patched else contextlib.nullcontext():
            step()
            result["error_mode"][label] = error_mode(run, step)
        del step
    return result


def probe_syncs(run: Run) -> dict:
    torch.manual_seed(0)
    base = models.SyncProbe()
    ranks: dict[str, dict] = {}
    for label, batch in models.PROBE_RANK_BATCHES.items():
        try:
            step = models.ProbeStep(copy.deepcopy(base), run.device, batch)
            edge = batch != models.PROBE_BATCH
            recorder = models.ProbeStep(copy.deepcopy(base), run.device, models.PROBE_BATCH) if edge else None
            losses: list[torch.Tensor] = []
            with rank_collectives(run, edge, recorder):
                step()  # warm-up: the optimizer's state
                before = run.standin.calls["all_reduce"]
                entry: dict[str, Any] = {"sync_debug": error_mode(run, lambda: losses.append(step()))}  # noqa: B023
                entry["all_reduces"] = run.standin.calls["all_reduce"] - before
            if losses:  # read back outside the sync check
                entry["loss"] = float(losses[0].detach())
                if not math.isfinite(entry["loss"]):
                    entry["error"] = f"non-finite loss {entry['loss']}"
        except Exception as err:  # noqa: BLE001  (recorded: the check fails)
            entry = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        ranks[label] = entry
    return {"description": models.PROBE_DESCRIPTION, "ranks": ranks}


def run_layer_case(run: Run, case: models.LayerCase) -> dict:
    """One layer's forward and backward under sync debug mode "error", and what it returned."""
    entry: dict[str, Any] = {"case": case.name, "layer": case.layer_class.__name__, "input": list(case.shape)}
    gen = torch.Generator().manual_seed(0)

    def inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        x = (torch.randn(shape, generator=gen) * 2 + 1).to(run.device).contiguous(memory_format=case.memory_format)
        return x.requires_grad_(), torch.randn(shape, generator=gen).to(run.device).contiguous(
            memory_format=case.memory_format
        )

    try:
        torch.manual_seed(0)
        layer = case.make().to(run.device)
        twin = copy.deepcopy(layer)  # the same layer name: a full rank's payloads for the others to send
        x, dy = inputs(case.shape)
        full = inputs((4, *case.shape[1:]))
        returned: dict[str, Any] = {}
        with rank_collectives(run, case.others_hold_data, lambda: parts.op_output_and_grads(twin, *full)):
            before = run.standin.calls["all_reduce"]

            def call() -> None:
                returned["output"], returned["grad_input"], _ = parts.op_output_and_grads(layer, x, dy)

            entry["sync_debug"] = error_mode(run, call)
            entry["all_reduces"] = run.standin.calls["all_reduce"] - before
        if "output" in returned:
            out, grad = returned["output"], returned["grad_input"]
            entry["layout"] = parts.layout_problems(x, out, grad)
            entry["finite"] = bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad).all())
    except Exception as err:  # noqa: BLE001  (recorded: the check fails)
        entry["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return entry


def section_no_host_sync(run: Run) -> dict:
    result: dict[str, Any] = {"resnet50": resnet50_syncs(run), "probe": probe_syncs(run)}
    cases = models.sync_layer_cases()
    result["layers"] = [run_layer_case(run, case) for case in cases]
    classes = models.synchronised_layer_classes()
    result["classes"] = [c.__name__ for c in classes]
    result["fingerprint_check"] = run.standin.fingerprint_checked
    res, probe, layers = result["resnet50"], result["probe"]["ranks"], result["layers"]

    def zero(value: str) -> bool | None:
        return None if not run.cuda else value == "passed"

    ours = res["variants"]["syncnorm"]["syncs"]
    modes = res["error_mode"]
    result["checks"] = {
        "resnet50_syncs": all_of(
            {"warn": None if not run.cuda else ours == 0, **{k: zero(v) for k, v in modes.items()}},
            (
                f"syncnorm: {ours} syncs per step (warn mode); error mode: "
                + ", ".join(f"{k}: {v[:80]}" for k, v in modes.items())
            )
            if run.cuda
            else "rehearsed: the steps ran with the stand-in and the fake backend (sync debug needs CUDA)",
        ),
        "probe_syncs": all_of(
            {k: False if "error" in v else zero(v["sync_debug"]) for k, v in probe.items()},
            "; ".join(f"{k}: {v.get('error', v.get('sync_debug'))[:120]}" for k, v in probe.items()),
        ),
        "layer_syncs": all_of(
            {e["case"]: False if "error" in e else zero(e["sync_debug"]) for e in layers},
            (
                f"{sum(e.get('sync_debug') == 'passed' for e in layers)}/{len(layers)} layer cases passed sync debug 'error'"
                if run.cuda
                else f"rehearsed: {sum('error' not in e for e in layers)}/{len(layers)} layer cases ran (sync debug needs CUDA)"
            )
            + "".join(
                f"; {e['case']}: {e.get('error', e.get('sync_debug'))[:150]}"
                for e in layers
                if e.get("sync_debug") not in ("passed", "not run (sync debug mode needs CUDA)")
            ),
        ),  # fmt: skip
    }
    result["checks"]["layer_coverage"] = models.layer_coverage(cases, classes)
    bad_layout = [f"{e['case']}: {'; '.join(e['layout'])}" for e in layers if e.get("layout")]
    broken = [e["case"] for e in layers if "error" in e or e.get("finite") is False]
    result["checks"]["layer_layouts"] = check(
        not bad_layout and not broken,
        (f"kept in all {len(layers)} cases" if not bad_layout else "; ".join(bad_layout)[:400])
        + (f"; errors or non-finite values in {broken}" if broken else ""),
    )
    return result


# ---------------------------------------------------------------------------------------------
# c1) CUDA graphs


def section_cuda_graph(run: Run) -> dict:
    base = syncnorm.convert_sync_batchnorm(models.resnet50()[0])
    sizes = run.sizes
    with run.standin.patched():
        resnet = models.graph_equals_eager(
            lambda: models.ResNetStep(copy.deepcopy(base), run.device, sizes["batch"], sizes["image"]),
            sizes["graph_steps"], sizes["graph_warmup"],
        )  # fmt: skip
    resnet["equal"] = models.graph_matches(resnet)
    torch.manual_seed(0)
    probe_base = models.SyncProbe()
    probe: dict[str, dict] = {}
    for label, batch in models.PROBE_RANK_BATCHES.items():
        try:
            edge = batch != models.PROBE_BATCH
            recorder = models.ProbeStep(copy.deepcopy(probe_base), run.device, models.PROBE_BATCH) if edge else None
            with rank_collectives(run, edge, recorder):
                probe[label] = models.graph_equals_eager(
                    lambda: models.ProbeStep(copy.deepcopy(probe_base), run.device, batch),  # noqa: B023
                    sizes["graph_steps"], sizes["graph_warmup"],
                )  # fmt: skip
            probe[label]["equal"] = models.graph_matches(probe[label])
        except Exception as err:  # noqa: BLE001  (recorded: the check fails)
            probe[label] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}

    def verdict(r: dict) -> bool | None:
        return False if "error" in r else (r["equal"] if run.cuda else None)

    def text(r: dict) -> str:
        if "error" in r:
            return r["error"][:200]
        return f"loss {r['loss_rel_diff']['graph']:.1e}, state {r['state_rel_diff']['graph']:.1e}" + (
            "" if r["captured"] else " (CPU: no capture)"
        )

    return {
        "criterion": models.GRAPH_CRITERION,
        "resnet50": resnet,
        "probe": probe,
        "checks": {
            "resnet50_graph": check(verdict(resnet), text(resnet)),
            "probe_graph": all_of(
                {k: verdict(v) for k, v in probe.items()}, "; ".join(f"{k}: {text(v)}" for k, v in probe.items())
            ),
        },
    }


# ---------------------------------------------------------------------------------------------
# c2) torch.compile


@contextlib.contextmanager
def counting_cuda_graphs() -> Iterator[Counter]:
    """Count torch.cuda.CUDAGraph captures and replays (inductor's CUDA graph trees use that class)."""
    counts: Counter = Counter()
    if not torch.cuda.is_available():
        yield counts
        return
    cls = torch.cuda.CUDAGraph
    saved = {name: cls.__dict__.get(name) for name in ("capture_begin", "replay")}

    def counted(name: str) -> Callable:
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in saved:
        setattr(cls, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


def section_compile(run: Run) -> dict:
    from torch._dynamo.utils import counters

    backend = run.args.compile_backend or ("aot_eager" if run.args.quick and not run.cuda else "inductor")
    torch.manual_seed(0)
    base = syncnorm.convert_sync_batchnorm(models.CompileProbe())
    result: dict[str, Any] = {"backend": backend, "modes": {}}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the same conv numerics in eager and compiled code
    try:
        with run.standin.patched():
            eager = copy.deepcopy(base).to(run.device)
            want = models.probe_steps(eager, eager, run.device, run.sizes["probe_steps"])
            for mode in ("default", "reduce-overhead"):
                spare = run.left_s() - run.reserved_after("c2")
                if spare < run.needs_s("c2") / 2:
                    result["modes"][mode] = {"skipped": f"budget: {spare:.0f} s left beside the later sections"}
                    result["budget_cut"] = f"compile mode {mode} not run: {spare:.0f} s left beside the later sections"
                    continue
                model = copy.deepcopy(base).to(run.device)
                skips = counters["inductor"]["cudagraph_skips"]
                start = time.perf_counter()
                compiled = torch.compile(
                    model, fullgraph=True, backend=backend, mode=None if mode == "default" else mode
                )
                try:
                    with counting_cuda_graphs() as graphs:
                        got = models.probe_steps(compiled, model, run.device, run.sizes["probe_steps"])
                except Exception as err:  # noqa: BLE001
                    result["modes"][mode] = {"error": f"{type(err).__name__}: {str(err)[:1500]}"}
                    continue
                errors: dict[str, float] = {}
                for step_want, step_got in zip(want, got):
                    for name, tensor in step_want.items():
                        parts.track_error(errors, name, step_got[name], tensor)
                worst = max(errors.items(), key=lambda kv: kv[1])
                result["modes"][mode] = {"seconds": round(time.perf_counter() - start, 1), "worst": worst,
                                         "equal": worst[1] <= 1e-3, "errors": errors, "cuda_graphs": dict(graphs),
                                         "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips}  # fmt: skip
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    result["criterion"] = (
        "every output, input grad, parameter grad and buffer within 1e-3 (relative to its max) of eager, each step"
    )
    result["checks"] = {}
    for mode in ("default", "reduce-overhead"):
        m = result["modes"].get(mode, {})
        if "equal" in m:
            result["checks"][mode] = check(
                m["equal"], f"worst {m['worst'][1]:.1e} ({m['worst'][0]}), backend {backend}"
            )
        else:
            result["checks"][mode] = check(
                False if "error" in m else None, m.get("error", m.get("skipped", "not run"))[:300]
            )
    ro = result["modes"].get("reduce-overhead", {})
    result["checks"]["cudagraphs"] = (
        cudagraphs_check(ro["cudagraph_skips"], ro["cuda_graphs"].get("capture_begin", 0), run.cuda, backend)
        if "cudagraph_skips" in ro
        else check(result["checks"]["reduce-overhead"]["passed"], "reduce-overhead did not run")
    )
    return result
