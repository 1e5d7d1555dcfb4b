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

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from splitrpc import comm, console, data, loop, record, transport
from splitrpc.models import model_for, split_model
from splitrpc.optim import LRSchedule, apply_gradients, make_optimizer

RING = "ring"  # the peer name under which all-reduce traffic is booked


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


class DdpTrainer:
    def __init__(self, cfg, rank: int):
        self.cfg, self.rank, self.ranks = cfg, rank, cfg.hospitals
        self.hospital = rank + 1
        self.device = transport.compute_device(cfg)
        self.ledger = comm.Ledger(transport.hospital_name(self.hospital))
        self.shard = data.load_shard(cfg, self.hospital)
        self.test = data.load_test(cfg)
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
        self.local_losses: list[tuple[float, int]] = []
        self.steps = 0
        self.eval_payload = 0.0
        self.timed = {"steps": 0, "step_s": 0.0, "wait_s": 0.0}  # sums over the steps CountingAllReduce times

    def _all_gather(self, value):
        gathered = [None] * self.ranks
        dist.all_gather_object(gathered, value)
        return gathered

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce outside the gradient path (CPU tensors, over gloo), booked like the gradient buckets."""
        self.ledger.book_ring(RING, comm.tensor_bytes(tensor), self.ranks)
        dist.all_reduce(tensor)
        return tensor

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

    def reduce_losses(self, losses: list[float], counts: list[int]) -> list[float]:
        """Each step's loss over every participating hospital's batch (gathered after the epoch)."""
        epoch = torch.tensor(self.local_losses[-len(losses):], dtype=torch.float64)
        totals = self._all_reduce(epoch)
        return (totals[:, 0] / totals[:, 1].clamp_min(1)).tolist()

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """The replica's test accuracy; ranks share the test batches and add up the counts."""
        module = self.model.module
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            self.ledger.book_ring(RING, comm.tensor_bytes(*buffers), self.ranks)
            transport.all_reduce_mean_(buffers, self.ranks)
        module.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for b in range(self.rank, self.test.num_batches, self.ranks):
            images, labels = self.test.batch(b)
            counts[0] += (module(images.to(self.device)).argmax(1).cpu() == labels).sum().item()
            counts[1] += len(labels)
        module.train()
        self._all_reduce(counts)
        return [counts[0].item() / counts[1].item()]

    def communication(self, steps_per_epoch: int, train_seconds: float) -> dict:
        reports = self._all_gather(self.ledger.report())
        buckets = slowest_overlap(self._all_gather(self.hook_state.buckets()))
        n = self.timed["steps"]
        timing = slowest_step(self._all_gather(
            {"steps": n, "step_s": self.timed["step_s"] / max(n, 1), "wait_s": self.timed["wait_s"] / max(n, 1)}))
        names = [transport.hospital_name(r + 1) for r in range(self.ranks)]
        ring = comm.ring_allreduce_bytes(self.gradient_bytes, self.ranks)
        analytic = comm.party_table({n: {"sent": self.steps * ring, "received": self.steps * ring} for n in names})
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

        def per_epoch(table):
            if table is None or not self.steps:
                return None
            scale = steps_per_epoch / self.steps
            per_rank = [table[n]["sent"] + table[n]["received"] for n in names]
            return {"total": table["total"] * scale, "per_hospital": sum(per_rank) / len(per_rank) * scale}

        return {
            "method": "ddp",
            "transport": "gloo" if self.device.type == "cpu" else "nccl",
            "phases": phases,
            "measured_steps": self.steps,
            "steps_per_epoch": steps_per_epoch,
            "extrapolated": self.steps % steps_per_epoch != 0,
            "gradient_bytes_per_step": self.gradient_bytes,
            "bucket_bytes_per_step": self.hook_state.bucket_bytes / self.steps if self.steps else None,
            "buckets": buckets,
            "step_timing": timing,
            "per_epoch": {kind: per_epoch(phases["train"][f"{kind}_bytes"]) for kind in ("analytic", "payload", "tcp")},
            "wait_share": None,  # DDP overlaps all-reduce with the backward pass; see "buckets" for the overlap
        }

    def save(self, directory: str) -> None:
        head, trunk = split_model(self.model.module, self.cfg.cut)
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in trunk.state_dict().items()}, Path(directory) / "trunk.pt")
        torch.save({k: v.cpu() for k, v in head.state_dict().items()}, Path(directory) / "head-ddp.pt")


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
            trainer = DdpTrainer(cfg, rank)
            plan = data.epoch_plan(trainer.batches, "parallel")
            peak = cfg.lr * cfg.hospitals if cfg.lr_scaling else cfg.lr
            if rank == 0:
                console.line(f"[rank0] pid {os.getpid()} joined; {cfg.hospitals} ranks, peak lr {peak:g}")
            run_record["hospitals"] = [{"name": transport.hospital_name(r + 1), "train_batches": n}
                                       for r, n in enumerate(trainer.batches)]
            run_record["setup_time_s"] = time.perf_counter() - started
            result = loop.run(cfg, plan, trainer.train_step, trainer.evaluate, who=who,
                              lr_schedule=LRSchedule(cfg, len(plan), peak_lr=peak),
                              switch_phase=trainer.ledger.switch, reduce_losses=trainer.reduce_losses,
                              quiet=rank != 0)
            trainer.ledger.switch("done")
            run_record.update(result)
            run_record["comm"] = trainer.communication(len(plan), result["train_time_s"])
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
