"""Mixed precision (half weights, FSDP2 MixedPrecisionPolicy, a model cast whole) and copies of converted models.

References: float32 single-process ``nn.BatchNorm`` training on the global batch (within
bf16/fp16 tolerance), and, for copies, the original model's own group and outputs.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch._dynamo  # noqa: F401  (before the harness forks: FSDP imports it lazily)
import torch.distributed as dist
import torch.nn.functional as F
from helpers.harness import run_ranks, shard
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import syncnorm

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

# torch < 2.6 runs FSDP2 on CUDA only ("FSDP requires CUDA for streams").
CPU_FSDP2 = pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6), reason="FSDP2 on CPU needs torch >= 2.6"
)

WORLD = 2
HALF_TOL = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def make_batch(batch: int = 8, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 6, 6, generator=generator) * 2 + 1, torch.randn(batch, 3, generator=generator)


def one_step(model: nn.Module, inputs, targets, rank: int = 0, world: int = 1, dtype=torch.float32) -> None:
    sizes = [inputs.shape[0] // world] * world
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.mse_loss(model(shard(inputs, rank, sizes).to(dtype)).float(), shard(targets, rank, sizes))
    loss.backward()
    optimiser.step()


# --- half-precision weight and bias with float32 statistics ------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_with_float32_statistics_outside_distributed(dtype):
    """What FSDP2's param_dtype does to a layer: weight and bias in half, running buffers float32."""
    x = torch.randn(6, 4, 5, 5) * 3 + 2
    reference = nn.BatchNorm2d(4)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    layer = syncnorm.SyncBatchNorm(4)
    layer.load_state_dict(reference.state_dict())
    layer.weight.data = layer.weight.data.to(dtype)
    layer.bias.data = layer.bias.data.to(dtype)
    out = layer(x.to(dtype))
    assert out.dtype == dtype and layer.running_mean.dtype == torch.float32
    expected = reference(x)
    torch.testing.assert_close(out.float(), expected, **HALF_TOL[dtype])
    torch.testing.assert_close(layer.running_mean, reference.running_mean, **HALF_TOL[dtype])
    out.float().square().sum().backward()
    assert layer.weight.grad.dtype == dtype and layer.bias.grad.dtype == dtype
    layer.eval()
    reference.eval()
    torch.testing.assert_close(layer(x.to(dtype)).float(), reference(x), **HALF_TOL[dtype])


def test_model_cast_whole_to_bfloat16_trains_and_evaluates():
    inputs, targets = make_batch()
    reference = make_net()
    one_step(reference, inputs, targets)
    model = syncnorm.convert_sync_batchnorm(make_net()).to(torch.bfloat16)
    one_step(model, inputs, targets, dtype=torch.bfloat16)
    for (name, got), (_, want) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(got.float(), want.float(), **HALF_TOL[torch.bfloat16], msg=name)
    model.eval()
    assert model(inputs.to(torch.bfloat16)).dtype == torch.bfloat16


