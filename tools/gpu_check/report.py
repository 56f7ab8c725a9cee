"""The report of ``tools/gpu_check``: the targets as rows with PASS / MISS, the markdown, the summary and
the exit code. Pure functions of the sections' recorded results (testable without a GPU).

Each target row reads one check a section recorded (``result["checks"][name]``); a section that
raised turns its rows into FAIL, one that did not run into NOT MEASURED, so that no row can
read PASS for something that did not happen.
"""

from __future__ import annotations

import json
from typing import Any, Optional

COMMUNICATION_NOTE = (
    "One GPU cannot hold two NCCL ranks (NCCL refuses two ranks on one device), so correctness (a) runs 2 "
    "and 4 real gloo ranks that share the GPU with CUDA tensors, and everything else runs in one process as "
    "rank 0 of W = 8 under torch's fake process group, with its collectives replaced by a stand-in "
    "(`IdenticalRanks` in `tools/gpu_check/parts.py`): all_reduce(SUM) multiplies by W, the "
    "all_gathers tile the local input W times, as W ranks with identical data would. An empty rank or a "
    "one-sample rank is run beside W - 1 ranks holding a recorded batch (`OtherRanks`: the local payload "
    "plus W - 1 times the payload a full batch sent). Both syncnorm and torch.nn.SyncBatchNorm thus compute "
    "on real numbers (the fake backend alone would leave torch's all_gather output uninitialised) with "
    "device ops only, and syncnorm's layer-fingerprint check runs (its CUDA device-side assert included) as "
    "on a real group: communication time is left out of every timing, and so is the host-device traffic a "
    "real NCCL call would add (none in either implementation). Section b also runs syncnorm once with the "
    "fake backend's own collectives."
)

# (target, section, check name): every row the report must show.
TARGETS = [
    ("zero host syncs: ResNet-50 training step (syncnorm, W=8)", "b", "resnet50_syncs"),
    ("zero host syncs: SyncProbe step with 8 samples, an empty rank and a one-sample rank", "b", "probe_syncs"),
    ("zero host syncs: every synchronised layer alone (SyncBatchNorm 1d/2d/3d, SyncBatchNormAct2d, InPlaceABNSync, "
     "SyncInstanceNorm1d/2d/3d), incl. an empty rank and one value per channel", "b", "layer_syncs"),
    ("every exported synchronised layer class is in the sync check, with an empty and a one-value rank", "b", "layer_coverage"),
    ("output and input gradient as the op returns them keep the input's strides", "b", "layer_layouts"),
    ("whole ResNet-50 step (fwd, bwd, AdamW) captured in one CUDA graph equals eager", "c1", "resnet50_graph"),
    ("SyncProbe step captured in one CUDA graph equals eager (8 samples, empty rank, one-sample rank)", "c1", "probe_graph"),
    ("first syncnorm call of a fresh process made inside a CUDA graph capture equals eager (SyncProbe, ResNet-50)", "c3", "first_call_graph"),
    ("torch.compile(fullgraph=True) equals eager", "c2", "default"),
    ("torch.compile(mode='reduce-overhead', fullgraph=True) equals eager", "c2", "reduce-overhead"),
    ("mode='reduce-overhead' ran as CUDA graphs: 0 cudagraph skips, >= 1 graph captured", "c2", "cudagraphs"),
    ("per layer fwd+bwd at least as fast as torch.nn.SyncBatchNorm on every ResNet-50 shape, fp32/bf16 x NCHW/channels_last", "d1", "vs_torch_sync"),
    (">= 70% of copy bandwidth on the large layers", "d1", "bandwidth"),
    ("ResNet-50 step within 1.03x nn.BatchNorm", "d2", "vs_batchnorm"),
    ("ResNet-50 step faster than torch.nn.SyncBatchNorm", "d2", "vs_torch_sync"),
    ("correctness vs float64 nn.BatchNorm on the global batch (2 and 4 gloo ranks)", "a", "correctness"),
    ("InPlaceABNSync activation memory <= 0.6x nn.BatchNorm2d + LeakyReLU (conv stack, peak during the step "
     "- allocated before the forward)", "e", "abn_memory"),
]  # fmt: skip


def check(passed: Optional[bool], measured: str) -> dict:
    """One check of a section: passed True / False, or None where it cannot be measured here."""
    return {"passed": passed, "measured": measured}


