"""syncnorm.fuse_inplace_abn: BatchNorm + LeakyReLU/ELU pairs become InPlaceABN only where that is exact.

The reference is the model itself before fusion (a deep copy), trained and evaluated side by side
in float64: outputs, input and parameter gradients, running statistics.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import syncnorm
from syncnorm import InPlaceABN

TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),
        nn.ELU(0.5),
        nn.Conv2d(8, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),  # not invertible: this pair stays
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),
        nn.LeakyReLU(0.2),
    ).double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            channels = module.num_features
            module.weight.data = torch.randn(channels, dtype=torch.float64).sign() * (0.5 + torch.rand(channels))
            module.bias.data = torch.randn(channels, dtype=torch.float64)
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_fused_model_computes_what_the_pairs_computed_in_training_and_eval():
    reference = _model()
    model = copy.deepcopy(reference)
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())

    report = syncnorm.fuse_inplace_abn(model)

    assert report.fused == ["1", "4", "11"] and report.left == {}
    assert [type(model[i]) for i in (1, 2, 4, 5, 7, 8, 11, 12)] == [
        InPlaceABN, nn.Identity, InPlaceABN, nn.Identity, nn.BatchNorm2d, nn.ReLU, InPlaceABN, nn.Identity
    ]  # fmt: skip
    assert (model[1].activation, model[1].activation_param) == ("leaky_relu", 0.1)
    assert (model[4].activation, model[4].activation_param, model[4].momentum) == ("elu", 0.5, None)
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[name] for name, p in model.named_parameters())  # optimiser state carries over

    for step in range(3):
        x = torch.randn(6, 3, 6, 6, dtype=torch.float64) * 2 + step
        outs, grads = [], []
        for net in (reference, model):
            net.zero_grad()
            leaf = x.clone().requires_grad_()
            out = net(leaf)
            out.mul(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
            outs.append(out.detach())
            grads.append([leaf.grad, *(p.grad for p in net.parameters())])
        torch.testing.assert_close(outs[1], outs[0], **TIGHT)
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, **TIGHT)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, **TIGHT, msg=name)
    reference.eval(), model.eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), **TIGHT)


def test_pairs_that_would_not_be_exact_are_left_with_the_reason():
    class MyBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    hooked, tiny = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        tiny.weight[2] = 1e-7
    model = nn.Sequential(
        nn.Sequential(hooked, nn.LeakyReLU()),
        nn.Sequential(tiny, nn.ELU()),
        nn.Sequential(MyBatchNorm(4), nn.LeakyReLU()),  # a subclass may compute anything
        nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.0)),  # slope 0 is ReLU: not invertible
        nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.3)),
    )
    before = copy.deepcopy(model)

    report = syncnorm.fuse_inplace_abn(model)

    assert report.fused == ["4.0"]
    assert report.left.keys() == {"0.0", "1.0"}
    assert "hooks" in report.left["0.0"]
    assert "|gamma| < eps" in report.left["1.0"] and "[2]" in report.left["1.0"]
    for index in range(4):
        assert [type(m) for m in model[index]] == [type(m) for m in before[index]]
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(model(x), before(x))


def test_fused_layers_take_the_group_and_convert_sync_batchnorm_leaves_them_alone():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU())
    syncnorm.fuse_inplace_abn(model, process_group=None, inplace=True)
    assert model[0].inplace is True and model[0].process_group is None and model[0].layer_name == "0"
    converted = syncnorm.convert_sync_batchnorm(model)
    assert type(converted[0]) is InPlaceABN
