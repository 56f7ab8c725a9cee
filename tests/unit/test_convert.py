"""convert_sync_batchnorm / revert_sync_batchnorm on nested models, against the original model."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
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


# --- conversion rules: what is converted, what is refused ------------------------------------


class CheckedBatchNorm(nn.BatchNorm2d):
    """Like mmengine's _BatchNormXd: overrides only the input check, so it computes what BatchNorm2d does."""

    def _check_input_dim(self, input):
        pass


class ResidualBatchNorm(nn.BatchNorm2d):
    """A user subclass whose forward does more than normalise."""

    def forward(self, input):
        return super().forward(input) + input


class SyncResidualBatchNorm(syncnorm.SyncBatchNorm):
    def forward(self, input):
        return super().forward(input) + input


def test_subclass_without_its_own_forward_is_converted_like_its_base_and_reverted_to_itself():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), CheckedBatchNorm(4)).double()
    model[1].note = "kept"
    calls = []
    model[1].register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    expected = copy.deepcopy(model)(x)
    calls.clear()  # the copy ran the hook as well
    syncnorm.convert_sync_batchnorm(model)
    assert type(model[1]) is syncnorm.SyncBatchNorm and model[1].note == "kept"
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert calls == [1]  # the user's hook came along
    syncnorm.revert_sync_batchnorm(model)
    assert type(model[1]) is CheckedBatchNorm and model[1].note == "kept"
    assert not hasattr(model[1], "process_group") and not hasattr(model[1], "layer_name")


def test_subclass_with_its_own_forward_is_refused_before_anything_changes():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(ResidualBatchNorm(4)))
    with pytest.raises(TypeError) as caught:
        syncnorm.convert_sync_batchnorm(model)
    message = str(caught.value)
    assert "ResidualBatchNorm" in message and "'1.0'" in message
    assert "register_conversion" in message and "exclude" in message
    assert type(model[0]) is nn.BatchNorm2d  # nothing was converted


def test_registered_and_excluded_subclasses():
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    model = nn.Sequential(ResidualBatchNorm(4)).double()
    expected = copy.deepcopy(model)(x)
    kept = syncnorm.convert_sync_batchnorm(copy.deepcopy(model), exclude=[ResidualBatchNorm])
    assert type(kept[0]) is ResidualBatchNorm
    syncnorm.register_conversion(ResidualBatchNorm, SyncResidualBatchNorm)
    try:
        converted = syncnorm.convert_sync_batchnorm(model)
        assert type(converted[0]) is SyncResidualBatchNorm
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)
        assert type(syncnorm.revert_sync_batchnorm(converted)[0]) is ResidualBatchNorm
    finally:
        syncnorm.convert._CONVERSIONS.pop(ResidualBatchNorm)
    with pytest.raises(TypeError, match="SyncBatchNorm or a callable"):
        syncnorm.register_conversion(ResidualBatchNorm, nn.BatchNorm2d)


def test_uninitialised_lazy_batchnorm_is_a_clear_error_and_converts_after_a_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="uninitialised LazyBatchNorm2d.*Run one forward"):
        syncnorm.convert_sync_batchnorm(model)
    model(torch.randn(2, 3, 4, 4))
    assert type(syncnorm.convert_sync_batchnorm(model)[1]) is syncnorm.SyncBatchNorm


def test_activation_layer_applies_act_and_drop_and_reverts_to_timm_when_built_directly():
    layer = syncnorm.SyncBatchNormAct2d(4).double()
    layer.act = nn.SiLU()
    reference = nn.BatchNorm2d(4).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.silu(reference(x)), rtol=0, atol=0)
    assert isinstance(layer, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="4-D input"):
        layer(torch.randn(3, 4, dtype=torch.float64))
    # syncnorm never imports timm for a model without timm layers:
    code = "import sys, torch, syncnorm; m = syncnorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3)); print('timm' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
