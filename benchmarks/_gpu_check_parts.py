"""The pieces of ``gpu_check.py``: a stand-in for W identical ranks, the correctness cases run
on real gloo ranks, the training step, the CUDA-graph and compile comparisons, the timers.

Everything here runs on CUDA and on CPU tensors alike (``device`` is an argument), so that
``gpu_check.py --device cpu`` rehearses the same code the GPU run takes; what needs CUDA
(graphs, sync debug mode, CUDA events, torch.nn.SyncBatchNorm) is switched on ``device.type``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _bench_common import REPO_ROOT  # noqa: F401  (puts the repo root and tests/ on sys.path)
from harness import shard
from torch import Tensor, nn

import syncnorm

# ---------------------------------------------------------------------------------------------
# W identical ranks in one process


class _Done:
    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class IdenticalRanks:
    """Collectives as W ranks holding the same data would compute them, without any communication.

    Under torch's "fake" process group every collective returns at once and leaves its
    output as it was: an all_gather output stays uninitialised, so torch.nn.SyncBatchNorm
    would normalise with garbage counts and statistics. Inside :meth:`patched`,
    ``torch.distributed``'s all_reduce multiplies by W (SUM; MAX, MIN, AVG leave it) and
    the all_gathers tile the local input W times: both implementations then compute on
    real numbers (the global statistics of W copies of the local batch equal the local
    ones), with device ops only, so no host sync and nothing a CUDA graph cannot capture.
    The Python-level call counts are kept in ``calls``.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self.calls: Counter = Counter()

    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
        self.calls["all_reduce"] += 1
        if op == dist.ReduceOp.SUM:
            tensor.mul_(self.world)
        elif op not in (dist.ReduceOp.MAX, dist.ReduceOp.MIN, dist.ReduceOp.AVG):
            raise NotImplementedError(f"IdenticalRanks: all_reduce op {op}")
        return _Done() if async_op else None

    def process_group_allreduce(self, group, tensors, options=None):
        # syncnorm calls the ProcessGroup directly (dist.all_reduce's wrappers cost host time).
        op = dist.ReduceOp.SUM if options is None else options.reduceOp
        for tensor in tensors if isinstance(tensors, (list, tuple)) else [tensors]:
            self.all_reduce(tensor, op)
        return _Done()

    def all_gather_into_tensor(self, output: Tensor, input: Tensor, group=None, async_op: bool = False):
        self.calls["all_gather_into_tensor"] += 1
        output.view(self.world, -1).copy_(input.reshape(1, -1))
        return _Done() if async_op else None

    def all_gather(self, tensor_list: list, tensor: Tensor, group=None, async_op: bool = False):
        self.calls["all_gather"] += 1
        for out in tensor_list:
            out.copy_(tensor)
        return _Done() if async_op else None

    @contextlib.contextmanager
    def patched(self):
        replacements = {
            "all_reduce": self.all_reduce,
            "all_gather": self.all_gather,
            "all_gather_into_tensor": self.all_gather_into_tensor,
            "all_gather_single": self.all_gather_into_tensor,  # torch >= 2.13's name in SyncBatchNorm
            "_all_gather_base": self.all_gather_into_tensor,
        }
        saved = {name: getattr(dist, name) for name in replacements if hasattr(dist, name)}
        saved_allreduce = dist.ProcessGroup.__dict__["allreduce"]  # the descriptor, so restoring keeps binding
        identical = self
        try:
            for name in saved:
                setattr(dist, name, replacements[name])
            dist.ProcessGroup.allreduce = lambda group, *args, **kwargs: identical.process_group_allreduce(
                group, *args, **kwargs
            )
            yield self
        finally:
            dist.ProcessGroup.allreduce = saved_allreduce
            for name, original in saved.items():
                setattr(dist, name, original)


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
    # Ranks holding one value per channel (the edge of defect 5); at W=2 one rank holds 2, since the
    # input gradient of a batch of exactly 2 values is identically zero (nothing to compare).
    add("nc", sizes=[1] * world if world > 2 else [1, 2])
    add("nchw", sizes=[0] * (world - 1) + [6])
    return cases


