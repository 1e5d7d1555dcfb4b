"""What every rank of a hospitals-only group shares (DDP and FedAvg): rank r = 0..N-1 is hospital
r+1, holds its own shard and a full replica, and talks to the others over one gloo group.

``RankTrainer`` has the group's collectives (booked in the ledger, as the method's own traffic
is), the step losses and test accuracy reduced over ranks, the bytes table of every phase and
the final save; ``RankParty`` runs one rank through ``splitrpc.lifecycle``, checkpointing and
resuming it (``splitrpc.resumable``). A method adds only what it does differently: its step, what
it exchanges, and what its checkpoint holds (``state_dict``).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from splitrpc import comm, console, data, transport
from splitrpc.errors import PeerError
from splitrpc.methods import Party
from splitrpc.models import split_model
from splitrpc.resumable import Resumable

RING = "ring"  # the peer name under which all-reduce traffic is booked
STORE_PROBE_S = 2.0  # a store call after a failed collective; longer, and rank 0 is taken to be gone


def collective_failure(exc: BaseException) -> bool:
    """A gloo (or NCCL) collective failed: a peer died, hung past --rpc-timeout or lost its link."""
    return isinstance(exc, RuntimeError) and (isinstance(exc, getattr(dist, "DistError", ())) or
                                              "gloo" in str(exc) or "NCCL" in str(exc))


class StoreGone(Exception):
    """The coordination store did not answer: its connection may now be out of step (a reply that
    came late would be read as the next call's), so nothing more may be asked of it."""


def blame(store, rank: int, world_size: int, wait_s: float) -> str:
    """Which ranks did not report a failed collective: each survivor reports its own through the
    coordination store, then waits up to ``wait_s`` (--rpc-timeout) for the others'. A live rank
    fails in the same collective within one timeout of this one (at once on a lost connection, or
    when its own wait on a peer that left times out); one that does not say so in time is dead,
    stopped or cut off. A rank frozen for less than two timeouts wakes in time to report a failure
    of its own and is not told apart: then every rank's collective "failed at once". Rank 0 hosts
    the store: when the store does not answer within ``STORE_PROBE_S`` it is rank 0 that is gone
    (stopped or cut off, it would otherwise hold every store call for the store's own timeout,
    --setup-timeout, and wake to report a failure of its own as if it had been there all along)."""
    try:
        store.set_timeout(timedelta(seconds=STORE_PROBE_S))
        store.set(f"collective_failed/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in range(world_size) if not store.check([f"collective_failed/{r}"])]
            if not silent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store's own failure is the answer
        raise StoreGone(f"{transport.hospital_name(1)} (rank 0, which holds the coordination store) "
                        f"is unreachable") from None
    if not silent:
        return "every rank's collective failed at once"
    names = ", ".join(f"{transport.hospital_name(r + 1)} (rank {r})" for r in silent)
    return f"no word from {names}: dead, stopped or cut off"


class RankTrainer:
    """The parts of a DDP or FedAvg rank that do not depend on what the method exchanges."""

    head_file = ""  # the saved L1's name: head-<method>.pt

    def __init__(self, cfg, rank: int):
        self.cfg, self.rank, self.ranks = cfg, rank, cfg.hospitals
        self.hospital = rank + 1
        self.device = transport.compute_device(cfg)
        self.ledger = comm.Ledger(transport.hospital_name(self.hospital))
        self.shard = data.load_shard(cfg, self.hospital)
        self.test = data.load_test(cfg)
        self.local_losses: list[tuple[float, int]] = []
        self.steps = 0  # steps this process ran (a resumed run's bytes are counted from its resumption)

    def state_dict(self) -> dict:
        """What a checkpoint holds; a method adds its model and optimizer. The step losses are kept for
        the current epoch's loss, which is reduced over ranks at its end."""
        return {"local_losses": list(self.local_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.local_losses = list(state["local_losses"])

    def _all_gather(self, value):
        gathered = [None] * self.ranks
        dist.all_gather_object(gathered, value)
        return gathered

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce outside the method's own exchange (CPU tensors, over gloo), booked like it."""
        self.ledger.book_ring(RING, comm.tensor_bytes(tensor), self.ranks)
        dist.all_reduce(tensor)
        return tensor

    def reduce_losses(self, losses: list[float], counts: list[int]) -> list[float]:
        """Each step's loss over every participating hospital's batch (gathered after the epoch)."""
        epoch = torch.tensor(self.local_losses[-len(losses):], dtype=torch.float64)
        totals = self._all_reduce(epoch)
        return (totals[:, 0] / totals[:, 1].clamp_min(1)).tolist()

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module) -> list[float]:
        """``model``'s test accuracy (every rank holds the same one); ranks share the test batches."""
        model.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for b in range(self.rank, self.test.num_batches, self.ranks):
            images, labels = self.test.batch(b)
            counts[0] += (model(images.to(self.device)).argmax(1).cpu() == labels).sum().item()
            counts[1] += len(labels)
        model.train()
        self._all_reduce(counts)
        return [counts[0].item() / counts[1].item()]

    def names(self) -> list[str]:
        return [transport.hospital_name(r + 1) for r in range(self.ranks)]

    def phases(self, reports: list[dict], analytic: dict) -> dict:
        """Bytes three ways for every phase; ``analytic`` is the training phase's count from shapes."""
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
        return phases

    def per_epoch(self, phases: dict, scale: float | None) -> dict:
        """The training phase's bytes scaled to one epoch (``scale``: epochs' units over measured units)."""
        names = self.names()

        def one(table):
            if table is None or scale is None:
                return None
            per_rank = [table[n]["sent"] + table[n]["received"] for n in names]
            return {"total": table["total"] * scale, "per_hospital": sum(per_rank) / len(per_rank) * scale}

        return {kind: one(phases["train"][f"{kind}_bytes"]) for kind in ("analytic", "payload", "tcp")}

    def transport_name(self) -> str:
        return "gloo" if self.device.type == "cpu" else "nccl"

    def save_model(self, model: torch.nn.Module, directory: str) -> None:
        """The same files as a split run: the trunk, and the head under this method's name."""
        head, trunk = split_model(model, self.cfg.cut)
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in trunk.state_dict().items()}, Path(directory) / "trunk.pt")
        torch.save({k: v.cpu() for k, v in head.state_dict().items()}, Path(directory) / self.head_file)


class RankParty(Resumable, Party):
    """One rank of a DDP or FedAvg run. Rank 0 prints, records and saves; every rank trains and checkpoints."""

    def __init__(self, cfg, rank: int, coordinator):
        self.cfg, self.rank, self.coordinator = cfg, rank, coordinator
        self.who = f"rank{rank}"
        self.writes_record = rank == 0

    def make_trainer(self):
        raise NotImplementedError

    def joined_line(self) -> str:
        return f"{self.cfg.hospitals} ranks"

    def loop_options(self) -> dict:
        return {}

    def join(self) -> None:
        with self.coordinator.reporting(self.who):
            data.prepare(self.cfg)
        self.coordinator.mark_ready()
        self.coordinator.wait_all_ready(self.cfg.setup_timeout)
        transport.init_hospital_group(self.cfg, self.rank)

    @contextmanager
    def reporting(self):
        """A failed collective becomes one line that names the ranks that went silent (gloo's own
        message names at most an address, and a timeout names no one)."""
        with self.coordinator.reporting(self.who):
            try:
                yield
            except RuntimeError as exc:
                if not collective_failure(exc):
                    raise
                cause = str(exc).split("This is typically")[0].strip()
                cause = cause.split("] ", 1)[-1] if cause.startswith("[") else cause
                try:
                    who = blame(self.coordinator.store, self.rank, self.cfg.hospitals, self.cfg.rpc_timeout)
                except StoreGone as gone:
                    # A late reply on that connection once made this rank read another's failure as
                    # the run's first and leave without a word (the third chaos pass).
                    self.coordinator.store_gone = True
                    who = str(gone)
                raise PeerError(f"a collective with the other hospitals failed: {who} (gloo: {cause})") from None

    def setup(self, run_record: dict) -> None:
        self.trainer = self.make_trainer()
        self.plan = data.epoch_plan(self.trainer.batches, "parallel")
        if self.rank == 0:
            console.line(f"[rank0] pid {os.getpid()} joined; {self.joined_line()}")
        run_record["hospitals"] = [{"name": transport.hospital_name(r + 1), "train_batches": n}
                                   for r, n in enumerate(self.trainer.batches)]
        self.start_loop(run_record, switch_phase=self.trainer.ledger.switch, reduce_losses=self.trainer.reduce_losses,
                        quiet=self.rank != 0, **self.loop_options())

    def checkpoint_party(self) -> str:
        return transport.hospital_name(self.rank + 1)

    def gather(self, value) -> list:
        return self.trainer._all_gather(value)

    def train(self) -> dict:
        result = self.loop.run()
        self.trainer.ledger.switch("done")
        return result

    def save(self, directory: str) -> None:
        if self.rank == 0:
            self.trainer.save(directory)

    def synchronize(self) -> None:
        dist.barrier()

    def leave(self, failed: bool) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
