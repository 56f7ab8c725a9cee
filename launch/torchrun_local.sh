#!/usr/bin/env bash
# Run a training script on this machine with NPROC processes under torchrun.
#
# Usage:  launch/torchrun_local.sh NPROC SCRIPT [ARGS...]
#   e.g.  launch/torchrun_local.sh 2 examples/train_digits.py --epochs 3 --out runs/digits
#   PYTHON=/path/to/venv/bin/python launch/torchrun_local.sh ...   picks the interpreter (default:
#   python when it imports torch, else python3)
#
# torchrun --standalone runs its own rendezvous on a free local port, so several runs can share
# a machine. Environment knobs (all optional):
#   MAX_RESTARTS      how often torchrun restarts the group after a worker fails (default 0 here;
#                     train_digits.py resumes from its newest checkpoint on restart)
#   OMP_NUM_THREADS   threads per process (default: CPU cores / NPROC, at least 1)
#   SYNCNORM_BACKEND  gloo|nccl; default chosen by the training script (nccl on CUDA, gloo on CPU)
#   PYTHON            interpreter that has torch installed (default: python when it imports torch,
#                     else python3); the script stops with a message if it has no torch
set -euo pipefail

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
nproc_per_node=$1
shift
[[ $nproc_per_node =~ ^[1-9][0-9]*$ ]] || { echo "NPROC must be a positive integer, got '$nproc_per_node'" >&2; usage; }
[[ -f $1 ]] || { echo "no such training script: $1" >&2; usage; }

# shellcheck source=launch/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
set_launch_env "$nproc_per_node"
pick_python

exec "$LAUNCH_PYTHON" -m torch.distributed.run \
    --standalone \
    --nnodes 1 \
    --nproc-per-node "$nproc_per_node" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    "$@"