def all_of(parts: dict[str, Optional[bool]], measured: str) -> dict:
    """One check from several: False if any is False, True if all are True, else None."""
    values = list(parts.values())
    passed = False if False in values else (True if values and all(v is True for v in values) else None)
    return check(passed, measured)


def cudagraphs_check(skips: int, captured: Optional[int], cuda: bool, backend: str) -> dict:
    """Whether mode='reduce-overhead' really ran as CUDA graphs.

    Inductor falls back to plain kernels, silently and with the same numbers, whenever it
    skips CUDA graphs (a CPU tensor, a mutated input, dynamic shapes); equality with eager
    alone cannot tell. It counts each skip in ``counters["inductor"]["cudagraph_skips"]``.
    """
    if not cuda:
        return check(None, f"CUDA graphs need CUDA ({skips} cudagraph skips counted)")
    if backend != "inductor":
        return check(None, f"backend {backend} makes no CUDA graphs")
    if skips:
        return check(False, f"{skips} cudagraph skips: inductor ran without CUDA graphs")
    if not captured:
        return check(False, "0 cudagraph skips, but no CUDA graph was captured")
    return check(True, f"0 cudagraph skips, {captured} CUDA graph captures")


def _why(section: dict) -> str:
    reason = section.get("error") or section.get("reason") or ""
    return f"section {section['status']}" + (f": {reason}" if reason else "")


def targets(sections: dict, cuda: bool) -> list[dict]:
    """Every target with its measured value and PASS / MISS / FAIL / NOT MEASURED."""
    rows = []
    for target, key, name in TARGETS:
        section = sections[key]
        checks = (section.get("result") or {}).get("checks") or {}
        found = checks.get(name)
        if section["status"] == "failed" and (found is None or found.get("passed") is None):
            measured, verdict = _why(section)[:300], "FAIL"
        elif found is None:
            measured, verdict = f"not measured: {_why(section)}"[:300], "NOT MEASURED"
        else:
            measured, passed = found["measured"], found["passed"]
            if passed is None:
                verdict = "NOT MEASURED" if cuda else "CPU rehearsal (no verdict)"
            else:
                verdict = "PASS" if passed else "MISS"
        rows.append({"target": target, "section": key, "measured": measured, "result": verdict})
    return rows


def overall(sections: dict, rows: list[dict], cuda: bool) -> tuple[int, str]:
    """The exit code and the summary's last line: 0 all ran and passed (or were rehearsed on CPU),
    1 a section failed or was killed or a target missed, 4 something chosen was not measured."""
    failed = [f"{k} {s['status']}" for k, s in sections.items() if s["status"] in ("failed", "killed")]
    missed = [r["target"] for r in rows if r["result"] in ("MISS", "FAIL")]
    if failed or missed:
        return 1, "FAILED: " + "; ".join(
            ([f"sections {', '.join(failed)}"] if failed else []) + ([f"{len(missed)} target(s) missed or failed"] if missed else [])
        )  # fmt: skip
    chosen = {k for k, s in sections.items() if s["status"] != "not selected"}
    short = [
        f"{k} {s['status']}" for k, s in sections.items() if k in chosen and s["status"] not in ("ok", "rehearsed")
    ]
    unmeasured = [r["target"] for r in rows if cuda and r["section"] in chosen and r["result"] == "NOT MEASURED"]
    if short or unmeasured:
        return 4, "INCOMPLETE: " + "; ".join(
            ([f"sections {', '.join(short)}"] if short else []) + ([f"{len(unmeasured)} target(s) not measured"] if unmeasured else [])
        )  # fmt: skip
    return 0, "OK: every chosen section ran and every check passed" if cuda else (
        "REHEARSED: every chosen section ran on CPU; no check failed (the CUDA-only ones give no verdict here)"
    )


# ---------------------------------------------------------------------------------------------
# markdown


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]


def _graph_row(label: str, r: dict) -> list[Any]:
    if "error" in r:
        return [label, "-", "-", "-", f"**error** {r['error'][:300]}"]
    loss, state = r["loss_rel_diff"], r["state_rel_diff"]
    return [label, "yes" if r["captured"] else "no (CPU: eager stand-in)", f"{loss['graph']:.2e} (floor {loss['eager_again']:.2e})",
            f"{state['graph']:.2e} (floor {state['eager_again']:.2e})", "equal" if r.get("equal") else "**differs**"]  # fmt: skip


