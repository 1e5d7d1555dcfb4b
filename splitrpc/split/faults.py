"""Testing: a hospital that misbehaves on purpose (``--fault hospital<i>:<kind>@<n>``), so that
the server's checks and failure policy can be exercised with real processes."""

from __future__ import annotations

import torch

from splitrpc import transport


def parse_fault(spec: str, index: int) -> tuple[str, int] | None:
    """--fault hospital<i>:<kind>@<n>: (kind, n) if it names this hospital."""
    if not spec:
        return None
    who, rest = spec.split(":", 1)
    kind, start = rest.split("@")
    return (kind, int(start)) if who == transport.hospital_name(index) else None


def inject_fault(kind: str, activations: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Testing: corrupt what this hospital sends, as a faulty or malicious site would."""
    if kind in ("nan", "inf"):
        activations = activations.clone()  # in place on a copy, so the graph to L1 stays intact
        activations[(0 if kind == "nan" else -1,) * activations.dim()] = float(kind)
    elif kind == "shape":
        activations = activations[:, :-1]
    elif kind == "dtype":
        activations = activations.to(torch.float16)
    elif kind == "labels":
        labels = labels.clone()
        labels[0] = num_classes
    return activations, labels
