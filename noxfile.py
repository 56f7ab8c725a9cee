"""The torch-version matrix: `nox` runs all three sessions, `nox -s models` one of them.

* ``tests``: the pinned suite, exactly the README's test command (torch 2.13.0, CPU build).
* ``models``: the newest torch (2.14.1, the CUDA build, which runs on CPU) with torchvision and
  timm: the core equivalence tests, the model-zoo tests, and the fake-CUDA test (the CUDA path of
  every synchronised layer on fake CUDA tensors: no host read, no CPU-CUDA copy, no call torch's
  CUDA kernels refuse), which needs a CUDA build of torch and no GPU.
  torchvision's wheels import only with their matching CUDA build of torch, which is why the
  model-zoo tests live here and skip in the pinned suite.
* ``oldest``: the oldest torch ``pyproject.toml`` admits (``torch>=2.5``): the core tests.
* ``wheel``: syncnorm built as a wheel and installed as users get it (not editable): every unit
  and distributed test against that install.

The sessions choose their tests by marker (``tests/conftest.py``), not by file.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "models", "oldest", "wheel"]
nox.options.reuse_existing_virtualenvs = True

TEST_TOOLS = ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3"]
NEWEST = {"torch": "2.14.1", "torchvision": "0.29.1"}
OLDEST_TORCH = "2.5.1"


@nox.session
def tests(session: nox.Session) -> None:
    """The pinned suite: the README's test command."""
    session.install("-c", "constraints.txt", "-e", ".[dev]")
    session.run("python", "-m", "pytest", "-n", "auto", *session.posargs)


@nox.session
def models(session: nox.Session) -> None:
    """Newest torch with torchvision and timm: core equivalence and the model zoos."""
    session.install(f"torch=={NEWEST['torch']}", f"torchvision=={NEWEST['torchvision']}", "timm", *TEST_TOOLS)
    session.install("--no-deps", "-e", ".")
    session.run(
        "python",
        "-c",
        "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__)",
    )
    session.run("python", "-m", "pytest", "-n", "auto", "-m", "core or models or fake_cuda", *session.posargs)


@nox.session
def oldest(session: nox.Session) -> None:
    """The oldest torch the project claims: the core tests."""
    session.install(f"torch=={OLDEST_TORCH}", "numpy", *TEST_TOOLS)
    session.install("--no-deps", "-e", ".")
    session.run("python", "-c", "import torch; print(torch.__version__)")
    session.run("python", "-m", "pytest", "-n", "auto", "-m", "core", *session.posargs)


@nox.session
def wheel(session: nox.Session) -> None:
    """The package as users install it: a built wheel, not the source tree."""
    folder = session.create_tmp()
    session.run("python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", folder, ".")
    session.install("-c", "constraints.txt", "torch", "numpy", *TEST_TOOLS)
    wheels = [name for name in os.listdir(folder) if name.startswith("syncnorm-") and name.endswith(".whl")]
    session.install("--no-deps", "--force-reinstall", os.path.join(folder, wheels[0]))
    location = session.run(
        "python", "-c", "import syncnorm, os; print(os.path.dirname(syncnorm.__file__))", silent=True
    ).strip()
    if "site-packages" not in location:
        session.error(f"syncnorm imported from {location}, not from the installed wheel")
    session.run("python", "-m", "pytest", "-n", "auto", "-m", "not integration", *session.posargs)
