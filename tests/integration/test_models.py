"""Real model zoos: conversion keeps what timm and torchvision models compute, and DDP of a timm net is exact.

The references are the models' own outputs before conversion (eval, with non-trivial
running statistics, and training mode outside torch.distributed) and single-process
training of the unconverted model on the global batch in float64. timm and torchvision
import only with a matching (CUDA) build of torch, so these tests run in the
``models`` nox session (see ``noxfile.py``) and skip, saying so, in the pinned suite.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo  # noqa: F401  (before the harness forks: DDP imports it lazily)
from helpers.harness import run_ranks, sgd_on_shards
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

import syncnorm

timm = pytest.importorskip("timm", reason="timm (and torchvision) need the CUDA build of torch: `nox -s models`")
torchvision = pytest.importorskip("torchvision", reason="torchvision needs its matching torch build: `nox -s models`")

TIMM_MODELS = ["efficientnet_b0", "mobilenetv3_small_050", "regnetx_002", "cspresnet50", "resnet18"]
TORCHVISION_MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "regnet_x_400mf"]


def _batchnorm_classes(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def _with_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that eval outputs depend on them."""
    generator = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, _BatchNorm) and layer.affine:
                layer.weight.uniform_(0.5, 1.5, generator=generator)
                layer.bias.uniform_(-0.2, 0.2, generator=generator)
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64, generator=generator, dtype=torch.float64))
    return model


def _check_conversion_keeps_outputs(model: nn.Module) -> None:
    model = _with_statistics(model.double())
    classes = _batchnorm_classes(model)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model.eval()
    expected_eval = model(x)
    train_reference = copy.deepcopy(model).train()
    torch.manual_seed(5)  # the same dropout masks in both training-mode forwards
    expected_train = train_reference(x)

    converted = syncnorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert all(isinstance(m, syncnorm.SyncBatchNorm) for m in converted.modules() if isinstance(m, _BatchNorm))
    eval_diff = (converted(x) - expected_eval).abs().max().item()
    print(f"{type(model).__name__}: eval max |diff| after conversion = {eval_diff}")
    torch.testing.assert_close(converted(x), expected_eval, rtol=0, atol=0)
    # Training mode outside torch.distributed: the same output and the same running statistics.
    converted.train()
    torch.manual_seed(5)
    torch.testing.assert_close(converted(x), expected_train, rtol=0, atol=0)
    for (name, got), (_, want) in zip(converted.state_dict().items(), train_reference.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)

    reverted = syncnorm.revert_sync_batchnorm(converted).eval()
    assert _batchnorm_classes(reverted) == classes
    # Both went through the same training step: equal running statistics, equal eval outputs.
    torch.testing.assert_close(reverted(x), train_reference.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_conversion_keeps_outputs_and_reverts(name):
    torch.manual_seed(0)
    _check_conversion_keeps_outputs(timm.create_model(name, pretrained=False, num_classes=10))


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_conversion_keeps_outputs_and_reverts(name):
    torch.manual_seed(0)
    _check_conversion_keeps_outputs(getattr(torchvision.models, name)(weights=None, num_classes=10))


def test_timm_batchnorm_act_keeps_its_activation_modules():
    from timm.layers import BatchNormAct2d

    layer = BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout)
    act, drop, weight = layer.act, layer.drop, layer.weight
    converted = syncnorm.convert_sync_batchnorm(layer)
    assert type(converted) is syncnorm.SyncBatchNormAct2d and isinstance(converted, nn.BatchNorm2d)
    assert converted.act is act and converted.drop is drop and converted.weight is weight
    reverted = syncnorm.revert_sync_batchnorm(converted)
    assert type(reverted) is BatchNormAct2d and reverted.act is act and reverted.drop is drop
    assert not hasattr(reverted, "process_group") and not hasattr(reverted, "layer_name")


def test_timm_sync_batchnorm_act_converts_to_the_activation_layer():
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import convert_sync_batchnorm as timm_convert

    original = nn.Sequential(BatchNormAct2d(4, act_layer=nn.ReLU)).double()
    timm_synced = timm_convert(copy.deepcopy(original))
    assert type(timm_synced[0]).__name__ == "SyncBatchNormAct"
    converted = syncnorm.convert_sync_batchnorm(timm_synced)
    assert type(converted[0]) is syncnorm.SyncBatchNormAct2d
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), rtol=0, atol=0)
    assert type(syncnorm.revert_sync_batchnorm(converted)[0]) is BatchNormAct2d


# --- DDP of a timm net with BatchNormAct2d equals one process on the global batch ----------------

WORLD = 2


def _timm_net() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3).double()


def _ddp_rank(rank, world_size, batches):
    torch._dynamo.config.suppress_errors = True
    model = syncnorm.convert_sync_batchnorm(_timm_net())
    sgd_on_shards(DistributedDataParallel(model), batches, rank, world_size, lr=0.05)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_ddp_of_a_timm_net_with_batchnorm_act_matches_one_process():
    generator = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64), torch.randn(8, 3, generator=generator))
        for _ in range(2)
    ]
    batches = [(x, y.double()) for x, y in batches]
    results = run_ranks(_ddp_rank, WORLD, batches, timeout=240, pg_timeout=120)
    reference = _timm_net()
    assert any(type(m).__name__ == "BatchNormAct2d" for m in reference.modules())
    sgd_on_shards(reference, batches, lr=0.05)
    expected = reference.state_dict()
    worst = 0.0
    for rank, state in enumerate(results):
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            if tensor.is_floating_point():
                worst = max(worst, (tensor - expected[name]).abs().max().item())
            torch.testing.assert_close(tensor, expected[name], rtol=1e-9, atol=1e-10, msg=f"rank {rank} {name}")
    print(f"DDP timm mobilenetv3_small_050, 2 ranks vs one process: max |diff| = {worst:.3g}")
    for name, tensor in results[1].items():
        assert torch.equal(tensor, results[0][name]), name
