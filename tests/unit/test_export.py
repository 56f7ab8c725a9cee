"""Export: a converted model in eval mode runs torch's own ops only, through torch.export and ONNX.

The reference is the model's own output before conversion. Every syncnorm layer is in the model:
SyncBatchNorm (converted from BatchNorm2d and BatchNorm1d), SyncBatchNormAct2d, InPlaceABN (made by
fuse_inplace_abn, leaky_relu and elu) and SyncInstanceNorm2d with running statistics.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncnorm


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
            nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ELU(0.5),
            nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 4, 1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def trained_net() -> Net:
    """Non-trivial weights and running statistics: a few training steps on random data."""
    torch.manual_seed(0)
    net = Net()
    for module in net.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d)):
            nn.init.uniform_(module.weight, -2, 2)
            nn.init.uniform_(module.bias, -1, 1)
    for _ in range(3):
        net(torch.randn(4, 3, 8, 8) * 3 + 1).sum().backward()
    return net.eval()


def as_syncnorm(net: Net) -> Net:
    """Every syncnorm layer: converted BatchNorms, fused InPlaceABN pairs, SyncBatchNormAct2d, SyncInstanceNorm."""
    net = copy.deepcopy(net)
    report = syncnorm.fuse_inplace_abn(net)
    assert report.fused == ["features.1", "features.4"]
    syncnorm.convert_sync_batchnorm(net)
    act = syncnorm.SyncBatchNormAct2d(6).eval()
    act.load_state_dict(net.features[7].state_dict())
    act.act = nn.ReLU()
    net.features[7], net.features[8] = act, nn.Identity()
    instance = syncnorm.SyncInstanceNorm2d(4, affine=True, track_running_stats=True).eval()
    instance.load_state_dict(net.features[10].state_dict())
    net.features[10] = instance
    kinds = {type(module).__name__ for module in net.modules()}
    assert {"InPlaceABN", "SyncBatchNorm", "SyncBatchNormAct2d", "SyncInstanceNorm2d"} <= kinds
    return net


def graph_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


def test_torch_export_of_every_layer_in_eval_mode_records_no_syncnorm_op_and_matches_the_original():
    original = trained_net()
    converted = as_syncnorm(original)
    x = torch.randn(2, 3, 8, 8) * 3 + 1
    program = torch.export.export(converted, (x,))
    ops = graph_ops(program)
    assert not [op for op in ops if "syncnorm" in op], ops
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(converted(x), expected)
        torch.testing.assert_close(program.module()(x), expected)


def test_onnx_export_of_every_layer_in_eval_mode_runs_in_onnx_and_matches_the_original():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    original = trained_net()
    converted = as_syncnorm(original)
    x = torch.randn(2, 3, 8, 8) * 3 + 1
    exported = torch.onnx.export(converted, (x,), dynamo=True)
    model = exported.model_proto
    onnx.checker.check_model(model)
    assert not [node.domain for node in model.graph.node if "syncnorm" in node.domain]
    (output,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), original(x), rtol=1e-4, atol=1e-5)


def test_revert_undoes_fusion_and_conversion_and_conv_bn_folding_then_gives_the_same_outputs():
    original = trained_net()
    converted = as_syncnorm(original)
    converted.features[7], converted.features[8] = nn.BatchNorm2d(6).eval(), nn.ReLU()  # built by hand above
    converted.features[7].load_state_dict(original.features[7].state_dict())
    leaky, elu = original.features[2], original.features[5]
    # fusion put an nn.Identity in the activations' places; the fused layers keep the modules
    fused_leaky, fused_elu = (converted.features[index].__dict__["_unfused_pair"][1] for index in (1, 4))
    assert type(converted.features[2]) is nn.Identity and type(fused_leaky) is nn.LeakyReLU
    reverted = syncnorm.revert_sync_batchnorm(converted)

    kinds = [type(module) for module in reverted.features]
    assert kinds == [type(module) for module in original.features[:10]] + [syncnorm.SyncInstanceNorm2d]
    assert type(reverted.head[2]) is nn.BatchNorm1d
    assert reverted.features[2] is fused_leaky and reverted.features[5] is fused_elu  # the very modules
    assert (fused_leaky.negative_slope, fused_elu.alpha) == (leaky.negative_slope, elu.alpha)
    for name in ("activation", "activation_param", "inplace", "_unfused_pair", "layer_name", "process_group"):
        assert name not in reverted.features[1].__dict__
    x = torch.randn(2, 3, 8, 8) * 3 + 1
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(reverted(x), expected)
        # torch's own conv + BatchNorm folding works on the reverted model
        for conv, norm in ((0, 1), (3, 4), (6, 7)):
            folded = torch.nn.utils.fusion.fuse_conv_bn_eval(reverted.features[conv], reverted.features[norm])
            reverted.features[conv], reverted.features[norm] = folded, nn.Identity()
        torch.testing.assert_close(reverted(x), expected, rtol=1e-4, atol=1e-5)


def test_an_inplace_abn_built_directly_is_left_alone_by_revert():
    layer = syncnorm.InPlaceABN(4)
    model = nn.Sequential(layer, nn.Identity())
    syncnorm.revert_sync_batchnorm(model)
    assert model[0] is layer and type(model[1]) is nn.Identity
