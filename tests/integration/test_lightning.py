"""syncnorm.lightning under real Lightning Trainer runs: two CPU ranks (gloo), "ddp" and "ddp_spawn".

The multi-rank runs are real subprocesses (``tests/integration/jobs/lightning_job.py``; Lightning's "ddp" re-runs the
script for rank 1, "ddp_spawn" spawns workers), each writing per-rank results that are compared here
against a single-process float64 ``nn.BatchNorm`` on the global batch. Each run checks several things,
because every run costs seconds of interpreter and Lightning start-up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytorch_lightning")

import pytorch_lightning as pl  # noqa: E402
from helpers.harness import RankError, free_port, launcher_free_env, run_command, run_ranks  # noqa: E402
from jobs.lightning_job import EVAL_SHARD, TRAIN_SHARDS, TinyNet, make_data  # noqa: E402
from pytorch_lightning.utilities.exceptions import MisconfigurationException  # noqa: E402

from syncnorm import convert_sync_batchnorm  # noqa: E402
from syncnorm.lightning import SyncNormCallback, SyncNormPlugin  # noqa: E402
from syncnorm.testing import shard  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
JOB = Path(__file__).resolve().parent / "jobs" / "lightning_job.py"
RUN_TIMEOUT_S = 240
STATS_KEYS = ("net.1.running_mean", "net.1.running_var", "net.5.running_mean", "net.5.running_var")
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def run_job(out: Path, *args: str, expect_success: bool = True) -> subprocess.CompletedProcess:
    """Run lightning_job.py on two ranks; kill the whole process tree (rank 1 included) on timeout."""
    cmd = [sys.executable, str(JOB), "--out", str(out), *args]
    env = launcher_free_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    returncode, output = run_command(cmd, timeout=RUN_TIMEOUT_S, env=env)
    if expect_success:
        assert returncode == 0, f"{' '.join(cmd)} failed ({returncode}):\n{output[-6000:]}"
    return subprocess.CompletedProcess(cmd, returncode, output)


def load_ranks(out: Path, prefix: str = "fit") -> list[dict]:
    return [torch.load(out / f"{prefix}-rank{rank}.pt", weights_only=False) for rank in range(2)]


def plain_model(state: dict) -> TinyNet:
    model = TinyNet()
    model.load_state_dict(state)
    assert [type(m).__name__ for m in model.net if "BatchNorm" in type(m).__name__] == ["BatchNorm2d", "BatchNorm1d"]
    return model


def reference_stats(initial_state: dict, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Running statistics of plain nn.BatchNorm after one training forward on ``batch``, float64."""
    model = plain_model(initial_state).train()
    with torch.no_grad():
        model(batch)
    state = model.state_dict()
    return {key: state[key] for key in STATS_KEYS}


def assert_stats_match(ranks: list[dict], initial_state: dict, batch_per_rank: list[torch.Tensor]) -> None:
    """Each rank trained on its shard and holds the statistics of the batch it was told to sync over."""
    data = make_data()
    for rank, record in enumerate(ranks):
        assert len(record["batches"]) == 1
        torch.testing.assert_close(record["batches"][0], shard(data["train_x"], rank, TRAIN_SHARDS), rtol=0, atol=0)
        assert record["classes_in_fit"] == ["SyncBatchNorm", "SyncBatchNorm"]
        # Callbacks' setup (where SyncNormCallback converts) runs before the strategy wraps the model.
        assert (record["model_at_setup"], record["model_in_fit"]) == ("TinyNet", "DistributedDataParallel")
        assert record["classes_after_fit"] == ["BatchNorm2d", "BatchNorm1d"]  # reverted after fit
        expected = reference_stats(initial_state, batch_per_rank[rank])
        for key in STATS_KEYS:
            torch.testing.assert_close(
                record["state_after_step"][key], expected[key], **TIGHT, msg=f"rank {rank} {key}"
            )
        assert int(record["state_after_step"]["net.1.num_batches_tracked"]) == 1


def global_batch(initial_state: dict) -> list[torch.Tensor]:
    """The batch each rank must have synchronised over: the concatenation of both shards."""
    batch = make_data()["train_x"]
    synced = reference_stats(initial_state, batch)
    local = reference_stats(initial_state, shard(batch, 0, TRAIN_SHARDS))
    # Rank-local statistics are far from the global ones, so an unsynchronised run fails the test.
    assert not torch.allclose(synced["net.1.running_mean"], local["net.1.running_mean"], rtol=1e-3, atol=1e-3)
    return [batch, batch]


def syncnorm_warnings(record: dict) -> list[tuple[str, str]]:
    return [(cat, msg) for cat, msg in record["warnings"] if "syncnorm" in msg.lower() or "SyncNorm" in cat]


