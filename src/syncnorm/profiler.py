"""What synchronisation costs: per layer and pass, the calls, bytes and time of syncnorm's collectives.

``with syncnorm.profile() as prof:`` records every all_reduce syncnorm's layers make in the block
(on this rank); ``prof.table()`` and ``prof.summary()`` report it. Off (outside such a block) the
collective wrapper pays one global lookup per call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["LayerCost", "Profile", "profile"]

_active: Optional[Profile] = None
_EVENTS_KEPT = 256  # per layer and pass, before the finished ones are added up


@dataclass
class LayerCost:
    """One layer's collectives in one pass: how many, how many bytes, how long."""

    layer: str
    what: str
    calls: int = 0
    payload_bytes: int = 0
    seconds: float = 0.0
    _events: list = field(default_factory=list, repr=False)

    def _resolve(self) -> None:
        # CUDA: events were recorded around each collective on its stream; reading them waits
        # for the GPU, which happens here, when the profile is read, not during training.
        for start, end in self._events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()

    def _fold_finished(self) -> None:
        """Add up the events the GPU has passed already (no waiting), so a long profile keeps few."""
        pending = []
        for start, end in self._events:
            if end.query():
                self.seconds += start.elapsed_time(end) / 1000.0
            else:
                pending.append((start, end))
        self._events = pending


class Profile:
    """The collectives of one ``with syncnorm.profile()`` block, on this rank.

    Times are wall time around the collective on CPU (gloo): the time this rank spent in it,
    waiting for the slowest rank included. On CUDA they come from CUDA events around the
    collective on the current stream (no host sync while training; the events are read when the
    profile is). ``payload_bytes`` is what each rank hands to the all_reduce; a ring all_reduce
    sends ``2 (W - 1) / W`` times that per rank. A collective recorded while a CUDA graph is being
    captured counts as a call without a time, and a graph's replays make no Python call, so the
    profile does not see them.
    """

    def __init__(self) -> None:
        self.costs: dict[tuple[str, str], LayerCost] = {}
        self.world_size = 1
        self.started = time.perf_counter()
        self.finished: Optional[float] = None
        self._cuda = False

    # --- recording (called by syncnorm.collectives.all_reduce) ------------------------------

    def _begin(self, tensor: torch.Tensor) -> Any:
        if tensor.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return None  # events inside a CUDA-graph capture cannot be read; not recorded
            self._cuda = True
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def _end(self, begun: Any, tensor: torch.Tensor, group: Any, layer: str, what: str) -> None:
        cost = self.costs.get((layer, what))
        if cost is None:
            cost = self.costs[(layer, what)] = LayerCost(layer, what)
        cost.calls += 1
        cost.payload_bytes += tensor.numel() * tensor.element_size()
        self.world_size = max(self.world_size, group.size())
        if begun is None:
            return
        if isinstance(begun, float):
            cost.seconds += time.perf_counter() - begun
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            cost._events.append((begun, end))
            if len(cost._events) >= _EVENTS_KEPT:
                cost._fold_finished()

    # --- reading --------------------------------------------------------------------------------

    def _close(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self.finished = time.perf_counter()

    def wall_seconds(self) -> float:
        """The block's wall time (so far, if it is still open)."""
        return (self.finished if self.finished is not None else time.perf_counter()) - self.started

    def summary(self) -> dict[str, Any]:
        """A dict for loggers: totals, the share of the block's time in collectives, and per-layer rows."""
        for cost in self.costs.values():
            cost._resolve()
        wall = self.wall_seconds()
        seconds = sum(cost.seconds for cost in self.costs.values())
        return {
            "wall_seconds": wall,
            "collective_seconds": seconds,
            "collective_share": seconds / wall if wall > 0 else 0.0,
            "calls": sum(cost.calls for cost in self.costs.values()),
            "payload_bytes": sum(cost.payload_bytes for cost in self.costs.values()),
            "world_size": self.world_size,
            "layers": [
                {
                    "layer": c.layer,
                    "pass": c.what,
                    "calls": c.calls,
                    "payload_bytes": c.payload_bytes,
                    "seconds": c.seconds,
                }
                for c in sorted(self.costs.values(), key=lambda c: -c.seconds)
            ],  # fmt: skip
        }

    def table(self, limit: int = 20) -> str:
        """The layers that cost the most time in collectives, as text."""
        summary = self.summary()
        rows = summary["layers"]
        width = max([len("layer")] + [len(row["layer"]) for row in rows[:limit]])
        lines = [
            f"syncnorm collectives: {summary['collective_seconds'] * 1e3:.1f} ms of {summary['wall_seconds']:.3f} s "
            f"({summary['collective_share']:.1%}), {summary['calls']} calls, "
            f"{summary['payload_bytes'] / 1e3:.1f} kB payload, W = {summary['world_size']}",
            f"{'layer':<{width}}  {'pass':<19} {'calls':>6} {'payload kB':>11} {'ms':>9} {'ms/call':>8}",
        ]
        for row in rows[:limit]:
            per_call = row["seconds"] * 1e3 / row["calls"] if row["calls"] else 0.0
            lines.append(
                f"{row['layer']:<{width}}  {row['pass']:<19} {row['calls']:>6} {row['payload_bytes'] / 1e3:>11.2f} "
                f"{row['seconds'] * 1e3:>9.2f} {per_call:>8.3f}"
            )
        if len(rows) > limit:
            lines.append(f"... {len(rows) - limit} more")
        return "\n".join(lines)

    # --- the block -------------------------------------------------------------------------------

    def __enter__(self) -> Profile:
        global _active
        if _active is not None:
            raise RuntimeError("syncnorm.profile: a profile is already recording in this process; they do not nest")
        _active = self
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        _active = None
        self._close()


def profile() -> Profile:
    """Record what syncnorm's collectives cost in a block: ``with syncnorm.profile() as prof: ...``.

    Per synchronised layer and pass (forward statistics, backward gradient, and the other
    collectives syncnorm makes): the number of all_reduces, the payload bytes, and the time this
    rank spent in them, which includes waiting for slower ranks. ``prof.table()`` prints the
    costliest layers and the share of the block's wall time spent in collectives;
    ``prof.summary()`` returns the same as a dict for loggers. Each rank records its own.
    """
    return Profile()


def active() -> Optional[Profile]:
    return _active
