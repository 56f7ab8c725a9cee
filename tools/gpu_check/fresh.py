"""The first syncnorm call of a process, made inside a CUDA graph capture (``tools/gpu_check`` section c3).

    python -m tools.gpu_check.fresh --device cuda --model probe --result OUT.json   # from the repo root

``tools/gpu_check`` starts this in a fresh interpreter per model. In its own process sections b and
c1 run syncnorm eagerly before they capture anything, which fills its caches (the per-layer
fingerprints, the backend test of the group): a problem with a first call inside a capture (a
cached device tensor born in the graph's private pool, a host read while capturing) could not
show there. Here nothing of syncnorm has run, which the result states (``fresh``: its fingerprint
cache was empty before the capture). As torch's CUDA graph docs do, everything else is warmed up
on a side stream first (cuDNN, cuBLAS: a copy of the model with its synchronised layers replaced
by identities), then forward + backward are captured and replayed against two eager copies (the
second gives the noise floor). The optimizer stays out of this graph: its state must exist before
a capture (torch's rule), and section c1 captures it. On CPU the "graph" is an eager call: the
same steps, rehearsed.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import syncnorm
from syncnorm.modules import SyncLayer

from . import models, parts

if TYPE_CHECKING:
    from .run import Run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("probe", "resnet50")
WORLD = 8
DESCRIPTION = (
    "Each model in its own fresh interpreter (pid shown): the synchronised layers' very first call is made "
    "inside torch.cuda.graph capture of forward + backward, after a side-stream warm-up of everything else "
    "(the model with its synchronised layers replaced by identities); replays vs two eager copies; "
    "criterion: " + models.GRAPH_CRITERION + ", gradients as the state"
)


def syncnorm_untouched() -> Optional[bool]:
    """Whether no synchronised call has run in this process: syncnorm's per-layer fingerprint cache,
    which every synchronised pass fills, is empty (None where that cache is not there).

    The stand-in sets syncnorm's cached backend test for the group on purpose (so that the
    fingerprint assert runs as on NCCL, see ``fingerprint_check_on``); that one is not counted."""
    cache = getattr(syncnorm.fingerprint, "_fingerprints", None)
    return None if not isinstance(cache, dict) else not cache


def without_sync_layers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose synchronised layers are identities: warms up everything else."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SyncLayer):
                setattr(module, name, nn.Identity())
    return twin


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _max_relative(got: list[Tensor], want: list[Tensor]) -> float:
    worst = 0.0 if len(got) == len(want) else float("inf")
    for a, b in zip(got, want):
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff / max(float(b.double().abs().max()) if b.numel() else 0.0, 1e-12))
    return worst


def run_case(model_name: str, device: torch.device, batch: int, image: int, steps: int) -> dict:
    """Build, warm up the rest, capture the first synchronised call, replay and compare (see the module doc)."""
    result: dict[str, Any] = {"model": model_name, "pid": os.getpid(), "device": device.type}
    result["fresh"] = syncnorm_untouched()
    start = time.perf_counter()
    torch.manual_seed(0)
    if model_name == "probe":
        base: nn.Module = models.SyncProbe()

        def make(model: nn.Module) -> models.TrainStep:
            return models.ProbeStep(model, device, models.PROBE_BATCH)
    else:
        base = syncnorm.convert_sync_batchnorm(models.resnet50()[0])

        def make(model: nn.Module) -> models.TrainStep:
            return models.ResNetStep(model, device, batch, image)

    # Copies made before any call keep the layer names (the fingerprints agree).
    warm, eager, eager_again, captured = (make(m) for m in (without_sync_layers(base), copy.deepcopy(base),
                                                            copy.deepcopy(base), base))  # fmt: skip
    data = [eager.make_batch(seed=1 + index) for index in range(steps)]
    cuda = device.type == "cuda"
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                warm.model.zero_grad(set_to_none=True)
                warm.forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        result["fresh_at_capture"] = syncnorm_untouched()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_loss = captured.forward_backward()  # grads are None: backward allocates them in the graph

        def replay() -> Tensor:
            graph.replay()
            return graph_loss
    else:
        result["fresh_at_capture"] = syncnorm_untouched()

        def replay() -> Tensor:
            captured.model.zero_grad(set_to_none=True)
            return captured.forward_backward()

    losses: dict[str, list[float]] = {"graph": [], "eager": [], "eager_again": []}
    for x, y in data:
        captured.load(x, y)
        losses["graph"].append(float(replay().detach()))
        for name, step in (("eager", eager), ("eager_again", eager_again)):
            step.load(x, y)
            step.model.zero_grad(set_to_none=True)
            losses[name].append(float(step.forward_backward().detach()))
    want = _grads(eager.model)
    result.update(
        captured=cuda,
        losses=losses,
        loss_rel_diff={name: models.relative_difference(losses[name], losses["eager"]) for name in ("graph", "eager_again")},
        state_rel_diff={
            name: max(models.max_state_difference(step.model, eager.model), _max_relative(_grads(step.model), want))
            for name, step in (("graph", captured), ("eager_again", eager_again))
        },
    )  # fmt: skip
    result["equal"] = models.graph_matches(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def first_call_check(results: dict[str, dict], cuda: bool, main_pid: int) -> dict:
    """Section c3's check: each model ran in another process, syncnorm's first call there was the
    captured one, and the replays equal eager (on CPU nothing is captured: no verdict on that)."""
    verdicts, notes = [], []
    for model in MODELS:
        r = results.get(model, {"error": "no result"})
        if "error" in r:
            verdicts.append(False)
            notes.append(f"{model}: {r['error'][-200:]}")
        elif r.get("pid") == main_pid or not (r.get("fresh") and r.get("fresh_at_capture")):
            verdicts.append(False)
            notes.append(f"{model}: not a first call (syncnorm had run in process {r.get('pid')} before the capture)")
        elif not cuda:
            verdicts.append(None)
            notes.append(f"{model}: fresh process {r['pid']}, first call ran eagerly (no capture on CPU)")
        else:
            verdicts.append(bool(r["captured"] and r["equal"]))
            notes.append(f"{model}: pid {r['pid']}, loss {r['loss_rel_diff']['graph']:.1e}, "
                         f"state+grads {r['state_rel_diff']['graph']:.1e}" + ("" if r["equal"] else " DIFFERS"))  # fmt: skip
    passed = False if False in verdicts else (None if None in verdicts else True)
    return {"passed": passed, "measured": "; ".join(notes)}


# ---------------------------------------------------------------------------------------------
# the parent's side: start one process per model, join them


def start_fresh_graph_case(run: Run) -> Callable[[Run], dict]:
    """Start one fresh interpreter per model (``fresh.py``); returns the function that joins them.

    In this process sections b and c1 fill syncnorm's caches before any capture, so a first call
    inside a capture is only seen in a process where nothing of syncnorm has run yet.
    """
    procs: dict[str, tuple[subprocess.Popen, str, str]] = {}
    for model in MODELS:
        result_path = os.path.join(run.args.out, f"fresh_{model}.json")
        log_path = os.path.join(run.args.out, f"fresh_{model}.log")
        # the child's own last resort: budget + grace, should this process die without ending it
        timeout_s = max(10.0, run.left_s() + run.args.grace_s)
        command = [sys.executable, "-m", "tools.gpu_check.fresh", "--device", run.device.type, "--model", model,
                   "--batch", str(run.sizes["batch"]), "--image", str(run.sizes["image"]),
                   "--steps", str(run.sizes["graph_steps"]), "--timeout-s", f"{timeout_s:.0f}", "--result", result_path]  # fmt: skip
        os.makedirs(run.args.out, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        run.children.append(proc)
        procs[model] = (proc, result_path, log_path)

    def join(run: Run) -> dict:
        results: dict[str, dict] = {}
        for model, (proc, result_path, log_path) in procs.items():
            try:  # past the budget the watchdog ends the run (and these processes)
                proc.wait(max(1.0, run.left_s() + run.args.grace_s + 5.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            try:
                with open(result_path) as handle:
                    results[model] = json.load(handle)
            except (OSError, ValueError) as err:
                with open(log_path) as handle:
                    tail = handle.read()[-1500:]
                results[model] = {"error": f"no result (exit code {proc.returncode}, {type(err).__name__}): {tail}"}
        return {
            "description": DESCRIPTION,
            "main_pid": os.getpid(),
            "models": results,
            "checks": {"first_call_graph": first_call_check(results, run.cuda, os.getpid())},
        }

    return join


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--batch", type=int, default=32, help="ResNet-50 batch (the probe uses its own)")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="replays compared with eager steps")
    parser.add_argument("--result", required=True, help="where the JSON result goes")
    parser.add_argument("--timeout-s", type=float, default=0.0, help="end this process after this long (0: never)")
    args = parser.parse_args()
    if args.timeout_s:  # should the parent die without ending this process (its own last resort fired)
        faulthandler.dump_traceback_later(args.timeout_s, exit=True)
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if args.device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
        with parts.IdenticalRanks(WORLD).patched():
            result = run_case(args.model, torch.device(args.device), args.batch, args.image, args.steps)
    except Exception as err:  # noqa: BLE001  (the parent reads the file: the error goes there)
        result = {"model": args.model, "pid": os.getpid(), "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        traceback.print_exc()
    with open(args.result + ".tmp", "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    os.replace(args.result + ".tmp", args.result)
    print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, default=str)[:2000], flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # no fake-group destructors at interpreter exit
