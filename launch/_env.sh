# shellcheck shell=bash
# Shared environment for the launch scripts; sourced, not run.

# Usage: set_launch_env NPROC_PER_NODE
set_launch_env() {
    local cores threads
    cores=$(nproc 2>/dev/null || echo 1)
    threads=$((cores / $1))
    ((threads >= 1)) || threads=1
    # More threads than cores/NPROC oversubscribes the CPU and makes gloo collectives crawl.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
    # With torchrun's default shared rendezvous store, workers of a restarted group can read the
    # previous attempt's addresses and fail to connect (pytorch/pytorch#135712, #167288): give every
    # attempt a fresh store so that --max-restarts actually recovers.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
}

_has_torch() {
    # find_spec, not `import torch`: the same answer for an installed torch, without the seconds an
    # import takes.
    "$1" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' >/dev/null 2>&1
}

# Usage: pick_python; then run "$LAUNCH_PYTHON". The interpreter a user would run the script with:
# $PYTHON when set; else `python` when it has torch (an activated venv or conda environment, where
# `python3` may still be the system one); else `python3`. Exits with a message naming PYTHON when
# the chosen interpreter has no torch, before anything starts.
pick_python() {
    local origin
    if [[ -n ${PYTHON:-} ]]; then
        LAUNCH_PYTHON=$PYTHON
        origin="PYTHON=$PYTHON"
    elif command -v python >/dev/null 2>&1 && _has_torch python; then
        LAUNCH_PYTHON=python
        origin="python from PATH"
    else
        LAUNCH_PYTHON=python3
        origin="python3 from PATH (python: $(command -v python >/dev/null 2>&1 && echo 'no torch' || echo 'not found'))"
    fi
    if ! command -v "$LAUNCH_PYTHON" >/dev/null 2>&1; then
        echo "$(basename "$0"): no interpreter '$LAUNCH_PYTHON' ($origin). Set PYTHON to the python of the" \
            "environment that has torch, e.g. PYTHON=/path/to/venv/bin/python $(basename "$0") ..." >&2
        exit 2
    fi
    if ! _has_torch "$LAUNCH_PYTHON"; then
        echo "$(basename "$0"): $(command -v "$LAUNCH_PYTHON") ($origin) cannot import torch. Set PYTHON to the" \
            "python of the environment that has torch and syncnorm, e.g. PYTHON=/path/to/venv/bin/python" \
            "$(basename "$0") ..." >&2
        exit 2
    fi
    export LAUNCH_PYTHON
}
