"""One rank of a 2-process job where rank 1 is left in eval mode and keeps working elsewhere.

Rank 0 trains and waits in the layer's all_reduce: it must warn after SYNCNORM_WAIT_WARNING
seconds, then raise syncnorm's error at the process group's timeout, and both processes must
exit 0 through the interpreter's normal exit. Usage: wait_warning_job.py RANK STORE_FILE PG_TIMEOUT
"""

import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import syncnorm

rank, store_path, pg_timeout = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
torch.set_num_threads(1)
store = dist.FileStore(store_path, 2)
dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=pg_timeout))
model = syncnorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
if rank == 1:
    model.eval()
start = time.monotonic()
show = warnings.showwarning


def timed_warning(message, category, *args, **kwargs):
    print(f"rank {rank}: {category.__name__} after {time.monotonic() - start:.1f} s: {message}", flush=True)
    show(message, category, *args, **kwargs)


warnings.showwarning = timed_warning
try:
    model(torch.randn(6, 4))
    print(f"rank {rank}: forward returned after {time.monotonic() - start:.1f} s", flush=True)
except Exception as error:
    print(f"rank {rank}: {type(error).__name__} after {time.monotonic() - start:.1f} s: {error}", flush=True)
if rank == 1:
    time.sleep(pg_timeout + 2)  # keeps working, as an evaluation loop would
print(f"rank {rank}: exiting", flush=True)
