"""Code that runs on a hospital (ranks 1..N).

The server creates one ``Hospital`` on each hospital with ``rpc.remote`` and
drives it through its RRef. Raw images, the shard's indices and the L1
weights never leave this process: ``forward`` returns L1 activations and
labels, distributed autograd brings back only the gradient of those
activations, and ``step`` applies it here.
"""

from __future__ import annotations

import copy
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from splitrpc import codec, comm, console, data, transport
from splitrpc.privacy import label_defences
from splitrpc.privacy.dcor import distance_correlation
from splitrpc.errors import PeerError
from splitrpc.methods import Party
from splitrpc.models import model_for, split_model, split_u
from splitrpc.optim import apply_gradients, make_optimizer
from splitrpc.privacy.capture import Capture
from splitrpc.split.checkpoints import HospitalCheckpoints
from splitrpc.split.dedup_session import HospitalDedup
from splitrpc.split.faults import inject_fault, parse_fault
from splitrpc.split.protocol import l1_sync_tensors, label_dtype
from splitrpc.split.ushape import HospitalTail

FINISH_POLL_S = 0.2


class Hospital(HospitalCheckpoints, HospitalDedup, HospitalTail):
    """One hospital's data shard, its L1 (the model's first ``cut`` stages) and L1's optimizer."""

    def __init__(self, cfg, index: int):
        self.cfg, self.index = cfg, index
        self.device = transport.compute_device(cfg)
        self.shard = data.load_shard(cfg, index)
        self.test = data.load_test(cfg)
        # --l1-init shared: every party builds the full model from --seed and keeps its
        # part, so every L1 starts equal to the local reference's (and the server could
        # rebuild it). private: from this hospital's own randomness, never sent anywhere.
        seed = cfg.seed if cfg.l1_init == "shared" else secrets.randbits(63)
        model = model_for(cfg, seed)
        # --labels hospital (U-shaped): the last --tail stages and the loss stay here too.
        self.tail: torch.nn.Sequential | None = None
        if cfg.labels == "hospital":
            self.head, _, self.tail = split_u(model, cfg.cut, cfg.tail)
            self.tail.to(self.device)
            self.tail_optimizer = make_optimizer(cfg, self.tail.parameters())
            if cfg.label_defence == "rr":
                self.shard.targets = label_defences.randomized_response(
                    self.shard.labels, cfg.label_defence_strength, cfg.num_classes,
                    torch.Generator().manual_seed(data.derived_seed(cfg.seed, data.LABEL_DP, index)))
        else:
            self.head, _ = split_model(model, cfg.cut)
        self.head.to(self.device)
        self.optimizer = make_optimizer(cfg, self.head.parameters())
        # The training batch whose gradient is awaited: its labels and, U-shaped, its tail's gradients.
        self.in_flight: dict = {}
        self.eval_labels: dict[int, torch.Tensor] = {}
        self.label_dtype = label_dtype(cfg.num_classes)
        self.head_dtype = getattr(torch, cfg.dtype)
        self.codec = codec.for_config(cfg)  # top-k's error feedback keeps its residual here, the sender
        self.ledger = comm.Ledger(transport.hospital_name(index))
        self.dropped: list[int] = []  # positions removed by deduplication, kept for checkpoints
        self.forwards = 0
        self.fault = parse_fault(cfg.fault, index)
        self.psi = None  # the keyless protocol's secret, while it runs (dedup_session.HospitalDedup)
        self.nopeek_values: list[float] = []
        # --capture-dir: the last batches' inputs, matching what the server keeps of them.
        self.capture = (Capture(-(-cfg.capture_samples // cfg.batch_size), cfg.capture_epochs)
                        if cfg.capture_dir else None)
        # RPC handlers run on a thread pool; BatchNorm's running statistics are
        # state that forward mutates, so one forward at a time.
        self.lock = threading.Lock()
        # L1's backward pass and step run here, one at a time, as gradients arrive.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="l1-step")
        self.pending: Future | None = None
        self.pending_lock = threading.Lock()
        # (server step, this hospital's state before it): undone if the server retries that step.
        self.attempt: tuple[int, dict] = (-1, {})

    def describe(self) -> dict:
        """Sizes the server needs to plan steps. No sample or index leaves."""
        return {
            "name": transport.hospital_name(self.index),
            "train_samples": len(self.shard),
            "train_batches": self.shard.num_batches,
            "test_samples": len(self.test.labels),
            "test_batches": self.test.num_batches,
            "label_histogram": data.label_histogram(self.shard.labels, self.cfg.num_classes),
            "threads": torch.get_num_threads(),
        }

    def forward(self, epoch: int, batch: int, lr: float, grad_scale: float, step: int = -1,
                tail_scale: float = 1.0) -> tuple:
        """The wire form of L1's activations for training batch ``batch`` of ``epoch``, and its labels
        (U-shaped: the activations only; ``tail_loss`` then takes the trunk's output).

        Called inside the server's distributed-autograd context. The gradient of these
        activations comes back through that context (the only other message of a step),
        and L1 then takes its step here at rate ``lr``, its gradient multiplied by
        ``grad_scale``: the step needs no request of its own. ``step`` numbers the server's
        optimizer steps: a forward for the step this hospital last computed is the server
        retrying that step after another hospital failed in it, and whatever the first
        attempt did here (BatchNorm statistics, an L1 step if its gradient came) is undone
        first, so that the step is taken once.
        """
        self.settle()  # the previous batch's L1 step comes first
        images, labels = self.shard.batch(epoch, batch)
        with self.lock:
            if step >= 0 and step == self.attempt[0]:
                self._restore(self.attempt[1])
            else:
                self.attempt = (step, self._snapshot())
            self.head.train()
            activations = self.protect(self.head(images.to(self.device)).cpu(),
                                       data.derived_seed(self.cfg.seed, data.NOISE, self.index, epoch, batch))
            extra = None
            if self.cfg.nopeek:
                # NoPeek: this hospital's own loss term, lambda * dCor(inputs, what leaves), whose
                # gradient is added to the one the server sends back (at the step).
                dcor = distance_correlation(images, activations)
                extra = dict(zip(self.head.parameters(), torch.autograd.grad(
                    self.cfg.nopeek * dcor, list(self.head.parameters()), retain_graph=True, allow_unused=True)))
                self.nopeek_values.append(dcor.item())
            activations, labels = self.leaving(epoch, batch, images, labels, activations)
            flight = self.in_flight = {"labels": labels, "tail_gradients": None, "epoch": epoch, "batch": batch}
            if self.shard.targets is not None:
                flight["labels"] = self.shard.batch_targets(epoch, batch).to(self.label_dtype)

        def on_gradient(gradient, wire_gradient):
            # Runs in distributed autograd's thread as the gradient arrives; L1's backward pass and
            # step run on this hospital's own worker, so the server's backward pass need not wait.
            self.ledger.add(transport.SERVER, "received", comm.tensor_bytes(*wire_gradient))
            if self.in_flight is not flight:
                return  # a late gradient of an attempt the server has abandoned
            with self.pending_lock:
                self.pending = self.worker.submit(self._step, activations, gradient, lr, grad_scale, extra,
                                                  flight["tail_gradients"], tail_scale)

        wire = codec.hospital_send(activations, self.codec, on_gradient, self.codec_draws(epoch, batch))
        return (*wire, labels) if self.tail is None else tuple(wire)  # U-shaped: labels stay here

    def leaving(self, epoch: int, batch: int, images: torch.Tensor, labels: torch.Tensor,
                activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a training batch sends (activations, labels as they cross), after the audit's capture of
        its inputs and, in tests, a deliberate fault. Counts the batch."""
        self.forwards += 1
        if self.capture is not None:
            # The labels too: an auditor holding both sides scores label leakage (U-shaped) against them.
            self.capture.add(0, {"epoch": epoch, "batch": batch, "inputs": images.clone(), "labels": labels.clone()})
        labels = labels.to(self.label_dtype)
        if self.fault and self.forwards >= self.fault[1]:
            activations, labels = inject_fault(self.fault[0], activations, labels, self.cfg.num_classes)
        return activations, labels

    def codec_draws(self, epoch: int, batch: int) -> torch.Generator | None:
        """Randomized top-k's draws: seeded by the batch, so a retried or resumed step draws the same."""
        if not self.cfg.topk_random:
            return None
        return torch.Generator().manual_seed(data.derived_seed(self.cfg.seed, data.CODEC, self.index, epoch, batch))

    def _step(self, activations, gradient, lr: float, grad_scale: float, extra, tail_gradients,
              tail_scale: float) -> None:
        with self.lock:
            try:
                torch.autograd.backward(activations, gradient.to(activations.dtype))
                extra = {p: g for p, g in extra.items() if g is not None} if extra else None
                apply_gradients(self.optimizer, None, lr, grad_scale, extra)
                if tail_gradients is not None:
                    # The server divides each hospital's loss gradient by the participants, and L1's
                    # gradient comes back multiplied by grad_scale: the tail's is scaled to match.
                    apply_gradients(self.tail_optimizer, tail_gradients, lr, tail_scale)
            finally:
                self.optimizer.zero_grad(set_to_none=True)  # a failed step leaves no gradient behind

    def settle(self) -> None:
        """Wait for an L1 step still running from the last gradient (and raise its error, if any)."""
        with self.pending_lock:
            pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def _snapshot(self) -> dict:
        """What one step changes here: L1 (with BatchNorm's statistics), the tail, their optimizers."""
        state = {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "codec": self.codec.state_dict()}
        if self.tail is not None:
            state.update(tail=self.tail.state_dict(), tail_optimizer=self.tail_optimizer.state_dict())
        return copy.deepcopy(state)

    def _restore(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.codec.load_state_dict(state["codec"])
        if self.tail is not None:
            self.tail.load_state_dict(state["tail"])
            self.tail_optimizer.load_state_dict(state["tail_optimizer"])

    def protect(self, activations: torch.Tensor, noise_seed: int) -> torch.Tensor:
        """--noise: Gaussian noise on everything that leaves this hospital (training and evaluation)."""
        if not self.cfg.noise:
            return activations
        generator = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(activations.shape, generator=generator, dtype=activations.dtype)
        return activations + self.cfg.noise * noise

    def write_capture(self, epoch: int | None = None) -> int:
        """--capture-dir: the inputs (and labels) behind the activations the server kept, on this hospital's
        disk: at the run's end, or with --capture-epochs those of ``epoch`` as it ends. Returns the batches kept."""
        if self.capture is None:
            return 0
        if epoch is not None or not self.cfg.capture_epochs:
            name = Capture.file_name(f"{transport.hospital_name(self.index)}-inputs", epoch)
            Path(self.cfg.capture_dir).mkdir(parents=True, exist_ok=True)
            torch.save(self.capture.items(0, epoch), Path(self.cfg.capture_dir) / name)
        return len(self.capture.items(0, epoch))

    def privacy_stats(self) -> dict:
        values = self.nopeek_values
        return {"nopeek_dcor_mean": sum(values) / len(values) if values else None, "nopeek_batches": len(values)}

    @torch.no_grad()
    def eval_forward(self, batch: int) -> tuple:
        self.settle()
        images, labels = self.test.batch(batch)
        with self.lock:
            self.head.eval()
            activations = self.protect(self.head(images.to(self.device)).cpu(),
                                       data.derived_seed(self.cfg.seed, data.EVAL_NOISE, self.index, batch))
            self.head.train()
        labels = labels.to(self.label_dtype)
        wire = self.codec.encode(activations, training=False)
        if self.tail is not None:
            self.eval_labels[batch] = labels  # for eval_tail; they stay here
            return tuple(wire)
        return (*wire, labels)

    @torch.no_grad()
    def average_l1(self, weight: float | None = None) -> None:
        """Average L1 weights and BatchNorm statistics with the other hospitals.

        An all-reduce among the hospitals' own process group: the server,
        which triggers it, never sees L1 weights. ``weight``: this hospital's
        share of the weighted mean (SplitFed: its shard's share of the
        hospitals' samples, as FedAvg weighs); None, the plain mean.
        """
        self.settle()
        with self.lock:
            tensors = l1_sync_tensors(self.head)
            self.ledger.book_ring("hospitals", comm.tensor_bytes(*tensors), self.cfg.hospitals)
            if weight is None:
                transport.all_reduce_mean_(tensors, self.cfg.hospitals)
            else:
                transport.all_reduce_weighted_(tensors, weight)

    def switch_phase(self, phase: str) -> None:
        self.ledger.switch(phase)

    def comm_report(self) -> dict:
        return self.ledger.report()

    def save(self, path: str) -> None:
        self.settle()
        torch.save({k: v.cpu() for k, v in self.head.state_dict().items()}, path)
        if self.tail is not None:
            tail_path = Path(path).with_name(f"tail-{transport.hospital_name(self.index)}.pt")
            torch.save({k: v.cpu() for k, v in self.tail.state_dict().items()}, tail_path)


def _store(call, *args):
    """A coordination-store call; if the store is gone, its host (the server's) is gone."""
    try:
        return call(*args)
    except Exception:
        raise PeerError("lost the server: the coordination store is gone") from None


class HospitalParty(Party):
    """Rank i of a split run: prepares its data, serves the server's requests (the Hospital object
    the server creates here), and leaves when the server says it has finished. It writes no record:
    the server's holds the run."""

    writes_record = False

    def __init__(self, cfg, rank: int, coordinator: transport.Coordinator):
        self.cfg, self.rank, self.coordinator = cfg, rank, coordinator
        self.who = transport.hospital_name(rank)
        self.graceful = True

    def join(self) -> None:
        cfg, coordinator = self.cfg, self.coordinator
        with coordinator.reporting(self.who):
            data.prepare(cfg)
        coordinator.mark_ready()
        coordinator.wait_all_ready(cfg.setup_timeout)
        if cfg.l1 == "average":
            # The hospitals' own group, for averaging L1; the server is not a member.
            dist.init_process_group("gloo", store=dist.PrefixStore("hospitals", coordinator.store),
                                    rank=self.rank - 1, world_size=cfg.hospitals)
        transport.start_rpc(cfg, self.rank, cfg.world_size)
        console.line(f"[{self.who}] pid {os.getpid()} joined; data stays here")

    def reporting(self):
        return self.coordinator.reporting(self.who)

    def train(self) -> dict:
        """The server drives everything through RPC handler threads; this thread only watches
        that the server is alive until it says it has finished."""
        coordinator, timeout = self.coordinator, self.cfg.rpc_timeout
        beat_every = min(5.0, timeout / 4)
        last_beat = 0.0
        while not _store(coordinator.finished):
            failure = _store(coordinator.failure)
            if failure:
                raise PeerError(f"run stopped: {failure}", consequence=True)
            if time.monotonic() - last_beat >= beat_every:
                try:
                    rpc.rpc_sync(transport.SERVER, transport.heartbeat, timeout=timeout)
                except Exception as exc:
                    if _store(coordinator.finished):
                        break
                    raise PeerError(f"lost the server: {transport.remote_error_summary(exc)}") from None
                last_beat = time.monotonic()
            time.sleep(FINISH_POLL_S)
        # Read before the acknowledgement: after it the server, the store's host, may leave.
        self.graceful = not _store(coordinator.lost)
        _store(coordinator.acknowledge_finish, self.who)
        return {}

    def leave(self, failed: bool) -> None:
        if failed:
            transport.stop_rpc(graceful=False, timeout_s=0)
            return
        # A graceful stop waits for every party; with a hospital lost on the way it cannot complete.
        transport.stop_rpc(graceful=self.graceful, timeout_s=self.cfg.rpc_timeout)
        if self.cfg.l1 == "average":
            dist.destroy_process_group()
