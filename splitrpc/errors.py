"""Errors a user can fix, reported as one line without a traceback."""

from __future__ import annotations

import sys

from splitrpc import console


class UserError(Exception):
    """Bad input or environment: printed as ``splitrpc: error: <message>``, exit code 2."""

    exit_code = 2


class PeerError(Exception):
    """A remote party failed, hung or sent something invalid: exit code 1.

    ``consequence=True`` marks an error that only follows another party's
    failure (already reported by that party).
    """

    exit_code = 1

    def __init__(self, message: str, consequence: bool = False):
        super().__init__(message)
        self.consequence = consequence


def report(exc: BaseException, who: str = "") -> int:
    prefix = f"splitrpc[{who}]" if who else "splitrpc"
    console.line(f"{prefix}: error: {exc}", sys.stderr)
    return getattr(exc, "exit_code", 1)
