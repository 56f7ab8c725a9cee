"""syncnorm under Lightning Fabric, Hugging Face Accelerate and Ray Train: real two-rank CPU runs (gloo).

Each test runs ``tests/integration/jobs/framework_job.py`` under the framework's own launcher (Fabric's script launcher,
``accelerate launch``, a local Ray instance with ``TorchTrainer``), following the recipe of
docs/frameworks.md, and compares what the ranks end with against a plain single-process float64
``nn.BatchNorm`` model trained with the same optimiser on the same global batches: the concatenation,
step by step, of the inputs the ranks report they trained on (and those are checked to be a disjoint
split of the data set, so the framework really sharded it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.harness import free_port, launcher_free_env, run_command
from jobs.framework_job import LR, MOMENTUM, STEPS, WORLD, make_data, make_model, norm_classes

JOBS = Path(__file__).resolve().parent / "jobs"
REPO = Path(__file__).resolve().parents[2]
JOB = JOBS / "framework_job.py"
RUN_TIMEOUT_S = 240
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# bfloat16 keeps 8 significant bits (relative rounding 2**-8): after three steps the bf16 run is within
# 1e-2 of float64; an unsynchronised run is more than 0.1 away in its running statistics.
BF16 = {"rtol": 2e-2, "atol": 2e-2}


def run_job(cmd: list[str], out: Path) -> str:
    """Run one framework job; on timeout kill its whole process tree (the other rank included)."""
    env = launcher_free_env(MASTER_ADDR="127.0.0.1", PYTHONPATH=str(JOBS), RAY_USAGE_STATS_ENABLED="0")
    returncode, output = run_command(cmd, timeout=RUN_TIMEOUT_S, env=env)
    assert returncode == 0, f"{' '.join(cmd)} failed ({returncode}):\n{output[-6000:]}"
    return output


def load_ranks(out: Path, framework: str) -> list[dict]:
    return [torch.load(out / f"{framework}-rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def global_batches(ranks: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Step k's global batch: the ranks' step-k samples in rank order, as float64 originals from the data set.

    The samples must split the data set exactly: a real, disjoint sharding by the framework.
    """
    data_x, data_y = make_data()
    for rank, record in enumerate(ranks):
        assert len(record["seen"]) == STEPS, f"rank {rank} took {len(record['seen'])} steps, not {STEPS}"
    rows = data_x.to(ranks[0]["seen"][0][0].dtype).flatten(1)  # a float32 run saw the rounded samples
    inputs, targets, order = [], [], []
    for step in range(STEPS):
        x = torch.cat([record["seen"][step][0] for record in ranks]).flatten(1)
        index = torch.tensor([int(torch.nonzero((rows == row).all(1)).item()) for row in x])
        assert torch.equal(torch.cat([record["seen"][step][1] for record in ranks]), data_y[index])
        inputs.append(data_x[index])
        targets.append(data_y[index])
        order += index.tolist()
    assert sorted(order) == list(range(len(data_x))), f"samples seen, step by step: {order}"
    return inputs, targets


