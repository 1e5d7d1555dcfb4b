"""What one RPC round trip puts on the wire, read from the kernel's TCP counters.

    python -m bench.rpc_bytes > results/rpc_bytes.json

This process and one peer form an RPC group over TensorPipe's TCP transport
(``--transport tcp``, as every run uses). For each size of ``SIZES`` a float32
tensor goes to the peer and comes back ``--calls`` times; the difference of
this process's per-socket counters (``ss``) before and after, less
retransmissions and the rendezvous store's sockets, divided by the calls, is
the bytes per call in each direction. What exceeds the tensor's own bytes is
TensorPipe's framing of the request and of the response.

tests/test_bench_bytes.py runs it and compares it with the payload of the
committed benchmark baseline (bench/baseline/).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed.rpc as rpc

from bench.rpc_peer import echo
from splitrpc import comm, transport
from splitrpc.config import parse_args

REPO = Path(__file__).resolve().parents[1]
SIZES = {"64KB": 64 * 1024, "1MB": 1 << 20, "8MB": 8 << 20}  # one sample ... one batch of activations
CALLS = 10
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wire_bytes(store_port: int | None) -> tuple[int, int] | None:
    """(sent less retransmitted, received) over this process's sockets, the store's left out; None without `ss`."""
    counters = comm.socket_counters()
    if counters is None:
        return None
    sent = received = 0
    for (local, peer), (s, r, retransmitted) in counters.items():
        if store_port not in (comm.port_of(local), comm.port_of(peer)):
            sent += s - retransmitted
            received += r
    return sent, received


def measure(calls: int) -> dict:
    cfg = parse_args([])
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "TORCH_CPP_LOG_LEVEL": "FATAL"}
    peer = subprocess.Popen([sys.executable, "-m", "bench.rpc_bytes", "--peer"], env={**env, "RANK": "1"}, cwd=REPO)
    os.environ.update({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}, RANK="0")
    try:
        transport.start_rpc(cfg, 0, 2)
        results = {}
        for name, nbytes in SIZES.items():
            tensor = torch.zeros(nbytes // 4)
            rpc.rpc_sync(transport.hospital_name(1), echo, args=(tensor,))  # connections and buffers warmed up
            sent0, received0 = wire_bytes(port)
            for _ in range(calls):
                rpc.rpc_sync(transport.hospital_name(1), echo, args=(tensor,))
            sent1, received1 = wire_bytes(port)
            results[name] = {"tensor_bytes": comm.tensor_bytes(tensor), "calls": calls,
                             "sent_per_call": (sent1 - sent0) / calls, "received_per_call": (received1 - received0) / calls}
        transport.stop_rpc(graceful=True, timeout_s=30)
    finally:
        try:
            peer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            peer.kill()
    return results


def serve_as_peer() -> None:
    transport.start_rpc(parse_args([]), 1, 2)
    transport.stop_rpc(graceful=True, timeout_s=TIMEOUT_S)  # returns once rank 0 has finished too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rpc_bytes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        serve_as_peer()
        return 0
    if comm.socket_counters() is None:
        print("rpc_bytes: error: `ss` is not available; the kernel's TCP counters cannot be read", file=sys.stderr)
        return 2
    sizes = measure(args.calls)
    for entry in sizes.values():
        entry["framing_sent_per_call"] = entry["sent_per_call"] - entry["tensor_bytes"]
        entry["framing_received_per_call"] = entry["received_per_call"] - entry["tensor_bytes"]
    json.dump({"command": "python -m bench.rpc_bytes" + (f" --calls {args.calls}" if args.calls != CALLS else ""),
               "torch_version": torch.__version__, "sizes": sizes}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
