"""U-shaped split learning (``--labels hospital``), both sides: each hospital keeps the last
``--tail`` stages and the loss, so labels never leave it. A step gains a second round trip: the
trunk's output goes down, the loss's gradient (and the loss) come up; an evaluation sends the
output down and gets back only a count of correct answers.

``ServerTail`` and ``HospitalTail`` are mixed into ``Server`` and ``Hospital``, which build the
tail (``models.split_u``) and take its step with L1's.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from splitrpc import codec, data
from splitrpc.privacy import label_defences
from splitrpc.split.protocol import HospitalFailure, output_gradient_problem


class ServerTail:
    """The server's side: send each participant its slice of the trunk's output, check what comes back."""

    def _hospital_losses(self, participants: Sequence[tuple[int, int]], output: torch.Tensor):
        """U-shaped: each participant's slice of the trunk's output goes to its hospital, whose tail computes
        the loss with labels the server never sees, and returns the loss and its gradient for that slice.

        Returns (the step's loss, the objective whose backward pass carries those gradients
        through the trunk): sum over hospitals of <slice, gradient> / participants, the
        gradient of the mean loss over every participant's samples, as the vanilla step's.
        """
        slices = output.split(self.cfg.batch_size)
        futures = []
        for (h, _), piece in zip(participants, slices):
            wire = codec.encode(self.cfg.codec, piece.detach().cpu())
            futures.append(self.hospitals.call_async(h, "tail_loss", *wire))
        losses, objective = [], 0
        for (h, _), piece, future in zip(participants, slices, futures):
            reply = self.hospitals.wait(h, future)
            problem = output_gradient_problem(reply, tuple(piece.shape), self.dtype, self.cfg.codec)
            if problem:
                raise HospitalFailure(h, f"{self.hospitals.name(h)} sent {problem}; rejected before the trunk")
            *wire, loss = reply
            gradient = codec.decode(self.cfg.codec, wire, self.dtype).to(self.device)
            kept = self.capture.last(h) if self.capture is not None else None
            if kept is not None:
                # U-shaped audits: what went down (model completion reads it) and what came back.
                kept.update(trunk_output=piece.detach().cpu().clone(), output_gradient=gradient.detach().cpu().clone())
            losses.append(loss)
            objective = objective + (piece * gradient).sum()
        return torch.cat(losses).mean(), objective / len(participants)

    def _tail_correct(self, h: int, batch: int, output: torch.Tensor) -> int:
        """U-shaped evaluation: how many of test batch ``batch`` hospital ``h``'s tail classifies correctly."""
        output_wire = codec.encode(self.cfg.codec, output.cpu())
        count = self.hospitals.wait(h, self.hospitals.call_async(h, "eval_tail", batch, *output_wire))
        return int(count.item())


class HospitalTail:
    """A hospital's side: its tail and loss on the trunk's output, with labels that stay here."""

    def tail_loss(self, *trunk_output: torch.Tensor) -> tuple:
        """U-shaped: this hospital's tail and loss on the trunk's output for the batch in flight.

        Returns the gradient of the batch's mean loss with respect to that output (encoded
        like activations) and the loss itself. The tail's own gradients wait here for the
        activation gradient, so that L1 and the tail step together, or neither does.
        """
        flight, cfg = self.in_flight, self.cfg
        labels = flight["labels"].long().to(self.device)  # under --label-defence rr, the record's drawn label
        # --label-defence: the batch's own draws, so that a retried or resumed step draws the same.
        draws = torch.Generator().manual_seed(
            data.derived_seed(cfg.seed, data.LABEL_DEFENCE, self.index, flight["epoch"], flight["batch"]))
        with self.lock:
            output = codec.decode(cfg.codec, trunk_output, self.head_dtype).detach().requires_grad_()
            self.tail.train()
            if cfg.label_defence == "mixup":
                loss = label_defences.mixup_loss(self.tail, output.to(self.device), labels,
                                                 cfg.label_defence_strength, draws)
            else:
                loss = F.cross_entropy(self.tail(output.to(self.device)), labels)
            parameters = list(self.tail.parameters())
            gradients = torch.autograd.grad(loss, [output, *parameters])
        flight["tail_gradients"] = dict(zip(parameters, gradients[1:]))
        # Only the gradient that leaves is perturbed; the tail learns from its own, exact one.
        leaving = label_defences.defend_gradients(cfg.label_defence, cfg.label_defence_strength, gradients[0],
                                                  labels.cpu(), draws)
        return (*codec.encode(cfg.codec, leaving), loss.detach().reshape(1).cpu())

    @torch.no_grad()
    def eval_tail(self, batch: int, *trunk_output: torch.Tensor) -> torch.Tensor:
        """U-shaped evaluation: how many of test batch ``batch`` the tail classifies correctly (only the count leaves)."""
        labels = self.eval_labels.pop(batch)
        with self.lock:
            self.tail.eval()
            output = codec.decode(self.cfg.codec, trunk_output, self.head_dtype)
            predictions = self.tail(output.to(self.device)).argmax(1).cpu()
            self.tail.train()
        return (predictions == labels.long()).sum().reshape(1).to(torch.int64)
