"""MkDocs hook: serve the committed benchmark plots and tables from ``benchmarks/results/``.

The plots and raw tables are committed once, where the benchmark scripts write them. The docs
show them as ``assets/benchmarks/NAME`` without a copy in ``docs/``, so they cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SHOWN = ("micro_ratios.png", "e2e_step.png", "comm_model.png", "per_layer_ms.csv")


def on_files(files, config, **kwargs):
    for name in SHOWN:
        files.append(File.generated(config, f"assets/benchmarks/{name}", abs_src_path=str(RESULTS / name)))
    return files
