"""The models and steps ``tools/gpu_check`` runs: ResNet-50, the probe model, the compile probe, the
per-layer cases of the sync check, and a training step that can be captured whole in a CUDA graph.

Two probe models, named in the report:

* the ResNet-50 training step (torchvision's, or the same layout here): bf16 autocast,
  channels_last, AdamW, every BatchNorm a ``syncnorm.SyncBatchNorm``;
* :class:`SyncProbe`: InPlaceABNSync with leaky_relu, SyncInstanceNorm2d (tracked statistics)
  and SyncBatchNorm on (N, C) input, in float32, run with 8 samples, with an empty rank and with
  a one-sample rank (the other ranks' share comes from ``OtherRanks``).

Everything runs on CUDA or CPU tensors (``device`` is an argument); on CPU a "graph" is an eager step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

import syncnorm
from syncnorm.modules import SyncLayer

# ---------------------------------------------------------------------------------------------
# ResNet-50


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


# ---------------------------------------------------------------------------------------------
# the probe model

PROBE_IMAGE = 16
PROBE_BATCH = 8
PROBE_RANK_BATCHES = {"8 samples": PROBE_BATCH, "empty rank": 0, "one-sample rank": 1}
PROBE_DESCRIPTION = (
    "SyncProbe: conv 3x3 -> InPlaceABNSync(leaky_relu 0.01) -> conv 3x3 -> SyncInstanceNorm2d(affine, tracked) "
    "-> leaky_relu -> global pool -> linear -> SyncBatchNorm on (N, C) -> relu -> linear; float32, "
    f"{PROBE_IMAGE}x{PROBE_IMAGE} inputs, AdamW"
)


class SyncProbe(nn.Module):
    """The synchronised layers ResNet-50 does not hold, in one small model (see PROBE_DESCRIPTION)."""

    def __init__(self, channels: int = 16, hidden: int = 32, outputs: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.abn = syncnorm.InPlaceABNSync(channels, activation="leaky_relu", activation_param=0.01)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.instance = syncnorm.SyncInstanceNorm2d(channels, affine=True, track_running_stats=True)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.bn1d = syncnorm.SyncBatchNorm(hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        y = self.abn(self.conv1(x))
        y = F.leaky_relu(self.instance(self.conv2(y)), 0.01)
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return self.fc2(F.relu(self.bn1d(self.fc1(y))))


# ---------------------------------------------------------------------------------------------
# the training step


class TrainStep:
    """One training step on a fixed batch: forward, loss, backward, AdamW; subclasses say what the batch is.

    The optimizer is capturable on CUDA (its step count stays on the device), so forward,
    backward and update can be captured together in one CUDA graph.
    """

    channels_last = False
    autocast = False

    def __init__(self, model: nn.Module, device: torch.device, batch: int, seed: int = 0) -> None:
        self.device, self.batch = device, batch
        model = model.to(device=device, memory_format=torch.channels_last) if self.channels_last else model.to(device)
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-3, foreach=True, capturable=device.type == "cuda"
        )
        self.x, self.y = self.make_batch(seed)

    def make_batch(self, seed: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_backward(self) -> Tensor:
        # cache_enabled=False: autocast's cast cache must not outlive a CUDA-graph capture (torch's CUDA graph notes)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        return loss

    def forward_backward_update(self) -> Tensor:
        loss = self.forward_backward()
        self.optimizer.step()
        return loss

    def __call__(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.forward_backward_update()

    def load(self, x: Tensor, y: Tensor) -> None:
        self.x.copy_(x)
        self.y.copy_(y)


class ResNetStep(TrainStep):
    """An image-classifier step: bf16 autocast, channels_last, cross-entropy over 1000 classes."""

    channels_last = True
    autocast = True

    def __init__(self, model: nn.Module, device: torch.device, batch: int, image: int, seed: int = 0) -> None:
        self.image = image
        super().__init__(model, device, batch, seed)

    def make_batch(self, seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, 3, self.image, self.image, generator=gen)
        y = torch.randint(0, 1000, (self.batch,), generator=gen)
        return x.to(self.device).contiguous(memory_format=torch.channels_last), y.to(self.device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)


class ProbeStep(TrainStep):
    """A :class:`SyncProbe` step: float32, squared error summed over the batch / PROBE_BATCH.

    A sum, not a mean, so that an empty rank's loss is 0 (its gradient share is zero), not NaN."""

    def make_batch(self, seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, 3, PROBE_IMAGE, PROBE_IMAGE, generator=gen) * 2 + 1
        return x.to(self.device), torch.randn(self.batch, 10, generator=gen).to(self.device)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target).square().sum() / PROBE_BATCH


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


