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

``topk`` (:class:`TopK`) sends far fewer values: per sample, the ``D / ratio``
largest magnitudes and their positions. The forward function the trunk sees is
``mask * x``, whose exact gradient is ``mask * g``: the gradient therefore comes
back as values only, at the positions that went up, which both ends know. Each
codec is an object (:func:`for_config`); the functions below take either a
codec or the name of a dense one.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

CODECS = ("none", "bf16", "fp16", "fp8", "topk")
DENSE = ("none", "bf16", "fp16", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448: the largest finite e4m3 value
SCALE_DTYPE = torch.float32
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _channel_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(d for d in range(tensor.dim()) if d != 1)


def _fp8_encode(tensor: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 values and the float32 scale that maps each slice's largest magnitude to e4m3's largest value."""
    amax = tensor.detach().abs().amax(dim=dims, keepdim=True).to(SCALE_DTYPE)
    scale = amax.clamp_min(torch.finfo(SCALE_DTYPE).tiny) / FP8_MAX
    return (tensor / scale).to(FP8), scale


def _element_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class Dense:
    """``none``, ``bf16``, ``fp16``, ``fp8``: every value crosses, in a narrower type; the gradient
    comes back in the same form as the activations went up."""

    def __init__(self, name: str):
        self.name = name

    def encode(self, tensor: torch.Tensor, training: bool = True, generator=None) -> tuple[torch.Tensor, ...]:
        if self.name == "none":
            return (tensor,)
        if self.name in _CAST:
            return (tensor.to(_CAST[self.name]),)
        return _fp8_encode(tensor, _channel_dims(tensor))  # one scale per channel (dimension 1)

    def decode(self, wire: Sequence[torch.Tensor], dtype: torch.dtype, shape: Sequence[int] | None = None) -> torch.Tensor:
        if self.name == "none":
            return wire[0]
        if self.name in _CAST:
            return wire[0].to(dtype)
        values, scale = wire
        return (values.to(SCALE_DTYPE) * scale).to(dtype)

    def wire_spec(self, shape: Sequence[int], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        shape = tuple(shape)
        if self.name == "none":
            return [(shape, dtype)]
        if self.name in _CAST:
            return [(shape, _CAST[self.name])]
        return [(shape, FP8), (tuple(s if d == 1 else 1 for d, s in enumerate(shape)), SCALE_DTYPE)]

    def problem(self, wire: Sequence[torch.Tensor], shape: Sequence[int] | None = None) -> str | None:
        # fp8's scales must be positive: a zero or negative scale decodes to garbage.
        if self.name == "fp8" and not bool((wire[1] > 0).all()):
            return "float8 scales that are not positive"
        return None

    # The gradient direction: the same form, independent of what went up.
    def encode_gradient(self, gradient: torch.Tensor, sent: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.encode(gradient)

    def decode_gradient(self, wire: Sequence[torch.Tensor], sent: Sequence[torch.Tensor], dtype: torch.dtype,
                        shape: Sequence[int] | None = None) -> torch.Tensor:
        return self.decode(wire, dtype)

    def gradient_spec(self, shape: Sequence[int], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return self.wire_spec(shape, dtype)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TopK:
    """Per sample, the ``k = D // ratio`` largest magnitudes of the ``D`` values at the cut, and their positions.

    Up: values (bfloat16, or float8 with one float32 scale per sample) and positions (int16
    where ``D <= 32768``, else int32). The trunk sees ``mask * x``; the exact gradient of that
    function is ``mask * g``, so down go only the gradient's values at the same positions
    (same value type): no positions, and nothing left over for the server to keep.

    ``random`` > 0 is randomized top-k (Zheng et al., IJCAI 2023, following their reference
    code): the ``k`` positions are drawn without replacement, each top-k position with
    probability ``(1 - random) / k`` and each other one with ``random / (D - k)``, so that
    positions outside the top k also learn; evaluation always takes the plain top k.

    ``feedback``: error feedback (Seide et al. 2014; Karimireddy et al. 2019) on the way up,
    the residual kept by the sender, the hospital: what a batch's top k left out is added to
    the next training batch's activations before selection. Activations of one batch are not
    those of the next (other samples), so unlike a gradient the residual does not sum to
    anything meaningful: offered to measure, off by default.
    """

    name = "topk"

    def __init__(self, ratio: int, values: str = "bf16", random: float = 0.0, feedback: bool = False):
        if values not in ("bf16", "fp8"):
            raise ValueError(f"top-k values travel as bf16 or fp8, not {values!r}")
        self.ratio, self.values, self.random, self.feedback = ratio, values, random, feedback
        self.residual: torch.Tensor | None = None  # the sender's, with feedback

    def k(self, shape: Sequence[int]) -> int:
        return max(1, math.prod(shape[1:]) // self.ratio)

    @staticmethod
    def index_dtype(shape: Sequence[int]) -> torch.dtype:
        return torch.int16 if math.prod(shape[1:]) <= 2 ** 15 else torch.int32

    def _values(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.values == "bf16":
            return (values.to(torch.bfloat16),)
        return _fp8_encode(values, (1,))  # one scale per sample: the positions differ from row to row

    def _unvalues(self, wire: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if self.values == "bf16":
            return wire[0].to(dtype)
        return (wire[0].to(SCALE_DTYPE) * wire[1]).to(dtype)

    def _select(self, flat: torch.Tensor, k: int, training: bool, generator) -> torch.Tensor:
        top = flat.abs().topk(k, dim=1, sorted=False).indices
        if not (training and self.random > 0) or k == flat.shape[1]:
            return top
        d = flat.shape[1]
        probability = torch.full(flat.shape, self.random / (d - k), dtype=torch.float64)
        probability.scatter_(1, top, (1 - self.random) / k)
        return torch.multinomial(probability, k, replacement=False, generator=generator)

    def encode(self, tensor: torch.Tensor, training: bool = True, generator=None) -> tuple[torch.Tensor, ...]:
        shape, k = tuple(tensor.shape), self.k(tensor.shape)
        flat = tensor.detach().reshape(shape[0], -1)
        feedback = training and self.feedback
        if feedback and self.residual is not None and self.residual.shape == flat.shape:
            flat = flat + self.residual
        # Sorted positions: the same wire for the same selection, and duplicates easy to spot.
        positions = self._select(flat, k, training, generator).sort(dim=1).values
        values = self._values(flat.gather(1, positions))
        if feedback:  # what did not cross, in full precision: left out, or rounded
            self.residual = flat - self._scatter(self._unvalues(values, flat.dtype), positions, flat.shape)
        return (*values, positions.to(self.index_dtype(shape)))

    @staticmethod
    def _scatter(values: torch.Tensor, positions: torch.Tensor, flat_shape) -> torch.Tensor:
        return values.new_zeros(flat_shape).scatter_(1, positions.long(), values)

    def decode(self, wire: Sequence[torch.Tensor], dtype: torch.dtype, shape: Sequence[int] | None = None) -> torch.Tensor:
        if shape is None:
            raise ValueError("top-k decodes to the cut's shape: pass it")  # the positions alone do not say it
        values = self._unvalues(wire[:-1], dtype)
        return self._scatter(values, wire[-1], (shape[0], math.prod(shape[1:]))).view(tuple(shape))

    def wire_spec(self, shape: Sequence[int], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        batch, k = shape[0], self.k(shape)
        values = [((batch, k), torch.bfloat16)] if self.values == "bf16" else [((batch, k), FP8), ((batch, 1), SCALE_DTYPE)]
        return [*values, ((batch, k), self.index_dtype(shape))]

    def problem(self, wire: Sequence[torch.Tensor], shape: Sequence[int] | None = None) -> str | None:
        positions = wire[-1].long()
        if self.values == "fp8" and not bool((wire[1] > 0).all()):
            return "float8 scales that are not positive"
        if shape is not None and positions.numel() and (positions.min() < 0 or positions.max() >= math.prod(shape[1:])):
            return f"top-k positions outside 0..{math.prod(shape[1:]) - 1}"
        ordered = positions.sort(dim=1).values
        if ordered.shape[1] > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            return "repeated top-k positions"
        return None

    def encode_gradient(self, gradient: torch.Tensor, sent: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        flat = gradient.reshape(gradient.shape[0], -1)
        return self._values(flat.gather(1, sent[-1].long()))

    def decode_gradient(self, wire: Sequence[torch.Tensor], sent: Sequence[torch.Tensor], dtype: torch.dtype,
                        shape: Sequence[int] | None = None) -> torch.Tensor:
        return self.decode((*wire, sent[-1]), dtype, shape)

    def gradient_spec(self, shape: Sequence[int], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return self.wire_spec(shape, dtype)[:-1]

    def state_dict(self) -> dict:
        return {"residual": self.residual}

    def load_state_dict(self, state: dict) -> None:
        self.residual = state.get("residual")


Codec = Dense | TopK


def get(codec) -> Codec:
    """A codec object from a codec or the name of a dense one."""
    if isinstance(codec, str):
        if codec not in DENSE:
            raise ValueError(f"codec {codec!r} needs its options: use for_config")
        return Dense(codec)
    return codec


def for_config(cfg) -> Codec:
    """The codec of ``--codec`` with its options: every party builds its own (the sender keeps its state)."""
    if cfg.codec == "topk":
        return TopK(cfg.topk_ratio, cfg.topk_values, cfg.topk_random, cfg.topk_feedback)
    return Dense(cfg.codec)


def encode(codec, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The wire form of ``tensor`` (no autograd)."""
    return get(codec).encode(tensor)


def decode(codec, wire: Sequence[torch.Tensor], dtype: torch.dtype, shape: Sequence[int] | None = None) -> torch.Tensor:
    """The tensor (in ``dtype``) that the wire form ``wire`` stands for (no autograd); top-k needs its ``shape``."""
    return get(codec).decode(wire, dtype, shape)


def wire_spec(codec, shape: Sequence[int], dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each wire tensor for a ``dtype`` tensor of ``shape``."""
    return get(codec).wire_spec(shape, dtype)


def wire_bytes(codec, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of the wire form of a ``dtype`` tensor of ``shape``, from shapes alone."""
    return sum(_element_bytes(s, d) for s, d in get(codec).wire_spec(shape, dtype))


def gradient_bytes(codec, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of the wire form of the gradient of a ``dtype`` tensor of ``shape`` (what comes back down)."""
    return sum(_element_bytes(s, d) for s, d in get(codec).gradient_spec(shape, dtype))


def wire_problem(codec, wire: Sequence[torch.Tensor], shape: Sequence[int] | None = None) -> str | None:
    """What is wrong with wire tensors of the right shapes and dtypes, before decoding, or None."""
    return get(codec).problem(wire, shape)


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
    def forward(ctx, anchor, activations, codec, on_gradient, generator):
        ctx.codec, ctx.on_gradient, ctx.dtype, ctx.shape = codec, on_gradient, activations.dtype, activations.shape
        wire = codec.encode(activations, True, generator)
        # Saved, not kept as ctx.sent: an output held by its own node's ctx is a reference cycle
        # through the autograd graph that Python's collector cannot see, and with two floating
        # outputs (fp8's values and scales) it kept every step's L1 graph alive (10 MB a step).
        ctx.save_for_backward(*wire)
        # Positions are integers: nothing flows back through them (the gradient's own values do).
        ctx.mark_non_differentiable(*[w for w in wire if not w.is_floating_point()])
        return wire if len(wire) > 1 else wire[0]

    @staticmethod
    def backward(ctx, *wire_grads):
        sent = ctx.saved_tensors
        wire_grads = tuple(g for g, w in zip(wire_grads, sent) if w.is_floating_point())
        ctx.on_gradient(ctx.codec.decode_gradient(wire_grads, sent, ctx.dtype, ctx.shape), wire_grads)
        # The anchor's (zero) gradient is what distributed autograd accumulates here; L1's
        # gradients are computed by the hospital itself from the gradient it was handed.
        return torch.zeros((), dtype=ctx.dtype), None, None, None, None


def hospital_send(activations: torch.Tensor, codec, on_gradient: Callable[[torch.Tensor, tuple], None],
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """The wire tensors to return from an RPC handler running inside a distributed-autograd context.

    ``activations`` keep their local graph (to L1); what is returned is detached from it.
    ``on_gradient(gradient, wire_gradients)`` runs on the hospital when the backward
    pass delivers the gradient of ``activations``. ``generator``: randomized top-k's draws.
    """
    anchor = torch.zeros((), dtype=activations.dtype, requires_grad=True)
    wire = _HospitalSend.apply(anchor, activations.detach(), get(codec), on_gradient, generator)
    return wire if isinstance(wire, tuple) else (wire,)


class _ServerReceive(torch.autograd.Function):
    """Server end of the cut: decode going up; encode the gradient going down."""

    @staticmethod
    def forward(ctx, codec, dtype, shape, on_gradient, *wire):
        ctx.codec, ctx.on_gradient, ctx.sent = codec, on_gradient, wire
        return decode(codec, wire, dtype, shape)

    @staticmethod
    def backward(ctx, gradient):
        wire = ctx.codec.encode_gradient(gradient, ctx.sent)
        ctx.on_gradient(wire)
        # One gradient per floating wire tensor that came up (top-k's positions get none).
        return (None, None, None, None, *wire, *[None] * (len(ctx.sent) - len(wire)))


def server_receive(wire: Sequence[torch.Tensor], codec, dtype: torch.dtype,
                   on_gradient: Callable[[tuple], None], shape: Sequence[int] | None = None) -> torch.Tensor:
    """The activations the trunk runs on (of ``shape``, which top-k needs); ``on_gradient(wire_gradient)``
    sees what the backward pass sends down."""
    return _ServerReceive.apply(get(codec), dtype, shape, on_gradient, *wire)
