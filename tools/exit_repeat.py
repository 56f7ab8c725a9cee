"""Repeated-exit check: run short jobs many times in a row and count how they exit.

A job that trains fine can still fail at the very end: gloo aborts a process ("terminate called
without an active exception", exit status 134 / -6) when its worker thread lets go of a tensor
after the interpreter has begun to shut down (see ``src/syncnorm/collectives.py``). One run says
little; this script repeats each job and reports the exit codes it saw.

Jobs (``--jobs``, comma separated):

* ``lightning-none``, ``lightning-plugin``, ``lightning-callback``, ``lightning-both``: a tiny
  ``Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5)`` fit, without syncnorm,
  with ``SyncNormPlugin()``, with ``SyncNormCallback(check_every_n_steps=2, on_drift="raise")``
  or with both; nothing after ``fit``.
* ``lightning-both-destroy``: as ``lightning-both``, then ``torch.distributed.destroy_process_group()``
  (enough where nothing else holds the group; docs/troubleshooting.md gives an ending that holds either way).
* ``torchrun-step``: two ranks under torchrun, one synchronised training step (forward and
  backward, no DDP), and the script ends right away: syncnorm's backward all_reduce is the last
  collective before the exit, the tightest case there is.
* ``torchrun-raw``: the same with a plain ``dist.all_reduce`` of a Python tensor instead of a
  syncnorm layer: torch and gloo alone, for comparison.

    python tools/exit_repeat.py [--repeats 20] [--jobs lightning-both,torchrun-step]
                                     [--syncnorm-path DIR]

``--syncnorm-path`` imports syncnorm from another checkout (for example an export of an older
commit, to count its exits "before"). Exits 1 if any run of a syncnorm job exited non-zero.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from syncnorm.testing import free_port, kill_tree

# Launchers read these to detect an outer job; a job started here must not inherit them.
LAUNCHER_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "ACCELERATE_", "SYNCNORM_")
LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "RAY_ADDRESS")  # fmt: skip
JOBS = (
    "lightning-none",
    "lightning-plugin",
    "lightning-callback",
    "lightning-both",
    "lightning-both-destroy",
    "torchrun-step",
    "torchrun-raw",
)
RUN_TIMEOUT_S = 300


def _lightning_job(variant: str) -> None:
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from syncnorm.lightning import SyncNormCallback, SyncNormPlugin

    torch.set_num_threads(1)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            gen = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(64, 8, generator=gen), torch.randint(0, 2, (64,), generator=gen))
            return DataLoader(data, batch_size=8)

    with_plugin = variant in ("plugin", "both", "both-destroy")
    with_callback = variant in ("callback", "both", "both-destroy")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=5,
        plugins=[SyncNormPlugin()] if with_plugin else [],
        callbacks=[SyncNormCallback(check_every_n_steps=2, on_drift="raise")] if with_callback else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny())
    if variant == "both-destroy":
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _torchrun_job(variant: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import syncnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    if variant == "raw":
        payload = torch.ones(9, dtype=torch.float64)
        dist.all_reduce(payload)
        del payload
    else:
        net = syncnorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
        net(torch.randn(6, 8)).square().sum().backward()
    # The script ends here, like many training scripts: no barrier, no destroy_process_group.


def _job_env(syncnorm_path: Optional[Path]) -> dict[str, str]:
    """This environment without launcher variables (this may itself run under a launcher)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith(LAUNCHER_ENV_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if syncnorm_path is not None:  # another checkout, chosen on the command line, to compare against
        env["PYTHONPATH"] = str(syncnorm_path)
    return env


def _run_once(job: str, syncnorm_path: Optional[Path], workdir: Path) -> tuple[int, str]:
    env = _job_env(syncnorm_path)
    family, variant = job.split("-", 1)
    script = [str(Path(__file__).resolve()), "--worker", job]
    if family == "lightning":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script]
    proc = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun's workers lead sessions of their own: killpg would miss them
        output, _ = proc.communicate()
        return -999, output
    return proc.returncode, output


def _describe(code: int, output: str) -> str:
    if code == 0:
        return "0"
    if code == -999:
        return "timeout"
    aborted = "terminate called" in output or "SIGABRT" in output or code in (134, -6)
    return f"{code} (abort)" if aborted else str(code)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--jobs", default="lightning-plugin,lightning-callback,lightning-both,torchrun-step")
    parser.add_argument(
        "--syncnorm-path", type=Path, help="the folder holding another syncnorm package to run (default: installed)"
    )
    parser.add_argument("--show-failures", action="store_true", help="print the tail of each failed run's output")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        family, variant = args.worker.split("-", 1)
        (_lightning_job if family == "lightning" else _torchrun_job)(variant)
        return 0

    jobs = [job.strip() for job in args.jobs.split(",") if job.strip()]
    unknown = [job for job in jobs if job not in JOBS]
    if unknown:
        parser.error(f"unknown jobs {unknown}; choose from {', '.join(JOBS)}")
    syncnorm_path = args.syncnorm_path.resolve() if args.syncnorm_path else None
    print(
        f"syncnorm from {syncnorm_path or 'the installed package'}, {args.repeats} consecutive runs per job", flush=True
    )
    failed_syncnorm_job = False
    with tempfile.TemporaryDirectory(prefix="syncnorm-exit-") as folder:
        for job in jobs:
            codes: list[str] = []
            start = time.monotonic()
            for _ in range(args.repeats):
                code, output = _run_once(job, syncnorm_path, Path(folder))
                codes.append(_describe(code, output))
                if code != 0 and args.show_failures:
                    print(f"--- {job} exited {code}:\n{output[-2500:]}", flush=True)
            counts = collections.Counter(codes)
            failures = args.repeats - counts["0"]
            if failures and job not in ("lightning-none", "torchrun-raw"):
                failed_syncnorm_job = True
            summary = ", ".join(f"{code}: {n}" for code, n in sorted(counts.items()))
            print(
                f"{job:24s} {failures:2d} of {args.repeats} runs exited non-zero   [exit codes {summary}]"
                f"   ({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    return 1 if failed_syncnorm_job else 0


if __name__ == "__main__":
    sys.exit(main())