def relative_difference(got: list[float], want: list[float]) -> float:
    return max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want)), default=0.0)


def graph_equals_eager(make_step: Callable[[], TrainStep], steps: int, warmup: int) -> dict:
    """Replays of a captured step against eager steps; a second eager copy gives the noise floor.

    ``make_step`` builds a fresh step (its own copy of the model) each call. On CPU nothing is
    captured: the "graph" copy runs eagerly, so the comparison is rehearsed, not made.
    """
    runs = {name: make_step() for name in ("eager", "eager_again", "graph")}
    cuda = runs["eager"].device.type == "cuda"
    data = [runs["eager"].make_batch(seed=1 + index) for index in range(warmup + steps)]
    for x, y in data[:warmup]:
        for name in ("eager", "eager_again") if cuda else runs:
            runs[name].load(x, y)
            runs[name]()
    runners: dict[str, Callable[[], Tensor]] = dict(runs)
    if cuda:
        runners["graph"] = GraphedStep(runs["graph"], data[:warmup])
    losses: dict[str, list[float]] = {name: [] for name in runners}
    for x, y in data[warmup:]:
        for name, runner in runners.items():
            runner.load(x, y)
            losses[name].append(float(runner().detach()))
    return {
        "captured": cuda,
        "losses": losses,
        "loss_rel_diff": {
            name: relative_difference(losses[name], losses["eager"]) for name in ("graph", "eager_again")
        },
        "state_rel_diff": {
            name: max_state_difference(runs[name].model, runs["eager"].model) for name in ("graph", "eager_again")
        },
    }


GRAPH_CRITERION = "graph vs eager <= 4 x (eager vs eager) + 1e-3 (loss), + 1e-4 (parameters and buffers)"


def graph_matches(result: dict) -> bool:
    loss, state = result["loss_rel_diff"], result["state_rel_diff"]
    return loss["graph"] <= 4 * loss["eager_again"] + 1e-3 and state["graph"] <= 4 * state["eager_again"] + 1e-4


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
# every synchronised layer alone, for the sync check


@dataclass(frozen=True)
class LayerCase:
    """One synchronised layer on one rank's input; ``others_hold_data``: replayed through OtherRanks."""

    name: str
    layer_class: type
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    memory_format: torch.memory_format
    others_hold_data: bool


def _act2d(channels: int) -> nn.Module:
    layer = syncnorm.SyncBatchNormAct2d(channels)
    layer.act = nn.LeakyReLU(0.01)  # as timm's BatchNormAct2d converts
    return layer


def synchronised_layer_classes() -> list[type]:
    """Every layer class syncnorm exports that synchronises over ranks (a SyncLayer)."""
    found = {getattr(syncnorm, name) for name in syncnorm.__all__}
    return sorted((c for c in found if isinstance(c, type) and issubclass(c, SyncLayer)), key=lambda c: c.__name__)


