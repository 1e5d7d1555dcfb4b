"""What one shaped link of bench.wan delivers one way and both ways at once.

    python -m bench.link_duplex --rate 20mbit [--mbytes 40] [--json results/link_duplex.json]

Two namespaces on the emulated network of ``bench.wan`` (a hospital link shaped
with tbf on both ends) move ``--mbytes`` of bulk TCP: first one way, then both
ways at the same time. Split learning's traffic crosses a link one direction at
a time (activations up, then gradients down); a ring all-reduce sends and
receives at once, and on this emulator the ACKs of each direction queue in the
tbf behind the other direction's data. The ratio of the two goodputs is what the
time model's DDP term leaves out. Root only, like bench.wan; everything it
creates is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.wan import Network, check_environment, format_rate, parse_rate
from splitrpc.errors import UserError, report

PORT = 5201
CHUNK_B = 1 << 20
CONNECT_TRIES = 200
TRANSFER_TIMEOUT_S = 600


def endpoint(role: str, address: str, nbytes: int, both_ways: bool) -> None:
    """One end of the transfer, run inside its namespace: prints the seconds it took."""
    if role == "listen":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, PORT))
        listener.listen(1)
        conn, _ = listener.accept()
    else:
        for _ in range(CONNECT_TRIES):
            try:
                conn = socket.create_connection((address, PORT))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit(f"link_duplex: could not connect to {address}:{PORT}")
    chunk = b"\0" * CHUNK_B

    def send():
        left = nbytes
        while left > 0:
            left -= conn.send(chunk[:min(left, CHUNK_B)])

    def receive():
        got = 0
        while got < nbytes:
            data = conn.recv(CHUNK_B)
            if not data:
                break
            got += len(data)

    sends, receives = role == "connect" or both_ways, role == "listen" or both_ways
    threads = [threading.Thread(target=f) for f, on in ((send, sends), (receive, receives)) if on]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{time.monotonic() - started:.6f}", flush=True)
    conn.close()


def measure(rate: float, nbytes: int) -> dict:
    """Goodput per direction (bit/s of TCP payload) one way and both ways, on one shaped link."""
    check_environment()
    net = Network("ddp", 2, rate, None)
    result = {"rate_bit_s": rate, "bytes": nbytes}
    try:
        net.build()
        a, b = net.parties
        for mode in ("one_way", "both_ways"):
            flags = [str(nbytes), "1" if mode == "both_ways" else "0"]
            run = [sys.executable, "-m", "bench.link_duplex", "--endpoint"]
            listen = subprocess.Popen(["ip", "netns", "exec", a.netns, *run, "listen", a.address, *flags],
                                      stdout=subprocess.PIPE, text=True)
            connect = subprocess.Popen(["ip", "netns", "exec", b.netns, *run, "connect", a.address, *flags],
                                       stdout=subprocess.PIPE, text=True)
            seconds = [float(p.communicate(timeout=TRANSFER_TIMEOUT_S)[0].strip().splitlines()[-1])
                       for p in (listen, connect)]
            result[mode] = {"seconds": max(seconds), "goodput_bit_s": nbytes * 8 / max(seconds)}
    finally:
        net.close()
    result["both_over_one"] = result["both_ways"]["goodput_bit_s"] / result["one_way"]["goodput_bit_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--endpoint"]:
        role, address, nbytes, both = argv[1:5]
        endpoint(role, address, int(nbytes), both == "1")
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.link_duplex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", action="append", required=True, help="link rate, e.g. 20mbit (repeatable)")
    parser.add_argument("--mbytes", type=float, default=40.0, help="MB each direction carries")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args(argv)
    try:
        rates = [parse_rate(r) for r in args.rate]
        if None in rates:
            raise UserError("--rate must be a rate such as 20mbit, not 'none'")
        if args.mbytes <= 0:
            raise UserError(f"--mbytes must be positive, got {args.mbytes:g}")
        results = []
        for rate in rates:
            r = measure(rate, int(args.mbytes * 1e6))
            results.append(r)
            print(f"[link_duplex] {format_rate(rate)}: one way {r['one_way']['goodput_bit_s'] / 1e6:.2f} Mbit/s, "
                  f"both ways {r['both_ways']['goodput_bit_s'] / 1e6:.2f} Mbit/s per direction "
                  f"({r['both_over_one']:.3f} of one way)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    except UserError as exc:
        report(exc, "")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