def test_ddp_plugin_syncs_checkpoints_and_evaluates(tmp_path):
    """Plugin + monitor under "ddp": global statistics, silent monitor, portable checkpoint, validate/test."""
    run_job(tmp_path, "--strategy", "ddp", "--mode", "both", "--eval")
    ranks = load_ranks(tmp_path)
    initial = torch.load(tmp_path / "initial_state.pt")
    assert_stats_match(ranks, initial, global_batch(initial))
    assert torch.equal(
        ranks[0]["state_after_step"]["net.1.running_var"], ranks[1]["state_after_step"]["net.1.running_var"]
    )
    for record in ranks:
        assert syncnorm_warnings(record) == []
        assert record["metrics"] == {
            "syncnorm/num_sync_layers": 2.0,
            "syncnorm/max_drift": 0.0,
            "syncnorm/global_batch_size": float(sum(TRAIN_SHARDS)),
        }

    # The checkpoint ModelCheckpoint wrote during DDP training loads into a plain single-process model.
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    model = plain_model(torch.load(checkpoint, weights_only=False)["state_dict"]).eval()
    with torch.no_grad():
        probe = model(make_data()["probe_x"])
    for record in ranks:
        torch.testing.assert_close(probe, record["probe_out"], **TIGHT)

    # trainer.validate / trainer.test under DDP after fit: the sync_dist mean of the equal-sized
    # per-rank losses equals the loss of the single-process model over the whole eval set.
    data = make_data()
    with torch.no_grad():
        expected_loss = F.cross_entropy(model(data["eval_x"]), data["eval_y"]).item()
    assert len(data["eval_x"]) == 2 * EVAL_SHARD
    for evaluation in load_ranks(tmp_path, "eval"):
        assert evaluation["classes"] == ["BatchNorm2d", "BatchNorm1d"]
        assert evaluation["validate"][0]["val_loss"] == pytest.approx(expected_loss, rel=1e-10)
        assert evaluation["test"][0]["test_loss"] == pytest.approx(expected_loss, rel=1e-10)


def test_ddp_spawn_callback_alone_syncs_and_warns_on_drift(tmp_path):
    """The callback converts without the plugin; a drift planted on rank 1 is reported, naming layer and rank."""
    run_job(tmp_path, "--strategy", "ddp_spawn", "--mode", "callback", "--plant-drift", "--on-drift", "warn")
    ranks = load_ranks(tmp_path)
    initial = torch.load(tmp_path / "initial_state.pt")
    assert_stats_match(ranks, initial, global_batch(initial))
    (warning,) = syncnorm_warnings(ranks[0])  # the first rank of the group warns, once
    assert warning[0] == "SyncNormDriftWarning"
    assert "layer 'net.1' running_mean: ranks [1] differ from rank 0" in warning[1]
    assert "net.5" not in warning[1] and "running_var" not in warning[1]
    assert syncnorm_warnings(ranks[1]) == []
    for record in ranks:
        assert "error" not in record
        assert record["metrics"]["syncnorm/max_drift"] == pytest.approx(0.5)  # the planted +0.5 on channel 0


def test_ddp_spawn_plugin_alone_syncs(tmp_path):
    run_job(tmp_path, "--strategy", "ddp_spawn", "--mode", "plugin")
    ranks = load_ranks(tmp_path)
    initial = torch.load(tmp_path / "initial_state.pt")
    assert_stats_match(ranks, initial, global_batch(initial))
    for record in ranks:
        assert record["metrics"] == {}  # no callback: nothing logged


def test_ddp_callback_alone_syncs_and_raises_on_drift(tmp_path):
    args = ("--strategy", "ddp", "--mode", "callback", "--plant-drift", "--on-drift", "raise")
    result = run_job(tmp_path, *args, expect_success=False)
    assert result.returncode != 0
    assert "SyncNormMismatchError" in result.stdout and "layer 'net.1' running_mean: ranks [1] differ" in result.stdout
    # Both ranks raise; rank 0 (the launching process) records it before Lightning kills rank 1,
    # which may or may not have written its record by then.
    written = sorted(tmp_path.glob("fit-rank*.pt"))
    assert tmp_path / "fit-rank0.pt" in written, result.stdout[-4000:]
    initial = torch.load(tmp_path / "initial_state.pt")
    batch = make_data()["train_x"]
    for path in written:
        record = torch.load(path, weights_only=False)
        expected = reference_stats(initial, batch)
        for key in STATS_KEYS:  # synchronised before the drift was planted
            torch.testing.assert_close(record["state_after_step"][key], expected[key], **TIGHT)
        assert record["classes_in_fit"] == ["SyncBatchNorm", "SyncBatchNorm"]
        name, message = record["error"]
        assert name == "SyncNormMismatchError"
        assert "layer 'net.1' running_mean: ranks [1] differ from rank 0" in message


