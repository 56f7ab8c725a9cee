"""The reliability guard: turn rank disagreements into prompt, named errors.

A synchronised layer fails badly when ranks disagree: one rank skips a layer,
runs it in eval mode, or feeds another channel count or dtype. Its collective
then pairs with a different collective on another rank, and the job hangs
until the backend's timeout, mixes unrelated numbers, or (gloo, payloads of
different sizes) aborts a process. With the guard on (``SYNCNORM_CHECK=1``,
:func:`syncnorm.set_check` or ``layer.check = True``, the same on every rank),
every synchronised call first all-reduces a small fingerprint (layer name,
channel count, dtype, training flag, collective kind, input rank) with MAX over
``[f, -f]``: every rank gets the same element-wise max and min, so a difference
is seen by all ranks at once and all of them raise. Only on that failure path
are the full fingerprints gathered, to name the ranks that differ.

The fingerprint has a fixed size, so two guard calls always pair cleanly
whatever the ranks disagree about. It is an odd number of int32 values (not a
multiple of 8 bytes), so it can never be mistaken for a syncnorm statistics
payload, which is float64: if a guard call meets a statistics collective
(the switch differs between ranks) the backend fails loudly instead of
mixing the two.

Cost: one extra all_reduce of 15 int32 values per synchronised call, plus a
device-to-host read of its result (a sync on CUDA); see the README's "Failure
behaviour" section for measured numbers. With the guard on, eval-mode calls
take part as well (that is how a rank left in eval mode is caught), so every
rank must then run the same evaluation batches.
"""

from __future__ import annotations

import zlib
from collections import Counter

import torch
import torch.distributed as dist

from .collectives import SyncNormCollectiveError, SyncNormMismatchError, all_gather_rows, all_reduce

__all__ = [
    "KIND_BACKWARD",
    "KIND_FORWARD",
    "KIND_RUNNING_STATS",
    "SyncNormCollectiveError",
    "SyncNormMismatchError",
    "SyncNormNonFiniteError",
    "verify_consistency",
    "verify_finite",
]

KIND_FORWARD = 1
KIND_BACKWARD = 2
KIND_RUNNING_STATS = 3
_KIND_NAMES = {
    KIND_FORWARD: "forward statistics",
    KIND_BACKWARD: "backward gradient sums",
    KIND_RUNNING_STATS: "running statistics",
}
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_MAGIC = 0x5C4E0B  # lets a report tell a guard row from some other collective's data
_FIELDS = 7  # magic, layer hash, channels, dtype, training, kind, ndim
_NAME_BYTES = 64  # of the layer name, shown in the mismatch report (the hash covers all of it)
_INT31 = 0x7FFFFFFF  # hashes are kept non-negative in int32 so that negating them cannot overflow


class SyncNormNonFiniteError(FloatingPointError, RuntimeError):
    """The synchronised statistics contain NaN or Inf."""


