"""convert_sync_batchnorm / revert_sync_batchnorm on nested models, against the original model."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncnorm


def _nested_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))
    model.blocks = nn.ModuleList(
        [
            nn.Sequential(nn.Conv3d(2, 2, 1), nn.BatchNorm3d(2, eps=1e-3, affine=False)),
            nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False)),
        ]
    )
    model.head = nn.SyncBatchNorm(7, momentum=0.3)
    model.double()
    for bn in (model.stem[1], model.head):
        with torch.no_grad():
            bn.weight.uniform_()
            bn.bias.uniform_()
    model.stem[1].running_mean.uniform_()
    model.stem[1].running_var.uniform_(1, 2)
    model.stem[1].num_batches_tracked.fill_(5)
    model.stem[1].weight.requires_grad_(False)
    model.blocks[0].eval()
    return model


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (_BatchNorm, nn.SyncBatchNorm))}


def test_convert_shares_state_and_keeps_every_setting():
    original = _nested_model()
    before = {name: (type(m), m.training, copy.deepcopy(m.state_dict())) for name, m in _batchnorms(original).items()}
    params_before = {name: p for name, p in original.named_parameters()}
    converted = syncnorm.convert_sync_batchnorm(original)
    assert converted is original
    layers = _batchnorms(converted)
    assert set(layers) == set(before)
    for name, layer in layers.items():
        cls, training, state = before[name]
        assert type(layer) is syncnorm.SyncBatchNorm and isinstance(layer, _BatchNorm)
        assert not isinstance(layer, nn.SyncBatchNorm)
        assert layer.layer_name == name and layer.training == training
        assert layer.state_dict().keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(layer.state_dict()[key], value), (name, key)
            assert layer.state_dict()[key].dtype == value.dtype
    # The same Parameter objects: an optimiser built before conversion still drives the model.
    assert all(p is params_before[name] for name, p in converted.named_parameters())
    assert converted.stem[1].weight.requires_grad is False and converted.stem[1].momentum is None
    assert converted.blocks[0][1].eps == 1e-3 and converted.blocks[0][1].affine is False
    assert converted.blocks[1][1].track_running_stats is False and converted.head.momentum == 0.3


def test_converted_model_computes_what_the_original_does_outside_distributed():
    original = _nested_model()
    converted = syncnorm.convert_sync_batchnorm(copy.deepcopy(original))
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    for model in (original, converted):
        model.train()
    torch.testing.assert_close(converted.stem(x), original.stem(x), rtol=0, atol=0)
    torch.testing.assert_close(converted.stem[1].running_var, original.stem[1].running_var, rtol=0, atol=0)


def test_revert_round_trip_restores_classes_and_state():
    original = _nested_model()
    reference = copy.deepcopy(original)
    reverted = syncnorm.revert_sync_batchnorm(syncnorm.convert_sync_batchnorm(original))
    expected_classes = {name: type(m) for name, m in _batchnorms(reference).items()}
    expected_classes["head"] = nn.BatchNorm2d  # torch's SyncBatchNorm has no dimensionality to go back to
    got = _batchnorms(reverted)
    assert {name: type(m) for name, m in got.items()} == expected_classes
    assert reverted.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(reverted.state_dict()[key], value), key
    assert got["blocks.0.1"].training is False and got["stem.1"].weight.requires_grad is False
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    reference.eval()
    reverted.eval()
    torch.testing.assert_close(reverted.stem(x), reference.stem(x), rtol=0, atol=0)


def test_bare_batchnorm_is_returned_converted():
    bn = nn.BatchNorm1d(3)
    converted = syncnorm.convert_sync_batchnorm(bn)
    assert type(converted) is syncnorm.SyncBatchNorm and converted.weight is bn.weight
    back = syncnorm.revert_sync_batchnorm(converted)
    assert type(back) is nn.BatchNorm1d and back.running_var is bn.running_var


def test_activation_checkpointing_outside_distributed_updates_running_stats_once():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    synced = syncnorm.convert_sync_batchnorm(copy.deepcopy(plain))
    x = torch.randn(4, 3, 6, 6)
    plain(x).square().sum().backward()
    for use_reentrant in (False, True):
        model = copy.deepcopy(synced)
        xr = x.clone().requires_grad_(use_reentrant)
        checkpoint(model, xr, use_reentrant=use_reentrant).square().sum().backward()
        for ours, ref in zip(_batchnorms(model).values(), _batchnorms(plain).values()):
            torch.testing.assert_close(ours.running_mean, ref.running_mean)
            torch.testing.assert_close(ours.running_var, ref.running_var)
            assert int(ours.num_batches_tracked) == 1
        for ours, ref in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(ours.grad, ref.grad)


def test_instance_norm_under_checkpointing_updates_running_stats_once():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ref = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    ours = syncnorm.SyncInstanceNorm2d(3, affine=True, track_running_stats=True)
    x = torch.randn(4, 3, 5, 5)
    ref(x).square().sum().backward()
    for use_reentrant in (False, True):
        layer = copy.deepcopy(ours)
        checkpoint(layer, x.clone().requires_grad_(), use_reentrant=use_reentrant).square().sum().backward()
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        torch.testing.assert_close(layer.running_var, ref.running_var)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
