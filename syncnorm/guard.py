"""The reliability guard: turn rank disagreements into prompt, named errors.

A synchronised layer fails silently when ranks disagree: one rank skips a
layer, runs it in eval mode, or feeds another channel count, and the job hangs
until the backend's timeout or mixes unrelated statistics. With the guard on
(``SYNCNORM_CHECK=1`` or :func:`syncnorm.set_check`), every synchronised call
first all-reduces a small fixed-size fingerprint (layer, channel count, dtype,
training flag, collective kind) with MAX over ``[f, -f]``, which gives every
rank the same element-wise max and min: a difference means a mismatch, seen by
all ranks at once, so all of them raise. Only then, on the failure path, the
full fingerprints are gathered to name the ranks that differ.

Cost: one extra all_reduce of 16 int64 values per synchronised call, plus a
device-to-host read of its result (a sync on CUDA), so it is a debugging switch
and off by default. With it on, eval-mode calls take part in the check as well
(that is how a rank left in eval mode is caught), so every rank must then run
the same evaluation batches.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from .collectives import SyncNormCollectiveError, SyncNormMismatchError, all_gather_rows, all_reduce

__all__ = ["KIND_FORWARD", "KIND_BACKWARD", "KIND_RUNNING_STATS", "SyncNormNonFiniteError", "verify_consistency", "verify_finite"]

KIND_FORWARD = 1
KIND_BACKWARD = 2
KIND_RUNNING_STATS = 3
_KIND_NAMES = {KIND_FORWARD: "forward statistics", KIND_BACKWARD: "backward gradient sums", KIND_RUNNING_STATS: "running statistics"}
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_MAGIC = 0x5C_4E_0B  # lets the guard spot a pairing with some other, non-syncnorm collective
_NAME_BYTES = 48
_FIELDS = 7  # magic, layer hash, channels, dtype, training, kind, ndim


class SyncNormNonFiniteError(FloatingPointError, RuntimeError):
    """The synchronised statistics contain NaN or Inf."""


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 100 + hash(str(dtype)) % 1000


def _describe(row: list[int]) -> str:
    name = bytes(b for b in row[_FIELDS:] if b > 0).decode("utf-8", "replace")
    if row[0] != _MAGIC:
        return "not in a syncnorm layer (another collective paired with this one)"
    dtype = _DTYPES[row[3]] if 0 <= row[3] < len(_DTYPES) else f"code {row[3]}"
    kind = _KIND_NAMES.get(row[5], f"kind {row[5]}")
    mode = "train" if row[4] else "eval"
    return f"layer '{name}' {kind}, {mode} mode, {row[2]} channels, {row[6]}-D input, dtype {dtype}"


def verify_consistency(
    group: dist.ProcessGroup,
    layer: str,
    *,
    channels: int,
    dtype: torch.dtype,
    training: bool,
    kind: int,
    ndim: int,
    device: torch.device,
) -> None:
    """Raise :class:`SyncNormMismatchError` on every rank unless all ranks agree."""
    fingerprint = [_MAGIC, zlib.crc32(layer.encode()), channels, _dtype_code(dtype), int(training), kind, ndim]
    pair = torch.tensor(fingerprint + [-v for v in fingerprint], dtype=torch.int64, device=device)
    all_reduce(pair, group, layer=layer, what="consistency-guard", op=dist.ReduceOp.MAX)
    high, neg_low = pair[:_FIELDS], pair[_FIELDS:]
    if bool(torch.equal(high, -neg_low)):
        return
    name = list(layer.encode()[:_NAME_BYTES])
    row = torch.tensor(fingerprint + name + [0] * (_NAME_BYTES - len(name)), dtype=torch.int64, device=device)
    rows = all_gather_rows(row, group, layer=layer, what="consistency-guard").tolist()
    ranks = dist.get_process_group_ranks(group)
    reference = rows[0]
    differing = [ranks[i] for i, r in enumerate(rows) if r[:_FIELDS] != reference[:_FIELDS]]
    lines = "\n".join(f"  rank {ranks[i]}: {_describe(r)}" for i, r in enumerate(rows))
    raise SyncNormMismatchError(
        f"syncnorm: ranks disagree at layer '{layer}' (rank {dist.get_rank()} is here); "
        f"ranks {differing} differ from rank {ranks[0]}:\n{lines}\n"
        "Every rank must call the same synchronised layers in the same order, in the same "
        "train/eval mode, with the same channel count and dtype."
    )


def verify_finite(global_values: torch.Tensor, local_values: torch.Tensor, group: dist.ProcessGroup, layer: str) -> None:
    """Raise :class:`SyncNormNonFiniteError` on every rank if the reduced values are not finite.

    ``global_values`` is identical on every rank, so they all take the same branch;
    the gather that names the culprits runs only on that (failing) branch.
    """
    if bool(torch.isfinite(global_values).all()):
        return
    local_bad = torch.tensor([0 if bool(torch.isfinite(local_values).all()) else 1], device=global_values.device)
    flags = all_gather_rows(local_bad, group, layer=layer, what="non-finite-guard").flatten().tolist()
    ranks = dist.get_process_group_ranks(group)
    culprits = [ranks[i] for i, f in enumerate(flags) if f]
    raise SyncNormNonFiniteError(
        f"syncnorm: non-finite (NaN/Inf) statistics in layer '{layer}'; ranks {culprits} brought "
        "non-finite local statistics. Running statistics were left unchanged."
    )


__all__ += ["SyncNormCollectiveError", "SyncNormMismatchError"]
