# shellcheck shell=bash
# Shared environment for the launch scripts; sourced, not run. Usage: set_launch_env NPROC_PER_NODE
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
