"""Code that runs on a hospital (ranks 1..N) under local-loss split learning.

``LocalLossHospital`` is split learning's ``Hospital`` whose ``forward`` also trains: L1's output
goes through a small auxiliary head to this hospital's own cross-entropy loss on its own labels,
and L1 and the head take their step at once. What leaves is the detached activations (through the
codec, with --noise) and the labels; no gradient ever comes back.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from splitrpc import data, transport
from splitrpc.errors import PeerError
from splitrpc.optim import apply_gradients, make_optimizer
from splitrpc.split.hospital import Hospital


def auxiliary_head(channels: int, num_classes: int) -> nn.Sequential:
    """The local loss's classifier on L1's output: adaptive average pooling to one value per channel,
    then one linear layer (channels x classes + classes parameters: 170 for 16 channels and 10 classes)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class LocalLossHospital(Hospital):
    """A hospital's L1, its auxiliary head and their optimizers; it answers the server's forward requests
    in the order of the server's steps, however many are in flight (``--run-ahead``)."""

    def __init__(self, cfg, index: int):
        super().__init__(cfg, index)
        with torch.no_grad():
            self.head.eval()
            channels = self.head(torch.zeros(1, 3, 32, 32, dtype=self.head_dtype, device=self.device)).shape[1]
            self.head.train()
        # Like L1 (--l1-init): from --seed, or from this hospital's own randomness.
        seed = cfg.seed if cfg.l1_init == "shared" else secrets.randbits(63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.aux = auxiliary_head(channels, cfg.num_classes)
        self.aux.to(self.device, self.head_dtype)
        self.aux_optimizer = make_optimizer(cfg, self.aux.parameters())
        # Requests of several steps may wait here at once (--run-ahead): each names the step of this
        # hospital's previous request, and runs once that one has.
        self.order = threading.Condition()
        self.done_step = -1
        # The auxiliary head's cost at this hospital (seconds), and its loss, for the record.
        self.aux_seconds = {"aux_forward": 0.0, "local_backward_and_steps": 0.0}
        self.aux_losses: list[float] = []

    def forward(self, epoch: int, batch: int, lr: float, step: int, previous: int) -> tuple:
        """L1's activations for training batch ``batch`` of ``epoch`` (wire form) and the labels; L1 and the
        auxiliary head step at rate ``lr`` on this hospital's own loss before they are returned.

        ``step`` is the server's step; ``previous`` the server step of the last request it sent
        here (-1: none since the server started), which must have run first: RPC handlers run
        concurrently, and L1's trajectory is the sequence of this hospital's own steps.
        """
        images, labels = self.shard.batch(epoch, batch)
        with self.order:
            if not self.order.wait_for(lambda: previous < 0 or self.done_step == previous,
                                       timeout=self.cfg.rpc_timeout):
                raise PeerError(f"the request of step {previous} never came before that of step {step}")
        with self.lock:
            self.head.train()
            output = self.head(images.to(self.device))
            t0 = time.perf_counter()
            loss = F.cross_entropy(self.aux(output), labels.long().to(self.device))
            t1 = time.perf_counter()
            try:
                loss.backward()
                apply_gradients(self.optimizer, None, lr)
                apply_gradients(self.aux_optimizer, None, lr)
            finally:  # a failed step leaves no gradient behind
                self.optimizer.zero_grad(set_to_none=True)
                self.aux_optimizer.zero_grad(set_to_none=True)
            self.aux_seconds["aux_forward"] += t1 - t0
            self.aux_seconds["local_backward_and_steps"] += time.perf_counter() - t1
            self.aux_losses.append(loss.item())
            # What leaves: L1's output before this step, detached, with --noise on it (the aux head saw it clean).
            activations = self.protect(output.detach().cpu(),
                                       data.derived_seed(self.cfg.seed, data.NOISE, self.index, epoch, batch))
            activations, labels = self.leaving(epoch, batch, images, labels, activations)
            # Encoded here, in order: top-k's error feedback carries its residual from this request to the next.
            wire = self.codec.encode(activations, True, self.codec_draws(epoch, batch))
        with self.order:
            self.done_step = step
            self.order.notify_all()
        return (*wire, labels)

    def local_loss_report(self) -> dict:
        """The auxiliary head's size, its cost here and its loss (for the run record)."""
        losses = self.aux_losses
        return {
            "aux_head": " -> ".join(type(m).__name__ for m in self.aux),
            "aux_head_parameters": sum(p.numel() for p in self.aux.parameters()),
            "seconds": dict(self.aux_seconds),
            "steps": len(losses),
            "aux_loss_first": losses[0] if losses else None,
            "aux_loss_last": losses[-1] if losses else None,
        }

    def extra_state(self) -> dict:
        return {"aux": self.aux.state_dict(), "aux_optimizer": self.aux_optimizer.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.aux.load_state_dict(state["aux"])
        self.aux_optimizer.load_state_dict(state["aux_optimizer"])

    def save(self, path: str) -> None:
        super().save(path)
        aux_path = Path(path).with_name(f"aux-{transport.hospital_name(self.index)}.pt")
        torch.save({k: v.cpu() for k, v in self.aux.state_dict().items()}, aux_path)