def _details(key: str, r: dict) -> list[str]:
    lines: list[str] = []
    if key == "a":
        for world, w in r["worlds"].items():
            if "cases" not in w:
                lines += [f"W={world}: ranks failed: `{w['error']}`"[:3000], ""]
                continue
            rows = [[c["case"], "ok" if c["ok"] else "**FAIL**", f"{c['worst'][0]} {c['worst'][1]:.1e}", "; ".join(c["notes"])]
                    for c in w["cases"]]  # fmt: skip
            lines += [f"W={world}: {w['passed']}/{w['total']} cases pass (tolerance by dtype: {r['tolerance']})", ""]
            lines += _table(["case", "result", "worst error (max abs / max ref)", "notes"], rows) + [""]
    elif key == "c3":
        lines += [r["description"], ""]
        rows = []
        for model, m in r["models"].items():
            rows.append(
                [model, m.get("pid", "-"), m.get("fresh", "-"), *_graph_row("", m)[1:], f"{m.get('seconds', '-')}"]
            )
        lines += _table(["model", "pid", "fresh (no syncnorm call before)", "captured", "loss rel diff", "state rel diff",
                         "verdict", "s"], rows)  # fmt: skip
    elif key == "b":
        res = r["resnet50"]
        lines += [f"ResNet-50: {res['model']}, batch {res['batch_per_rank']} per rank at {res['image']}px, bf16 autocast, "
                  "channels_last, AdamW", ""]  # fmt: skip
        rows = [[n, v["syncs"], v.get("where", ""), v["collectives"]] for n, v in res["variants"].items()]
        lines += _table(["variant", "host syncs in one step", "where (file:line: count)", "collectives per step"], rows)
        lines += [""] + [f"- set_sync_debug_mode('error'), {k}: {v}" for k, v in res["error_mode"].items()]
        lines += ["", r["probe"]["description"], ""]
        lines += _table(["SyncProbe rank", "sync debug 'error'", "loss", "all_reduces"],
                        [[k, v.get("sync_debug", v.get("error", "")), v.get("loss", "-"), v.get("all_reduces", "-")]
                         for k, v in r["probe"]["ranks"].items()])  # fmt: skip
        lines += ["", f"Layer classes: {', '.join(r['classes'])}", ""]
        lines += _table(["layer case", "input", "sync debug 'error'", "all_reduces", "layout", "finite"],
                        [[e["case"], e["input"], e.get("sync_debug", "") + (f" **{e['error']}**" if "error" in e else ""),
                          e.get("all_reduces", "-"), "; ".join(e.get("layout", [])) or "kept", e.get("finite", "-")]
                         for e in r["layers"]])  # fmt: skip
    elif key == "c1":
        lines += [f"criterion: {r['criterion']}", ""]
        rows = [_graph_row("ResNet-50 step", r["resnet50"])]
        rows += [_graph_row(f"SyncProbe, {label}", p) for label, p in r["probe"].items()]
        lines += _table(["step", "captured", "loss rel diff", "state rel diff", "verdict"], rows)
    elif key == "c2":
        rows = [[mode, m.get("worst", ""), m.get("seconds", ""), m.get("cudagraph_skips", ""), m.get("cuda_graphs", ""),
                 m.get("error", m.get("skipped", ""))[:300]] for mode, m in r["modes"].items()]  # fmt: skip
        lines += [f"backend {r['backend']}; {r['criterion']}", ""]
        lines += _table(["mode", "worst (tensor, error)", "s", "cudagraph skips", "CUDA graph calls", "error"], rows)
    elif key == "d1":
        impls = r["impls"]
        header = ["dtype", "layout", "shape", *[f"{n} ms" for n in impls], *[f"{n} host ms" for n in impls], "copy ms",
                  "copy GB/s", *[f"{n} BW/copy" for n in impls], "syncnorm/BN", "syncnorm/torch"]  # fmt: skip
        rows = []
        for row in r["rows"]:
            ratio = row["ratios"].get("syncnorm / torch.nn.SyncBatchNorm")
            rows.append([row["dtype"], row["layout"], tuple(row["shape"]), *[f"{row['ms'][n]:.3f}" for n in impls],
                         *[f"{row['host_ms'][n]:.3f}" for n in impls], f"{row['ms']['copy']:.3f}", f"{row['copy_GBps']:.1f}",
                         *[f"{100 * row['bandwidth_vs_copy'][n]:.0f}%" for n in impls],
                         f"{row['ratios']['syncnorm / nn.BatchNorm']['median']:.3f}", f"{ratio['median']:.3f}" if ratio else "-"])  # fmt: skip
        checks = "; ".join(
            f"{n}: " + ", ".join(f"{k} {v:.1e}" for k, v in e.items()) for n, e in r["standin_check"].items()
        )
        lines += [f"Stand-in check, each vs nn.BatchNorm on the local batch (max abs / max ref): {checks}", "",
                  f"{r['timing']}", ""]  # fmt: skip
        lines += _table(header, rows)
    elif key == "d2":
        lines += [f"{r['model']}, batch {r['batch_per_rank']} per rank at {r['image']}px, bf16 autocast, channels_last, AdamW",
                  "", r["timing"], ""]  # fmt: skip
        lines += _table(["variant", "ms per step (median)", "host ms per step (median)"],
                        [[n, f"{ms:.2f}", f"{r['host_ms'][n]:.2f}"] for n, ms in r["ms"].items()]) + [""]  # fmt: skip
        lines += [f"- {k}: {v['median']:.3f} (quartiles {v['q1']:.3f}-{v['q3']:.3f})" for k, v in r["ratios"].items()]
    elif key == "e":
        rows = [[n, v.get("activation_MiB", "-"), v.get("saved_for_backward_MiB", "-"), v.get("error", v.get("repr", ""))]
                for n, v in r["variants"].items()]  # fmt: skip
        lines += [r["model"], "", r["measure"], ""]
        lines += _table(["variant", "activation MiB (peak - before forward)", "saved for backward MiB", "layer"], rows)
    else:
        lines += ["```", json.dumps(r, indent=1, default=str)[:3000], "```"]
    checks = r.get("checks") or {}
    return lines + [""] + [f"- check {name}: {c['passed']} ({c['measured']})" for name, c in checks.items()]


