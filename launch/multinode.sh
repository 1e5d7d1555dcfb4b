#!/usr/bin/env bash
# One site of a multi-host run. Run it on every host, each with its own
# --node-rank; the training options after `--` must be the same everywhere.
#
#   # the server's host (node 0; its address is the rendezvous point)
#   launch/multinode.sh --nnodes 4 --node-rank 0 --master-addr 10.8.0.1 --master-port 29500 -- \
#       --method split --hospitals 3 --model resnet20 --dataset cifar10 --data-dir /data/cifar
#   # hospital i's host, i = 1..3
#   launch/multinode.sh --nnodes 4 --node-rank i --master-addr 10.8.0.1 --master-port 29500 -- <same options>
#
# Rank layout (torchrun's static rendezvous: node ranks fix the ranks):
#   --method split: node 0 runs the server alone (rank 0, `server`); node r >= 1
#     runs --nproc-per-node hospitals (default 1), ranks 1..N in node order.
#   --method ddp:   every node runs --nproc-per-node hospitals, ranks 0..N-1.
#
# Options of this script (before `--`):
#   --nnodes M  --node-rank R  --master-addr HOST  --master-port PORT   (or --rdzv-endpoint HOST:PORT)
#   --nproc-per-node K   hospitals on this node (default 1)
#   --rdzv-timeout S     give up if not every node has joined within S seconds (default 120)
#   --local-addr ADDR    this node's address as the others reach it
#   --print-torchrun     print the equivalent torchrun command and exit
#
# Environment: MASTER_ADDR/MASTER_PORT (defaults for --master-addr/--master-port),
# TP_SOCKET_IFNAME (TensorPipe: interface for RPC traffic), GLOO_SOCKET_IFNAME
# (gloo: interface for DDP and L1 averaging). Ports: see launch/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$here"
exec "$python" -m splitrpc.launch multinode "$@"
