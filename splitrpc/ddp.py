"""The baseline: large-scale synchronous SGD with DistributedDataParallel.

Runs on every rank r = 0..N-1, which is hospital r+1: it holds its own shard
and a full replica of the model, and DDP all-reduces gradients every step
(gloo on CPU, NCCL on GPU). There is no server.

Steps follow the ``parallel`` plan of split learning: step t uses batch t of
every hospital that still has one. DDP must all-reduce on every rank at every
step, so a hospital whose shard is exhausted runs a zero-weighted batch; the
other ranks' losses are weighted so that the averaged gradient is the mean
over the samples of the hospitals present, exactly what ``--method local``
computes on their concatenated batches.
"""

from __future__ import annotations

import copy

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from splitrpc import comm, transport
from splitrpc.methods import CHECKPOINT_OPTIONS, Method, Party
from splitrpc.models import model_for, split_model
from splitrpc.optim import LRSchedule, apply_gradients, make_optimizer
from splitrpc.ranks import RING, RankParty, RankTrainer


class CountingAllReduce:
    """State of a DDP communication hook that books every gradient bucket handed to all-reduce.

    It also times when each bucket is handed over, relative to the step's last
    bucket (whose gradients are the last the backward pass computes): a
    bucket's *lead* is how long its all-reduce can run while the backward pass
    still computes, which is what the time model needs to credit DDP's
    overlap on a slow link (bench/timemodel.py). It also times how long the
    backward pass waited after its last bucket (``wait``: the all-reduce the
    backward pass could not hide), so that a step's own compute is its length
    less that wait. The first step is left out of both: DDP rebuilds its
    buckets in gradient-ready order after it.
    """

    def __init__(self, ledger: comm.Ledger, ranks: int):
        self.ledger, self.ranks = ledger, ranks
        self.paused = False  # an all-reduce that is not training (DdpTrainer.rebuild_buckets): not booked
        self.bucket_bytes = 0
        self._handed: list[tuple[int, float]] = []  # (bytes, perf_counter) of this step's buckets, in order
        self._steps_timed = 0
        self._lead_sums: list[float] = []
        self._layout: tuple[int, ...] | None = None  # the timed steps' bucket bytes, in order

    def book(self, nbytes: int) -> None:
        self.bucket_bytes += nbytes
        self.ledger.book_ring(RING, nbytes, self.ranks)
        self._handed.append((nbytes, time.perf_counter()))

    def end_step(self, first: bool) -> float | None:
        """Call when the backward pass returns (DDP has waited for every bucket's all-reduce by then);
        returns the seconds it waited after the last bucket was handed over, None for an untimed step."""
        handed, self._handed = self._handed, []
        if first or not handed:
            return None
        returned = time.perf_counter()
        layout = tuple(nbytes for nbytes, _ in handed)
        if layout != self._layout:  # a rebuild (or the first timed step): start the averages again
            self._layout, self._steps_timed, self._lead_sums = layout, 0, [0.0] * len(handed)
        last = handed[-1][1]
        for i, (_, at) in enumerate(handed):
            self._lead_sums[i] += last - at
        self._steps_timed += 1
        return returned - last

    def buckets(self) -> list[dict]:
        """[{"bytes", "lead_s"}] per bucket in hand-over order, averaged over the timed steps."""
        n = self._steps_timed
        return [{"bytes": b, "lead_s": lead / n} for b, lead in zip(self._layout, self._lead_sums)] if n else []


def counting_allreduce_hook(state, bucket):
    # No annotations: DDP inspects them, and ``from __future__ import annotations`` turns them into strings.
    if not state.paused:
        state.book(comm.tensor_bytes(bucket.buffer()))
    return default_hooks.allreduce_hook(dist.group.WORLD, bucket)


