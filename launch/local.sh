#!/usr/bin/env bash
# Split learning, the DDP baseline or centralized training on this machine.
#
#   launch/local.sh --method split --hospitals 3 --model resnet20 --dataset cifar10 --data-dir data
#
# Works out the process count from --method and --hospitals (1 server + N
# hospitals, N DDP ranks, or 1) and starts them under torchrun's elastic agent
# on a free loopback port (MASTER_PORT=<port> to choose one). Every option is
# forwarded to splitrpc-train; see `splitrpc-train --help`.
#
#   PRINT=1 launch/local.sh ...   prints the equivalent plain torchrun command.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
if [ "${PRINT:-0}" = 1 ]; then
    nproc="$("$python" -m splitrpc.launch world-size "$@")"
    echo "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node $nproc -m splitrpc.train $*"
    exit 0
fi
cd "$here"
exec "$python" -m splitrpc.launch local "$@"
