"""The two functions the server's RPCs name to reach a hospital's endpoints; they run on the hospital.

The server creates a hospital's ``Hospital`` object with ``open_hospital`` and calls its methods
with ``call_hospital``, so the server process never loads ``splitrpc.split.hospital``: an RRef
proxy (``rref.rpc_async().method()``) would, to learn the remote object's type.
"""

from __future__ import annotations

from splitrpc.split.protocol import reply_bytes, request_bytes
from splitrpc.transport import SERVER


def open_hospital(cfg, index: int):
    """Runs on hospital ``index`` (``rpc.remote``): its endpoints, the object the server's RRef names
    (the method's declaration says which class: split learning's, or a variant's)."""
    from splitrpc import methods

    return methods.get(cfg.method).hospital(cfg, index)


def call_hospital(rref, method: str, *args):
    """Runs on the hospital that owns ``rref``: one of its endpoints, by name, its request and
    reply booked in the hospital's ledger as ``protocol.PAYLOAD`` says (the one place they are)."""
    hospital = rref.local_value()
    received = request_bytes(method, args)
    if received:
        hospital.ledger.add(SERVER, "received", received)
    reply = getattr(hospital, method)(*args)
    sent = reply_bytes(method, reply)
    if sent:
        hospital.ledger.add(SERVER, "sent", sent)
    return reply
