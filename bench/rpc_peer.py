"""Functions the benchmark calls over RPC (importable on every party), and a plain TCP echo server."""

from __future__ import annotations

import socket
import sys
import threading


def echo(tensor):
    """An RPC round trip: the tensor goes to the peer and comes back."""
    return tensor


def tcp_echo_server(port_file: str) -> None:
    """Echo every byte back on each connection; the floor an RPC round trip is compared against."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    with open(port_file, "w") as fh:
        fh.write(str(server.getsockname()[1]))

    def serve(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    return
                conn.sendall(chunk)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    tcp_echo_server(sys.argv[1])
