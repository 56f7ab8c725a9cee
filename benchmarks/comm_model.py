"""Communication model: bytes each rank moves per BatchNorm layer per training step, against world size.

syncnorm does one all_reduce per pass (forward: [count, sum x, sum x^2], backward:
[sum dy, sum dy * x_hat]); the all_gather design of ``torch.nn.SyncBatchNorm``
gathers every rank's [mean, invstd, count] (2C + 1 float32 values per rank) in the
forward and all_reduces 2C float32 values in the backward.

syncnorm's payload sizes are not taken from its documentation: they are measured by
running syncnorm at W = 2 with ``torch.distributed.all_reduce`` wrapped to record
``numel * element_size`` of every call (:func:`syncnorm_payloads`).

Per-rank traffic (bytes sent, which equals bytes received) with ring algorithms:
all_reduce of P bytes: 2 (W - 1) / W * P;  all_gather of a P-byte row per rank: (W - 1) * P.

Run alone: ``python benchmarks/comm_model.py --out benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from _bench_common import pyplot

import syncnorm
from syncnorm.testing import recorded_all_reduces, run_ranks

# The 53 BatchNorm layers of ResNet-50 by channel count: stem, then per stage
# (blocks x [width, width, 4 width]) plus one downsample BatchNorm of 4 width.
RESNET50_BN_CHANNELS = (
    [64]
    + [64, 64, 256] * 3 + [256]
    + [128, 128, 512] * 4 + [512]
    + [256, 256, 1024] * 6 + [1024]
    + [512, 512, 2048] * 3 + [2048]
)  # fmt: skip
MODEL_CHANNELS = (64, 256, 512, 1024, 2048)
MODEL_WORLDS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODEL_CHANNEL_SET = sorted(set(MODEL_CHANNELS) | set(RESNET50_BN_CHANNELS))
ALL_GATHER_ELEMENT_BYTES = 4  # torch.nn.SyncBatchNorm gathers float32 statistics for float32 input


def _payload_rank(rank: int, world_size: int, channel_counts: list[int], dtype: torch.dtype) -> dict:
    payloads = {}
    for channels in channel_counts:
        layer = syncnorm.SyncBatchNorm(channels, dtype=dtype)
        input = torch.randn(4, channels, 2, 2, dtype=dtype, requires_grad=True)
        with recorded_all_reduces() as forward:
            output = layer(input)
        with recorded_all_reduces() as backward:
            output.sum().backward()
        payloads[channels] = {"forward": forward, "backward": backward}
    return payloads


def syncnorm_payloads(channel_counts, dtype: torch.dtype = torch.float32) -> dict[int, dict]:
    """Measure syncnorm's all_reduces at W = 2: {C: {"forward": [(numel, dtype)], "backward": [...]}}."""
    return run_ranks(_payload_rank, 2, sorted(set(channel_counts)), dtype, timeout=120)[0]


def payload_bytes(calls: list[tuple[int, torch.dtype]]) -> int:
    return sum(numel * torch.empty(0, dtype=dtype).element_size() for numel, dtype in calls)


def ring_all_reduce_bytes(payload: float, world: int) -> float:
    return 2.0 * (world - 1) / world * payload


def ring_all_gather_bytes(row: float, world: int) -> float:
    return float(world - 1) * row


def per_layer_bytes(channels: int, world: int, payloads: dict) -> dict[str, float]:
    """Bytes per rank for one layer and one training step (forward + backward), both designs."""
    ours = sum(ring_all_reduce_bytes(payload_bytes(payloads[channels][which]), world) for which in payloads[channels])
    gather = ring_all_gather_bytes((2 * channels + 1) * ALL_GATHER_ELEMENT_BYTES, world) + ring_all_reduce_bytes(
        2 * channels * ALL_GATHER_ELEMENT_BYTES, world
    )
    return {"syncnorm": ours, "all_gather": gather}


def build_model(payloads: dict) -> dict:
    rows = []
    for world in MODEL_WORLDS:
        for channels in MODEL_CHANNELS:
            rows.append({"world": world, "channels": channels, **per_layer_bytes(channels, world, payloads)})
        totals = {"syncnorm": 0.0, "all_gather": 0.0}
        for channels in RESNET50_BN_CHANNELS:
            for design, value in per_layer_bytes(channels, world, payloads).items():
                totals[design] += value
        rows.append({"world": world, "channels": "ResNet-50 (53 layers)", **totals})
    measured = {
        str(channels): {which: [(numel, str(dtype)) for numel, dtype in calls] for which, calls in entry.items()}
        for channels, entry in payloads.items()
    }
    return {"rows": rows, "measured_payloads": measured}


def _human(nbytes: float) -> str:
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


def markdown(model: dict) -> str:
    lines = [
        "| W | C | syncnorm (2 all_reduces) | all_gather design | all_gather / syncnorm |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in model["rows"]:
        if row["world"] not in (2, 8, 64, 1024):
            continue
        ratio = row["all_gather"] / row["syncnorm"]
        lines.append(
            f"| {row['world']} | {row['channels']} | {_human(row['syncnorm'])} | {_human(row['all_gather'])} "
            f"| {ratio:.1f}x |"
        )
    return "\n".join(lines)


def plot(model: dict, path: str) -> None:
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter

    # Drawn about as wide as the docs' content column shows it, so the labels keep their size there.
    figure, axes = plt.subplots(2, 1, figsize=(7.5, 8.2))
    labels = {"syncnorm": "syncnorm (all_reduce)", "all_gather": "all_gather (torch.nn.SyncBatchNorm)"}
    for axis, channels_key in zip(axes, (256, "ResNet-50 (53 layers)")):
        rows = [row for row in model["rows"] if row["channels"] == channels_key]
        worlds = [row["world"] for row in rows]
        for design, style in (("syncnorm", "o-"), ("all_gather", "s--")):
            axis.plot(worlds, [row[design] for row in rows], style, label=labels[design])
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.xaxis.set_major_locator(FixedLocator(worlds))  # every world size labelled, W = 2 included
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.tick_params(labelsize=10)
        axis.set_xlabel("world size W")
        axis.set_ylabel("bytes per rank per step")
        title = f"one layer, C = {channels_key}" if isinstance(channels_key, int) else channels_key
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(
        "Communication per training step, computed from the measured\npayload sizes (ring algorithms), not timed",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(out_dir: str, payloads: dict | None = None) -> dict:
    """Build the model (measuring the payloads unless given), write comm_model.{md,json,png} into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    payloads = payloads or syncnorm_payloads(MODEL_CHANNEL_SET)
    model = build_model(payloads)
    table = markdown(model)
    with open(os.path.join(out_dir, "comm_model.md"), "w") as handle:
        handle.write(table + "\n")
    with open(os.path.join(out_dir, "comm_model.json"), "w") as handle:
        json.dump(model, handle, indent=1)
    plot(model, os.path.join(out_dir, "comm_model.png"))
    model["markdown"] = table
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    model = run(parser.parse_args().out)
    print(model["markdown"])


if __name__ == "__main__":
    main()