def _track(errors: dict, key: str, got: Tensor, want: Tensor) -> None:
    """Largest |got - want| relative to the largest |want|, floored at 1e-3 (0 for an empty shard, inf for NaN).

    The floor keeps a reference that is zero up to rounding (the gradient of a bias in front of
    a BatchNorm, of a batch of 2) from turning float32 rounding into a large relative error."""
    want = want.detach().double().cpu()
    if want.numel() == 0:
        errors.setdefault(key, 0.0)
        return
    diff = float((got.detach().double().cpu() - want).abs().max()) / max(float(want.abs().max()), 1e-3)
    errors[key] = max(errors.get(key, 0.0), diff if diff == diff else float("inf"))


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
        with autocast:
            out = ours(local)
        (out.double() * shard(g, rank, sizes).to(device)).sum().backward()
        _track(errors, "output", out, shard(want, rank, sizes))
        _track(errors, "grad_input", local.grad, shard(xr.grad, rank, sizes))
        if out.dtype != dtype:
            notes.append(f"output dtype {out.dtype}")
        if local.numel() and not out.is_contiguous(memory_format=layout):
            notes.append("output lost the input's memory format")
        if local.numel() and local.grad.stride() != local.stride():
            notes.append(f"grad_input strides {local.grad.stride()} != input strides {local.stride()}")
        for name in ("weight", "bias") if case["affine"] else ():
            param = getattr(ours, name)
            if param.grad is not None and param.grad.dtype != param.dtype:
                notes.append(f"grad_{name} dtype {param.grad.dtype} != {param.dtype}")
            summed = (param.grad if param.grad is not None else torch.zeros_like(param)).detach().double().cpu()
            dist.all_reduce(summed)  # syncnorm's parameter gradients are each rank's share
            _track(errors, f"grad_{name}", summed, getattr(reference, name).grad)
            param.grad = getattr(reference, name).grad = None
        _track(errors, "running_mean", ours.running_mean, reference.running_mean)
        _track(errors, "running_var", ours.running_var, reference.running_var)
        if int(ours.num_batches_tracked) != int(reference.num_batches_tracked):
            notes.append(f"num_batches_tracked {int(ours.num_batches_tracked)} != {int(reference.num_batches_tracked)}")
    ours.eval()
    reference.eval()
    x = batches[0][0]
    with torch.no_grad(), autocast:
        out = ours(shard(x, rank, sizes).to(device=device, dtype=dtype).contiguous(memory_format=layout))
    _track(errors, "eval_output", out, shard(reference(x), rank, sizes))
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
# models and the training step


class _Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        width, out = planes, planes * 4
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (53 BatchNorm layers), for machines without torchvision."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, inplanes = [], 64
        for planes, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(count):
                blocks.append(_Bottleneck(inplanes, planes, stride if index == 0 else 1))
                inplanes = planes * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def resnet50() -> tuple[nn.Module, str]:
    """torchvision's ResNet-50 (weights=None), or the same layout here when torchvision is missing."""
    try:
        import torchvision
    except ImportError:
        return _ResNet50(), "built-in ResNet-50 layout (torchvision not installed)"
    return torchvision.models.resnet50(weights=None), f"torchvision {torchvision.__version__} resnet50(weights=None)"


