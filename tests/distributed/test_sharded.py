"""syncnorm beyond DDP: FSDP2 (``fully_shard``), DeviceMesh process groups, distributed checkpoints.

Every check runs on real gloo ranks (tests/helpers/harness.py) and compares against an
independent reference: plain ``nn.BatchNorm2d`` on the global batch (or on one
mesh group's batch) in a single process, in float64.

Why per-rank ``mean`` losses reproduce the global-batch reference: with equal
per-rank batches the global mean loss is the average of the per-rank mean
losses. syncnorm's backward all_reduce makes each rank's gradient the gradient
of the *sum* of all ranks' losses (restricted to its own share of a parameter),
and FSDP/DDP average over ranks: sum over ranks / W = gradient of the average.
"""

from __future__ import annotations

import pytest
import torch

# DDP and fully_shard import torch._dynamo on first use (seconds per rank on a loaded 2-core
# machine); importing it here, before the harness forks the ranks, lets every rank inherit it.
import torch._dynamo  # noqa: F401
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from helpers.harness import run_ranks, shard
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
    from torch.distributed._composable.fsdp import fully_shard

import syncnorm
from syncnorm.functional import sync_batch_norm

# torch < 2.6 runs FSDP2 on CUDA only ("FSDP requires CUDA for streams").
CPU_FSDP2 = pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6), reason="FSDP2 on CPU needs torch >= 2.6"
)

