#!/usr/bin/env bash
# One run over an emulated multi-site network on this machine: a network
# namespace per party, shaped veth links on a bridge, every party started with
# multinode.sh inside its namespace. Needs root. See bench/wan.py.
#
#   launch/wan.sh --rate 20mbit --out results/x.jsonl -- --method split --hospitals 2 --model vgg16 ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$here"
exec "$python" -m bench.wan "$@"
