"""The GPU check's checks of itself: every section runs or says why not, and its checks can fail.

Run from the repository root, as ``tests/integration/test_gpu_check.py`` does::

    python -m pytest tools/gpu_check/selfcheck.py

The GPU check is meant for one short run on a lent GPU; these checks make sure that run is not
spent on a crash, and that its report cannot read PASS for something that did not happen. They
run the CPU rehearsal (``--device cpu --quick``) in a subprocess and check both reports; they
plant each failure the script must catch (a section that raises, a variant error in section e,
a cudagraph skip, a wrongly strided output or input gradient, a missing layer case, a
"fresh" case that is not fresh, a timer that does not synchronise, a budget past 270 s) and
check that it shows as a failure in the section, the target rows and the exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import syncnorm
from benchmarks.measure import time_interleaved
from syncnorm.testing import run_ranks

from . import __main__ as gpu_check
from . import correctness, fresh, models, parts, report, speed
from . import run as frame

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The rehearsal's own budget: on 2 loaded cores it has taken 40 s alone and 120 s beside other
# jobs. The test's timeout stays above budget + grace + the hard exit, so the script's watchdog,
# not the test, decides.
REHEARSAL_BUDGET_S, REHEARSAL_GRACE_S = 420, 30
REHEARSAL_TIMEOUT_S = REHEARSAL_BUDGET_S + REHEARSAL_GRACE_S + frame.HARD_EXIT_S + 60


def _run(out, *extra, timeout):
    command = [sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--quick", "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def _run_frame(tmp_path, sections: list[str]) -> frame.Run:
    """A Run in this process (CPU, quick sizes), for sections run one at a time."""
    args = gpu_check.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path / "report")])
    return frame.Run(args, time.monotonic(), sections)


@pytest.mark.timeout(REHEARSAL_TIMEOUT_S + 30)
def test_cpu_rehearsal_runs_every_section_and_reports_every_target(tmp_path):
    budget = ["--budget-s", str(REHEARSAL_BUDGET_S), "--grace-s", str(REHEARSAL_GRACE_S)]
    done = _run(tmp_path / "report", *budget, timeout=REHEARSAL_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "RESULT REHEARSED" in done.stdout
    data = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    markdown = (tmp_path / "report" / "gpu_check.md").read_text()
    sections, meta = data["sections"], data["meta"]
    assert list(sections) == frame.ORDER
    for key, section in sections.items():
        # rehearsed: ran on the CPU stand-ins for what needs CUDA; ok: real checks that passed
        assert section["status"] in ("ok", "rehearsed"), (key, section.get("error"), section.get("missed"))
        assert section["result"]["checks"], key
        assert f"## {key}) " in markdown
    # the report names the torch version, the card and the commit
    assert meta["torch"] == torch.__version__ and meta["card"] == "none (CPU rehearsal)"
    assert meta["syncnorm_commit"] and meta["syncnorm_commit"] != "unknown"
    for key in ("card", "torch", "syncnorm_commit"):
        assert f"- {key}: {meta[key]}" in markdown
    rows = {row["target"]: row for row in data["targets"]}
    assert list(rows) == [target for target, _, _ in report.TARGETS]
    for row in data["targets"]:
        assert f"| {row['target']} | {row['measured']} | {row['result']} |" in markdown
        assert row["result"] in ("PASS", "CPU rehearsal (no verdict)"), row
    by_check = {(row["section"], name): row["result"] for (_, _, name), row in zip(report.TARGETS, data["targets"])}
    for passed in [("a", "correctness"), ("c2", "default"), ("c2", "reduce-overhead"), ("b", "layer_coverage"),
                   ("b", "layer_layouts")]:  # fmt: skip
        assert by_check[passed] == "PASS", passed
    assert "How communication was left out" in markdown and "IdenticalRanks" in markdown

    b = sections["b"]["result"]
    # the stand-in really ran: syncnorm's ResNet-50 step did two all_reduces per BatchNorm layer
    assert b["resnet50"]["variants"]["syncnorm"]["collectives"] == {"all_reduce": 2 * 53}
    assert b["fingerprint_check"] is True  # syncnorm's layer fingerprints were verified under the stand-in
    cases = models.sync_layer_cases()
    assert [e["case"] for e in b["layers"]] == [c.name for c in cases]
    for entry in b["layers"]:
        # every case ran, through the collectives (an empty rank on CPU raises unless the others' counts arrive)
        assert "error" not in entry and entry["all_reduces"] > 0 and entry["finite"] and entry["layout"] == [], entry
    assert set(b["probe"]["ranks"]) == set(models.PROBE_RANK_BATCHES)
    assert all("error" not in r and r["all_reduces"] > 0 for r in b["probe"]["ranks"].values()), b["probe"]
    assert set(sections["c1"]["result"]["probe"]) == set(models.PROBE_RANK_BATCHES)

    c3 = sections["c3"]["result"]
    for model in fresh.MODELS:  # each first call ran in its own fresh interpreter
        result = c3["models"][model]
        assert "error" not in result, result
        assert result["pid"] not in (meta["pid"], os.getpid()) and result["fresh"] and result["fresh_at_capture"]
    assert all("host_ms" in row for row in sections["d1"]["result"]["rows"])
    assert "gpu_check summary" in done.stdout


@pytest.mark.timeout(240)
def test_the_watchdog_ends_an_overrunning_run_within_budget_plus_grace(tmp_path):
    budget_s, grace_s = 8, 1
    start = time.monotonic()
    done = _run(tmp_path / "report", "--sections", "a,b", "--budget-s", str(budget_s), "--grace-s", str(grace_s),
                timeout=200)  # fmt: skip
    wall = time.monotonic() - start
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert "WATCHDOG" in done.stdout and "RESULT FAILED" in done.stdout
    # budget + grace from the process start; the interpreter's own start and exit are the slack
    assert wall < budget_s + grace_s + frame.HARD_EXIT_S + 15, wall
    sections = json.loads((tmp_path / "report" / "gpu_check.json").read_text())["sections"]
    # a (the correctness ranks take longer than 9 s on CPU) was running: killed; on a machine so loaded
    # that the imports alone passed budget + grace, nothing started at all
    assert sections["a"]["status"] in ("killed", "not run (budget)")
    assert sections["b"]["status"] in ("killed", "not run (budget)")
    assert sections["d2"]["status"] == "not selected" and sections["c1"]["status"] == "not selected"
    assert "| d2) speed: ResNet-50 training step | not selected |" in (tmp_path / "report" / "gpu_check.md").read_text()


def test_budget_constants_keep_a_gpu_run_within_270_s():
    assert frame.WATCHDOG_WORST_S == frame.BUDGET_S + frame.GRACE_S + frame.HARD_EXIT_S <= 270
    defaults = gpu_check.parse_args(["--device", "cuda", "--out", "x"])
    assert defaults.budget_s + defaults.grace_s + frame.HARD_EXIT_S <= 270
    # what the sections need on the GPU, with 30 s for the imports and CUDA start, fits the budget
    assert sum(frame.NEEDS_S.values()) + 30 <= frame.BUDGET_S
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cuda", "--out", "x", "--budget-s", "400"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cuda", "--out", "x", "--grace-s", "60"])
    assert gpu_check.parse_args(["--device", "cpu", "--out", "x", "--budget-s", "400"]).budget_s == 400


def test_a_section_that_does_not_fit_is_not_run_and_the_run_is_incomplete(tmp_path):
    run = _run_frame(tmp_path, ["b"])
    run.deadline = time.monotonic() - 1
    frame.run_section(run, "b", lambda run: pytest.fail("a section past the budget must not start"))
    assert run.sections["b"]["status"] == "not run (budget)"
    rows = run.targets()
    assert {row["result"] for row in rows if row["section"] == "b"} == {"NOT MEASURED"}
    assert report.overall(run.sections, rows, cuda=False)[0] == 4


def test_a_section_that_raises_or_reports_no_checks_fails_the_run(tmp_path):
    run = _run_frame(tmp_path, ["c1", "d2"])

    def raises(run):
        raise RuntimeError("planted")

    frame.run_section(run, "c1", raises)
    frame.run_section(run, "d2", lambda run: {"ms": {}})  # no checks: not "ok"
    assert run.sections["c1"]["status"] == "failed" and "planted" in run.sections["c1"]["error"]
    assert run.sections["d2"]["status"] == "failed" and run.sections["d2"]["missed"]
    rows = run.targets()
    assert {row["result"] for row in rows if row["section"] in ("c1", "d2")} == {"FAIL"}
    code, line = report.overall(run.sections, rows, cuda=False)
    assert code == 1 and line.startswith("FAILED")
    summary = report.summary(run.meta, rows, run.sections, cuda=False)
    assert "section c1: failed" in summary and "RESULT FAILED" in summary and "[FAIL]" in summary
    written = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    assert written["sections"]["c1"]["status"] == "failed"
    assert "| c1) " in (tmp_path / "report" / "gpu_check.md").read_text()


def test_section_e_fails_when_a_variant_raises(tmp_path, monkeypatch):
    run = _run_frame(tmp_path, ["e"])
    frame.run_section(run, "e", speed.section_memory)
    assert run.sections["e"]["status"] == "rehearsed", run.sections["e"]  # the peak needs CUDA

    def broken(channels):
        raise RuntimeError("planted variant failure")

    monkeypatch.setitem(speed.MEMORY_VARIANTS, speed.TARGET_VARIANT, broken)
    frame.run_section(run, "e", speed.section_memory)
    section = run.sections["e"]
    assert section["status"] == "failed" and "variants_ran" in section["missed"]
    assert "planted variant failure" in section["result"]["variants"][speed.TARGET_VARIANT]["error"]
    rows = [row for row in run.targets() if row["section"] == "e"]
    assert [row["result"] for row in rows] == ["FAIL"]
    assert report.overall(run.sections, run.targets(), cuda=False)[0] == 1


def test_abn_memory_target_is_a_row_and_compares_activation_memory():
    assert [name for _, key, name in report.TARGETS if key == "e"] == ["abn_memory"]
    assert speed.ABN_MEMORY_TARGET == 0.6 and speed.BASELINE in speed.MEMORY_VARIANTS
    assert speed.TARGET_VARIANT in speed.MEMORY_VARIANTS


def test_reduce_overhead_needs_cuda_graphs_without_skips():
    assert report.cudagraphs_check(1, 3, cuda=True, backend="inductor")["passed"] is False
    assert report.cudagraphs_check(0, 0, cuda=True, backend="inductor")["passed"] is False
    assert report.cudagraphs_check(0, 2, cuda=True, backend="inductor")["passed"] is True
    assert report.cudagraphs_check(0, 2, cuda=True, backend="aot_eager")["passed"] is None
    assert report.cudagraphs_check(0, 0, cuda=False, backend="inductor")["passed"] is None
    # a planted skip turns the c2 row into MISS and the run into a failure
    sections = {key: {"title": key, "status": "not selected"} for key in frame.SECTIONS}
    checks = {"default": report.check(True, "equal"), "reduce-overhead": report.check(True, "equal"),
              "cudagraphs": report.cudagraphs_check(2, 1, cuda=True, backend="inductor")}  # fmt: skip
    status, missed = frame.section_status({"checks": checks}, cuda=True)
    assert (status, missed) == ("failed", ["cudagraphs"])
    sections["c2"] = {"title": "c2", "status": status, "result": {"checks": checks}}
    rows = report.targets(sections, cuda=True)
    assert [row["result"] for row in rows if row["section"] == "c2"] == ["PASS", "PASS", "MISS"]
    assert report.overall(sections, rows, cuda=True)[0] == 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward returns a contiguous (NCHW) gradient whatever the input's layout."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _PlantedLayer(torch.nn.Module):
    def __init__(self, output_format=None):
        super().__init__()
        self.output_format = output_format

    def forward(self, x):
        out = _ContiguousGrad.apply(x)
        return out.contiguous(memory_format=self.output_format) if self.output_format else out


def test_the_layout_check_fires_on_the_op_own_output_and_gradient():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert parts.layout_problems(x, x.detach().clone(), x.detach().clone()) == []
    assert len(parts.layout_problems(x, x.detach().contiguous(), None)) == 1
    # size-1 dims carry no layout: (1, C, 1, 1) is both layouts at once
    one = torch.randn(1, 3, 1, 1).contiguous(memory_format=torch.channels_last)
    assert parts.layout_problems(one, one.contiguous(), one.contiguous()) == []
    out, grad, _ = parts.op_output_and_grads(_PlantedLayer(), x, dy)
    assert parts.layout_problems(x, out, grad) == [f"grad_input strides (60, 20, 5, 1) != input strides {x.stride()}"]
    out, grad, _ = parts.op_output_and_grads(_PlantedLayer(torch.contiguous_format), x, dy)
    assert [p.split()[0] for p in parts.layout_problems(x, out, grad)] == ["output", "grad_input"]
    # why .grad cannot be checked: AccumulateGrad gives it the input's strides whatever the op returned
    _PlantedLayer()(x).backward(dy)
    assert x.grad.stride() == x.stride()
    # the real layers keep the layout
    for layer in (syncnorm.SyncBatchNorm(3), syncnorm.InPlaceABNSync(3)):
        assert parts.layout_problems(x, *parts.op_output_and_grads(layer, x, dy)[:2]) == []


def _ranks_with_contiguous_grad(rank, world, cases):
    original = syncnorm.SyncBatchNorm.forward
    # the gradient that reaches the input leaves the op contiguous, whatever the input's layout
    syncnorm.SyncBatchNorm.forward = lambda self, input: original(self, _ContiguousGrad.apply(input))
    return correctness.correctness_rank(rank, world, cases, "cpu")


def test_correctness_fails_when_the_op_returns_a_wrongly_strided_gradient():
    cases = [c for c in correctness.correctness_cases(2, quick=True) if c["layout"] == "channels_last"]
    assert cases
    for per_rank in run_ranks(_ranks_with_contiguous_grad, 2, cases, timeout=120):
        assert all(not r["ok"] and any("grad_input strides" in n for n in r["notes"]) for r in per_rank), per_rank


def _ranks_without_synchronisation(rank, world, cases):
    import syncnorm.collectives

    def local_statistics_only(tensor, group, **kwargs):
        tensor[:2].mul_(group.size())  # the layer fingerprint as if every rank sent it; the rest stays local
        return tensor

    syncnorm.collectives.all_reduce = local_statistics_only
    return correctness.correctness_rank(rank, world, cases, "cpu")


def test_correctness_check_fails_when_statistics_are_not_synchronised():
    cases = [c for c in correctness.correctness_cases(2, quick=True) if "float32" in c["name"]]
    results = run_ranks(_ranks_without_synchronisation, 2, cases, timeout=120)
    for per_rank in results:
        assert [r["ok"] for r in per_rank] == [False] * len(cases)
        assert all(r["errors"]["output"] > 1e-2 for r in per_rank)
    good = run_ranks(correctness.correctness_rank, 2, cases, "cpu", timeout=120)
    assert all(r["ok"] for per_rank in good for r in per_rank)


def test_the_sync_check_covers_every_layer_class_with_empty_and_one_value_ranks():
    classes = models.synchronised_layer_classes()
    expected = {syncnorm.SyncBatchNorm, syncnorm.SyncBatchNormAct2d, syncnorm.InPlaceABNSync,
                syncnorm.SyncInstanceNorm1d, syncnorm.SyncInstanceNorm2d, syncnorm.SyncInstanceNorm3d}  # fmt: skip
    assert expected <= set(classes)
    cases = models.sync_layer_cases()
    assert models.layer_coverage(cases, classes)["passed"] is True
    for cls in classes:
        kinds = {models.rank_kind(c) for c in cases if c.layer_class is cls}
        assert kinds == {"full", "empty", "one"}, cls
    # SyncBatchNorm on (N, C), (N, C, L), 2-d and 3-d input
    assert {len(c.shape) for c in cases if c.layer_class is syncnorm.SyncBatchNorm} == {2, 3, 4, 5}
    assert all(c.others_hold_data == (models.rank_kind(c) != "full") for c in cases)
    without_empty = [
        c for c in cases if not (c.layer_class is syncnorm.InPlaceABNSync and models.rank_kind(c) == "empty")
    ]
    assert models.layer_coverage(without_empty, classes)["passed"] is False


def test_other_ranks_add_the_recorded_payload_of_w_minus_1_ranks():
    others = parts.OtherRanks(8)
    with others.recording():
        full = torch.tensor([3.0, 9.0, 4.0])
        others.all_reduce(full)
    assert full.tolist() == [24.0, 72.0, 32.0]  # identical ranks while recording
    with others.replaying():
        empty = torch.tensor([3.0, 9.0, 0.0])
        others.all_reduce(empty)
        assert empty.tolist() == [3.0 + 7 * 3, 9.0 + 7 * 9, 7 * 4.0]
        with pytest.raises(RuntimeError, match="recorded"):
            others.all_reduce(torch.zeros(5))


def test_the_fresh_case_is_refused_where_syncnorm_ran_before(monkeypatch):
    # what a synchronised call leaves behind: its layer's fingerprint, cached
    monkeypatch.setitem(syncnorm.fingerprint._fingerprints, ("planted layer", "forward statistics"), (1, torch.ones(2)))
    result = fresh.run_case("probe", torch.device("cpu"), 2, 16, steps=1)
    assert result["fresh"] is False and result["equal"] is True
    verdict = fresh.first_call_check({"probe": result, "resnet50": dict(result, model="resnet50")}, False, -1)
    assert verdict["passed"] is False and "not a first call" in verdict["measured"]
    fine = dict(result, fresh=True, fresh_at_capture=True, pid=12345)
    assert fresh.first_call_check({m: fine for m in fresh.MODELS}, False, os.getpid())["passed"] is None
    assert fresh.first_call_check({m: fine for m in fresh.MODELS}, False, 12345)["passed"] is False  # same process
    captured = dict(fine, captured=True)
    assert fresh.first_call_check({m: captured for m in fresh.MODELS}, True, os.getpid())["passed"] is True
    differs = dict(captured, equal=False)
    assert fresh.first_call_check({"probe": captured, "resnet50": differs}, True, os.getpid())["passed"] is False
    assert fresh.first_call_check({"probe": captured}, True, os.getpid())["passed"] is False  # one never reported


class _Recorder:
    """A fake DeviceClock and its events: logs synchronisations, event records and calls, in order."""

    def __init__(self):
        self.log: list[str] = []
        self.now = 0.0  # seconds, advanced by the fake calls

    def synchronize(self):
        self.log.append("sync")

    def event(self):
        recorder = self

        class Event:
            def record(self):
                recorder.log.append("record")
                self.at = recorder.now

            def elapsed_time(self, end):
                return (end.at - self.at) * 1e3

        return Event()

    def host_clock(self):
        return self.now


def test_the_timer_synchronises_before_every_start_and_reports_host_time_apart():
    clock = _Recorder()

    def fake_call(name, seconds):
        def call():
            clock.log.append(name)
            clock.now += seconds

        return call

    fns = {"gpu_bound": fake_call("gpu_bound", 0.001), "host_bound": fake_call("host_bound", 0.002)}
    reps, inner = 3, 2
    timed = time_interleaved(fns, reps, warmup=1, inner=inner, clock=clock, host_clock=clock.host_clock)
    assert clock.log[-1] == "sync"  # a final sync before the events are read
    body = clock.log[:-1]
    chunk = 3 + inner
    assert len(body) == (1 + reps) * len(fns) * chunk  # the warm-up repetition runs the same way
    for index in range(0, len(body), chunk):
        # each repetition: synchronise, start event, the calls, end event
        sync, start, *calls, end = body[index : index + chunk]
        assert (sync, start, end) == ("sync", "record", "record") and len(set(calls)) == 1, body
    # seconds per call: device time from the events, host time from the host clock around the calls
    assert timed.device["gpu_bound"] == pytest.approx([0.001] * reps)
    assert timed.host["host_bound"] == pytest.approx([0.002] * reps)
