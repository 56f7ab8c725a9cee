# examples/ddp_minimal.py; run with: torchrun --nproc-per-node 2 examples/ddp_minimal.py
"""The smallest complete DDP training script with syncnorm (CPU, gloo): the README's usage example."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import syncnorm

dist.init_process_group("gloo")  # "nccl" on GPUs
torch.manual_seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(576, 10))
model = syncnorm.convert_sync_batchnorm(model)  # BatchNorm2d -> syncnorm.SyncBatchNorm
ddp = nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)

torch.manual_seed(1 + dist.get_rank())  # each rank its own data
for step in range(3):
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))  # 4 samples per rank
    loss = nn.functional.cross_entropy(ddp(x), y)  # BatchNorm statistics over all 8 samples
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if dist.get_rank() == 0:
        print(f"step {step}: loss {loss.item():.3f}")

plain = syncnorm.revert_sync_batchnorm(model)  # nn.BatchNorm2d again: same weights and statistics

# gloo can abort a process that ends right after a collective
# (docs/troubleshooting.md): once every rank is done, skip the teardown.
dist.barrier()
sys.stdout.flush()
os._exit(0)
