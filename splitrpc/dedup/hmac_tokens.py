"""Keyed tokens: HMAC-SHA256 of each identity under a key only the hospitals share (``--dedup-key-file``).

A hospital sends the server exactly ``{"key_check": ..., "tokens": [...]}``
(``hospital_message``). Without the key the server can neither invert a token
nor test a guessed identity. The server checks that every hospital holds the
same key (``verify_key_checks``) and plans the removals (``server_plan``, with
``splitrpc.dedup.removal``).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import secrets

from splitrpc.dedup.removal import plan_removals
from splitrpc.errors import PeerError, UserError

TOKEN_BYTES = 32  # HMAC-SHA256 output
MIN_KEY_BYTES = 16
NEW_KEY_BYTES = 32
# Identities are 32-byte pixel digests or start with PATIENT_PREFIX (splitrpc.dedup.identities), so no
# identity equals this label and a key check is never also a token.
KEY_CHECK_LABEL = b"splitrpc/dedup/key-check/v1"
MESSAGE_FIELDS = ("key_check", "tokens")


def load_key(path: str) -> bytes:
    """Read the hospitals' shared secret.

    Leading and trailing whitespace (spaces, tabs, newlines) is stripped. If what
    remains is an even number of hex digits (either case), it is hex text and the
    key is the bytes it encodes (``new_key`` writes this form); otherwise the key
    is the remaining bytes as they are. Either way it must be at least
    MIN_KEY_BYTES (16) bytes long.
    """
    try:
        with open(path, "rb") as fh:
            content = fh.read().strip()
    except OSError as exc:
        raise UserError(f"--dedup-key-file {path}: cannot read it ({exc.strerror or exc})") from None
    if not content:
        raise UserError(f"--dedup-key-file {path}: the file is empty")
    try:
        key, form = binascii.unhexlify(content), "hex text decoding to "
    except binascii.Error:  # odd length or not hex digits: the raw bytes are the key
        key, form = content, ""
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"--dedup-key-file {path}: the key is {form}{len(key)} bytes, it must be at least "
                        f"{MIN_KEY_BYTES} (create one with: python -c 'import secrets; print(secrets.token_hex({NEW_KEY_BYTES}))')")
    return key


def new_key() -> str:
    """A fresh key as hex text, to be written to every hospital's --dedup-key-file."""
    return secrets.token_hex(NEW_KEY_BYTES)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise UserError(f"the deduplication key must be at least {MIN_KEY_BYTES} bytes")


def tokens(key: bytes, identities: list[bytes]) -> list[bytes]:
    """HMAC-SHA256(key, identity), 32 bytes per identity, in the same order."""
    _check_key(key)
    return [hmac.new(key, identity, hashlib.sha256).digest() for identity in identities]


def key_check(key: bytes) -> bytes:
    """A value equal for equal keys that reveals nothing about the key (HMAC of a fixed label)."""
    _check_key(key)
    return hmac.new(key, KEY_CHECK_LABEL, hashlib.sha256).digest()


def _hospitals(ids: list[int]) -> str:
    ids = sorted(ids)
    if len(ids) == 1:
        return f"hospital {ids[0]}"
    return f"hospitals {', '.join(map(str, ids[:-1]))} and {ids[-1]}"


def verify_key_checks(checks: dict[int, bytes]) -> None:
    """Fail with a UserError naming the hospitals whose keys differ.

    With different keys no token matches and deduplication would silently find
    nothing. The largest group of agreeing hospitals is named as the reference
    (ties: the group with the lowest hospital number).
    """
    groups: dict[bytes, list[int]] = {}
    for hospital in sorted(checks):
        groups.setdefault(checks[hospital], []).append(hospital)
    if len(groups) <= 1:
        return
    ordered = sorted(groups.values(), key=lambda members: (-len(members), members[0]))
    reference, others = ordered[0], ordered[1:]
    if len(others) == 1:
        verb = "holds" if len(others[0]) == 1 else "hold"
        raise UserError(f"{_hospitals(others[0])} {verb} a different --dedup-key-file than {_hospitals(reference)}; "
                        f"no duplicates can be matched")
    listing = " | ".join(_hospitals(members) for members in ordered)
    raise UserError(f"the hospitals hold {len(ordered)} different --dedup-key-file keys ({listing}); "
                    f"no duplicates can be matched")


# --------------------------------------------------------------------------- what crosses the wire
def hospital_message(key: bytes, identities: list[bytes]) -> dict:
    """Everything a hospital sends the server for deduplication, and nothing more."""
    return {"key_check": key_check(key), "tokens": tokens(key, identities)}


def server_plan(messages: dict[int, dict]) -> tuple[dict[int, list[int]], dict]:
    """The server's side: validate the hospitals' messages, check keys agree, plan removals."""
    for hospital, message in messages.items():
        if not isinstance(message, dict) or sorted(message) != sorted(MESSAGE_FIELDS):
            raise PeerError(f"hospital {hospital} sent a deduplication message without exactly the fields "
                            f"{', '.join(MESSAGE_FIELDS)}")
        if not isinstance(message["key_check"], bytes) or not isinstance(message["tokens"], list):
            raise PeerError(f"hospital {hospital} sent a deduplication message of the wrong types")
        bad = [t for t in message["tokens"] if not isinstance(t, bytes) or len(t) != TOKEN_BYTES]
        if bad:
            raise PeerError(f"hospital {hospital} sent {len(bad)} tokens that are not {TOKEN_BYTES} bytes")
    verify_key_checks({hospital: message["key_check"] for hospital, message in messages.items()})
    return plan_removals({hospital: message["tokens"] for hospital, message in messages.items()})