def slowest_overlap(per_rank: list[list[dict]]) -> list[dict] | None:
    """Bucket leads across ranks: a bucket's all-reduce starts when the last rank hands it over, so its
    window is the shortest lead of any rank. None when the ranks' bucket layouts differ or were not timed."""
    layouts = {tuple(round(b["bytes"]) for b in buckets) for buckets in per_rank}
    if len(layouts) != 1 or not per_rank[0]:
        return None
    return [{"bytes": per_rank[0][i]["bytes"], "lead_s": min(buckets[i]["lead_s"] for buckets in per_rank)}
            for i in range(len(per_rank[0]))]


def slowest_step(per_rank: list[dict]) -> dict | None:
    """The timed steps of all ranks as the time model sees a step: the slowest rank's compute (its step less
    its wait, the rank that finished its backward pass last), and that rank's shorter wait for the all-reduce.
    None when a rank timed no step."""
    if not per_rank or any(not r["steps"] for r in per_rank):
        return None
    return {"timed_steps": min(r["steps"] for r in per_rank),
            "step_s": max(r["step_s"] for r in per_rank),
            "compute_s": max(r["step_s"] - r["wait_s"] for r in per_rank),
            "allreduce_wait_s": min(r["wait_s"] for r in per_rank)}


def gradient_bytes(model: torch.nn.Module) -> int:
    return sum(comm.tensor_bytes(p) for p in model.parameters() if p.requires_grad)