def single_process_state(inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain nn.BatchNorm model, float64, one process: the same SGD steps on the given batches."""
    model = make_model().train()
    assert norm_classes(model) == ["BatchNorm2d", "BatchNorm1d"]
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in zip(inputs, targets):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_against_single_process(
    ranks: list[dict], framework: str, dtype: torch.dtype = torch.float64, tolerance: dict = TIGHT
) -> None:
    """Each rank's parameters and running statistics against a float64 single-process run; ranks bitwise equal."""
    for rank, record in enumerate(ranks):
        assert record["classes"] == ["SyncBatchNorm", "SyncBatchNorm"], f"rank {rank}: {record['classes']}"
        assert record["wrapper"] == "DistributedDataParallel", f"rank {rank}: wrapped in {record['wrapper']}"
        assert (record["world_size"], record["backend"]) == (WORLD, "gloo")
        assert record["param_dtypes"] == [str(dtype)]
    inputs, targets = global_batches(ranks)
    expected = single_process_state(inputs, targets)
    # Control: rank 0's half of the batches alone, unsynchronised, gives other running statistics,
    # so a run whose layers did not synchronise fails below.
    half = len(ranks[0]["seen"][0][0])
    local = single_process_state([x[:half] for x in inputs], [y[:half] for y in targets])
    control = float((local["features.1.running_mean"] - expected["features.1.running_mean"]).abs().max())
    assert control > 5 * tolerance["atol"], f"control too close to the synchronised reference: {control}"

    diffs = {"parameters": 0.0, "running statistics": 0.0}
    for rank, record in enumerate(ranks):
        state = record["state"]
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert tensor.dtype == (torch.int64 if "num_batches" in name else dtype), f"{name}: {tensor.dtype}"
            reference = expected[name].to(tensor.dtype)
            torch.testing.assert_close(
                tensor, reference, **tolerance, msg=lambda m, r=rank, n=name: f"{framework} rank {r} {n}: {m}"
            )
            kind = "running statistics" if "running" in name else "parameters" if "num_batches" not in name else None
            if kind:
                diffs[kind] = max(diffs[kind], float((tensor.double() - expected[name]).abs().max()))
        assert int(state["features.1.num_batches_tracked"]) == STEPS
    for name, tensor in ranks[0]["state"].items():  # every rank holds the very same numbers
        assert torch.equal(tensor, ranks[1]["state"][name]), f"{framework}: {name} differs between ranks"
    print(f"\n{framework}: max |diff| vs one process, " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))


def test_fabric_ddp_matches_single_process(tmp_path):
    """Fabric(strategy="ddp", precision="64-true"), its script launcher, setup_dataloaders' DistributedSampler."""
    pytest.importorskip("lightning_fabric", reason='Lightning Fabric is not installed (pip install "syncnorm[fabric]")')
    run_job([sys.executable, str(JOB), "fabric", "--out", str(tmp_path)], tmp_path)
    check_against_single_process(load_ranks(tmp_path, "fabric"), "fabric")


def accelerate_launch(out: Path, mixed_precision: str) -> list[dict]:
    pytest.importorskip("accelerate", reason='Accelerate is not installed (pip install "syncnorm[accelerate]")')
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert launcher, "the accelerate package is installed but its `accelerate` command is not on PATH"
    # `--cpu` would pick Accelerate's single-process (or mpirun) launcher; `--multi_gpu` is its torch
    # elastic launcher, which starts the processes; the script's Accelerator(cpu=True) then joins them on gloo.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1"]
    cmd += ["--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    run_job([*cmd, str(JOB), "accelerate", "--mixed-precision", mixed_precision, "--out", str(out)], out)
    ranks = load_ranks(out, "accelerate")
    for record in ranks:
        assert (record["distributed_type"], record["mixed_precision"]) == ("DistributedType.MULTI_CPU", mixed_precision)
    return ranks


def test_accelerate_matches_single_process(tmp_path):
    """accelerate launch of Accelerator(cpu=True), float64: MULTI_CPU on gloo, Accelerate's own batch sharding."""
    ranks = accelerate_launch(tmp_path, "no")
    assert ranks[0]["norm_input_dtypes"] == ["torch.float64"]
    check_against_single_process(ranks, "accelerate")


def test_accelerate_bf16_mixed_precision(tmp_path):
    """Accelerate's mixed_precision="bf16" on CPU: the layers get bf16 inputs under autocast and keep float32 state."""
    ranks = accelerate_launch(tmp_path, "bf16")
    for record in ranks:
        assert record["norm_input_dtypes"] == ["torch.bfloat16"]  # autocast really was on
    check_against_single_process(ranks, "accelerate bf16", dtype=torch.float32, tolerance=BF16)


def test_ray_train_matches_single_process(tmp_path):
    """TorchTrainer with ScalingConfig(num_workers=2, use_gpu=False) on a local Ray instance the job starts and stops."""
    pytest.importorskip("ray.train.torch", reason='Ray Train is not installed (pip install "syncnorm[ray]")')
    run_job([sys.executable, str(JOB), "ray", "--out", str(tmp_path)], tmp_path)
    ranks = load_ranks(tmp_path, "ray")
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two worker processes, not one
    check_against_single_process(ranks, "ray")
