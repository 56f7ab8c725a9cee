"""What synchronisation costs a model's training step: ``syncnorm.profile`` over a few DDP steps on gloo ranks.

    python benchmarks/sync_cost.py --model torchvision:resnet18 --world 2 --steps 5

Builds the model (``--model`` as ``python -m syncnorm doctor`` takes it), converts it with
``syncnorm.convert_sync_batchnorm``, wraps it in DDP and trains ``--steps`` steps on random data
on ``--world`` CPU ranks (one thread each), after one untimed step. Prints rank 0's profile table:
per synchronised layer and pass, the calls, payload bytes and time in syncnorm's collectives,
and their share of the steps' wall time.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import syncnorm
from syncnorm.doctor import load_model
from syncnorm.testing import run_ranks


def _rank(rank: int, world_size: int, options: argparse.Namespace) -> dict:
    import torch._dynamo  # noqa: F401  (DDP imports it lazily)

    torch.manual_seed(0)
    model = syncnorm.convert_sync_batchnorm(load_model(options.model))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    torch.manual_seed(1 + rank)
    inputs = torch.randn(options.batch, 3, options.image, options.image)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(ddp(inputs), torch.zeros(options.batch, dtype=torch.long)).backward()
        optimizer.step()

    step()
    with syncnorm.profile() as prof:
        for _ in range(options.steps):
            step()
    return {"table": prof.table(limit=options.rows), "summary": prof.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="samples per rank")
    parser.add_argument("--image", type=int, default=64, help="image side")
    parser.add_argument("--rows", type=int, default=12, help="table rows")
    parser.add_argument("--json", help="also write rank 0's summary here")
    options = parser.parse_args()
    results = run_ranks(_rank, options.world, options, timeout=1200, pg_timeout=600)
    print(
        f"{options.model}, W = {options.world} gloo ranks (CPU, 1 thread each), batch {options.batch} x 3 x "
        f"{options.image} x {options.image} per rank, {options.steps} DDP steps, torch {torch.__version__}"
    )
    print(results[0]["table"])
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(results[0]["summary"], handle, indent=1)


if __name__ == "__main__":
    main()
