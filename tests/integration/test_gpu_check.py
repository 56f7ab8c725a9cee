"""tools/gpu_check rehearses on CPU, and its own checks pass: run as subprocesses, never imported.

The GPU check carries its checks of itself (``tools/gpu_check/selfcheck.py``: the CPU rehearsal
of every section, the watchdog, and planted failures that each must show in the report). Here
they run in three groups, each a pytest process of its own, so xdist can spread them.
"""

from __future__ import annotations

import os
import sys

import pytest
from helpers.harness import run_split

SELFCHECK = os.path.join("tools", "gpu_check", "selfcheck.py")

# The rehearsal's own budget (420 s) + grace (30 s) + hard exit (10 s), and a margin for pytest's start.
GROUPS = {
    "rehearsal": ("rehearsal", 600),
    "watchdog": ("watchdog", 300),
    "planted failures": ("not rehearsal and not watchdog", 400),
}


@pytest.mark.parametrize(
    "group", [pytest.param(group, marks=pytest.mark.timeout(timeout + 30)) for group, (_, timeout) in GROUPS.items()]
)
def test_gpu_check_selfcheck(group, tmp_path):
    expression, timeout = GROUPS[group]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SELFCHECK]
    command += ["-k", expression, "--basetemp", str(tmp_path / "selfcheck"), "-o", f"timeout={timeout - 30}"]
    returncode, stdout, stderr = run_split(command, timeout=timeout)  # from the repository root
    tail = stdout[-6000:] + stderr[-3000:]
    assert returncode == 0, tail
    # the group ran checks, and none was skipped
    summary = stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, tail
