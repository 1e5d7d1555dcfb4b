"""Code that runs on the server (rank 0) under local-loss split learning.

``LocalLossServer`` is split learning's ``Server`` with its own step: it receives each
participant's activations and labels, runs the trunk and its loss and steps the trunk by itself
(plain autograd: nothing goes back down, so there is no distributed-autograd context), and keeps
the forward requests of the coming steps in flight (``--run-ahead``). Evaluation, checkpoints,
deduplication, the failure policy and the byte ledgers are split learning's.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from splitrpc import checkpoint, codec
from splitrpc.optim import apply_gradients
from splitrpc.split.hospitals import Call
from splitrpc.split.protocol import HospitalFailure
from splitrpc.split.server import Server, ServerParty


class LocalLossServer(Server):
    """The trunk, trained on what the hospitals send; no gradient goes back."""

    sends_gradients = False

    def __init__(self, cfg, coordinator):
        super().__init__(cfg, coordinator)
        # Forward requests already sent: {step: {hospital: Call}}; and per hospital the step of the newest
        # request sent to it, which its next request names so that the hospital runs them in order.
        self.window: dict[int, dict[int, Call]] = {}
        self.last_request: dict[int, int] = {}

    def _request(self, step: int, epoch: int, hospital: int, batch: int, lr: float) -> Call:
        previous = self.last_request.get(hospital, -1)
        self.last_request[hospital] = step
        return self.hospitals.call_async(hospital, "forward", epoch, batch, lr, step, previous)

    def _ahead(self, step: int, participants: Sequence[tuple[int, int]]) -> list[tuple]:
        """(step, epoch, participants, lr) of the steps after ``step`` whose requests may be in flight now.

        Each hospital may have --run-ahead + 1 requests in flight (this step's included), and the
        window never crosses what must see the hospitals as they are after a step: an evaluation
        (the end of an epoch), a checkpoint (so a checkpoint is taken with nothing in flight), an
        L1 average, the end of the run.
        """
        loop, cfg = self.loop, self.cfg
        steps_per_epoch = len(loop.plan)
        depth = Counter(h for h, _ in participants)
        ahead, s = [], step
        while True:
            done = s + 1  # steps done once step s has run
            if (done >= loop.total_steps or done % steps_per_epoch == 0
                    or cfg.checkpoint_dir and checkpoint.due(self.checkpoint_every, done, loop.total_steps)
                    or cfg.l1 == "average" and done % cfg.l1_sync_every == 0):
                return ahead
            s += 1
            epoch, index = divmod(s, steps_per_epoch)
            following = [(h, b) for h, b in loop.plan[index] if h not in self.hospitals.lost]
            if any(depth[h] > cfg.run_ahead for h, _ in following):
                return ahead
            depth.update(h for h, _ in following)
            ahead.append((s, epoch, following, loop.schedule(s)))

    def lose(self, failure: HospitalFailure, step: int) -> None:
        super().lose(failure, step)  # raises under --on-hospital-failure abort
        self.last_request.pop(failure.index, None)
        for calls in self.window.values():
            calls.pop(failure.index, None)  # its requests in flight are abandoned

    def _step(self, epoch: int, participants: Sequence[tuple[int, int]], lr: float,
              step: int) -> tuple[float | None, int]:
        clock, cfg = self.log.seconds, self.cfg
        t0 = time.perf_counter()
        # This step's requests (sent already if they were in the window), then the coming steps' within
        # --run-ahead: the hospitals compute and step their L1s while the trunk works.
        sent = self.window.pop(step, {})
        calls = {h: sent[h] if h in sent else self._request(step, epoch, h, b, lr) for h, b in participants}
        for s, e, following, rate in self._ahead(step, participants):
            if s not in self.window:
                self.log.prefetched += 1
            queued = self.window.setdefault(s, {})
            for h, b in following:
                if h not in queued:
                    queued[h] = self._request(s, e, h, b, rate)
        # One reply per participant: its activations and labels. A hospital that fails is lost
        # (or stops the run); the others' replies stand, their L1 steps are their own.
        taken, inputs, labels = [], [], []
        for h, b in participants:
            try:
                wire, y = self._receive(h, self.hospitals.wait(h, calls[h]), cfg.batch_size)
            except HospitalFailure as failure:
                self.lose(failure, step)
                continue
            taken.append((h, b))
            inputs.append(codec.decode(self.codec, wire, self.dtype, (len(wire[0]), *self.activation_shape)))
            labels.append(y)
            if self.capture is not None:
                self.capture.add(h, {"epoch": epoch, "batch": b, "activations": inputs[-1].clone(),
                                     "labels": y.clone()})
        if not taken:
            return None, 0
        t1 = time.perf_counter()
        activations = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
        output = self.trunk(activations.to(self.device))
        loss = F.cross_entropy(output, torch.cat(labels).long().to(self.device))
        t2 = time.perf_counter()
        loss.backward()  # the trunk only: the activations came detached, nothing goes down
        t3 = time.perf_counter()
        apply_gradients(self.optimizer, None, lr)
        t4 = time.perf_counter()
        clock["waiting_for_activations"] += t1 - t0
        clock["trunk_forward"] += t2 - t1
        clock["trunk_backward"] += t3 - t2
        clock["trunk_optimizer"] += t4 - t3
        self.log.steps.append(taken)
        return loss.item(), cfg.batch_size * len(taken)


class LocalLossServerParty(ServerParty):
    """Rank 0 of a local-loss run: split learning's server party with this Server, and the hospitals'
    auxiliary heads (their size, cost and loss) in the record."""

    server_class = LocalLossServer

    def finish(self, run_record: dict) -> None:
        super().finish(run_record)
        run_record["local_loss"] = {"run_ahead": self.cfg.run_ahead,
                                    "hospitals": self.server.call_live("local_loss_report")}