def test_ddp_group_size_syncs_within_blocks_only(tmp_path):
    """group_size=1 on two ranks: each rank normalises alone, and the monitor compares within groups only."""
    run_job(tmp_path, "--strategy", "ddp", "--mode", "both", "--group-size", "1")
    ranks = load_ranks(tmp_path)
    batch = make_data()["train_x"]
    local_batches = [shard(batch, rank, TRAIN_SHARDS) for rank in range(2)]
    assert_stats_match(ranks, torch.load(tmp_path / "initial_state.pt"), local_batches)
    for rank, record in enumerate(ranks):
        assert syncnorm_warnings(record) == []  # statistics differ across ranks, but not within a group
        assert record["metrics"]["syncnorm/global_batch_size"] == TRAIN_SHARDS[rank]


# --- single-process checks (in this process, one CPU device) ----------------------------------


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False)
    defaults.update(enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kwargs})


def test_sync_batchnorm_true_with_plugin_is_refused():
    # Lightning itself refuses a second layer-sync plugin next to sync_batchnorm=True.
    with pytest.raises(MisconfigurationException, match="sync_batchnorm=True.*SyncNormPlugin.*Choose one"):
        pl.Trainer(accelerator="cpu", devices=1, sync_batchnorm=True, plugins=[SyncNormPlugin()], logger=False)


def test_sync_batchnorm_true_with_callback_explains(tmp_path):
    trainer = _trainer(tmp_path, sync_batchnorm=True, callbacks=[SyncNormCallback()])
    with pytest.raises(ValueError, match=r"Remove sync_batchnorm=True"):
        trainer.fit(TinyNet())


def test_single_device_ignores_plugin_callback_says_so_and_converts(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, plugins=[SyncNormPlugin()], callbacks=[SyncNormCallback(check_every_n_steps=1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    messages = [str(w.message) for w in caught if "SyncNormPlugin has no effect" in str(w.message)]
    assert len(messages) == 1 and "SingleDeviceStrategy" in messages[0] and "nothing to synchronise" in messages[0]
    assert [type(m).__name__ for m in model.net if "BatchNorm" in type(m).__name__] == ["BatchNorm2d", "BatchNorm1d"]
    expected = reference_stats(initial, shard(make_data()["train_x"], 0, TRAIN_SHARDS))
    for key in STATS_KEYS:
        torch.testing.assert_close(model.state_dict()[key], expected[key], **TIGHT)
    assert trainer.callback_metrics["syncnorm/num_sync_layers"] == 2
    assert trainer.callback_metrics["syncnorm/global_batch_size"] == TRAIN_SHARDS[0]


def test_options_are_validated():
    with pytest.raises(ValueError, match="either process_group or group_size"):
        SyncNormPlugin(process_group=object(), group_size=2)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        SyncNormPlugin(group_size=0)
    with pytest.raises(ValueError, match='on_drift must be "warn" or "raise"'):
        SyncNormCallback(on_drift="ignore")
    with pytest.raises(ValueError, match="check_every_n_steps"):
        SyncNormCallback(check_every_n_steps=-1)


def test_import_without_lightning_names_the_extra():
    """In a fresh interpreter where pytorch_lightning and lightning cannot be imported."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoLightning(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pytorch_lightning", "lightning"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoLightning())
        import syncnorm
        layer = syncnorm.SyncBatchNorm(3)  # the core package works without Lightning
        assert "pytorch_lightning" not in sys.modules
        try:
            import syncnorm.lightning
        except ImportError as err:
            print("IMPORT ERROR:", type(err).__name__, err)
        else:
            print("IMPORTED")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("IMPORT ERROR: ImportError"), result.stdout
    assert 'pip install "syncnorm[lightning]"' in result.stdout


def _monitor_after_one_step(rank: int, world_size: int, poison: bool):
    """One synchronised training forward, then (optionally) NaN in rank 1's running_var, then a check."""
    torch.manual_seed(0)
    model = convert_sync_batchnorm(TinyNet())
    monitor = SyncNormCallback(on_drift="raise")
    monitor.on_train_start(None, model)  # finds the layers and hooks the first one; uses no trainer state
    model(shard(make_data()["train_x"], rank, TRAIN_SHARDS))
    if poison and rank == 1:
        model.net[5].running_var[2] = float("nan")
    return monitor.check_running_stats()


def test_monitor_check_names_non_finite_statistics():
    clean = run_ranks(_monitor_after_one_step, 2, False)
    for metrics in clean:
        assert metrics == {
            "syncnorm/num_sync_layers": 2.0,
            "syncnorm/max_drift": 0.0,
            "syncnorm/global_batch_size": float(sum(TRAIN_SHARDS)),
        }
    poisoned = run_ranks(_monitor_after_one_step, 2, True, expect_errors=True)
    for outcome in poisoned:  # every rank reaches the same verdict, so none is left waiting
        assert isinstance(outcome, RankError) and outcome.type_name == "SyncNormMismatchError", outcome
        assert "layer 'net.5' running_var: NaN/Inf on ranks [1]" in outcome.message
        assert "net.1" not in outcome.message and "training diverged" in outcome.message
