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

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from splitrpc import comm, console, data, loop, record, transport
from splitrpc.ddp import slowest_step
from splitrpc.models import model_for, split_model
from splitrpc.optim import apply_gradients, make_optimizer
from splitrpc.protocol import l1_sync_tensors

RING = "ring"  # the peer name under which all-reduce traffic is booked, as for DDP


class FedAvgTrainer:
    def __init__(self, cfg, rank: int):
        self.cfg, self.rank, self.ranks = cfg, rank, cfg.hospitals
        self.hospital = rank + 1
        self.device = transport.compute_device(cfg)
        self.ledger = comm.Ledger(transport.hospital_name(self.hospital))
        self.shard = data.load_shard(cfg, self.hospital)
        self.test = data.load_test(cfg)
        self.model = model_for(cfg).to(self.device)
        split_model(self.model, cfg.cut)  # the same --cut check as split learning
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        # What a round averages: every parameter and floating-point buffer (BatchNorm statistics).
        self.averaged = l1_sync_tensors(self.model)
        self.model_bytes = comm.tensor_bytes(*self.averaged)
        self.batches = self._all_gather(self.shard.num_batches)
        self.local_losses: list[tuple[float, int]] = []
        self.steps = 0
        self.rounds = 0
        # Samples this hospital and all hospitals trained on since the last average.
        self.round_mine, self.round_all = 0, 0
        self.steps_per_epoch = self.total_steps = 0  # set once the plan is known
        # Seconds of the rounds after the first (whose all-reduce also opens gloo's connections): this
        # hospital's local steps, and its wait in the round's all-reduce.
        self.timed = {"rounds": 0, "compute_s": 0.0, "wait_s": 0.0}
        self.round_compute_s = 0.0

    def _all_gather(self, value):
        gathered = [None] * self.ranks
        dist.all_gather_object(gathered, value)
        return gathered

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce outside the averaging path (CPU tensors, over gloo), booked like the rounds."""
        self.ledger.book_ring(RING, comm.tensor_bytes(tensor), self.ranks)
        dist.all_reduce(tensor)
        return tensor

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

    def reduce_losses(self, losses: list[float], counts: list[int]) -> list[float]:
        """Each step's loss over every participating hospital's batch (gathered after the epoch)."""
        epoch = torch.tensor(self.local_losses[-len(losses):], dtype=torch.float64)
        totals = self._all_reduce(epoch)
        return (totals[:, 0] / totals[:, 1].clamp_min(1)).tolist()

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """The averaged model's test accuracy (every replica holds it); ranks share the test batches."""
        self.model.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for b in range(self.rank, self.test.num_batches, self.ranks):
            images, labels = self.test.batch(b)
            counts[0] += (self.model(images.to(self.device)).argmax(1).cpu() == labels).sum().item()
            counts[1] += len(labels)
        self.model.train()
        self._all_reduce(counts)
        return [counts[0].item() / counts[1].item()]

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
        names = [transport.hospital_name(r + 1) for r in range(self.ranks)]
        ring = comm.ring_allreduce_bytes(self.model_bytes, self.ranks)
        analytic = comm.party_table({n: {"sent": self.rounds * ring, "received": self.rounds * ring} for n in names})
        phases = {}
        for phase in comm.PHASES:
            payload, tcp, store = comm.phase_tables(reports, phase)
            phases[phase] = {
                "seconds": self.ledger.seconds.get(phase, 0.0),
                "analytic_bytes": analytic if phase == "train" else None,
                "payload_bytes": payload,
                "tcp_bytes": tcp,
                "tcp_store_bytes": store,
                "tcp_over_payload": comm.ratio(tcp and tcp["total"], payload["total"]),
                "tcp_delivered_over_payload": comm.ratio(tcp and tcp["total"] - tcp["retransmitted"], payload["total"]),
            }

        # Training traffic is one model all-reduce per round (a run's last round may be short, its
        # bytes are not), so an epoch's bytes scale with its rounds, not with its steps.
        rounds_per_epoch = -(-steps_per_epoch // self.cfg.local_steps)

        def per_epoch(table):
            if table is None or not self.rounds:
                return None
            scale = rounds_per_epoch / self.rounds
            per_rank = [table[n]["sent"] + table[n]["received"] for n in names]
            return {"total": table["total"] * scale, "per_hospital": sum(per_rank) / len(per_rank) * scale}

        return {
            "method": "fedavg",
            "transport": "gloo" if self.device.type == "cpu" else "nccl",
            "phases": phases,
            "measured_steps": self.steps,
            "steps_per_epoch": steps_per_epoch,
            "extrapolated": self.steps % steps_per_epoch != 0,
            "local_steps": self.cfg.local_steps,
            "rounds": self.rounds,
            "rounds_per_epoch": rounds_per_epoch,
            "model_bytes_per_round": self.model_bytes,
            "per_epoch": {kind: per_epoch(phases["train"][f"{kind}_bytes"]) for kind in ("analytic", "payload", "tcp")},
            "wait_share": None,
            "round_timing": self.round_timing(),
        }

    def save(self, directory: str) -> None:
        head, trunk = split_model(self.model, self.cfg.cut)
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in trunk.state_dict().items()}, Path(directory) / "trunk.pt")
        torch.save({k: v.cpu() for k, v in head.state_dict().items()}, Path(directory) / "head-fedavg.pt")


def run(cfg, rank: int, coordinator: transport.Coordinator) -> int:
    started = time.perf_counter()
    run_record = record.new_record(cfg)
    who = f"rank{rank}"
    with coordinator.reporting(who):
        data.prepare(cfg)
    coordinator.mark_ready()
    coordinator.wait_all_ready(cfg.setup_timeout)
    transport.init_hospital_group(cfg, rank)
    try:
        with coordinator.reporting(who):
            trainer = FedAvgTrainer(cfg, rank)
            plan = data.epoch_plan(trainer.batches, "parallel")
            trainer.steps_per_epoch = len(plan)
            trainer.total_steps = loop.Loop.total_steps_of(cfg, len(plan))
            if rank == 0:
                console.line(f"[rank0] pid {os.getpid()} joined; {cfg.hospitals} ranks, {cfg.local_steps} local "
                             f"step(s) per round")
            run_record["hospitals"] = [{"name": transport.hospital_name(r + 1), "train_batches": n}
                                       for r, n in enumerate(trainer.batches)]
            run_record["setup_time_s"] = time.perf_counter() - started
            result = loop.run(cfg, plan, trainer.train_step, trainer.evaluate, who=who,
                              on_step_end=trainer.after_step, switch_phase=trainer.ledger.switch,
                              reduce_losses=trainer.reduce_losses, quiet=rank != 0)
            trainer.ledger.switch("done")
            run_record.update(result)
            run_record["rounds"] = trainer.rounds
            run_record["comm"] = trainer.communication(len(plan))
            if cfg.save_dir and rank == 0:
                trainer.save(cfg.save_dir)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        run_record["status"] = "ok"
        run_record["wall_time_s"] = time.perf_counter() - started
        record.append_jsonl(cfg.out, run_record)
        record.print_summary(run_record, who)
    return 0
