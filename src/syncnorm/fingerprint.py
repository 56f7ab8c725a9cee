"""The layer fingerprint every synchronised payload starts with: ranks at different layers raise.

Every per-layer payload starts with ``[f, f^2]``, f a fingerprint of the layer's name and the
pass. After the SUM, ``W * sum f^2 - (sum f)^2`` is the sum over pairs of ranks of
``(f_i - f_j)^2``: zero when every rank sent the same f, at least ``W - 1`` otherwise. Every rank
sees the same sums, so every rank reaches the same verdict with no extra collective. f < 2^12
keeps the sums exact in float64 for groups of up to 2^14 ranks.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import SyncNormMismatchError

_FINGERPRINT_RANGE = 4095
_fingerprints: dict[tuple[str, str], tuple[int, Tensor]] = {}


def _fingerprint(layer: str, what: str) -> tuple[int, Tensor]:
    known = _fingerprints.get((layer, what))
    if known is None:
        f = 1 + zlib.crc32(f"{layer}\0{what}".encode()) % _FINGERPRINT_RANGE
        known = _fingerprints[(layer, what)] = (f, torch.tensor([f, f * f], dtype=torch.float64, device="cpu"))
    return known


def fingerprint_head(layer: str, what: str, like: Tensor) -> Tensor:
    """``[f, f^2]`` in float64 on ``like``'s device, for this layer's ``what`` pass."""
    f, head = _fingerprint(layer, what)
    if like.is_cpu:
        return head
    # Fill kernels: a Python number copied into a device tensor would be a blocking copy, and a
    # cached device tensor could be born inside a CUDA-graph capture.
    head = like.new_full((2,), float(f), dtype=torch.float64)
    head[1:].mul_(f)
    return head


# The CPU payload's head [f, f^2, n] and the factors [1, 1, 1, n, ..., n] that weight a rank's
# statistics by its count, per (layer, pass), for the last count n seen: a Python number in an
# arithmetic op is wrapped into a new tensor on every call.
_counted_heads: dict[tuple[str, str], tuple[int, int, Tensor, Tensor]] = {}


def counted_head(layer: str, what: str, count: int, channels: int) -> tuple[Tensor, Tensor]:
    known = _counted_heads.get((layer, what))
    if known is None or known[0] != count or known[1] != channels:
        f, _ = _fingerprint(layer, what)
        with torch.inference_mode(False):  # constants born in inference mode could not be used outside it
            head = torch.tensor([f, f * f, count], dtype=torch.float64, device="cpu")
            weights = torch.full((3 + 2 * channels,), float(count), dtype=torch.float64, device="cpu")
            weights[:3] = 1.0
        known = _counted_heads[(layer, what)] = (count, channels, head, weights)
    return known[2], known[3]


_fake_backend: dict[str, bool] = {}


def _is_fake(group) -> bool:
    # torch's "fake" process group (one process standing in for W ranks, for tests and
    # benchmarks) returns every collective unchanged: nothing to verify.
    fake = _fake_backend.get(group.group_name)
    if fake is None:
        fake = _fake_backend[group.group_name] = dist.get_backend(group) == "fake"
    return fake


def _mixed_layers_message(group_size: int, layer: str, what: str) -> str:
    return (
        f"syncnorm: the ranks of a group of {group_size} reached different synchronised layers in the {what} "
        f"all_reduce (this rank is at layer '{layer}'), so their statistics would have mixed. A dynamic network, "
        "a skipped block (LayerDrop) or per-rank control flow does this: every rank must run the same "
        "synchronised layers in the same order, forward and backward. Run every rank with SYNCNORM_CHECK=1 "
        "to have the ranks and their layers named."
    )


def verify_fingerprint(sums: Tensor, group, layer: str, what: str) -> Optional[list[float]]:
    """Raise on every rank if the ranks' payloads came from different layers or passes.

    ``sums`` starts with the reduced ``[sum f, sum f^2]``. On CPU the check reads them (and
    returns the first three values, so the caller reads the count in the same go); on CUDA it
    is a device-side assert, which reads nothing back: the next synchronising call then fails
    with "device-side assert triggered".
    """
    group_size = group.size()
    spread = (group_size - 1) / 2
    if sums.is_cuda or torch.compiler.is_compiling():
        if not _is_fake(group):
            message = _mixed_layers_message(group_size, layer, what)
            torch._assert_async(group_size * sums[1] - sums[0] * sums[0] <= spread, message)
        return None
    head = (sums if sums.numel() <= 3 else sums[:3]).tolist()
    if group_size * head[1] - head[0] * head[0] > spread and not _is_fake(group):
        # The message is built only here: the CPU path runs this check in every pass.
        raise SyncNormMismatchError(_mixed_layers_message(group_size, layer, what))
    return head