HEADER_KEYS = ("card", "torch", "syncnorm_commit", "device", "torchvision", "triton", "cuda", "cudnn", "profile",
               "budget_s", "grace_s", "elapsed_s", "command")  # fmt: skip


def markdown(meta: dict, target_rows: list[dict], sections: dict) -> str:
    lines = ["# syncnorm GPU check", ""]
    lines += [f"- {k}: {meta[k]}" for k in HEADER_KEYS if k in meta]
    lines += ["", "## How communication was left out", "", COMMUNICATION_NOTE, "", "## Targets", ""]
    lines += _table(["target", "measured", "result"], [[t["target"], t["measured"], t["result"]] for t in target_rows])
    lines += ["", "## Sections", ""]
    lines += _table(["section", "status", "seconds", "note"],
                    [[f"{k}) {s['title']}", s["status"], s.get("seconds", ""), _note(s)[:300]] for k, s in sections.items()])  # fmt: skip
    for key, section in sections.items():
        lines += ["", f"## {key}) {section['title']}", "", f"status: {section['status']}", ""]
        if "result" in section:
            try:
                lines += _details(key, section["result"])
            except Exception as err:  # noqa: BLE001  (a renderer bug must not lose the data)
                lines += [f"(table failed: {type(err).__name__}: {err})", "```",
                          json.dumps(section["result"], default=str)[:3000], "```"]  # fmt: skip
        if "traceback" in section:
            lines += ["```", section["traceback"], "```"]
    return "\n".join(lines) + "\n"


def _note(section: dict) -> str:
    if "missed" in section:
        return "missed: " + ", ".join(section["missed"])
    return str(section.get("reason", section.get("error", "")))


def summary(meta: dict, target_rows: list[dict], sections: dict, cuda: bool) -> str:
    lines = [f"gpu_check summary: card {meta.get('card')}, torch {meta['torch']}, syncnorm {meta.get('syncnorm_commit')}, "
             f"{meta.get('elapsed_s')} s"]  # fmt: skip
    lines += [f"  [{t['result']}] {t['target']}: {t['measured']}" for t in target_rows]
    lines += [
        f"  section {k}: {s['status']} {s.get('seconds', '')} s {_note(s)[:200]}".rstrip() for k, s in sections.items()
    ]
    lines.append("RESULT " + overall(sections, target_rows, cuda)[1])
    return "\n".join(lines)
