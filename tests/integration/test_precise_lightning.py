"""PreciseBNCallback in a real Lightning fit on two CPU ranks ("ddp", gloo, syncnorm's plugin).

The job (``tests/integration/jobs/precise_lightning_job.py``) records the model's state at each validation and
after fit; here the population statistics are recomputed from those weights by hand (each
BatchNorm input normalised with its own step's batch statistics over both ranks' batches,
dropout off) and compared with what the callback left in the model.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytorch_lightning")

from helpers.harness import free_port, launcher_free_env, run_command  # noqa: E402
from jobs.precise_lightning_job import BATCH, EPOCHS, NUM_BATCHES, TRAIN_SHARDS, make_data  # noqa: E402

from syncnorm.lightning_precise import PreciseBNCallback  # noqa: E402
from syncnorm.testing import shard  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
JOB = Path(__file__).resolve().parent / "jobs" / "precise_lightning_job.py"
RUN_TIMEOUT_S = 240
TIGHT = dict(rtol=1e-10, atol=1e-12)


def run_job(out: Path) -> str:
    cmd = [sys.executable, str(JOB), "--out", str(out)]
    env = launcher_free_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    returncode, output = run_command(cmd, timeout=RUN_TIMEOUT_S, env=env)
    assert returncode == 0, f"{' '.join(cmd)} failed ({returncode}):\n{output[-6000:]}"
    return output


def _normalise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight.view(shape) + bias.view(shape)


def reference_stats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Population statistics of both BatchNorm inputs, from the weights in ``state``, by hand."""
    x_all = make_data()["train_x"]
    steps = [
        torch.cat([shard(x_all, rank, TRAIN_SHARDS)[t * BATCH : (t + 1) * BATCH] for rank in range(2)])
        for t in range(NUM_BATCHES)
    ]
    seen: dict[str, list[torch.Tensor]] = {"net.1": [], "net.6": []}
    for x in steps:
        h = F.conv2d(x, state["net.0.weight"], state["net.0.bias"], padding=1)
        seen["net.1"].append(h.transpose(0, 1).reshape(h.shape[1], -1))
        h = F.relu(_normalise(h, state["net.1.weight"], state["net.1.bias"])).flatten(1)  # dropout off
        h = F.linear(h, state["net.5.weight"], state["net.5.bias"])
        seen["net.6"].append(h.t())
    out = {}
    for name, chunks in seen.items():
        values = torch.cat(chunks, 1)
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = values.mean(1), values.var(1)
    return out


def assert_precise(state: dict[str, torch.Tensor], where: str) -> None:
    for key, expected in reference_stats(state).items():
        torch.testing.assert_close(state[key], expected, **TIGHT, msg=f"{where} {key}")


@pytest.mark.timeout(300)
def test_callback_in_a_two_rank_ddp_fit_sets_population_statistics_before_validation_and_at_the_end(tmp_path):
    run_job(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, record in enumerate(ranks):
        assert [(epoch, step) for epoch, step, _ in record["at_validation"]] == [(0, 2), (1, 4)]
        for epoch, _, state in record["at_validation"]:
            assert_precise(state, f"rank {rank}, validation of epoch {epoch}")
        # The end-of-fit run is at the step of the last epoch-end run: skipped, nothing moved.
        final = record["final"]
        assert all(torch.equal(final[k], v) for k, v in record["at_validation"][-1][2].items())
        assert_precise(final, f"rank {rank}, after fit")
        assert int(final["net.1.num_batches_tracked"]) == EPOCHS * 2  # training's count, untouched
        assert [h["epoch"] for h in record["history"]] == [0.0, 1.0]
        assert all(
            h["precise_bn/batches"] == 2 * NUM_BATCHES and h["precise_bn/max_mean_change"] > 0
            for h in record["history"]
        )
        assert record["classes"] == ["BatchNorm2d", "BatchNorm1d"]  # the plugin reverted them after fit
        assert all(record["modes"])  # the callback put every module back in training mode
    for key, value in ranks[0]["final"].items():
        assert torch.equal(ranks[1]["final"][key], value), f"{key} differs between the ranks"
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("precise_bn/max_mean_change")]
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert all(float(row["precise_bn/batches"]) == 2 * NUM_BATCHES for row in rows)


def test_callback_arguments_are_checked():
    for kwargs, message in [
        (dict(num_batches=0), "num_batches must be a positive int"),
        (dict(every_n_epochs=-1), "every_n_epochs must be an int >= 0"),
        (dict(other_modules="train"), 'other_modules must be "eval" or "as_is"'),
        (dict(every_n_epochs=0, at_train_end=False), "it would never run"),
    ]:
        with pytest.raises(ValueError, match=message):
            PreciseBNCallback(**kwargs)
