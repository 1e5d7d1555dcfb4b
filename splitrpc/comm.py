"""Communication accounting, three ways.

1. analytic: bytes implied by tensor shapes alone (no measurement);
2. payload: our code's own count of the tensors it hands to the transport,
   booked as they are handed over (RPC arguments and results, the activation
   gradients that distributed autograd sends back, DDP's gradient buckets).
   It restates the same shapes (numel x element size of tensors that have the
   analytic shapes; the server books a message after checking it against
   them; DDP and L1 averaging book a ring all-reduce's share), so payload =
   analytic is a bookkeeping check (every message counted once, in the right
   phase, direction and party), not evidence about the wire;
3. tcp: bytes the kernel's TCP sockets of each process sent and received,
   read from the per-socket counters (``ss -tinpH``) before and after a phase.
   This is the independent measurement: TCP / payload says what the transport
   added (framing, control messages, retransmissions) and would expose bytes
   our code sends without counting them.

Each is kept per party (``server``, ``hospital<i>`` / ``rank<r>``) and per
direction (``sent``, ``received``), for a phase (``setup``, ``train``,
``eval``) at a time.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import subprocess
import threading
import time
from collections import defaultdict

SS_TIMEOUT_S = 10
PHASES = ("setup", "dedup", "train", "eval")
_SOCKET_LINE = re.compile(r"^\S+\s+\d+\s+\d+\s+(?P<local>\S+)\s+(?P<peer>\S+)\s+(?P<users>users:.*)$")
_PIDS = re.compile(r"pid=(\d+)")
_COUNTER = re.compile(r"\b(bytes_sent|bytes_received|bytes_retrans):(\d+)")


# --------------------------------------------------------------------------- kernel counters
def socket_counters(pid: int | None = None) -> dict[tuple[str, str], tuple[int, int, int]] | None:
    """{(local, peer): (bytes_sent, bytes_received, bytes_retrans)} for the TCP sockets of process ``pid``.

    ``bytes_sent`` includes retransmissions, which ``bytes_retrans`` counts on its own:
    on one heavily loaded host, loopback TCP retransmits when a descheduled receiver
    acknowledges later than the retransmission timeout.

    None where ``ss`` is missing. Counters are cumulative over a socket's life,
    so a phase's bytes are the difference of two readings.
    """
    if shutil.which("ss") is None:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        text = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=SS_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    counters: dict[tuple[str, str], tuple[int, int]] = {}
    current = None
    for line in text.splitlines():
        m = _SOCKET_LINE.match(line)
        if m:
            owned = pid in {int(p) for p in _PIDS.findall(m.group("users"))}
            current = (m.group("local"), m.group("peer")) if owned else None
            if current:
                counters[current] = (0, 0, 0)
            continue
        if current and line[:1].isspace():
            values = dict(_COUNTER.findall(line))
            counters[current] = tuple(int(values.get(k, 0)) for k in ("bytes_sent", "bytes_received", "bytes_retrans"))
            current = None
    return counters


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def store_port() -> int | None:
    port = os.environ.get("MASTER_PORT")
    return int(port) if port else None


class Ledger:
    """One process's communication, phase by phase.

    ``switch(phase)`` closes the current phase: the kernel counters of this
    process's sockets are read, and the difference since the last switch is
    booked to the phase that ends. Payload bytes are booked with ``add`` as
    our code hands tensors to the transport (or receives them), per peer.
    Additions come from RPC and autograd threads; a lock keeps concurrent
    ones (the server's hooks, a hospital's handlers) from losing an update.
    """

    def __init__(self, party: str):
        self.party = party
        self.phase = "setup"
        self.store_port = store_port()
        self._last_counters = socket_counters()
        self._last_time = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)
        self.tcp: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        # Floats: a ring all-reduce moves a fractional 2(N-1)/N share per call; rounded when reported.
        self.payload: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
        self._lock = threading.Lock()

    def add(self, peer: str, direction: str, nbytes: float) -> None:
        with self._lock:
            self.payload[self.phase][peer][direction] += nbytes

    def book_ring(self, peer: str, nbytes: int, ranks: int) -> None:
        """An all-reduce of ``nbytes`` over ``ranks``: a ring sends and receives 2(N-1)/N of it per rank."""
        ring = ring_allreduce_bytes(nbytes, ranks)
        self.add(peer, "sent", ring)
        self.add(peer, "received", ring)

    def switch(self, phase: str) -> None:
        now, counters = time.perf_counter(), socket_counters()
        self.seconds[self.phase] += now - self._last_time
        if counters is not None and self._last_counters is not None:
            booked = self.tcp[self.phase]
            for key, (sent, received, retransmitted) in counters.items():
                sent0, received0, retransmitted0 = self._last_counters.get(key, (0, 0, 0))
                # torchrun's c10d store carries set-up and finish signals, not training traffic.
                kind = "store_" if self.store_port is not None and port_of(key[1]) == self.store_port else ""
                booked[kind + "sent"] += sent - sent0
                booked[kind + "received"] += received - received0
                booked[kind + "retransmitted"] += retransmitted - retransmitted0
        self.phase, self._last_time, self._last_counters = phase, now, counters

    def report(self) -> dict:
        """Plain data (for RPC or gather): seconds, tcp and payload per phase."""
        self.switch(self.phase)
        return {
            "party": self.party,
            "tcp_available": self._last_counters is not None,
            "seconds": dict(self.seconds),
            "tcp": {phase: dict(v) for phase, v in self.tcp.items()},
            "payload": {phase: {peer: dict(d) for peer, d in v.items()} for phase, v in self.payload.items()},
        }


def pickled_bytes(obj) -> int:
    """Size of a non-tensor RPC argument or result as RPC's pickler serialises it."""
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- analytic
def split_step_bytes(batch: int, activation_numel: int, element_size: int, label_size: int) -> tuple[int, int]:
    """(hospital -> server, server -> hospital) bytes of one hospital batch in a split step:
    activations and labels up, the activation gradient down."""
    activation = batch * activation_numel * element_size
    return activation + batch * label_size, activation


