"""Lines for the terminal that several processes share.

A run's processes (server, hospitals, DDP ranks, the launcher) write to one
stdout and one stderr. ``print(text)`` hands the text and its newline to the
stream as two writes, and with unbuffered streams (``PYTHONUNBUFFERED``,
``python -u``) those are two ``write()`` calls, between which another process's
line can land: ``[hospital1] ... data stays here[server] pid ... joined``.
One ``write()`` of a whole line (shorter than PIPE_BUF, 4096 bytes on Linux)
reaches a pipe in one piece, and a terminal in practice.
"""

from __future__ import annotations

import sys


def line(text: str, stream=None) -> None:
    """Write ``text`` and its newline in one call, then flush."""
    stream = sys.stdout if stream is None else stream
    stream.write(text + "\n")
    stream.flush()