WORLD = 2
PER_RANK = 4
STEPS = 3
LR = 0.1
MOMENTUM = 0.9
# float64 end to end: FSDP's reduce-scatter and syncnorm's all_reduce sum in a different
# order than the single-process reference, so equality holds to rounding, not bitwise.
TOL = dict(rtol=1e-10, atol=1e-12)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def make_net(seed: int) -> nn.Sequential:
    """Two conv+BN blocks and a linear head, float64, initialised from ``seed``."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return nn.Sequential(conv_block(3, 4), conv_block(4, 6), head).double()


def make_batches(steps: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1,
            torch.randn(batch, 3, generator=generator, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def shard_with_fsdp2(model: nn.Sequential, mesh) -> nn.Sequential:
    """Convert to syncnorm, then ``fully_shard`` every block and the root (the FSDP2 recipe)."""
    syncnorm.convert_sync_batchnorm(model, process_group=mesh)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers()}


# --- FSDP2 training equals single-process training on the global batch ---------------------------


def _fsdp2_training_rank(rank, world_size, batches):
    mesh = init_device_mesh("cpu", (world_size,))
    model = shard_with_fsdp2(make_net(seed=0), mesh)
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sizes = [PER_RANK] * world_size
    for inputs, targets in batches:
        optimiser.zero_grad()
        F.mse_loss(model(shard(inputs, rank, sizes)), shard(targets, rank, sizes)).backward()
        optimiser.step()
    return {
        "mesh_group_is_default": mesh.get_group() is dist.group.WORLD,
        "params": {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()},
        "param_types": {type(p).__name__ for p in model.parameters()},
        "buffer_types": {type(b).__name__ for b in model.buffers()},
        "buffers": buffers_of(model),
    }


def _reference_training(batches) -> nn.Module:
    model = make_net(seed=0)
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for inputs, targets in batches:
        optimiser.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        optimiser.step()
    return model


@CPU_FSDP2
def test_fsdp2_training_matches_single_process_on_global_batch():
    batches = make_batches(STEPS, WORLD * PER_RANK, seed=11)
    results = run_ranks(_fsdp2_training_rank, WORLD, batches)
    reference = _reference_training(batches)
    reference_params = dict(reference.named_parameters())
    reference_buffers = buffers_of(reference)

    for rank, result in enumerate(results):
        # init_device_mesh reuses the harness's default group instead of making a new one.
        assert result["mesh_group_is_default"], rank
        assert result["param_types"] == {"DTensor"}, "fully_shard did not shard the parameters"
        assert result["buffer_types"] == {"Tensor"}, "running statistics must stay plain replicated buffers"
        for name, param in result["params"].items():
            torch.testing.assert_close(param, reference_params[name].detach(), **TOL, msg=f"rank {rank} {name}")
        for name, buf in result["buffers"].items():
            torch.testing.assert_close(buf, reference_buffers[name], **TOL, msg=f"rank {rank} {name}")
        assert int(result["buffers"]["0.1.num_batches_tracked"]) == STEPS
    for name, buf in results[0]["buffers"].items():
        assert torch.equal(buf, results[1]["buffers"][name]), f"{name} differs between ranks"
    # The parameters really moved (a no-op training loop would also "agree").
    assert not torch.allclose(reference_params["0.0.weight"], make_net(seed=0)[0][0].weight)


# --- a 1-D slice of a 2-D mesh; a whole 2-D mesh is refused ---------------------------------------

CHANNELS = 3
GROUP_SIZES = [2, 3]  # samples of the rank at dp index 0 and 1 (unequal on purpose)
MESH_STEPS = 2


def _error_of(call) -> tuple[str, str]:
    try:
        call()
    except Exception as err:
        return type(err).__name__, str(err)
    return "no error", ""


def _mesh_rank(rank, world_size, inputs, upstreams, weight, bias):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_mesh = mesh["dp"]
    probe = inputs[0][rank]
    # The refusals come first: they must raise on every rank before any collective, or the
    # synchronised work below would hang or mix up its all_reduces.
    whole_mesh_layer = syncnorm.SyncBatchNorm(CHANNELS, process_group=mesh, dtype=torch.float64)
    plain_model = nn.Sequential(nn.BatchNorm2d(CHANNELS))
    errors = {
        "module": _error_of(lambda: whole_mesh_layer(probe)),
        "functional": _error_of(
            lambda: sync_batch_norm(probe, None, None, training=True, process_group=mesh, layer="probe")
        ),
        "convert": _error_of(lambda: syncnorm.convert_sync_batchnorm(plain_model, process_group=mesh)),
    }

    layer = syncnorm.SyncBatchNorm(CHANNELS, process_group=dp_mesh, dtype=torch.float64)
    converted = syncnorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(CHANNELS)).double(), dp_mesh)
    with torch.no_grad():
        for module in (layer, converted[0]):
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    running_mean = torch.zeros(CHANNELS, dtype=torch.float64)
    running_var = torch.ones(CHANNELS, dtype=torch.float64)
    steps = []
    for step_inputs, step_upstreams in zip(inputs, upstreams):
        x = step_inputs[rank].clone().requires_grad_()
        layer.weight.grad = None
        out = layer(x)
        (out * step_upstreams[rank]).sum().backward()
        functional_out = sync_batch_norm(
            step_inputs[rank], running_mean, running_var, weight, bias, True, 0.1, 1e-5, dp_mesh, layer="fn"
        )
        converted(step_inputs[rank])
        steps.append(
            {"out": out.detach(), "grad_x": x.grad, "grad_w": layer.weight.grad.clone(), "fn_out": functional_out}
        )
    return {
        "dp_ranks": dist.get_process_group_ranks(dp_mesh.get_group()),
        "errors": errors,
        "tracked_after_refusal": int(whole_mesh_layer.num_batches_tracked),
        "convert_refusal_left_model": type(plain_model[0]).__name__,
        "converted_group_is_mesh": converted[0].process_group is dp_mesh,
        "steps": steps,
        "module_stats": (layer.running_mean.clone(), layer.running_var.clone()),
        "functional_stats": (running_mean, running_var),
        "converted_stats": (converted[0].running_mean.clone(), converted[0].running_var.clone()),
    }


@pytest.fixture(scope="module")
def mesh_run():
    """Four ranks on a (dp=2, tp=2) mesh; tp=1 data sits near 100, tp=0 data near 0."""
    generator = torch.Generator().manual_seed(7)
    rank_sizes = [GROUP_SIZES[rank // 2] for rank in range(4)]  # rank = dp * 2 + tp

    def rank_batch(rank, size, scale):
        offset, spread = (100.0, 5.0) if rank % 2 else (0.0, 1.0)
        return torch.randn(size, CHANNELS, 3, 3, generator=generator, dtype=torch.float64) * spread * scale + offset

    inputs = [[rank_batch(r, n, 1.0) for r, n in enumerate(rank_sizes)] for _ in range(MESH_STEPS)]
    upstreams = [[torch.randn(n, CHANNELS, 3, 3, generator=generator, dtype=torch.float64) for n in rank_sizes]]
    upstreams.append([torch.randn_like(u) for u in upstreams[0]])
    weight = torch.rand(CHANNELS, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(CHANNELS, generator=generator, dtype=torch.float64)
    results = run_ranks(_mesh_rank, 4, inputs, upstreams, weight, bias)
    return results, inputs, upstreams, weight, bias


def _reference_group(ranks, inputs, upstreams, weight, bias):
    """nn.BatchNorm2d on the concatenation of one dp group's batches, in dp order."""
    bn = nn.BatchNorm2d(CHANNELS).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    steps = []
    for step_inputs, step_upstreams in zip(inputs, upstreams):
        x = torch.cat([step_inputs[r] for r in ranks]).requires_grad_()
        bn.weight.grad = None
        out = bn(x)
        (out * torch.cat([step_upstreams[r] for r in ranks])).sum().backward()
        sizes = [step_inputs[r].shape[0] for r in ranks]
        steps.append(
            {
                "out": [shard(out.detach(), i, sizes) for i in range(len(ranks))],
                "grad_x": [shard(x.grad, i, sizes) for i in range(len(ranks))],
                "grad_w": bn.weight.grad.clone(),
            }
        )
    return steps, (bn.running_mean, bn.running_var)