def ring_allreduce_bytes(gradient_bytes: int, ranks: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``gradient_bytes``."""
    return 2 * (ranks - 1) / ranks * gradient_bytes if ranks > 1 else 0.0


def party_table(per_party: dict[str, dict[str, float]]) -> dict:
    """{party: {sent, received}} plus ``total``: bytes on the wire, the sum of what every party sent."""
    table = {p: {"sent": int(round(d.get("sent", 0))), "received": int(round(d.get("received", 0)))}
             for p, d in sorted(per_party.items())}
    table["total"] = sum(d["sent"] for d in table.values())
    return table


def phase_tables(reports: list[dict], phase: str) -> tuple[dict, dict | None, dict | None]:
    """(payload, tcp, tcp of the store) party tables of one phase from every party's ledger report.

    A party's payload is what it counted itself: the sum over its peers.
    """
    payload, tcp, store = {}, {}, {}
    for rep in reports:
        sent = sum(d.get("sent", 0) for d in rep["payload"].get(phase, {}).values())
        received = sum(d.get("received", 0) for d in rep["payload"].get(phase, {}).values())
        payload[rep["party"]] = {"sent": sent, "received": received}
        booked = rep["tcp"].get(phase, {})
        tcp[rep["party"]] = {"sent": booked.get("sent", 0), "received": booked.get("received", 0)}
        store[rep["party"]] = {"sent": booked.get("store_sent", 0), "received": booked.get("store_received", 0)}
    measured = all(rep["tcp_available"] for rep in reports)
    if not measured:
        return party_table(payload), None, None
    tcp_table = party_table(tcp)
    # Included in "sent" (they crossed the wire); listed apart because payload never explains them.
    tcp_table["retransmitted"] = sum(rep["tcp"].get(phase, {}).get("retransmitted", 0) for rep in reports)
    return party_table(payload), tcp_table, party_table(store)


def ratio(a, b) -> float | None:
    if a is None or b in (None, 0):
        return None
    return a / b


def human_bytes(n: float) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