def variant_model(base: nn.Module, variant: str) -> nn.Module:
    model = copy.deepcopy(base)
    if variant.startswith("syncnorm"):
        return syncnorm.convert_sync_batchnorm(model)
    if variant == "torch.nn.SyncBatchNorm":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class TrainStep:
    """One image-classifier training step: AdamW, bf16 autocast, channels_last, a fixed batch."""

    def __init__(self, model: nn.Module, device: torch.device, batch: int, image: int, seed: int = 0) -> None:
        self.device = device
        self.model = model.to(device=device, memory_format=torch.channels_last).train()
        # capturable: the step count stays on the device, so the optimizer can be in a CUDA graph
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-3, foreach=True, capturable=device.type == "cuda"
        )
        gen = torch.Generator().manual_seed(seed)
        self.x = (
            torch.randn(batch, 3, image, image, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
        )
        self.y = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def forward_backward_update(self) -> Tensor:
        # cache_enabled=False: autocast's cast cache must not outlive a CUDA-graph capture (torch's CUDA graph notes)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return loss

    def __call__(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.forward_backward_update()

    def load(self, x: Tensor, y: Tensor) -> None:
        self.x.copy_(x)
        self.y.copy_(y)


class GraphedStep:
    """A TrainStep captured whole (forward, backward, optimizer) in one torch.cuda.CUDAGraph."""

    def __init__(self, step: TrainStep, warmup: list[tuple[Tensor, Tensor]]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for x, y in warmup:
                step.load(x, y)
                step()
        torch.cuda.current_stream().wait_stream(side)
        step.optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates the grads
        self.step, self.graph = step, torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step.forward_backward_update()

    def load(self, x: Tensor, y: Tensor) -> None:
        self.step.load(x, y)

    def __call__(self) -> Tensor:
        self.graph.replay()
        return self.loss


def max_state_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest per-tensor max |a - b| / max |b| over parameters and floating buffers."""
    worst = 0.0
    for (_, ta), (_, tb) in zip(
        [*a.named_parameters(), *a.named_buffers()], [*b.named_parameters(), *b.named_buffers()]
    ):
        if ta.is_floating_point() and ta.numel():
            diff = float((ta.detach().double() - tb.detach().double()).abs().max())
            worst = max(worst, diff / max(float(tb.detach().double().abs().max()), 1e-12))
    return worst


def graph_equals_eager(base: nn.Module, device: torch.device, batch: int, image: int, steps: int, warmup: int) -> dict:
    """Replays of a captured syncnorm step against eager steps; a second eager copy gives the noise floor."""
    runs = {name: TrainStep(copy.deepcopy(base), device, batch, image) for name in ("eager", "eager_again", "graph")}
    gen = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(batch, 3, image, image, generator=gen).to(device),
            torch.randint(0, 1000, (batch,), generator=gen).to(device),
        )
        for _ in range(warmup + steps)
    ]
    for x, y in data[:warmup]:
        for name in ("eager", "eager_again") if device.type == "cuda" else runs:
            runs[name].load(x, y)
            runs[name]()
    runners: dict[str, Callable] = dict(runs)
    if device.type == "cuda":
        runners["graph"] = GraphedStep(runs["graph"], data[:warmup])
    losses: dict[str, list[float]] = {name: [] for name in runners}
    for x, y in data[warmup:]:
        for name, run in runners.items():
            run.load(x, y)
            losses[name].append(float(run().detach()))

    def loss_diff(name: str) -> float:
        return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[name], losses["eager"]))

    return {
        "captured": device.type == "cuda",
        "losses": losses,
        "loss_rel_diff": {"graph": loss_diff("graph"), "eager_again (floor)": loss_diff("eager_again")},
        "state_rel_diff": {
            "graph": max_state_difference(runs["graph"].model, runs["eager"].model),
            "eager_again (floor)": max_state_difference(runs["eager_again"].model, runs["eager"].model),
        },
    }


# ---------------------------------------------------------------------------------------------
# torch.compile against eager


class CompileProbe(nn.Module):
    """Three synchronised layers in one graph: (N, C), channels_last 2-D and channels_last_3d."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn1 = nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8)
        self.conv2, self.bn2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv3d(3, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4)

    def forward(self, flat: Tensor, image: Tensor, volume: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (
            F.relu(self.bn1(self.linear(flat))),
            F.relu(self.bn2(self.conv2(image))),
            F.relu(self.bn3(self.conv3(volume))),
        )


def compile_probe_inputs(device: torch.device, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(8, 6, generator=gen) * 2 + 1
    image = (torch.randn(4, 3, 8, 8, generator=gen) * 2 + 1).contiguous(memory_format=torch.channels_last)
    volume = (torch.randn(2, 3, 4, 4, 4, generator=gen) * 2 + 1).contiguous(memory_format=torch.channels_last_3d)
    return [t.to(device).requires_grad_() for t in (flat, image, volume)]


def probe_steps(fn: Callable, model: nn.Module, device: torch.device, steps: int) -> list[dict[str, Tensor]]:
    """``fn`` (``model`` or a compiled ``model``) forward + backward on fresh inputs each step;
    outputs, input grads, parameter grads and buffers, cloned (CUDA-graph outputs get overwritten)."""
    records = []
    for step in range(steps):
        inputs = compile_probe_inputs(device, seed=100 + step)
        outputs = fn(*inputs)
        sum(out.square().sum() for out in outputs).backward()
        record = {f"output{i}": out.detach().clone() for i, out in enumerate(outputs)}
        record.update({f"grad_input{i}": t.grad.clone() for i, t in enumerate(inputs)})
        for name, param in model.named_parameters():
            record[f"grad {name}"] = param.grad.clone()
            param.grad = None
        for name, buffer in model.named_buffers():
            record[name] = buffer.detach().clone()
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# timing


def time_interleaved(fns: dict[str, Callable], device: torch.device, reps: int, inner: int, warmup: int) -> dict:
    """Milliseconds per call of each fn: every repetition runs each fn ``inner`` times, in a fresh order.

    On CUDA the calls are bracketed by CUDA events and nothing synchronises until the
    end, so the host queues work as a training loop does and host-bound calls show
    their host cost; on CPU (synchronous) ``perf_counter`` brackets the calls.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, order = list(fns), random.Random(0)
    marks: dict[str, list] = {name: [] for name in names}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    for _ in range(reps):
        for name in order.sample(names, len(names)):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            if cuda:
                end.record()
                marks[name].append((start, end))
            else:
                marks[name].append((time.perf_counter() - start) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        return {name: [s.elapsed_time(e) / inner for s, e in marks[name]] for name in names}
    return {name: [ms / inner for ms in marks[name]] for name in names}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def paired(times: dict[str, list[float]], numerator: str, denominator: str) -> dict:
    """Median and quartiles of numerator / denominator over repetitions (paired: same repetition)."""
    ratios = sorted(a / b for a, b in zip(times[numerator], times[denominator]))
    quarter = max(0, len(ratios) // 4)
    return {"median": median(ratios), "q1": ratios[quarter], "q3": ratios[len(ratios) - 1 - quarter]}


def layer_fwd_bwd(layer: nn.Module, x: Tensor, dy: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        for param in layer.parameters():
            param.grad = None
        layer(x).backward(dy)

    return step


# ---------------------------------------------------------------------------------------------
# the report: targets with PASS / MISS, markdown

COMMUNICATION_NOTE = (
    "One GPU cannot hold two NCCL ranks (NCCL refuses two ranks on one device), so correctness (a) runs 2 "
    "and 4 real gloo ranks that share the GPU with CUDA tensors, and everything else runs in one process as "
    "rank 0 of W = 8 under torch's fake process group, with its collectives replaced by a stand-in "
    "(`IdenticalRanks` in `benchmarks/_gpu_check_parts.py`): all_reduce(SUM) multiplies by W, the "
    "all_gathers tile the local input W times, as W ranks with identical data would. Both syncnorm and "
    "torch.nn.SyncBatchNorm thus compute on real numbers (the fake backend alone would leave torch's "
    "all_gather output uninitialised) with device ops only: communication time is left out of every "
    "timing, and so is the host-device traffic a real NCCL call would add (none in either implementation). "
    "Section b also runs syncnorm once with the fake backend's own collectives."
)


def _result(sections: dict, key: str) -> dict | None:
    section = sections[key]
    return section.get("result") if section["status"] in ("ok", "failed", "rehearsed") else None


def _why(sections: dict, key: str) -> str:
    section = sections[key]
    return f"not measured: section {key} {section['status']}" + (
        f" ({section['reason']})" if "reason" in section else ""
    )


def targets(sections: dict, cuda: bool) -> list[dict]:
    """The issue's targets and checks, each with its measured value and PASS / MISS."""
    rows: list[dict] = []

    def add(target: str, key: str, measure: Callable[[dict], tuple[str, bool | None]], needs_cuda: bool) -> None:
        result = _result(sections, key)
        if result is None:
            rows.append({"target": target, "measured": _why(sections, key), "result": "NOT MEASURED"})
            return
        try:
            measured, passed = measure(result)
        except Exception as err:  # noqa: BLE001  (a partial result: say so)
            measured, passed = f"not measured: {type(err).__name__}: {err}", None
        verdict = "NOT MEASURED" if passed is None else ("PASS" if passed else "MISS")
        if needs_cuda and not cuda and passed is not None:
            verdict = "CPU rehearsal (no verdict)"
        rows.append({"target": target, "measured": measured, "result": verdict})

    def syncs(r: dict) -> tuple[str, bool | None]:
        ours = r["variants"]["syncnorm"]["syncs"]
        if not isinstance(ours, int):
            return f"{ours}", None
        others = ", ".join(f"{n}: {v['syncs']}" for n, v in r["variants"].items() if n != "syncnorm")
        modes = r["error_mode"]
        passed = sum(v == "passed" for v in modes.values())
        return f"syncnorm: {ours} syncs per step (warn mode); error mode passed {passed}/{len(modes)}; {others}", (
            ours == 0 and passed == len(modes)
        )

    def per_layer(r: dict) -> tuple[str, bool | None]:
        key = "syncnorm / torch.nn.SyncBatchNorm"
        ratios = [(row["ratios"][key]["median"], row) for row in r["rows"] if key in row["ratios"]]
        if not ratios:
            return "no torch.nn.SyncBatchNorm rows (it needs CUDA)", None
        if not r.get("standin_ok"):
            return "stand-in check failed: the implementations did not compute the same numbers", None
        worst, row = max(ratios, key=lambda item: item[0])
        wins = sum(value <= 1.0 for value, _ in ratios)
        return (
            f"worst {worst:.3f} ({row['dtype']} {row['layout']} {tuple(row['shape'])}); <= 1 on {wins}/{len(ratios)} shapes",
            worst <= 1.0,
        )

    def step_ratio(key: str, limit: float, strict: bool) -> Callable[[dict], tuple[str, bool | None]]:
        def measure(r: dict) -> tuple[str, bool | None]:
            if key not in r["ratios"]:
                return f"no {key} (needs CUDA)", None
            value = r["ratios"][key]
            ok = value["median"] < limit if strict else value["median"] <= limit
            return f"{value['median']:.3f} (quartiles {value['q1']:.3f}-{value['q3']:.3f})", ok

        return measure

    def bandwidth(r: dict) -> tuple[str, bool | None]:
        largest = max(row["numel"] for row in r["rows"])
        large = [row for row in r["rows"] if row["numel"] >= 0.4 * largest]
        worst = min(large, key=lambda row: row["bandwidth_vs_copy"]["syncnorm"])
        value = worst["bandwidth_vs_copy"]["syncnorm"]
        shapes = sorted({tuple(row["shape"]) for row in large})
        return (
            f"min {100 * value:.0f}% ({worst['dtype']} {worst['layout']} {tuple(worst['shape'])}) over {len(large)} rows of {shapes}",
            value >= 0.70,
        )

    def correctness(r: dict) -> tuple[str, bool | None]:
        parts_ = []
        for world, w in r["worlds"].items():
            parts_.append(f"W={world}: " + (f"{w['passed']}/{w['total']} cases" if "cases" in w else "ranks failed"))
        return "; ".join(parts_), all(w.get("passed", -1) == w.get("total") for w in r["worlds"].values())

    def graph(r: dict) -> tuple[str, bool | None]:
        d, s = r["loss_rel_diff"], r["state_rel_diff"]
        text = f"loss rel diff {d['graph']:.2e} (eager vs eager {d['eager_again (floor)']:.2e}); state {s['graph']:.2e} (floor {s['eager_again (floor)']:.2e})"
        return text if r["captured"] else "rehearsal, no capture on CPU: " + text, r["equal"] if r["captured"] else None

    def compiled(mode: str) -> Callable[[dict], tuple[str, bool | None]]:
        def measure(r: dict) -> tuple[str, bool | None]:
            m = r["modes"].get(mode, {"skipped": "not run"})
            if "equal" not in m:
                return m.get("error", m.get("skipped", "?")), False if "error" in m else None
            skips = f", cudagraph skips {m['cudagraph_skips']}" if mode != "default" else ""
            return f"worst {m['worst'][1]:.1e} ({m['worst'][0]}), backend {r['backend']}{skips}", m["equal"]

        return measure

    add("zero host syncs for syncnorm (ResNet-50 step, W=8)", "b", syncs, True)
    add("per layer at least as fast as torch.nn.SyncBatchNorm on every shape", "d1", per_layer, True)
    add("ResNet-50 step within 1.03x nn.BatchNorm", "d2", step_ratio("syncnorm / nn.BatchNorm", 1.03, False), True)
    add(
        "ResNet-50 step faster than torch.nn.SyncBatchNorm",
        "d2",
        step_ratio("syncnorm / torch.nn.SyncBatchNorm", 1.0, True),
        True,
    )
    add(">= 70% of copy bandwidth on the large layers", "d1", bandwidth, True)
    add("correctness vs float64 nn.BatchNorm (gloo ranks)", "a", correctness, False)
    add("CUDA graph of the whole step replays equal eager", "c1", graph, True)
    add("torch.compile(fullgraph=True) equals eager", "c2", compiled("default"), False)
    add("torch.compile(mode='reduce-overhead', fullgraph=True) equals eager", "c2", compiled("reduce-overhead"), False)
    return rows


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _details(key: str, r: dict) -> list[str]:
    if key == "a":
        lines = []
        for world, w in r["worlds"].items():
            if "cases" not in w:
                lines += [f"W={world}: ranks failed: `{w['error']}`"[:3000], ""]
                continue
            rows = [[c["case"], "ok" if c["ok"] else "**FAIL**", f"{c['worst'][0]} {c['worst'][1]:.1e}", "; ".join(c["notes"])]
                    for c in w["cases"]]  # fmt: skip
            lines += [f"W={world}: {w['passed']}/{w['total']} cases pass (tolerance by dtype: {TOLERANCE})", ""]
            lines += _table(["case", "result", "worst error (max abs / max ref)", "notes"], rows) + [""]
        return lines
    if key == "b":
        rows = [[n, v["syncs"], v.get("where", ""), v["collectives"]] for n, v in r["variants"].items()]
        lines = [
            f"{r['model']}, batch {r['batch_per_rank']} per rank at {r['image']}px, bf16 autocast, channels_last, AdamW",
            "",
        ]
        lines += _table(["variant", "host syncs in one step", "where (file:line: count)", "collectives per step"], rows)
        return lines + [""] + [f"- set_sync_debug_mode('error'), {k}: {v}" for k, v in r["error_mode"].items()]
    if key == "c1":
        return [f"- losses per replayed step: {r['losses']}", f"- criterion: {r['criterion']}",
                f"- loss rel diff: {r['loss_rel_diff']}", f"- state rel diff: {r['state_rel_diff']}"]  # fmt: skip
    if key == "c2":
        rows = [[mode, m.get("worst", ""), m.get("seconds", ""), m.get("cudagraph_skips", ""), m.get("error", m.get("skipped", ""))[:300]]
                for mode, m in r["modes"].items()]  # fmt: skip
        return [f"backend {r['backend']}; {r['criterion']}", ""] + _table(
            ["mode", "worst (tensor, error)", "s", "cudagraph skips", "error"], rows
        )
    if key == "d1":
        impls = r["impls"]
        header = ["dtype", "layout", "shape", *[f"{n} ms" for n in impls], "copy ms", "copy GB/s",
                  *[f"{n} BW/copy" for n in impls], "syncnorm/BN", "syncnorm/torch"]  # fmt: skip
        rows = []
        for row in r["rows"]:
            ratio = row["ratios"].get("syncnorm / torch.nn.SyncBatchNorm")
            rows.append([row["dtype"], row["layout"], tuple(row["shape"]), *[f"{row['ms'][n]:.3f}" for n in impls],
                         f"{row['ms']['copy']:.3f}", f"{row['copy_GBps']:.1f}", *[f"{100 * row['bandwidth_vs_copy'][n]:.0f}%" for n in impls],
                         f"{row['ratios']['syncnorm / nn.BatchNorm']['median']:.3f}", f"{ratio['median']:.3f}" if ratio else "-"])  # fmt: skip
        checks = "; ".join(
            f"{n}: " + ", ".join(f"{k} {v:.1e}" for k, v in e.items()) for n, e in r["standin_check"].items()
        )
        verdict = "ok" if r.get("standin_ok") else "**FAILED: timings compare different computations**"
        lines = [
            f"Stand-in check, each vs nn.BatchNorm on the local batch (max abs / max ref), {verdict}: {checks}",
            "",
        ]
        lines += ["fwd+bwd per call, median of interleaved repetitions (CUDA events, no sync per call); ratios are medians "
                  "of per-repetition ratios; BW/copy = (8 x tensor bytes / t) / (2 x tensor bytes / t_copy)", ""]  # fmt: skip
        return lines + _table(header, rows) + (["", f"{r['skipped_rows']}"] if "skipped_rows" in r else [])
    if key == "d2":
        rows = [[n, f"{ms:.2f}"] for n, ms in r["ms"].items()]
        lines = [
            f"{r['model']}, batch {r['batch_per_rank']} per rank at {r['image']}px, bf16 autocast, channels_last, AdamW",
            "",
        ]
        lines += _table(["variant", "ms per step (median)"], rows) + [""]
        return lines + [
            f"- {k}: {v['median']:.3f} (quartiles {v['q1']:.3f}-{v['q3']:.3f})" for k, v in r["ratios"].items()
        ]
    if key == "e":
        rows = [[n, v.get("peak_step_MiB", "-"), v.get("saved_for_backward_MiB", "-"), v.get("error", v.get("repr", ""))]
                for n, v in r["variants"].items()]  # fmt: skip
        return [r["model"] + (f"; {r['inplace_abn']}" if "inplace_abn" in r else ""), ""] + _table(
            ["variant", "peak MiB over one fwd+bwd", "saved for backward MiB", "layer"], rows
        )
    return ["```", json.dumps(r, indent=1, default=str)[:3000], "```"]


def markdown(meta: dict, target_rows: list[dict], sections: dict) -> str:
    lines = ["# syncnorm GPU check", ""]
    lines += [f"- {k}: {meta[k]}" for k in ("gpu", "device", "torch", "torchvision", "triton", "cuda", "syncnorm_commit",
                                           "profile", "budget_s", "elapsed_s", "command") if k in meta]  # fmt: skip
    lines += ["", "## How communication was left out", "", COMMUNICATION_NOTE, "", "## Targets", ""]
    lines += _table(["target", "measured", "result"], [[t["target"], t["measured"], t["result"]] for t in target_rows])
    lines += ["", "## Sections", ""]
    lines += _table(["section", "status", "seconds", "note"],
                    [[f"{k}) {s['title']}", s["status"], s.get("seconds", ""), s.get("reason", s.get("error", s.get("note", "")))[:300]]
                     for k, s in sections.items()])  # fmt: skip
    for key, section in sections.items():
        lines += ["", f"## {key}) {section['title']}", "", f"status: {section['status']}", ""]
        if "result" in section:
            try:
                lines += _details(key, section["result"])
            except Exception as err:  # noqa: BLE001  (a renderer bug must not lose the data)
                lines += [
                    f"(table failed: {type(err).__name__}: {err})",
                    "```",
                    json.dumps(section["result"], default=str)[:3000],
                    "```",
                ]
        if "traceback" in section:
            lines += ["```", section["traceback"], "```"]
    return "\n".join(lines) + "\n"


def summary(meta: dict, target_rows: list[dict], sections: dict) -> str:
    lines = [f"gpu_check summary ({meta.get('gpu', meta['device'])}, torch {meta['torch']}, {meta['elapsed_s']} s):"]
    lines += [f"  [{t['result']}] {t['target']}: {t['measured']}" for t in target_rows]
    lines += [
        f"  section {k}: {s['status']} {s.get('seconds', '')} s {s.get('reason', s.get('error', ''))[:200]}"
        for k, s in sections.items()
    ]
    return "\n".join(lines)
