"""Cut-layer codecs: how L1 activations travel up and their gradients travel down.

Both sides import this module. A codec turns a floating-point tensor into the
tuple of tensors that crosses RPC (its *wire* form) and back:

* ``none``: the tensor as it is (float32, or float64 for equivalence checks);
* ``bf16`` / ``fp16``: a cast, half the bytes;
* ``fp8``: float8 e4m3 with one float32 scale per channel (dimension 1), about a
  quarter of the bytes. Each direction has its own scale, computed from the
  tensor it encodes, so that small gradients do not underflow to zero as they
  do with a plain cast (shared/NOTES.md, "Lower-precision tensors at the cut").

The two autograd functions below sit at the two ends of the cut, so distributed
autograd carries the wire form both ways:

* on the hospital, :func:`hospital_send` encodes L1's output. The backward pass
  that distributed autograd delivers stops there: it decodes the gradient and
  hands it to the hospital (``on_gradient``), which runs L1's own backward pass
  and step locally. L1's graph therefore never belongs to a distributed-autograd
  context, and the hospital needs no second request to apply its step;
* on the server, :func:`server_receive` decodes what arrived; its backward
  encodes the activation gradient before distributed autograd sends it down.

For ``fp8`` the gradient's scale rides back as the "gradient" of the scale
tensor that came up: a custom function defines what flows backward through the
cut, and this is the one place where that is not a derivative.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

CODECS = ("none", "bf16", "fp16", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448: the largest finite e4m3 value
SCALE_DTYPE = torch.float32
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _channel_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(d for d in range(tensor.dim()) if d != 1)


def encode(codec: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The wire form of ``tensor`` (no autograd)."""
    if codec == "none":
        return (tensor,)
    if codec in _CAST:
        return (tensor.to(_CAST[codec]),)
    # fp8: the largest magnitude of each channel maps to the largest finite e4m3 value.
    amax = tensor.detach().abs().amax(dim=_channel_dims(tensor), keepdim=True).to(SCALE_DTYPE)
    scale = amax.clamp_min(torch.finfo(SCALE_DTYPE).tiny) / FP8_MAX
    return (tensor / scale).to(FP8), scale


def decode(codec: str, wire: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensor (in ``dtype``) that the wire form ``wire`` stands for (no autograd)."""
    if codec == "none":
        return wire[0]
    if codec in _CAST:
        return wire[0].to(dtype)
    values, scale = wire
    return (values.to(SCALE_DTYPE) * scale).to(dtype)


def wire_spec(codec: str, shape: Sequence[int], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each wire tensor for a ``dtype`` tensor of ``shape``."""
    shape = tuple(shape)
    if codec == "none":
        return [(shape, dtype)]
    if codec in _CAST:
        return [(shape, _CAST[codec])]
    scale_shape = tuple(s if d == 1 else 1 for d, s in enumerate(shape))
    return [(shape, FP8), (scale_shape, SCALE_DTYPE)]


def wire_bytes(codec: str, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of the wire form of a ``dtype`` tensor of ``shape``, from shapes alone."""
    return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in wire_spec(codec, shape, dtype))


def wire_problem(codec: str, wire: Sequence[torch.Tensor]) -> str | None:
    """What is wrong with wire tensors of the right shapes and dtypes, before decoding, or None:
    fp8's per-channel scales must be positive (a zero or negative scale decodes to garbage)."""
    if codec == "fp8" and not bool((wire[1] > 0).all()):
        return "float8 scales that are not positive"
    return None


def check(codec: str, dtype: str) -> str | None:
    """Why ``codec`` cannot be used with ``dtype``, or None."""
    if codec not in CODECS:
        return f"unknown codec {codec!r} (choose from {', '.join(CODECS)})"
    if codec != "none" and dtype != "float32":
        return f"--codec {codec} compresses float32 activations; it cannot be combined with --dtype {dtype}"
    return None


class _HospitalSend(torch.autograd.Function):
    """Hospital end of the cut: encode going up; decode the gradient coming down and hand it over."""

    @staticmethod
    def forward(ctx, anchor, activations, codec, on_gradient):
        ctx.codec, ctx.on_gradient, ctx.dtype = codec, on_gradient, activations.dtype
        wire = encode(codec, activations)
        return wire if len(wire) > 1 else wire[0]

    @staticmethod
    def backward(ctx, *wire_grads):
        ctx.on_gradient(decode(ctx.codec, wire_grads, ctx.dtype), wire_grads)
        # The anchor's (zero) gradient is what distributed autograd accumulates here; L1's
        # gradients are computed by the hospital itself from the gradient it was handed.
        return torch.zeros((), dtype=ctx.dtype), None, None, None


def hospital_send(activations: torch.Tensor, codec: str,
                  on_gradient: Callable[[torch.Tensor, tuple], None]) -> tuple[torch.Tensor, ...]:
    """The wire tensors to return from an RPC handler running inside a distributed-autograd context.

    ``activations`` keep their local graph (to L1); what is returned is detached from it.
    ``on_gradient(gradient, wire_gradients)`` runs on the hospital when the backward
    pass delivers the gradient of ``activations``.
    """
    anchor = torch.zeros((), dtype=activations.dtype, requires_grad=True)
    wire = _HospitalSend.apply(anchor, activations.detach(), codec, on_gradient)
    return wire if isinstance(wire, tuple) else (wire,)


class _ServerReceive(torch.autograd.Function):
    """Server end of the cut: decode going up; encode the gradient going down."""

    @staticmethod
    def forward(ctx, codec, dtype, on_gradient, *wire):
        ctx.codec, ctx.on_gradient = codec, on_gradient
        return decode(codec, wire, dtype)

    @staticmethod
    def backward(ctx, gradient):
        wire = encode(ctx.codec, gradient)
        ctx.on_gradient(wire)
        return (None, None, None, *wire)


def server_receive(wire: Sequence[torch.Tensor], codec: str, dtype: torch.dtype,
                   on_gradient: Callable[[tuple], None]) -> torch.Tensor:
    """The activations the trunk runs on; ``on_gradient(wire_gradient)`` sees what the backward pass sends down."""
    return _ServerReceive.apply(codec, dtype, on_gradient, *wire)
