#!/usr/bin/env bash
# Start this node's torchrun agent of a multi-node job (run it once on every node).
#
# Usage:  launch/torchrun_multinode.sh [OPTIONS] SCRIPT [ARGS...]
#   e.g.  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=4 \
#             launch/torchrun_multinode.sh examples/train_digits.py --out /shared/runs/digits
#   PYTHON=/path/to/venv/bin/python picks the interpreter (default: python when it imports torch,
#   else python3)
#
# Settings come from the environment, or from the matching option (options win):
#   NNODES          --nnodes N            number of nodes (default 1)
#   NODE_RANK       --node-rank R         this node's index; node 0 hosts the rendezvous store
#                                         (unset: torchrun decides by matching MASTER_ADDR)
#   MASTER_ADDR     --master-addr HOST    address of node 0, reachable from every node (default 127.0.0.1)
#   MASTER_PORT     --master-port PORT    free TCP port on node 0 (default 29500)
#   NPROC_PER_NODE  --nproc-per-node P    worker processes per node (default 1)
#   MAX_RESTARTS    --max-restarts K      group restarts after a worker fails (default 3); the
#                                         training script resumes from its newest checkpoint
#   RDZV_ID         --rdzv-id ID          job id shared by all nodes (default syncnorm)
#   RDZV_TIMEOUT    --rdzv-timeout S      seconds to wait for all nodes to join (default 600)
#   OMP_NUM_THREADS                       threads per worker (default: CPU cores / P, at least 1)
#   SYNCNORM_BACKEND                      gloo|nccl; default chosen by the training script
#   PYTHON                                interpreter that has torch installed (default: python when
#                                         it imports torch, else python3); stops with a message if
#                                         it has no torch
# Rendezvous is c10d (torch's TCP store on MASTER_ADDR:MASTER_PORT); ranks are assigned when all
# NNODES agents have joined, and again after every restart, so rank 0 may move to another node:
# give train_digits.py an --out on a filesystem that all nodes share.
set -euo pipefail

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_value() {
    [[ $# -ge 2 && -n $2 ]] || { echo "option $1 needs a value" >&2; usage; }
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --nnodes) need_value "$@"; NNODES=$2; shift 2 ;;
        --node-rank) need_value "$@"; NODE_RANK=$2; shift 2 ;;
        --master-addr) need_value "$@"; MASTER_ADDR=$2; shift 2 ;;
        --master-port) need_value "$@"; MASTER_PORT=$2; shift 2 ;;
        --nproc-per-node) need_value "$@"; NPROC_PER_NODE=$2; shift 2 ;;
        --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift 2 ;;
        --rdzv-id) need_value "$@"; RDZV_ID=$2; shift 2 ;;
        --rdzv-timeout) need_value "$@"; RDZV_TIMEOUT=$2; shift 2 ;;
        -h | --help) usage ;;
        --) shift; break ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || usage
[[ -f $1 ]] || { echo "no such training script: $1" >&2; usage; }

nnodes=${NNODES:-1}
nproc_per_node=${NPROC_PER_NODE:-1}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
max_restarts=${MAX_RESTARTS:-3}
for pair in "NNODES:$nnodes" "NPROC_PER_NODE:$nproc_per_node" "MASTER_PORT:$master_port"; do
    [[ ${pair#*:} =~ ^[1-9][0-9]*$ ]] || { echo "${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2; exit 2; }
done
[[ $max_restarts =~ ^[0-9]+$ ]] || { echo "MAX_RESTARTS must be a non-negative integer" >&2; exit 2; }

rdzv_conf="join_timeout=${RDZV_TIMEOUT:-600}"
if [[ -n ${NODE_RANK:-} ]]; then
    [[ $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $nnodes ]] || { echo "NODE_RANK must be in [0, $nnodes)" >&2; exit 2; }
    # Say explicitly who hosts the store: guessing from MASTER_ADDR races when nodes share an address.
    if [[ $NODE_RANK -eq 0 ]]; then rdzv_conf+=",is_host=1"; else rdzv_conf+=",is_host=0"; fi
fi

# shellcheck source=launch/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
set_launch_env "$nproc_per_node"
pick_python

exec "$LAUNCH_PYTHON" -m torch.distributed.run \
    --nnodes "$nnodes" \
    --nproc-per-node "$nproc_per_node" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$master_addr:$master_port" \
    --rdzv-id "${RDZV_ID:-syncnorm}" \
    --rdzv-conf "$rdzv_conf" \
    --max-restarts "$max_restarts" \
    "$@"