def _fsdp2_mixed_precision_rank(rank, world, param_dtype, inputs, targets):
    mesh = init_device_mesh("cpu", (world,))
    model = syncnorm.convert_sync_batchnorm(make_net(), process_group=mesh)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for index in (0, 3):
        fully_shard(model[index], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    one_step(model, inputs, targets, rank, world)
    one_step(model, inputs, targets, rank, world)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    return buffers, full


@CPU_FSDP2
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_fsdp2_mixed_precision_matches_float32_reference(param_dtype):
    inputs, targets = make_batch()
    results = run_ranks(_fsdp2_mixed_precision_rank, WORLD, param_dtype, inputs, targets, timeout=180, pg_timeout=60)
    reference = make_net()
    one_step(reference, inputs, targets)
    one_step(reference, inputs, targets)
    expected = dict(reference.named_parameters()) | dict(reference.named_buffers())
    worst = 0.0
    for buffers, params in results:
        for name, tensor in (buffers | params).items():
            assert tensor.dtype == expected[name].dtype, name  # statistics and master weights stay float32
            worst = max(worst, (tensor.double() - expected[name].double()).abs().max().item())
            torch.testing.assert_close(tensor, expected[name].detach(), **HALF_TOL[param_dtype], msg=name)
    print(f"FSDP2 param_dtype={param_dtype}: two steps, max |diff| against float32 = {worst:.3g}")
    for name, buffer in results[1][0].items():
        assert torch.equal(buffer, results[0][0][name]), f"{name} differs between ranks"


# --- copies: deepcopy shares the group, pickling follows one rule -------------------------------


def _copies_rank(rank, world, inputs, targets):
    group = syncnorm.new_sync_groups(world)  # a group object that is not the default group
    mesh = init_device_mesh("cpu", (world,))
    outcome = {}
    for kind, process_group in (("group", group), ("mesh", mesh), ("default", None)):
        model = syncnorm.convert_sync_batchnorm(make_net(), process_group=process_group)
        twin = copy.deepcopy(model)
        averaged = torch.optim.swa_utils.AveragedModel(model)  # deep-copies the model too
        outcome[f"{kind}-shared"] = all(
            a.process_group is b.process_group is c.process_group
            for a, b, c in zip(_sync_layers(model), _sync_layers(twin), _sync_layers(averaged.module))
        )
        outcome[f"{kind}-distinct-params"] = twin[1].weight is not model[1].weight
        # The copy synchronises: its running statistics after a step are the global batch's.
        twin.train()
        sizes = [inputs.shape[0] // world] * world
        with torch.no_grad():
            twin(shard(inputs, rank, sizes))
        outcome[f"{kind}-running-mean"] = twin[1].running_mean.clone()
        try:
            pickle.dumps(model)
            outcome[f"{kind}-pickle"] = "ok"
        except TypeError as err:
            outcome[f"{kind}-pickle"] = str(err)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)  # the recommended way always works
    dist.barrier()
    return outcome


def _sync_layers(model: nn.Module) -> list[syncnorm.SyncBatchNorm]:
    return [m for m in model.modules() if isinstance(m, syncnorm.SyncBatchNorm)]


def test_deepcopy_shares_the_group_and_pickling_a_group_is_a_clear_error():
    inputs, targets = make_batch()
    results = run_ranks(_copies_rank, WORLD, inputs, targets, timeout=120)
    reference = make_net()
    with torch.no_grad():
        reference(inputs)
    for outcome in results:
        for kind in ("group", "mesh", "default"):
            assert outcome[f"{kind}-shared"] and outcome[f"{kind}-distinct-params"], kind
            torch.testing.assert_close(outcome[f"{kind}-running-mean"], reference[1].running_mean, rtol=1e-5, atol=1e-6)
        assert outcome["default-pickle"] == "ok"
        for kind in ("group", "mesh"):
            message = outcome[f"{kind}-pickle"]
            assert "cannot be pickled" in message and "state_dict()" in message and "'1'" in message, message


def test_deepcopy_and_save_outside_distributed():
    model = syncnorm.convert_sync_batchnorm(make_net())
    twin = copy.deepcopy(model)
    assert type(twin[1]) is syncnorm.SyncBatchNorm and twin[1].layer_name == "1"
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = make_batch()[0]
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# --- every layer, every dtype mix: the same rule ----------------------------------------------

_REFERENCES = {
    "SyncBatchNorm": lambda: nn.BatchNorm2d(3),
    "InPlaceABN": lambda: nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(0.01)),
    "SyncInstanceNorm2d": lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
}
_LAYERS = {
    "SyncBatchNorm": lambda: syncnorm.SyncBatchNorm(3),
    "InPlaceABN": lambda: syncnorm.InPlaceABN(3),
    "SyncInstanceNorm2d": lambda: syncnorm.SyncInstanceNorm2d(3, affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("layer_name", list(_LAYERS))
@pytest.mark.parametrize(
    "param_dtype,input_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float64, torch.float32)],
    ids=["bf16-params-f32-input", "f32-params-bf16-input", "f64-params-f32-input"],
)
def test_every_layer_takes_every_dtype_mix_in_training_and_eval(layer_name, param_dtype, input_dtype):
    # The layer (parameters and buffers) in one dtype, the input in another: each layer trains and
    # evaluates, outside torch.distributed too, with its statistics in the input's statistics dtype.
    torch.manual_seed(0)
    layer = _LAYERS[layer_name]().to(param_dtype)
    reference = _REFERENCES[layer_name]().double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
    tolerance = (
        {"rtol": 3e-2, "atol": 3e-2} if torch.bfloat16 in (param_dtype, input_dtype) else {"rtol": 1e-5, "atol": 1e-5}
    )
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        reference.train(mode == "train")
        out = layer(x.to(input_dtype))
        assert out.dtype == input_dtype
        torch.testing.assert_close(out.double(), reference(x), **tolerance)
    norm = reference[0] if isinstance(reference, nn.Sequential) else reference
    assert layer.running_mean.dtype == param_dtype
    torch.testing.assert_close(layer.running_mean.double(), norm.running_mean, **tolerance)
    torch.testing.assert_close(layer.running_var.double(), norm.running_var, **tolerance)
