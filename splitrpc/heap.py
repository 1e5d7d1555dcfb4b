"""``--heap fixed``: freed tensors go back to the kernel at once instead of staying in malloc's arenas.

glibc serves an allocation at or above its mmap threshold (128 KB at start) with a fresh ``mmap`` and
returns it to the kernel when freed. But every time such a block is freed, glibc *raises* the
threshold to that block's size (up to 32 MB), so from then on tensors of a few MB (a batch's
activations, their gradients, a test batch of 500 at the cut: 31 MB for VGG-11 x0.25) come from the
malloc arenas instead, and freed arena memory stays with the process, spread over the arenas of the
RPC agent's threads. Measured with real CIFAR-10 (VGG-11 x0.25, N = 4, 60 parallel steps and one
evaluation, spawned; ``results/scale_heap.jsonl``): a hospital holds about 1.4 GB private at its peak
with glibc's default and about 0.5 GB with the threshold fixed at 1 MB.

Fixing it (``mallopt(M_MMAP_THRESHOLD)``, which switches the dynamic adjustment off) has a price: every
tensor of 1 MB or more is then a fresh mapping whose pages the kernel faults in and zeroes on first
touch, every step. On this machine that made training markedly slower (``results/heap.jsonl``), so it
is an option for hosts short of memory, not the default. Every process of a run applies the same
choice, the one-process local baseline included, so speed comparisons between methods stay like for
like. A user who sets ``MALLOC_MMAP_THRESHOLD_`` (glibc reads it at start) keeps their own value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
THRESHOLD_BYTES = 1 << 20
ENV = "MALLOC_MMAP_THRESHOLD_"


def apply(choice: str) -> bool:
    """``--heap``: True where this process's threshold was fixed now; says so in one line where
    ``--heap fixed`` cannot be applied (the run goes on with the C library's own behaviour)."""
    if choice != "fixed":
        return False
    if fix_mmap_threshold():
        return True
    from splitrpc import console

    why = f"{ENV} is set" if os.environ.get(ENV) else "the C library is not glibc"
    console.line(f"splitrpc: warning: --heap fixed not applied ({why})", sys.stderr)
    return False


def fix_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix this process's mmap threshold; False where the C library is not glibc or the user chose one."""
    if os.environ.get(ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to fix
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Torch's import has already freed blocks, so the dynamic adjustment may have raised the trim
    # threshold too; fixing the mmap threshold freezes it wherever it is. Set it as glibc would pair it.
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, 2 * threshold) == 1
