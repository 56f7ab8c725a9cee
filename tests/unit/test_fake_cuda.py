"""Every synchronised layer on fake CUDA tensors: no host reads, no CPU<->CUDA copies, no refused kernel calls.

Two training steps (forward and backward) per layer, shape, dtype and option, on fake CUDA
tensors under torch's "fake" process group of 4 ranks, so that the synchronised (W > 1)
path runs without a GPU. The numbers are meaningless; ``fake_cuda.CudaOpChecker`` fails on
the first op that would sync with the host, copy between devices, or be refused by torch's
CUDA kernels, naming the op and the syncnorm line that called it. Needs a CUDA build of
torch (the CI's CUDA-build session); a GPU is not needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

if torch.version.cuda is None or not torch.backends.cuda.is_built():
    pytest.skip(
        f"needs a CUDA build of torch (FakeTensorMode makes device='cuda' tensors only there); torch "
        f"{torch.__version__} is CPU-only",
        allow_module_level=True,
    )

import torch.distributed as dist
from helpers import fake_cuda
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import syncnorm

C = 3
WORLD = 4
LAYOUTS: dict[str, tuple[tuple[int, ...], torch.memory_format]] = {
    "NC": ((6, C), torch.contiguous_format),
    "NCL": ((4, C, 5), torch.contiguous_format),
    "NCHW": ((2, C, 4, 5), torch.contiguous_format),
    "NHWC": ((2, C, 4, 5), torch.channels_last),
    "NCDHW": ((2, C, 2, 3, 4), torch.contiguous_format),
    "NDHWC": ((2, C, 2, 3, 4), torch.channels_last_3d),
    "empty-NC": ((0, C), torch.contiguous_format),
    "empty-NCHW": ((0, C, 4, 5), torch.contiguous_format),
    "one-NC": ((1, C), torch.contiguous_format),
    "one-NCHW": ((1, C, 1, 1), torch.contiguous_format),
}
SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
ACTIVATION_PARAMS = {"leaky_relu": 0.01, "elu": 1.0, "identity": 0.01}


def _abn(activation: str) -> Callable[..., nn.Module]:
    def build(channels: int, **kwargs: Any) -> nn.Module:
        return syncnorm.InPlaceABN(
            channels, activation=activation, activation_param=ACTIVATION_PARAMS[activation], **kwargs
        )

    return build


def _instance_norm(cls: type) -> Callable[..., nn.Module]:
    def build(channels: int, **kwargs: Any) -> nn.Module:
        return cls(channels, **{"affine": True, "track_running_stats": True, **kwargs})

    return build


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "SyncBatchNorm": syncnorm.SyncBatchNorm,
    "SyncBatchNormAct2d": syncnorm.SyncBatchNormAct2d,
    **{f"InPlaceABN-{a}": _abn(a) for a in ACTIVATION_PARAMS},
    "SyncInstanceNorm1d": _instance_norm(syncnorm.SyncInstanceNorm1d),
    "SyncInstanceNorm2d": _instance_norm(syncnorm.SyncInstanceNorm2d),
    "SyncInstanceNorm3d": _instance_norm(syncnorm.SyncInstanceNorm3d),
}


@dataclass(frozen=True)
class Case:
    layer: str
    layout: str
    dtype: torch.dtype = torch.float32  # the input's
    param_dtype: torch.dtype = torch.float32  # the layer's parameters and buffers
    options: dict[str, Any] = field(default_factory=dict)
    inplace: bool = False  # InPlaceABN(inplace=True) on an intermediate result

    def __str__(self) -> str:
        parts = [self.layer, self.layout, SHORT[self.dtype]]
        if self.param_dtype != torch.float32:
            parts.append(f"{SHORT[self.param_dtype]}-params")
        parts += [f"{k}={v}" for k, v in self.options.items()] + (["inplace"] if self.inplace else [])
        return "-".join(parts)

    def build(self) -> nn.Module:
        options = {**self.options, **({"inplace": True} if self.inplace else {})}
        return BUILDERS[self.layer](C, device="cuda", dtype=self.param_dtype, **options).train()

    def collectives(self) -> int:
        """all_reduces per step: forward and backward statistics, or (InstanceNorm) the running statistics."""
        if not self.layer.startswith("SyncInstanceNorm"):
            return 2
        return int(self.options.get("track_running_stats", True) and self.options.get("momentum", 0.1) is not None)


def _cases() -> list[Case]:
    half = (torch.bfloat16, torch.float16)
    variants = ({"affine": False}, {"momentum": None}, {"track_running_stats": False})
    cases = [Case("SyncBatchNorm", layout) for layout in LAYOUTS]
    cases += [Case("SyncBatchNorm", layout, dtype) for layout in ("NC", "NCHW", "NHWC", "NDHWC") for dtype in half]
    cases += [Case("SyncBatchNorm", "NCHW", torch.bfloat16, torch.bfloat16)]
    cases += [Case("SyncBatchNorm", "NCHW", options=options) for options in variants]
    cases += [Case("SyncBatchNormAct2d", layout) for layout in ("NCHW", "NHWC", "empty-NCHW", "one-NCHW")]
    cases += [Case("SyncBatchNormAct2d", "NHWC", torch.float16)]
    for activation in ACTIVATION_PARAMS:
        abn = f"InPlaceABN-{activation}"
        cases += [Case(abn, "NCHW"), Case(abn, "NCHW", inplace=True), Case(abn, "NHWC", torch.bfloat16)]
    abn = "InPlaceABN-leaky_relu"
    cases += [
        Case(abn, layout) for layout in ("NC", "NCL", "NCDHW", "NDHWC", "empty-NC", "empty-NCHW", "one-NC", "one-NCHW")
    ]
    cases += [Case(abn, "NHWC", dtype, inplace=True) for dtype in half]
    cases += [Case(abn, "NCHW", torch.bfloat16, torch.bfloat16)]
    cases += [Case(abn, "NCHW", options=options) for options in variants]
    for layer, layouts in (("1d", ("NCL",)), ("2d", ("NCHW", "NHWC", "empty-NCHW")), ("3d", ("NCDHW", "NDHWC"))):
        cases += [Case(f"SyncInstanceNorm{layer}", layout) for layout in layouts]
    norm = "SyncInstanceNorm2d"
    cases += [Case(norm, "NHWC", dtype) for dtype in half] + [Case(norm, "NCHW", torch.bfloat16, torch.bfloat16)]
    cases += [Case(norm, "NCHW", options=options) for options in variants]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def fake_mode() -> Iterator[FakeTensorMode]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process; the fake one cannot be the default")
    syncnorm.set_check(False)  # the opt-in rank guard reads its verdict back to the host, by design
    try:
        with fake_cuda.fake_cuda_session(WORLD) as mode:
            yield mode
    finally:
        syncnorm.set_check(None)


def _input(case: Case) -> torch.Tensor:
    shape, memory_format = LAYOUTS[case.layout]
    return torch.randn(shape, device="cuda", dtype=case.dtype).to(memory_format=memory_format).requires_grad_()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_training_step_stays_on_the_device(case: Case, fake_mode: FakeTensorMode) -> None:
    with fake_mode:
        layer = case.build()  # outside the checker: a buffer built from a Python number is a copy
        for _ in range(2):
            x = _input(case)
            with fake_cuda.checked() as checker:
                # inplace writes over an intermediate result only (never a leaf), as in a real model
                output = layer(x * 1 if case.inplace else x)
                fake_cuda.run_backward(output, torch.randn_like(output))
            assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype
            for name, parameter in layer.named_parameters():
                assert parameter.grad is not None and parameter.grad.shape == parameter.shape, name
            assert checker.count("c10d", "allreduce") == case.collectives(), "not the synchronised path"


COMPILED = [Case("SyncBatchNorm", "NHWC"), Case("SyncBatchNormAct2d", "NCHW"), Case("InPlaceABN-leaky_relu", "NCHW")]


@pytest.mark.parametrize("case", COMPILED, ids=str)
def test_compiled_forward_stays_on_the_device(case: Case, fake_mode: FakeTensorMode) -> None:
    """The compiled graph (fullgraph) runs the custom ops' real bodies, checked.

    Backend aot_eager: Inductor generates and compiles kernels for the device, which needs a
    driver ("Found no NVIDIA driver"). Without grad: AOTAutograd would trace the backward with
    torch's autograd engine, which needs a device too (see the next test).
    """
    torch._dynamo.reset()
    with fake_mode:
        layer = case.build().requires_grad_(False)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        for _ in range(2):
            x = _input(case).requires_grad_(False)
            with fake_cuda.checked() as checker:
                compiled(x)
            assert checker.count("syncnorm") >= 1, "the compiled graph ran no syncnorm op"
            assert checker.count("c10d", "allreduce") == 1, "not the synchronised path"


def test_compiled_backward_stays_on_the_device(fake_mode: FakeTensorMode) -> None:
    torch._dynamo.reset()
    case = Case("SyncBatchNorm", "NCHW")
    with fake_mode:
        compiled = torch.compile(case.build(), backend="aot_eager", fullgraph=True)
        x = _input(case)
        with fake_cuda.checked():
            try:
                output = compiled(x)
            except Exception as error:  # torch._dynamo wraps it in BackendCompilerFailed
                if "hasPrimaryContext" not in str(error):
                    raise
                pytest.skip(
                    "AOTAutograd traces the joint forward/backward graph with torch's autograd engine, which "
                    "needs a real CUDA device for CUDA tensors ('hasPrimaryContext expects a valid device "
                    "index'); the eager tests cover the backward bodies, which the compiled backward op shares"
                )
            fake_cuda.run_backward(output, torch.randn_like(output))


def _full_size_copies(checker: fake_cuda.CudaOpChecker, numel: int) -> list[str]:
    return [
        op.name
        for op in checker.ops
        if ("copy" in op.name or "clone" in op.name)
        and any(isinstance(a, torch.Tensor) and a.numel() == numel for a in op.args)
    ]


def test_no_avoidable_work_on_the_device(fake_mode: FakeTensorMode) -> None:
    """Half inputs need no scratch statistics buffers (the CUDA kernel returns float32), the
    backward computes 1 / sqrt(var + eps) once, and a channels_last input meeting a contiguous
    grad gets its gradient without a full-size copy."""
    with fake_mode:
        layer = syncnorm.SyncBatchNorm(C, device="cuda").train()
        x = torch.randn(2, C, 4, 5, device="cuda", dtype=torch.float16).requires_grad_()
        with fake_cuda.checked() as forward:
            output = layer(x)
        per_channel_buffers = [
            op.name
            for op in forward.ops
            if op.name.split(".")[1] in ("new_zeros", "new_ones") and list(op.args[1]) == [C]
        ]
        assert per_channel_buffers == []
        with fake_cuda.checked() as backward:
            fake_cuda.run_backward(output, torch.randn_like(output))
        assert backward.count("aten", "rsqrt") == 1
        x = torch.randn(2, C, 4, 5, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
        output = layer(x)
        grad = torch.randn(output.shape, device="cuda")  # contiguous
        with fake_cuda.checked() as backward:
            grad_input = output.grad_fn.apply(grad)[0]  # the layer's own backward, before AccumulateGrad
        assert _full_size_copies(backward, x.numel()) == []
        assert grad_input.stride() == x.stride()


# --- the checker itself: what it must flag, and what it must let through ----------------------

SAMPLE = (4, C)


def _bn_backward_without_save_stats(t: torch.Tensor) -> None:
    stats = torch.zeros(C, device="cuda")
    torch.ops.aten.native_batch_norm_backward(t, t, None, stats, stats, None, None, False, 1e-5, [False, True, True])


def _backward_elemt_int64_count(t: torch.Tensor) -> None:
    stats = torch.zeros(C, device="cuda")
    count = torch.ones(1, device="cuda", dtype=torch.int64)
    torch.batch_norm_backward_elemt(t, t, stats, stats, None, stats, stats, count)


FLAGGED: dict[str, Callable[[torch.Tensor], Any]] = {
    "item": lambda t: t.sum().item(),
    "float": lambda t: float(t[0, 0]),
    "bool": lambda t: bool(t.sum() > 0),
    "nonzero": lambda t: t.nonzero(),
    "bool-mask-index": lambda t: t[t > 0],
    "bool-mask-assign": lambda t: t.__setitem__(t > 0, 1.0),
    "masked_select": lambda t: t.masked_select(t > 0),
    "equal": lambda t: torch.equal(t, t),
    "setitem-number": lambda t: t.__setitem__((0, 0), 3.0),
    "tensor-on-cuda": lambda t: torch.tensor([1.0, 2.0], device="cuda"),
    "cpu-scalar-operand": lambda t: t * torch.tensor(2.0),
    "to-cpu": lambda t: t.cpu(),
    "native_batch_norm_backward-without-save_mean": _bn_backward_without_save_stats,
    "batch_norm_backward_elemt-int64-count": _backward_elemt_int64_count,
}
ALLOWED: dict[str, Callable[[torch.Tensor], Any]] = {
    "fill-number": lambda t: t[:1].fill_(3.0),
    "number-operand": lambda t: t * 2.0 + 1,
    "full": lambda t: torch.full((1,), 3.0, device="cuda"),
    "where-mask": lambda t: torch.where(t > 0, t, 0.0),
    "batch_norm_stats": lambda t: torch.batch_norm_stats(t, 1e-5),
}


@pytest.mark.parametrize("name", FLAGGED)
def test_checker_flags(name: str, fake_mode: FakeTensorMode) -> None:
    with fake_mode:
        t = torch.randn(SAMPLE, device="cuda")
        with pytest.raises(fake_cuda.DeviceViolation, match="test_fake_cuda.py"), fake_cuda.checked():
            FLAGGED[name](t)


@pytest.mark.parametrize("name", ALLOWED)
def test_checker_allows(name: str, fake_mode: FakeTensorMode) -> None:
    with fake_mode:
        t = torch.randn(SAMPLE, device="cuda")
        with fake_cuda.checked():
            ALLOWED[name](t)
