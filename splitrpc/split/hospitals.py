"""The server's proxy for the hospitals, and its failure policy's vocabulary.

Every call to a hospital goes through ``Hospitals``: bounded by --rpc-timeout, counted per
accounting phase (round trips, for the time model), its payload booked in the server's ledger
as it leaves and as its reply arrives (``protocol.PAYLOAD``), and any failure becomes one
``HospitalFailure`` line that names the hospital. What the server then does (stop, or go on
without it) is ``Server.lose``'s decision.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch.distributed.rpc as rpc

from splitrpc import comm, transport
from splitrpc.split.endpoint import call_hospital, open_hospital
from splitrpc.split.protocol import HospitalFailure, reply_bytes, request_bytes

# Calls that serve the measurement itself, not training: left out of the round-trip counts.
MEASUREMENT_CALLS = frozenset({"switch_phase", "comm_report"})


class Call:
    """A request in flight to one hospital: its future, and which endpoint it asked (for the booking)."""

    __slots__ = ("future", "method")

    def __init__(self, future, method: str):
        self.future, self.method = future, method

    def wait(self):
        return self.future.wait()


class Hospitals:
    """RRefs to the Hospital objects. Every call is bounded by --rpc-timeout and every
    failure becomes a HospitalFailure whose one line names the hospital."""

    def __init__(self, cfg, ledger: comm.Ledger):
        self.cfg, self.ledger = cfg, ledger
        self.names = [transport.hospital_name(i) for i in range(1, cfg.hospitals + 1)]
        self.rrefs = [rpc.remote(name, open_hospital, args=(cfg, i), timeout=cfg.setup_timeout)
                      for i, name in enumerate(self.names, start=1)]
        self.lost: dict[int, dict] = {}  # index -> {name, step, error}
        # Requests sent to each hospital, per accounting phase (round trips, for the time model).
        self.phase = "setup"
        self.requests: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))

    @property
    def live(self) -> list[int]:
        return [i for i in range(1, self.cfg.hospitals + 1) if i not in self.lost]

    def name(self, index: int) -> str:
        return self.names[index - 1]

    def call_async(self, index: int, method: str, *args, timeout: float | None = None) -> Call:
        """Start ``Hospital.<method>(*args)`` on hospital ``index`` (1-based); its request is booked now."""
        if method not in MEASUREMENT_CALLS:
            self.requests[self.phase][index] += 1
        sent = request_bytes(method, args)
        if sent:
            self.ledger.add(self.name(index), "sent", sent)
        future = rpc.rpc_async(self.names[index - 1], call_hospital, args=(self.rrefs[index - 1], method, *args),
                               timeout=self.cfg.rpc_timeout if timeout is None else timeout)
        return Call(future, method)

    def wait(self, index: int, call: Call):
        """The reply of ``call``, booked as received; any failure is one HospitalFailure line."""
        try:
            reply = call.wait()
        except Exception as exc:
            raise HospitalFailure(index, f"{self.name(index)}: {transport.remote_error_summary(exc)}") from None
        received = reply_bytes(call.method, reply)
        if received:
            self.ledger.add(self.name(index), "received", received)
        return reply

    def call_all(self, method: str, *args, indices: Sequence[int] | None = None, timeout: float | None = None) -> list:
        indices = self.live if indices is None else indices
        futures = [self.call_async(i, method, *args, timeout=timeout) for i in indices]
        return [self.wait(i, f) for i, f in zip(indices, futures)]

    def unresponsive(self, indices: Sequence[int]) -> list[int]:
        """Which of ``indices`` do not answer a trivial call within --rpc-timeout."""
        futures = {i: self.call_async(i, "describe") for i in indices}
        dead = []
        for i, f in futures.items():
            try:
                f.wait()
            except Exception:
                dead.append(i)
        return dead