def sync_layer_cases(channels: int = 6) -> list[LayerCase]:
    """Each synchronised layer and input rank on a rank with 4 samples, an empty rank, and a rank with
    one value per channel (one instance per channel for SyncInstanceNorm, which needs > 1 position).

    SyncInstanceNorm runs on NCHW input: like torch's InstanceNorm it returns a contiguous output
    for channels_last input (its instances are a reshape), which the layout check would flag.
    """
    c = channels
    cl, cl3, plain = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
    layers: list[tuple[str, type, Callable[[], nn.Module], tuple[int, ...], tuple[int, ...], torch.memory_format]] = [
        ("SyncBatchNorm (N, C)", syncnorm.SyncBatchNorm, lambda: syncnorm.SyncBatchNorm(c), (c,), (c,), plain),
        ("SyncBatchNorm (N, C, L)", syncnorm.SyncBatchNorm, lambda: syncnorm.SyncBatchNorm(c), (c, 9), (c, 1), plain),
        ("SyncBatchNorm (N, C, H, W) channels_last", syncnorm.SyncBatchNorm, lambda: syncnorm.SyncBatchNorm(c), (c, 5, 4), (c, 1, 1), cl),
        ("SyncBatchNorm (N, C, D, H, W) channels_last_3d", syncnorm.SyncBatchNorm, lambda: syncnorm.SyncBatchNorm(c), (c, 3, 4, 2), (c, 1, 1, 1), cl3),
        ("SyncBatchNormAct2d + LeakyReLU channels_last", syncnorm.SyncBatchNormAct2d, lambda: _act2d(c), (c, 5, 4), (c, 1, 1), cl),
        ("InPlaceABNSync leaky_relu channels_last", syncnorm.InPlaceABNSync, lambda: syncnorm.InPlaceABNSync(c), (c, 5, 4), (c, 1, 1), cl),
        ("InPlaceABNSync elu (N, C, H, W)", syncnorm.InPlaceABNSync, lambda: syncnorm.InPlaceABNSync(c, activation="elu", activation_param=1.0), (c, 5, 4), (c, 1, 1), plain),
        ("SyncInstanceNorm1d affine tracked", syncnorm.SyncInstanceNorm1d, lambda: syncnorm.SyncInstanceNorm1d(c, affine=True, track_running_stats=True), (c, 9), (c, 9), plain),
        ("SyncInstanceNorm2d affine tracked", syncnorm.SyncInstanceNorm2d, lambda: syncnorm.SyncInstanceNorm2d(c, affine=True, track_running_stats=True), (c, 5, 4), (c, 5, 4), plain),
        ("SyncInstanceNorm3d affine tracked", syncnorm.SyncInstanceNorm3d, lambda: syncnorm.SyncInstanceNorm3d(c, affine=True, track_running_stats=True), (c, 3, 4, 2), (c, 3, 4, 2), plain),
    ]  # fmt: skip
    cases = []
    for name, cls, make, sample, one_value, layout in layers:
        one = "one instance per channel" if "InstanceNorm" in name else "one value per channel"
        cases += [
            LayerCase(f"{name}, 4 samples", cls, make, (4, *sample), layout, False),
            LayerCase(f"{name}, empty rank", cls, make, (0, *sample), layout, True),
            LayerCase(f"{name}, {one}", cls, make, (1, *one_value), layout, True),
        ]
    return cases


def rank_kind(case: LayerCase) -> str:
    """ "empty", "one" (one value per channel; one instance per channel for instance norm) or "full", from the shape."""
    batch, positions = case.shape[0], math.prod(case.shape[2:])
    if batch == 0:
        return "empty"
    if batch == 1 and (positions == 1 or issubclass(case.layer_class, _InstanceNorm)):
        return "one"
    return "full"


def layer_coverage(cases: list[LayerCase], classes: list[type]) -> dict:
    """The sync check's coverage: every class has a full, an empty and a one-value rank case."""
    missing = {
        c.__name__: sorted({"full", "empty", "one"} - {rank_kind(k) for k in cases if k.layer_class is c})
        for c in classes
    }
    missing = {name: kinds for name, kinds in missing.items() if kinds}
    text = f"{len(classes)} classes, {len(cases)} cases" + (f"; missing rank kinds: {missing}" if missing else "")
    return {"passed": bool(classes) and not missing, "measured": text}
