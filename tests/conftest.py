"""Shared fixtures, and the markers that select the test sets by kind.

The folders are the kinds: ``unit/`` (one process), ``distributed/`` (real gloo ranks, through
:func:`syncnorm.testing.run_ranks`) and ``integration/`` (whole jobs: torchrun, Lightning, the
frameworks, the examples, the model zoos, the tools; their job scripts are in
``integration/jobs/``). Each test gets its folder's marker, so that a session selects by marker:

* ``gloo``: starts gloo ranks (``distributed/`` and ``integration/``);
* ``integration``: whole jobs as subprocesses;
* ``models``: needs torchvision or timm (the model-zoo tests);
* ``fake_cuda``: the CUDA path on fake CUDA tensors (needs a CUDA build of torch, no GPU);
* ``core``: the equivalence tests every torch version must pass (the oldest torch runs these);
* ``slow``: marked in the test itself.

``pytest -m "not integration"`` is every unit and distributed test; ``-m models`` the model zoos.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from syncnorm import testing

KIND_MARKERS = {"unit": (), "distributed": ("gloo",), "integration": ("gloo", "integration")}
# By file: what needs more than the pinned environment has, and the core set.
FILE_MARKERS = {
    "test_models.py": ("models",),
    "test_fake_cuda.py": ("fake_cuda",),
    **{
        name: ("core",)
        for name in (
            "test_core.py",
            "test_convert.py",
            "test_ddp.py",
            "test_precision_and_copies.py",
            "test_variants.py",
            "test_sharded.py",
            "test_harness.py",
        )
    },
}


def pytest_configure(config):
    # Each xdist worker shares the machine's cores with the other workers and with the ranks they
    # start. With torch's default of one intra-op thread per core, OpenMP's spinning threads
    # oversubscribe them: the model-zoo tests' convolutions then took 10 to 60 times their time
    # alone on a 2-core machine, and once more than pytest's 300 s timeout.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        for name in KIND_MARKERS.get(path.parent.name, ()) + FILE_MARKERS.get(path.name, ()):
            item.add_marker(name)


@pytest.fixture
def world():
    """``syncnorm.testing.run_ranks``: ``world(fn, 2, *args)`` runs ``fn(rank, 2, *args)`` on two gloo ranks."""
    return testing.run_ranks


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    return testing.free_port()


@pytest.fixture
def kill_tree():
    """``kill_tree(pid)``: SIGKILL a process and every process it started, whatever session they lead."""
    return testing.kill_tree
