"""What the server and the hospitals agree on about the messages between them.

Both sides import this module; neither imports the other's code for it. The server reaches a
hospital's endpoints only through the two functions at the end, which run on the hospital:
so the server process never loads ``splitrpc.hospital`` (an RRef proxy would, to learn the
remote object's type).
"""

from __future__ import annotations

import torch

LABEL_DTYPE = torch.uint8  # labels cross the wire as one byte when the classes fit


def label_dtype(num_classes: int) -> torch.dtype:
    return LABEL_DTYPE if num_classes <= 256 else torch.int64


def l1_sync_tensors(head: torch.nn.Module) -> list[torch.Tensor]:
    """What --l1 average averages: L1's parameters and floating-point buffers (BatchNorm statistics)."""
    return [t for t in list(head.parameters()) + list(head.buffers()) if t.is_floating_point()]


def l1_sync_numel(head: torch.nn.Module) -> int:
    return sum(t.numel() for t in l1_sync_tensors(head))


def key_file(cfg, index: int) -> str:
    """Hospital ``index``'s copy of the shared key; ``{hospital}`` in the path lets one host simulate several sites."""
    return cfg.dedup_key_file.replace("{hospital}", str(index))


def open_hospital(cfg, index: int):
    """Runs on hospital ``index`` (``rpc.remote``): its endpoints, the object the server's RRef names."""
    from splitrpc.hospital import Hospital

    return Hospital(cfg, index)


def call_hospital(rref, method: str, *args):
    """Runs on the hospital that owns ``rref``: one of its endpoints, by name."""
    return getattr(rref.local_value(), method)(*args)