class DdpTrainer(RankTrainer):
    """A DDP rank: a replica whose gradients are all-reduced in buckets during the backward pass."""

    head_file = "head-ddp.pt"

    def __init__(self, cfg, rank: int):
        super().__init__(cfg, rank)
        model = model_for(cfg).to(self.device)
        split_model(model, cfg.cut)  # the same --cut check as split learning
        self.gradient_bytes = gradient_bytes(model)
        # Buffers (BatchNorm statistics) are not broadcast every step; they are
        # averaged before each evaluation instead, so a step moves gradients only.
        self.model = DistributedDataParallel(model, broadcast_buffers=False)
        self.hook_state = CountingAllReduce(self.ledger, self.ranks)
        self.model.register_comm_hook(self.hook_state, counting_allreduce_hook)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.batches = self._all_gather(self.shard.num_batches)
        self.eval_payload = 0.0
        self.timed = {"steps": 0, "step_s": 0.0, "wait_s": 0.0}  # sums over the steps CountingAllReduce times

    def train_step(self, epoch: int, index: int, participants, lr: float) -> tuple[float, int]:
        started = time.perf_counter()
        present = {h for h, _ in participants}
        mine = self.hospital in present
        images, labels = self.shard.batch(epoch, index if mine else 0)
        if not mine:
            self.model.eval()  # the stand-in batch must not move BatchNorm statistics
        loss = F.cross_entropy(self.model(images.to(self.device)), labels.to(self.device))
        weight = self.ranks / len(present) if mine else 0.0
        (loss * weight).backward()  # DDP's all-reduce averages over all ranks
        wait = self.hook_state.end_step(first=self.steps == 0)
        self.model.train()
        apply_gradients(self.optimizer, None, lr)
        self.local_losses.append((loss.item() * len(labels), len(labels)) if mine else (0.0, 0))
        self.steps += 1
        if wait is not None:
            self.timed["steps"] += 1
            self.timed["step_s"] += time.perf_counter() - started
            self.timed["wait_s"] += wait
        return loss.item(), len(participants) * self.cfg.batch_size

    def state_dict(self) -> dict:
        """This rank's replica (its BatchNorm statistics are its own until the next evaluation) and optimizer."""
        return {**super().state_dict(), "model": self.model.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # After DDP's constructor, which broadcast rank 0's parameters and buffers: each rank's own come back.
        super().load_state_dict(state)
        self.model.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rebuild_buckets()  # a checkpoint is taken after a step: the uninterrupted run had rebuilt them

    def rebuild_buckets(self) -> None:
        """Resuming: lay DDP's buckets out as the uninterrupted run had them at this step.

        DDP all-reduces its first step in the constructor's buckets and rebuilds them in
        gradient-ready order after it. A resumed process would otherwise take its first step in
        the constructor's layout: a parameter's gradient then sits elsewhere in its bucket, gloo's
        ring sums it from another rank first, and with 3 or more ranks the sum differs in its last
        bits (seen in the chaos campaign: results/chaos.jsonl). One backward pass of a zero loss on
        every rank records the ready order (the order, not the values, is what DDP keeps); the
        weights, BatchNorm statistics and gradients it touches are put back, and its all-reduce is
        not booked as traffic.
        """
        kept = copy.deepcopy(self.model.module.state_dict())
        images, labels = self.shard.batch(0, 0)
        self.hook_state.paused = True
        try:
            (0.0 * F.cross_entropy(self.model(images.to(self.device)), labels.to(self.device))).backward()
        finally:
            self.hook_state.paused = False
            self.hook_state.end_step(first=True)  # forget the buckets it handed over
        self.model.module.load_state_dict(kept)
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """The replica's test accuracy, after averaging the BatchNorm statistics DDP does not broadcast."""
        module = self.model.module
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            self.ledger.book_ring(RING, comm.tensor_bytes(*buffers), self.ranks)
            transport.all_reduce_mean_(buffers, self.ranks)
        return self.accuracy(module)

    def communication(self, steps_per_epoch: int, train_seconds: float) -> dict:
        reports = self._all_gather(self.ledger.report())
        buckets = slowest_overlap(self._all_gather(self.hook_state.buckets()))
        n = self.timed["steps"]
        timing = slowest_step(self._all_gather(
            {"steps": n, "step_s": self.timed["step_s"] / max(n, 1), "wait_s": self.timed["wait_s"] / max(n, 1)}))
        ring = comm.ring_allreduce_bytes(self.gradient_bytes, self.ranks)
        analytic = comm.party_table({n: {"sent": self.steps * ring, "received": self.steps * ring}
                                     for n in self.names()})
        phases = self.phases(reports, analytic)
        return {
            "method": "ddp",
            "transport": self.transport_name(),
            "phases": phases,
            "measured_steps": self.steps,
            "steps_per_epoch": steps_per_epoch,
            "extrapolated": self.steps % steps_per_epoch != 0,
            "gradient_bytes_per_step": self.gradient_bytes,
            "bucket_bytes_per_step": self.hook_state.bucket_bytes / self.steps if self.steps else None,
            "buckets": buckets,
            "step_timing": timing,
            "per_epoch": self.per_epoch(phases, steps_per_epoch / self.steps if self.steps else None),
            "wait_share": None,  # DDP overlaps all-reduce with the backward pass; see "buckets" for the overlap
        }

    def save(self, directory: str) -> None:
        self.save_model(self.model.module, directory)


class DdpParty(RankParty):
    """One DDP rank: its replica, the peak rate (scaled with --lr-scaling), and the bytes of its all-reduces."""

    def make_trainer(self) -> DdpTrainer:
        return DdpTrainer(self.cfg, self.rank)

    def peak_lr(self) -> float:
        return self.cfg.lr * self.cfg.hospitals if self.cfg.lr_scaling else self.cfg.lr

    def joined_line(self) -> str:
        return f"{self.cfg.hospitals} ranks, peak lr {self.peak_lr():g}"

    def loop_options(self) -> dict:
        return {"lr_schedule": LRSchedule(self.cfg, len(self.plan), peak_lr=self.peak_lr())}

    def finish(self, run_record: dict) -> None:
        run_record["comm"] = self.trainer.communication(len(self.plan), run_record["train_time_s"])


class Ddp(Method):
    """The DDP baseline's declaration: N ranks, one per hospital, all-reducing gradients every step."""

    name = "ddp"
    summary = "the baseline: synchronous data-parallel SGD (DistributedDataParallel), one rank per hospital"
    exchange = "all-reduce"
    options = frozenset({"lr_scaling", *CHECKPOINT_OPTIONS})
    fixed = {"schedule": "parallel"}  # every hospital takes part in every step

    def party(self, cfg, rank, coordinator) -> Party:
        return DdpParty(cfg, rank, coordinator)


METHOD = Ddp()
