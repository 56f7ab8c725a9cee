"""syncnorm.accumulate: running statistics move once per window, as one forward on the window's samples.

The reference is one process, float64, torch's own layers (nn.BatchNorm2d, nn.InstanceNorm2d) run
once per window on every sample of that window: every rank's, every micro-batch's, concatenated.
Micro-batches are uneven across ranks and within a window.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401  (DDP imports it on first use: once here, not in every rank)
from helpers.harness import run_ranks
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

import syncnorm

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
    from torch.distributed._composable.fsdp import fully_shard

TOL = dict(rtol=1e-10, atol=1e-12)
CHANNELS = 3
# WINDOWS[w][m][r]: the size of rank r's m-th micro-batch in window w.
WINDOWS_2 = [[[3, 1], [1, 4], [2, 2]], [[2, 3], [4, 1]]]
WINDOWS_3 = [[[3, 1, 2], [1, 4, 1], [2, 2, 3]], [[2, 3, 1]]]


def data(windows) -> list[list[list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(3)
    return [
        [[torch.randn(n, CHANNELS, 4, 4, generator=generator, dtype=torch.float64) * 2 + 1 for n in micro]
         for micro in window]
        for window in windows
    ]  # fmt: skip


class Net(nn.Module):
    """Every kind of syncnorm layer that keeps running statistics, in float64.

    ``compilable``: SyncInstanceNorm's running-statistics all_reduce is not traced by
    torch.compile (a graph break), so the compiled case leaves it out.
    """

    def __init__(self, momentum, compilable: bool = False) -> None:
        super().__init__()
        self.bn = syncnorm.SyncBatchNorm(CHANNELS, momentum=momentum)
        self.abn = syncnorm.InPlaceABN(CHANNELS, momentum=momentum, activation="leaky_relu", activation_param=0.1)
        self.inorm = (
            nn.Identity()
            if compilable
            else syncnorm.SyncInstanceNorm2d(CHANNELS, momentum=momentum or 0.1, track_running_stats=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inorm(self.abn(self.bn(x) * 1.5 + 0.5))


def reference(windows_data, momentum):
    """torch's layers, each run once per window on all of that window's inputs to it.

    A layer's inputs are what the layers before it make of each micro-batch: normalised with that
    micro-batch's own global statistics (batch statistics of all ranks' samples together). The
    parameters stay at their initial values (no optimizer step), so they need no copying.
    """
    bn = nn.BatchNorm2d(CHANNELS, momentum=momentum).double()
    abn = nn.BatchNorm2d(CHANNELS, momentum=momentum).double()
    inorm = nn.InstanceNorm2d(CHANNELS, momentum=momentum or 0.1, track_running_stats=True).double()
    batch_stats = lambda x: nn.functional.batch_norm(x, None, None, training=True)  # noqa: E731
    for window in windows_data:
        inputs = {"bn": [], "abn": [], "inorm": []}
        for micro in window:
            x = torch.cat(micro)  # this micro-batch on every rank
            inputs["bn"].append(x)
            inputs["abn"].append(batch_stats(x) * 1.5 + 0.5)
            inputs["inorm"].append(nn.functional.leaky_relu(batch_stats(inputs["abn"][-1]), 0.1))
        for name, layer in (("bn", bn), ("abn", abn), ("inorm", inorm)):
            layer(torch.cat(inputs[name]))
    return {"bn": bn, "abn": abn, "inorm": inorm}


def check_against(state: dict, ref: dict, windows: int) -> None:
    for name, layer in ref.items():
        if f"{name}.running_mean" not in state:
            continue  # the compiled case has no SyncInstanceNorm
        torch.testing.assert_close(state[f"{name}.running_mean"], layer.running_mean, **TOL)
        torch.testing.assert_close(state[f"{name}.running_var"], layer.running_var, **TOL)
    assert state["bn.num_batches_tracked"].item() == windows
    assert state["abn.num_batches_tracked"].item() == windows


def _train_windows(rank, world_size, windows_data, momentum, compiled, no_sync, sharded=False):
    torch.manual_seed(0)
    net = Net(momentum, compilable=compiled).double()
    if sharded:
        fully_shard(net, mesh=init_device_mesh("cpu", (world_size,)))
    model = DistributedDataParallel(net) if no_sync else net
    call = torch.compile(model, fullgraph=True) if compiled else model
    for window in windows_data:
        with syncnorm.accumulate(net):
            for index, micro in enumerate(window):
                last = index == len(window) - 1
                context = model.no_sync() if no_sync and not last else torch.enable_grad()
                with context:
                    call(micro[rank].requires_grad_()).square().mean().backward()
    return {key: value.detach().clone() for key, value in net.named_buffers()}


@pytest.mark.parametrize("windows", [WINDOWS_2, WINDOWS_3], ids=["W2", "W3"])
@pytest.mark.parametrize("momentum", [0.3, None], ids=["momentum", "cumulative"])
def test_each_window_moves_the_statistics_once_as_one_forward_on_all_its_samples(windows, momentum):
    windows_data = data(windows)
    results = run_ranks(_train_windows, len(windows[0][0]), windows_data, momentum, False, False, timeout=300)
    ref = reference(windows_data, momentum)
    for state in results:
        check_against(state, ref, len(windows))


@pytest.mark.parametrize("mode", ["compiled", "ddp_no_sync", "fsdp2"])
def test_windows_under_compile_ddp_no_sync_and_fsdp2(mode):
    windows_data = data(WINDOWS_2)
    flags = (mode == "compiled", mode == "ddp_no_sync", mode == "fsdp2")
    results = run_ranks(_train_windows, 2, windows_data, 0.3, *flags, timeout=400)
    ref = reference(windows_data, 0.3)
    for state in results:
        assert ("inorm.running_mean" in state) == (mode != "compiled")
        check_against(state, ref, len(WINDOWS_2))


def _outputs(rank, world_size, windows_data, in_window):
    torch.manual_seed(0)
    net = Net(0.3).double()
    outputs, grads = [], []
    for window in windows_data:
        with syncnorm.accumulate(net) if in_window else torch.enable_grad():
            for micro in window:
                x = micro[rank].clone().requires_grad_()
                out = net(x)
                out.square().mean().backward()
                outputs.append(out.detach())
                grads.append(x.grad)
    return outputs, grads, [p.grad.clone() for p in net.parameters()]


def test_the_window_leaves_outputs_and_gradients_as_they_are():
    windows_data = data(WINDOWS_2)
    inside = run_ranks(_outputs, 2, windows_data, True)
    outside = run_ranks(_outputs, 2, windows_data, False)
    for a, b in zip(inside, outside):
        for x, y in zip(a[0] + a[1] + a[2], b[0] + b[1] + b[2]):
            assert torch.equal(x, y)


def _eval_and_failure_in_a_window(rank, world_size, windows_data):
    torch.manual_seed(0)
    net = Net(0.3).double()
    (m1, m2, m3) = windows_data[0]
    with syncnorm.accumulate(net):
        net(m1[rank])
        with pytest.raises(ValueError, match="expected 3 channels|channels"):
            net(torch.randn(2, CHANNELS + 1, 4, 4, dtype=torch.float64))  # refused on every rank: not pooled
        net(m2[rank])
        net.eval()  # moves the statistics by m1 and m2 first
        evaluated = net(m3[rank])
        after_eval = {key: value.clone() for key, value in net.state_dict().items()}
        net.train()
        net(m3[rank])
    final = {key: value.clone() for key, value in net.state_dict().items()}
    return evaluated, after_eval, final


def test_eval_in_a_window_moves_the_statistics_first_and_a_failed_forward_is_not_pooled():
    windows_data = data(WINDOWS_2)
    (m1, m2, m3) = windows_data[0]
    first = reference([[m1, m2]], 0.3)
    both = reference([[m1, m2], [m3]], 0.3)
    for evaluated, after_eval, final in run_ranks(_eval_and_failure_in_a_window, 2, windows_data, timeout=300):
        check_against(after_eval, first, 1)
        check_against(final, both, 2)
        # Eval used the statistics of m1 and m2 pooled: torch's layers in eval mode with them.
        for layer in first.values():
            layer.eval()
        expected = [
            first["inorm"](nn.functional.leaky_relu(first["abn"](first["bn"](part) * 1.5 + 0.5), 0.1)) for part in m3
        ]
        assert any(torch.allclose(evaluated, part, **TOL) for part in expected)


def test_windows_do_not_nest_and_a_layer_without_running_statistics_is_left_alone():
    net = nn.Sequential(syncnorm.SyncBatchNorm(2), syncnorm.SyncBatchNorm(2, track_running_stats=False))
    with syncnorm.accumulate(net):
        with pytest.raises(RuntimeError, match="windows do not nest"):
            with syncnorm.accumulate(net):
                pass
        net(torch.randn(4, 2))
        assert net[0].num_batches_tracked.item() == 0  # counted when the window closes
    assert net[0].num_batches_tracked.item() == 1
    assert "_statistics_pool" not in net[0].__dict__ and "_statistics_pool" not in net[1].__dict__


def test_a_window_kept_open_and_closed_by_hand_as_a_framework_would():
    net = nn.Sequential(syncnorm.SyncBatchNorm(2, momentum=0.5))
    reference = nn.BatchNorm1d(2, momentum=0.5)
    first, second = torch.randn(3, 2), torch.randn(5, 2)
    window = syncnorm.accumulate(net)
    net(first)
    net(second)
    window.close()
    window.close()  # idempotent
    reference(torch.cat([first, second]))
    torch.testing.assert_close(net[0].running_mean, reference.running_mean)
    torch.testing.assert_close(net[0].running_var, reference.running_var)
    assert net[0].num_batches_tracked.item() == 1


def _accelerate_recipe(rank, world_size, micro_batches):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), syncnorm.SyncBatchNorm(4, momentum=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the reference can reuse the weights
    model, optimizer = accelerator.prepare(model, optimizer)  # one process: no DDP wrapper
    layer_inputs = []
    model[0].register_forward_hook(lambda module, args, out: layer_inputs.append(out.detach()))
    # The recipe of docs/accumulation.md:
    window = syncnorm.accumulate(model)
    for inputs in micro_batches:
        with accelerator.accumulate(model):
            accelerator.backward(model(inputs).square().mean())
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            window.close()
            window = syncnorm.accumulate(model)
    window.close()
    norm = model[1]
    return layer_inputs, norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.item()


def test_the_accelerate_recipe_moves_the_statistics_once_per_optimizer_step():
    pytest.importorskip("accelerate")
    micro_batches = [torch.randn(n, 3) for n in (3, 5, 2, 4)]
    ((layer_inputs, running_mean, running_var, steps),) = run_ranks(_accelerate_recipe, 1, micro_batches, timeout=300)
    reference = nn.BatchNorm1d(4, momentum=0.5)
    reference(torch.cat(layer_inputs[:2]))
    reference(torch.cat(layer_inputs[2:]))
    torch.testing.assert_close(running_mean, reference.running_mean)
    torch.testing.assert_close(running_var, reference.running_var)
    assert steps == 2


def test_the_lightning_callback_moves_the_statistics_once_per_optimizer_step_partial_window_included(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from syncnorm.lightning import AccumulationCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 4)
            self.norm = syncnorm.SyncBatchNorm(4, momentum=0.5)
            self.inputs: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            hidden = self.linear(batch)
            self.inputs.append(hidden.detach().clone())
            return self.norm(hidden).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: the reference sees the same inputs

    torch.manual_seed(0)
    batches = [torch.randn(n, 3) for n in (3, 5, 2, 4, 6)]  # windows of 2: [3, 5], [2, 4], [6]
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=2, callbacks=[AccumulationCallback()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    reference = nn.BatchNorm1d(4, momentum=0.5)
    inputs = module.inputs
    for window in (inputs[0:2], inputs[2:4], inputs[4:5]):
        reference(torch.cat(window))
    torch.testing.assert_close(module.norm.running_mean, reference.running_mean)
    torch.testing.assert_close(module.norm.running_var, reference.running_var)
    assert module.norm.num_batches_tracked.item() == 3


def test_activation_checkpointing_inside_a_window_pools_each_micro_batch_once():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    norm = syncnorm.SyncBatchNorm(3, momentum=0.5).double()
    reference = nn.BatchNorm1d(3, momentum=0.5).double()
    micro_batches = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (4, 6)]
    with syncnorm.accumulate(norm):
        for x in micro_batches:
            # The backward re-runs the forward: the window must not pool that second run.
            checkpoint(norm, x, use_reentrant=False).square().sum().backward()
    reference(torch.cat([x.detach() for x in micro_batches]))
    torch.testing.assert_close(norm.running_mean, reference.running_mean, **TOL)
    torch.testing.assert_close(norm.running_var, reference.running_var, **TOL)
    assert norm.num_batches_tracked.item() == 1
