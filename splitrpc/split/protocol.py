"""What the server and the hospitals agree on about the messages between them.

Both sides import this module; neither imports the other's code for it (the server reaches a
hospital's endpoints through ``splitrpc.split.endpoint``).
"""

from __future__ import annotations

import torch

from splitrpc import codec, comm
from splitrpc.errors import PeerError
from splitrpc.models import floating_state

LABEL_DTYPE = torch.uint8  # labels cross the wire as one byte when the classes fit


def label_dtype(num_classes: int) -> torch.dtype:
    return LABEL_DTYPE if num_classes <= 256 else torch.int64


def l1_sync_tensors(head: torch.nn.Module) -> list[torch.Tensor]:
    """What --l1 average averages: L1's parameters and floating-point buffers (BatchNorm statistics)."""
    return floating_state(head)


def l1_sync_numel(head: torch.nn.Module) -> int:
    return sum(t.numel() for t in l1_sync_tensors(head))


def key_file(cfg, index: int) -> str:
    """Hospital ``index``'s copy of the shared key; ``{hospital}`` in the path lets one host simulate several sites."""
    return cfg.dedup_key_file.replace("{hospital}", str(index))


class HospitalFailure(PeerError):
    """Hospital ``index`` died, hung, raised, or sent something invalid."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


# The endpoints whose messages are training or protocol traffic, and what their request and their
# reply count as payload (the first of the three byte counts): "tensors", the bytes of the tensors
# in it; "pickled", the pickled size of the Python values deduplication exchanges (a request's
# single argument, or all of them). Any other endpoint carries control values (sizes, commands,
# the ledger itself) that are not counted. Both sides book from this table, where a message is
# sent or received: the server in ``hospitals.Hospitals``, a hospital in ``endpoint.call_hospital``;
# the activation gradients that distributed autograd carries down are booked where the codec
# hands them over (``codec.hospital_send`` / ``server_receive`` callbacks).
PAYLOAD = {
    "forward": (None, "tensors"),           # L1's activations (and labels) up
    "tail_loss": ("tensors", "tensors"),    # U-shaped: the trunk's output down; its gradient and the loss up
    "eval_forward": (None, "tensors"),
    "eval_tail": ("tensors", "tensors"),    # U-shaped evaluation: the trunk's output down, a count up
    "dedup_message": (None, "pickled"),
    "psi_first": (None, "pickled"),
    "psi_reblind": ("pickled", "pickled"),
    "dedup_drop": ("pickled", "pickled"),
}


def request_bytes(method: str, args: tuple) -> int:
    return _payload(PAYLOAD.get(method, (None, None))[0], args[0] if len(args) == 1 else args)


def reply_bytes(method: str, reply) -> int:
    return _payload(PAYLOAD.get(method, (None, None))[1], reply)


def _payload(kind: str | None, value) -> int:
    if kind is None:
        return 0
    if kind == "pickled":
        return comm.pickled_bytes(value)
    values = value if isinstance(value, (tuple, list)) else (value,)
    return comm.tensor_bytes(*(v for v in values if isinstance(v, torch.Tensor)))


def message_problem(message, batch: int, activation_shape: tuple, dtype: torch.dtype, label_dtype: torch.dtype,
                    num_classes: int, codec_name="none", with_labels: bool = True) -> str | None:
    """What is wrong with a hospital's message ``(*wire activations, labels)`` (U-shaped: no labels), or None.
    ``codec_name``: a codec, or a dense codec's name."""
    shape = (batch, *activation_shape)
    spec = codec.wire_spec(codec_name, shape, dtype)
    if (not isinstance(message, (tuple, list)) or len(message) != len(spec) + with_labels
            or not all(isinstance(t, torch.Tensor) for t in message)):
        return f"something other than {len(spec)} activation tensor(s)" + (" and labels" if with_labels else "")
    wire, labels = (message[:-1], message[-1]) if with_labels else (message, torch.zeros(batch, dtype=label_dtype))
    for tensor, (_, expected_dtype) in zip(wire, spec):
        if tensor.dtype != expected_dtype:
            return f"activations of dtype {tensor.dtype}, expected {expected_dtype}"
    if labels.dtype != label_dtype or labels.dim() != 1:
        return f"labels of dtype {labels.dtype} and shape {tuple(labels.shape)}, expected {label_dtype} of shape ({batch},)"
    for tensor, (expected, _) in zip(wire, spec):
        if tuple(tensor.shape) != expected or len(labels) != batch:
            return f"activations of shape {tuple(tensor.shape)} with {len(labels)} labels, expected {expected}"
    problem = codec.wire_problem(codec_name, wire, shape)
    if problem:
        return problem
    # Decoded, as the trunk would see them: a finite but huge scale can still overflow.
    bad = (~torch.isfinite(codec.decode(codec_name, [t.detach() for t in wire], dtype, shape))).sum().item()
    if bad:
        return f"{bad} non-finite activation values"
    low, high = labels.min().item(), labels.max().item()
    if low < 0 or high >= num_classes:
        return f"labels outside 0..{num_classes - 1} (found {low}..{high})"
    return None


def output_gradient_problem(reply, shape: tuple, dtype: torch.dtype, codec_name: str) -> str | None:
    """What is wrong with a U-shaped hospital's reply ``(*gradient wire, loss)``, or None."""
    spec = codec.wire_spec(codec_name, shape, dtype)
    if (not isinstance(reply, (tuple, list)) or len(reply) != len(spec) + 1
            or not all(isinstance(t, torch.Tensor) for t in reply)):
        return "something other than the loss and its gradient"
    for tensor, (expected_shape, expected_dtype) in zip(reply[:-1], spec):
        if tuple(tensor.shape) != expected_shape or tensor.dtype != expected_dtype:
            return f"a loss gradient of {tuple(tensor.shape)} {tensor.dtype}, expected {expected_shape} {expected_dtype}"
    if tuple(reply[-1].shape) != (1,) or not reply[-1].is_floating_point():
        return f"a loss of shape {tuple(reply[-1].shape)} and dtype {reply[-1].dtype}, expected one float"
    problem = codec.wire_problem(codec_name, reply[:-1])
    if problem:
        return problem
    decoded = codec.decode(codec_name, list(reply[:-1]), dtype)
    if not (bool(torch.isfinite(decoded).all()) and bool(torch.isfinite(reply[-1]).all())):
        return "a non-finite loss or loss gradient"
    return None
