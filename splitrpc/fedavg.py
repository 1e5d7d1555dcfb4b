"""Federated averaging (McMahan et al., 2017), the baseline split-learning suites compare against.

Rank r = 0..N-1 is hospital r+1: it holds its own shard and a full replica of
the model and trains it on its own batches, with its own optimizer, for
``--local-steps`` steps (a round). At the end of a round the replicas'
parameters and BatchNorm statistics are averaged, weighted by the samples each
hospital trained on in the round (its shard size, when a round is a local
epoch), by one all-reduce over the hospitals' gloo group. There is no server.

Steps follow the ``parallel`` plan, as for DDP: step t uses batch t of every
hospital that still has one, and a hospital whose shard is exhausted sits the
step out (it trains on nothing and weighs nothing in that round's average).
A round also ends with every epoch and with the run, so evaluations and the
saved model are always of the averaged model. Optimizer state (momentum) stays
with each replica. With one local step, equal shards and SGD, a round is
exactly a DDP step: the average of the replicas' updates is the update of the
averaged gradient, momentum included, since SGD's update is linear in the
gradient and the momentum buffer.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from splitrpc import comm, data, loop
from splitrpc.ddp import slowest_step
from splitrpc.errors import UserError
from splitrpc.methods import CHECKPOINT_OPTIONS, Method, Party
from splitrpc.models import floating_state, model_for, split_model
from splitrpc.optim import apply_gradients, make_optimizer
from splitrpc.ranks import RING, RankParty, RankTrainer


class FedAvgTrainer(RankTrainer):
    """A FedAvg rank: a replica trained on its own batches, averaged with the others every round."""

    head_file = "head-fedavg.pt"

    def __init__(self, cfg, rank: int):
        super().__init__(cfg, rank)
        self.model = model_for(cfg).to(self.device)
        split_model(self.model, cfg.cut)  # the same --cut check as split learning
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        # What a round averages: every parameter and floating-point buffer (BatchNorm statistics).
        self.averaged = floating_state(self.model)
        self.model_bytes = comm.tensor_bytes(*self.averaged)
        self.batches = self._all_gather(self.shard.num_batches)
        self.rounds = 0  # rounds this process ran (its bytes); with those before a resumption:
        self.earlier_rounds = 0
        # Samples this hospital and all hospitals trained on since the last average.
        self.round_mine, self.round_all = 0, 0
        # The round boundaries, from the plan every rank builds (RankParty.setup): a round also ends with
        # every epoch and with the run.
        self.steps_per_epoch = len(data.epoch_plan(self.batches, "parallel"))
        self.total_steps = loop.Loop.total_steps_of(cfg, self.steps_per_epoch)
        # Seconds of the rounds after the first (whose all-reduce also opens gloo's connections): this
        # hospital's local steps, and its wait in the round's all-reduce.
        self.timed = {"rounds": 0, "compute_s": 0.0, "wait_s": 0.0}
        self.round_compute_s = 0.0

    def train_step(self, epoch: int, index: int, participants, lr: float) -> tuple[float, int]:
        started = time.perf_counter()
        present = {h for h, _ in participants}
        # Every hospital knows the plan, so each computes the round's weights without asking.
        self.round_all += len(present) * self.cfg.batch_size
        loss_value = 0.0  # a hospital sitting the step out; the step's loss is gathered after the epoch
        if self.hospital in present:
            images, labels = self.shard.batch(epoch, index)
            loss = F.cross_entropy(self.model(images.to(self.device)), labels.to(self.device))
            loss.backward()
            apply_gradients(self.optimizer, None, lr)
            loss_value = loss.item()
            self.local_losses.append((loss_value * len(labels), len(labels)))
            self.round_mine += len(labels)
        else:
            self.local_losses.append((0.0, 0))
        self.steps += 1
        self.round_compute_s += time.perf_counter() - started
        return loss_value, len(participants) * self.cfg.batch_size

    def after_step(self, steps_done: int) -> None:
        in_epoch = (steps_done - 1) % self.steps_per_epoch + 1
        if in_epoch % self.cfg.local_steps == 0 or in_epoch == self.steps_per_epoch or steps_done == self.total_steps:
            self.average()

    @torch.no_grad()
    def average(self) -> None:
        """One round's end: the replicas become their sample-weighted mean, in one all-reduce."""
        weight = self.round_mine / self.round_all
        flat = torch.cat([t.detach().reshape(-1) for t in self.averaged]) * weight
        self.ledger.book_ring(RING, comm.tensor_bytes(flat), self.ranks)
        started = time.perf_counter()
        dist.all_reduce(flat)
        if self.rounds:
            self.timed["rounds"] += 1
            self.timed["compute_s"] += self.round_compute_s
            self.timed["wait_s"] += time.perf_counter() - started
        self.round_compute_s = 0.0
        offset = 0
        for t in self.averaged:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        self.rounds += 1
        self.round_mine, self.round_all = 0, 0

    def state_dict(self) -> dict:
        """This replica, its optimizer (momentum stays with each hospital) and the round in progress: a
        checkpoint may fall between two averages."""
        return {**super().state_dict(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "round_mine": self.round_mine, "round_all": self.round_all,
                "rounds": self.earlier_rounds + self.rounds}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.round_mine, self.round_all, self.earlier_rounds = state["round_mine"], state["round_all"], state["rounds"]

    def evaluate(self) -> list[float]:
        """The averaged model's test accuracy (every replica holds it)."""
        return self.accuracy(self.model)

    def round_timing(self) -> dict | None:
        """A round as the time model sees one, as for DDP's step: the slowest hospital's local steps, and that
        hospital's shorter wait in the all-reduce (the transfer, where the others waited for it too)."""
        n = self.timed["rounds"]
        per_rank = self._all_gather({"steps": n, "step_s": (self.timed["compute_s"] + self.timed["wait_s"]) / max(n, 1),
                                     "wait_s": self.timed["wait_s"] / max(n, 1)})
        timing = slowest_step(per_rank)
        return timing and {"timed_rounds": timing["timed_steps"], "round_s": timing["step_s"],
                           "compute_s": timing["compute_s"], "allreduce_wait_s": timing["allreduce_wait_s"]}

    def communication(self, steps_per_epoch: int) -> dict:
        reports = self._all_gather(self.ledger.report())
        ring = comm.ring_allreduce_bytes(self.model_bytes, self.ranks)
        analytic = comm.party_table({n: {"sent": self.rounds * ring, "received": self.rounds * ring}
                                     for n in self.names()})
        phases = self.phases(reports, analytic)
        # Training traffic is one model all-reduce per round (a run's last round may be short, its
        # bytes are not), so an epoch's bytes scale with its rounds, not with its steps.
        rounds_per_epoch = -(-steps_per_epoch // self.cfg.local_steps)
        return {
            "method": "fedavg",
            "transport": self.transport_name(),
            "phases": phases,
            "measured_steps": self.steps,
            "steps_per_epoch": steps_per_epoch,
            "extrapolated": self.steps % steps_per_epoch != 0,
            "local_steps": self.cfg.local_steps,
            "rounds": self.rounds,
            "rounds_per_epoch": rounds_per_epoch,
            "model_bytes_per_round": self.model_bytes,
            "per_epoch": self.per_epoch(phases, rounds_per_epoch / self.rounds if self.rounds else None),
            "wait_share": None,
            "round_timing": self.round_timing(),
        }

    def save(self, directory: str) -> None:
        self.save_model(self.model, directory)


class FedAvgParty(RankParty):
    """One FedAvg rank: its replica, the round boundaries, and the bytes of its averages."""

    def make_trainer(self) -> FedAvgTrainer:
        return FedAvgTrainer(self.cfg, self.rank)

    def joined_line(self) -> str:
        return f"{self.cfg.hospitals} ranks, {self.cfg.local_steps} local step(s) per round"

    def loop_options(self) -> dict:
        return {"on_step_end": self.trainer.after_step}

    def finish(self, run_record: dict) -> None:
        run_record["rounds"] = self.trainer.earlier_rounds + self.trainer.rounds
        run_record["comm"] = self.trainer.communication(len(self.plan))


class FedAvg(Method):
    """FedAvg's declaration: N ranks, one per hospital, averaging their replicas every round."""

    name = "fedavg"
    summary = "federated averaging: local steps on every hospital's replica, averaged every round"
    exchange = "all-reduce"
    options = frozenset({"local_steps", "on_hospital_failure", *CHECKPOINT_OPTIONS})  # the latter only to refuse "continue" below
    fixed = {"schedule": "parallel"}  # every hospital takes part in every step

    def validate(self, cfg) -> None:
        if cfg.on_hospital_failure == "continue":
            raise UserError("--method fedavg supports --on-hospital-failure abort only (its all-reduce group cannot "
                            "lose a member)")

    def party(self, cfg, rank, coordinator) -> Party:
        return FedAvgParty(cfg, rank, coordinator)


METHOD = FedAvg()