def _hash31(text: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, and ranks started by a
    # launcher (torchrun) are separate interpreters.
    return zlib.crc32(text.encode()) & _INT31


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 100 + _hash31(str(dtype)) % 1000


def _fingerprint(layer: str, channels: int, dtype: torch.dtype, training: bool, kind: int, ndim: int) -> list[int]:
    return [_MAGIC, _hash31(layer), channels, _dtype_code(dtype), int(training), kind, ndim]


def _describe(row: list[int]) -> str:
    if row[0] != _MAGIC:
        return "not in a syncnorm guard (its collective met another kind of collective)"
    name = bytes(b for b in row[_FIELDS:] if b > 0).decode("utf-8", "replace")
    dtype = _DTYPES[row[3]] if 0 <= row[3] < len(_DTYPES) else f"dtype code {row[3]}"
    kind = _KIND_NAMES.get(row[5], f"kind {row[5]}")
    mode = "train" if row[4] else "eval"
    return f"layer '{name}' {kind}, {mode} mode, {row[2]} channels, {row[6]}-D input, {dtype}"


def _odd_ranks_out(fingerprints: list[tuple[int, ...]], ranks: list[int]) -> tuple[int, list[int]]:
    """The rank whose fingerprint most ranks share (ties: the lowest rank), and the ranks that differ from it."""
    counts = Counter(fingerprints)
    majority = max(fingerprints, key=lambda f: (counts[f], -fingerprints.index(f)))
    reference = ranks[fingerprints.index(majority)]
    return reference, [rank for rank, f in zip(ranks, fingerprints) if f != majority]


def verify_consistency(group: dist.ProcessGroup, layer: str, input: torch.Tensor, *, training: bool, kind: int) -> None:
    """Raise :class:`SyncNormMismatchError` on every rank of ``group`` unless all ranks agree.

    The fingerprint is the layer name, ``training``, ``kind`` and the input's channel
    count, dtype and number of dims. Every rank must call this at the same point (it is
    a collective); the error on each rank names its own layer, the ranks that differ
    from the majority, and what every rank was doing.
    """
    fingerprint = _fingerprint(layer, input.shape[1], input.dtype, training, kind, input.dim())
    device = input.device
    # [f, -f, 0]: the trailing 0 makes the count odd (see the module docstring).
    pair = torch.tensor(fingerprint + [-v for v in fingerprint] + [0], dtype=torch.int32, device=device)
    all_reduce(pair, group, layer=layer, what="consistency-guard", op=dist.ReduceOp.MAX)
    reduced = pair.tolist()  # one host read (a sync on CUDA); cheaper than comparing on the device
    if reduced[:_FIELDS] == [-v for v in reduced[_FIELDS : 2 * _FIELDS]]:
        return
    name = list(layer.encode()[:_NAME_BYTES])
    row = torch.tensor(fingerprint + name + [0] * (_NAME_BYTES - len(name)), dtype=torch.int32, device=device)
    rows = all_gather_rows(row, group, layer=layer, what="consistency-guard").tolist()
    ranks = dist.get_process_group_ranks(group)
    reference, differing = _odd_ranks_out([tuple(r[:_FIELDS]) for r in rows], ranks)
    lines = "\n".join(f"  rank {rank}: {_describe(r)}" for rank, r in zip(ranks, rows))
    raise SyncNormMismatchError(
        f"syncnorm: ranks disagree at layer '{layer}' (where rank {dist.get_rank()} is); "
        f"ranks {differing} differ from rank {reference}:\n{lines}\n"
        "Every rank must call the same synchronised layers in the same order, in the same "
        "train/eval mode, with the same channel count and dtype, and run backward on all of them."
    )


def verify_finite(
    global_values: torch.Tensor, local_values: torch.Tensor, group: dist.ProcessGroup, layer: str
) -> None:
    """Raise :class:`SyncNormNonFiniteError` on every rank if the reduced values are not finite.

    ``global_values`` (the all-reduced ``[count, sum x, sum x^2]``) is identical on
    every rank, so they all take the same branch; the gather that names the ranks
    whose own ``local_values`` were not finite runs only on that (failing) branch.
    """
    finite = torch.isfinite(global_values)
    if bool(finite.all()):
        return
    local_bad = torch.tensor([0 if bool(torch.isfinite(local_values).all()) else 1], device=global_values.device)
    flags = all_gather_rows(local_bad, group, layer=layer, what="non-finite-guard").flatten().tolist()
    ranks = dist.get_process_group_ranks(group)
    culprits = [rank for rank, flag in zip(ranks, flags) if flag]
    channels = (global_values.numel() - 1) // 2
    bad_channels = sorted({(int(i) - 1) % channels for i in (~finite).nonzero().flatten().tolist() if i > 0})
    shown = ", ".join(map(str, bad_channels[:8])) + (", ..." if len(bad_channels) > 8 else "")
    if culprits:
        source = (
            f"ranks {culprits} brought non-finite local statistics "
            "(NaN/Inf in their batch, or values whose squares overflow)"
        )
    else:
        source = "every rank's local statistics were finite: their sum over ranks overflowed"
    raise SyncNormNonFiniteError(
        f"syncnorm: non-finite (NaN/Inf) batch statistics in layer '{layer}' on rank {dist.get_rank()}, "
        f"channels [{shown}]; {source}. The layer's running statistics were left unchanged."
    )