def test_dp_slice_of_2d_mesh_synchronises_within_its_group_only(mesh_run):
    results, inputs, upstreams, weight, bias = mesh_run
    group_means = []
    for ranks in ([0, 2], [1, 3]):
        ref_steps, ref_stats = _reference_group(ranks, inputs, upstreams, weight, bias)
        group_means.append(ref_stats[0])
        for position, rank in enumerate(ranks):
            result = results[rank]
            assert result["dp_ranks"] == ranks, "init_device_mesh no longer lays ranks out as dp * 2 + tp"
            assert result["converted_group_is_mesh"]
            for step, ref in zip(result["steps"], ref_steps):
                torch.testing.assert_close(step["out"], ref["out"][position], **TOL)
                torch.testing.assert_close(step["fn_out"], ref["out"][position], **TOL)
                torch.testing.assert_close(step["grad_x"], ref["grad_x"][position], **TOL)
            for form in ("module_stats", "functional_stats", "converted_stats"):
                for got, want in zip(result[form], ref_stats):
                    torch.testing.assert_close(got, want, **TOL, msg=f"rank {rank} {form}")
        # weight gradients are each rank's share: they add up to the group's gradient.
        for step_index, ref in enumerate(ref_steps):
            total = sum(results[rank]["steps"][step_index]["grad_w"] for rank in ranks)
            torch.testing.assert_close(total, ref["grad_w"], **TOL)
        for got, other in zip(results[ranks[0]]["module_stats"], results[ranks[1]]["module_stats"]):
            assert torch.equal(got, other), f"running stats differ inside dp group {ranks}"
    # The groups' data are far apart, so any mixing over tp would have moved these by ~50.
    assert (group_means[1] - group_means[0]).abs().min() > 10


def test_whole_2d_mesh_is_refused_with_a_hint(mesh_run):
    results = mesh_run[0]
    for rank, result in enumerate(results):
        for form, (type_name, message) in result["errors"].items():
            assert type_name == "ValueError", f"rank {rank} {form}: {type_name} {message}"
            assert "2-D DeviceMesh" in message and 'mesh["<name>"]' in message and "'dp'" in message, message
        assert result["tracked_after_refusal"] == 0, "a refused forward must not count a batch"
        assert result["convert_refusal_left_model"] == "BatchNorm2d", "convert must fail before changing the model"


# --- distributed checkpoint of an FSDP2 model with syncnorm layers ---------------------------------


def _checkpoint_rank(rank, world_size, folder, batches, eval_inputs):
    mesh = init_device_mesh("cpu", (world_size,))
    model = shard_with_fsdp2(make_net(seed=0), mesh)
    optimiser = torch.optim.SGD(model.parameters(), lr=LR)
    sizes = [PER_RANK] * world_size
    for inputs, targets in batches:  # train a little so the running stats are not their defaults
        optimiser.zero_grad()
        F.mse_loss(model(shard(inputs, rank, sizes)), shard(targets, rank, sizes)).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        before = model(eval_inputs)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=folder)

    fresh = shard_with_fsdp2(make_net(seed=1), mesh).eval()
    with torch.no_grad():
        fresh_out = fresh(eval_inputs)
    state = {"model": get_model_state_dict(fresh)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(fresh, state["model"])
    with torch.no_grad():
        after = fresh(eval_inputs)
    return {"before": before, "fresh": fresh_out, "after": after, "buffers": buffers_of(fresh)}


@CPU_FSDP2
def test_distributed_checkpoint_round_trip(tmp_path):
    batches = make_batches(2, WORLD * PER_RANK, seed=5)
    eval_inputs = make_batches(1, 5, seed=6)[0][0]
    results = run_ranks(_checkpoint_rank, WORLD, str(tmp_path), batches, eval_inputs)
    # Independent reader: the same checkpoint loaded into a plain single-process BatchNorm model
    # (state_dict keys of syncnorm layers are BatchNorm's).
    plain = make_net(seed=2).eval()
    state = {"model": plain.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    plain.load_state_dict(state["model"])
    with torch.no_grad():
        plain_out = plain(eval_inputs)
    for rank, result in enumerate(results):
        assert not torch.allclose(result["fresh"], result["before"]), "the fresh model must start different"
        assert torch.equal(result["after"], result["before"]), f"rank {rank}: reload changed eval outputs"
        torch.testing.assert_close(plain_out, result["before"], **TOL)
        assert int(result["buffers"]["0.1.num_batches_tracked"]) == len(batches)
    assert torch.equal(results[0]["buffers"]["1.1.running_var"], results[1]["buffers"]["1.1.running_var"])
