"""Code that runs on the server (rank 0).

The server owns the trunk (stages ``cut``.. of the model) and drives training.
It never opens a data set: from each hospital it receives L1 activations and
labels, and it sends back only the gradient of those activations (through
distributed autograd). It also drives the one optimizer path: at every step
it evaluates the learning rate once and hands it to the trunk's optimizer
and, with the step command, to each participating hospital's L1 optimizer.

Everything a hospital sends is checked before it touches the trunk. A
hospital that dies, hangs or sends an invalid message either stops the run
(``--on-hospital-failure abort``) or is left out from then on (``continue``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed.autograd as dist_autograd
import torch.nn.functional as F

from splitrpc import accounting, checkpoint, codec, comm, console, data, loop, transport
from splitrpc.errors import PeerError, UserError
from splitrpc.methods import Party
from splitrpc.models import activation_shape, model_for, split_model, split_u
from splitrpc.optim import apply_gradients, make_optimizer
from splitrpc.privacy.capture import Capture
from splitrpc.split.checkpoints import ServerCheckpoints
from splitrpc.split.dedup_session import ServerDedup
from splitrpc.split.hospitals import Hospitals
from splitrpc.split.protocol import HospitalFailure, l1_sync_numel, label_dtype, message_problem
from splitrpc.split.ushape import ServerTail


LOST_ACK_WAIT_S = 2.0  # a dropped hospital that is alive polls the store every 0.2 s; a dead one never answers


class Server(ServerCheckpoints, ServerDedup, ServerTail):
    """Rank 0's trunk and the steps and evaluations it drives through the hospitals proxy (checkpoints,
    deduplication and the U-shaped tail are its mixins)."""

    sends_gradients = True  # the activation gradient goes down every step (False: a variant that sends none)

    def __init__(self, cfg, coordinator: transport.Coordinator):
        self.cfg, self.coordinator = cfg, coordinator
        self.device = transport.compute_device(cfg)
        self.ledger = comm.Ledger(transport.SERVER)
        model = model_for(cfg)
        self.activation_shape = activation_shape(model, cfg.cut)
        # U-shaped (--labels hospital): the server holds only the middle; hospitals keep the tail and the loss.
        self.u_shaped = cfg.labels == "hospital"
        if self.u_shaped:
            head, self.trunk, _ = split_u(model, cfg.cut, cfg.tail)
            self.output_shape = activation_shape(model, len(model) - cfg.tail)
        else:
            head, self.trunk = split_model(model, cfg.cut)
        self.l1_numel = l1_sync_numel(head)  # the architecture's size; the server keeps no L1 weights
        del head
        self.trunk.to(self.device)
        self.optimizer = make_optimizer(cfg, self.trunk.parameters())
        self.dtype = getattr(torch, cfg.dtype)
        self.label_dtype = label_dtype(cfg.num_classes)
        self.codec = codec.for_config(cfg)
        self.hospitals = Hospitals(cfg, self.ledger)
        # Construction on a hospital loads its shard; a failure there surfaces here.
        self.info = self.hospitals.call_all("describe", timeout=cfg.setup_timeout)
        self.loop: loop.Loop | None = None
        self.checkpoint_every = 0
        self.dedup_record: dict | None = None
        # Where the server's training time goes (seconds), and the participants of every
        # step that ran in this process (for the analytic bytes).
        self.log = accounting.StepLog()
        self.bytes = accounting.SplitBytes(cfg, self.activation_shape, self.output_shape if self.u_shaped else None,
                                           self.l1_numel, gradients=self.sends_gradients)
        # The next step's forward requests, sent while this step runs (see _upcoming): ((epoch, participants, lr), StepContext).
        self.prefetched: tuple[tuple, transport.StepContext] | None = None
        # --capture-dir: the last activations received from each hospital, for leakage audits.
        self.capture = (Capture(-(-cfg.capture_samples // cfg.batch_size), cfg.capture_epochs)
                        if cfg.capture_dir else None)

    # --- phases and deduplication ---------------------------------------------------------
    def call_live(self, method: str, *args, timeout: float | None = None) -> list:
        """Call every live hospital; one that fails is handled by --on-hospital-failure."""
        futures = [(h, self.hospitals.call_async(h, method, *args, timeout=timeout)) for h in self.hospitals.live]
        replies = []
        for h, f in futures:
            try:
                replies.append(self.hospitals.wait(h, f))
            except HospitalFailure as failure:
                self.lose(failure, self.loop.state["steps_done"] if self.loop else 0)
        return replies

    def switch_phase(self, phase: str) -> None:
        """Close the current accounting phase on every party at (nearly) the same moment."""
        self.ledger.switch(phase)
        self.call_live("switch_phase", phase)
        self.hospitals.phase = phase

    # --- what a hospital sends ------------------------------------------------------------
    def _receive(self, hospital: int, message, batch: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Check a hospital's message before it touches the trunk; returns (wire, labels or None)."""
        name = self.hospitals.name(hospital)
        problem = message_problem(message, batch, self.activation_shape, self.dtype, self.label_dtype,
                                  self.cfg.num_classes, self.codec, with_labels=not self.u_shaped)
        if problem:
            raise HospitalFailure(hospital, f"{name} sent {problem}; rejected before the trunk")
        if self.u_shaped:
            return list(message), None
        return list(message[:-1]), message[-1]

    def _activations(self, hospital: int, wire: list[torch.Tensor]) -> torch.Tensor:
        """The trunk's input from a training message; the backward pass sends its gradient down encoded."""
        name = self.hospitals.name(hospital)

        def on_gradient(wire_gradient):
            self.ledger.add(name, "sent", comm.tensor_bytes(*wire_gradient))
            self.log.gradient_pushes[hospital] += 1

        return codec.server_receive(wire, self.codec, self.dtype, on_gradient, (len(wire[0]), *self.activation_shape))

    def lose(self, failure: HospitalFailure, step: int) -> None:
        """--on-hospital-failure: stop the run, or leave the hospital out from now on."""
        if self.cfg.on_hospital_failure == "abort":
            saved = checkpoint.available_steps(self.cfg.checkpoint_dir, transport.SERVER) if self.cfg.checkpoint_dir else []
            if saved:
                raise PeerError(f"{failure} (stopped; --resume continues from the checkpoint of step {saved[-1]})") \
                    from None
            raise failure
        name = self.hospitals.name(failure.index)
        self.hospitals.lost[failure.index] = {"name": name, "step": step, "error": str(failure)}
        self.coordinator.mark_lost(name)
        detail = str(failure).removeprefix(f"{name}: ")
        console.line(f"[server] lost {name} ({detail}); continuing with {len(self.hospitals.live)} hospitals")
        if not self.hospitals.live:
            raise PeerError("every hospital has been lost") from None

    # --- training ---------------------------------------------------------------------------
    def epoch_plan(self, batches_per_hospital: list[int]) -> list[list[tuple[int, int]]]:
        """The steps of one epoch, each a list of (hospital, batch), as --schedule orders them."""
        return data.epoch_plan(batches_per_hospital, self.cfg.schedule)

    def train_step(self, epoch: int, index: int, participants: Sequence[tuple[int, int]], lr: float):
        """One optimizer step over the batches of ``participants`` [(hospital, batch), ...]."""
        step = self.loop.state["steps_done"] if self.loop else 0
        while True:
            live = [(h, b) for h, b in participants if h not in self.hospitals.lost]
            if not live:
                return None, 0  # every hospital of this step is gone: the schedule moves on without it
            try:
                return self._step(epoch, live, lr, step)
            except HospitalFailure as failure:
                self.discard_prefetch()
                self.lose(failure, step)  # raises under abort; otherwise retry without it
            except PeerError:
                self.discard_prefetch()
                # The backward pass failed without saying which peer: ask them.
                dead = self.hospitals.unresponsive([h for h, _ in live])
                if not dead:
                    raise
                for h in dead:
                    self.lose(HospitalFailure(h, f"{self.hospitals.name(h)}: did not answer after a failed "
                                                 f"backward pass"), step)

    def _open_step(self, epoch: int, participants: Sequence[tuple[int, int]], lr: float,
                   step: int) -> transport.StepContext:
        """A step's distributed-autograd context, with every participant's forward request sent inside it.

        A request carries the rate of the L1 step its hospital takes when the gradient comes
        back. The concatenated loss averages over every participant's samples; scaling a
        hospital's L1 gradient by the number of participants makes it the gradient of that
        hospital's own batch mean, as in a sequential step. U-shaped, the tail's gradient is
        that of the hospital's own mean already, and is scaled by ``scale / participants``
        to match (1 by default).
        """
        scale = self._l1_grad_scale(participants)
        tail_scale = scale / len(participants)
        return transport.StepContext(lambda: [self.hospitals.call_async(h, "forward", epoch, b, lr, scale, step,
                                                                        tail_scale)
                                              for h, b in participants])

    def _l1_grad_scale(self, participants: Sequence[tuple[int, int]]) -> float:
        """What each participant multiplies its L1 gradient by (see _open_step)."""
        return float(len(participants)) if self.cfg.l1_grad_scale == "participants" else 1.0

    def _upcoming(self, participants: Sequence[tuple[int, int]]) -> tuple | None:
        """(epoch, participants, lr, step) of the next step if its hospitals may compute it now, while this step runs.

        Only where that changes nothing: the next step's hospitals take no part in this one
        (their L1 does not move before they compute), L1s are independent (no average after
        this step), and no evaluation or checkpoint comes between the two steps.
        """
        if not self.cfg.prefetch or self.cfg.l1 != "independent" or self.loop is None:
            return None
        upcoming = self.loop.upcoming()
        if upcoming is None:
            return None
        epoch, _, following, lr = upcoming
        steps_done = self.loop.state["steps_done"] + 1
        if self.cfg.checkpoint_dir and checkpoint.due(self.checkpoint_every, steps_done, self.loop.total_steps):
            return None
        following = [(h, b) for h, b in following if h not in self.hospitals.lost]
        if not following or {h for h, _ in following} & {h for h, _ in participants}:
            return None
        return epoch, tuple(following), lr, steps_done

    def discard_prefetch(self) -> None:
        if self.prefetched is not None:
            self.prefetched[1].close()
            self.prefetched = None

    def _step(self, epoch: int, participants: Sequence[tuple[int, int]], lr: float,
              step: int) -> tuple[float, int]:
        hospitals, clock = self.hospitals, self.log.seconds
        t0 = time.perf_counter()
        key = (epoch, tuple(participants), lr, step)
        if self.prefetched is not None and self.prefetched[0] == key:
            context, self.prefetched = self.prefetched[1], None
        else:
            self.discard_prefetch()
            context = self._open_step(epoch, participants, lr, step)
        try:
            # One request per hospital: its L1 activations (sent already if prefetched).
            replies = [hospitals.wait(h, f) for (h, _), f in zip(participants, context.sent)]
            t1 = time.perf_counter()
            inputs, labels = [], []
            for (h, b), message in zip(participants, replies):
                wire, y = self._receive(h, message, self.cfg.batch_size)
                inputs.append(self._activations(h, wire))
                labels.append(y)
                if self.capture is not None:
                    self.capture.add(h, {"epoch": epoch, "batch": b, "activations": inputs[-1].detach().clone(),
                                         "labels": None if y is None else y.clone()})
            if self.u_shaped:  # a second round trip: the trunk's output down, the loss's gradient up
                output = self.trunk((torch.cat(inputs) if len(inputs) > 1 else inputs[0]).to(self.device))
                loss, objective = self._hospital_losses(participants, output)
            else:
                loss, objective = self._server_loss(participants, inputs, labels)
            t2 = time.perf_counter()
            upcoming = self._upcoming(participants)
            if upcoming is not None:  # the next step's hospitals compute and send while the trunk works
                self.prefetched = (upcoming, self._open_step(*upcoming))
                self.log.prefetched += 1
            try:
                # Sends each hospital its activation gradient, which it applies to L1 by itself.
                dist_autograd.backward(context.id, [objective])
            except Exception as exc:
                names = ", ".join(hospitals.name(h) for h, _ in participants)
                if len(participants) == 1:
                    raise HospitalFailure(participants[0][0], f"backward pass to {names} failed: "
                                          f"{transport.remote_error_summary(exc)}") from None
                raise PeerError(f"backward pass to {names} failed: {transport.remote_error_summary(exc)}") from None
            t3 = time.perf_counter()
            self._step_trunk(participants, dist_autograd.get_gradients(context.id), lr)
            t4 = time.perf_counter()
        finally:
            context.close()
        clock["waiting_for_activations"] += t1 - t0
        clock["trunk_forward"] += t2 - t1
        clock["backward_incl_push"] += t3 - t2
        clock["trunk_optimizer"] += t4 - t3
        self.log.steps.append(list(participants))
        return loss.item(), self.cfg.batch_size * len(participants)

    def _server_loss(self, participants: Sequence[tuple[int, int]], inputs: list[torch.Tensor],
                     labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the step's loss, the objective whose backward pass reaches every hospital): one trunk pass over
        the participants' concatenated activations, the mean loss over all their samples."""
        activations = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
        loss = F.cross_entropy(self.trunk(activations.to(self.device)), torch.cat(labels).long().to(self.device))
        return loss, loss

    def _step_trunk(self, participants: Sequence[tuple[int, int]], gradients: dict, lr: float) -> None:
        apply_gradients(self.optimizer, gradients, lr)

    def after_step(self, steps_done: int) -> None:
        self.average(steps_done)
        if self.cfg.checkpoint_dir and checkpoint.due(self.checkpoint_every, steps_done, self.loop.total_steps):
            with self.loop.off_the_clock():
                self.save_checkpoint(steps_done)
        if self.capture is not None and self.cfg.capture_epochs:
            epochs, into = divmod(steps_done, len(self.loop.plan))
            ended = epochs if into == 0 else epochs + 1 if steps_done >= self.loop.total_steps else None
            if ended in self.capture.epochs:
                with self.loop.off_the_clock():
                    self.write_capture(ended)

    def average(self, steps_done: int) -> None:
        """--l1 average: the hospitals average their L1s among themselves every --l1-sync-every steps."""
        if self.cfg.l1 == "average" and steps_done % self.cfg.l1_sync_every == 0:
            self.hospitals.call_all("average_l1")
            self.log.l1_syncs += 1

    @torch.no_grad()
    def evaluate(self) -> list[float | None]:
        """Each hospital's model (its L1 + the trunk) on the test set, forward only."""
        self.trunk.eval()
        accuracies: list[float | None] = []
        try:
            for h, info in zip(range(1, self.cfg.hospitals + 1), self.info):
                if h in self.hospitals.lost:
                    accuracies.append(None)
                    continue
                try:
                    accuracies.append(self._evaluate_hospital(h, info))
                except HospitalFailure as failure:
                    self.lose(failure, self.loop.state["steps_done"] if self.loop else 0)
                    accuracies.append(None)
        finally:
            self.trunk.train()
        self.log.evaluations += 1
        return accuracies

    def _evaluate_hospital(self, h: int, info: dict) -> float:
        correct, seen = 0, 0
        batches, size = info["test_batches"], self.cfg.eval_batch_size
        pending = self.hospitals.call_async(h, "eval_forward", 0)
        for b in range(batches):
            message = self.hospitals.wait(h, pending)
            wire, labels = self._receive(h, message, min(size, info["test_samples"] - b * size))
            if b + 1 < batches:  # the next batch travels while this one is scored
                pending = self.hospitals.call_async(h, "eval_forward", b + 1)
            activations = codec.decode(self.codec, wire, self.dtype, (len(wire[0]), *self.activation_shape))
            output = self.trunk(activations.to(self.device))
            if self.u_shaped:  # the hospital's tail scores its own labels; only the count comes back
                correct += self._tail_correct(h, b, output)
            else:
                correct += (output.argmax(1).cpu() == labels.long()).sum().item()
            seen += len(output)
        return correct / seen

    # --- the record -------------------------------------------------------------------------
    def communication(self, steps_per_epoch: int, train_seconds: float) -> dict:
        """The record's ``comm``: every party's own counts, with the analytic count of what ran."""
        reports = [self.ledger.report()] + self.call_live("comm_report")
        names = {h: self.hospitals.name(h) for h in range(1, self.cfg.hospitals + 1)}
        analytic = self.bytes.tables(self.log, names, self.info, self.hospitals.lost)
        return accounting.split_record(self.cfg, reports, analytic, self.log, steps_per_epoch, train_seconds,
                                       names, self.hospitals)

    def write_capture(self, epoch: int | None = None) -> dict:
        """What the server received last from each hospital, and (on each hospital's disk) the inputs behind
        it: at the run's end, or with --capture-epochs as each of those epochs ends (then the run's end
        writes nothing more)."""
        directory = Path(self.cfg.capture_dir)
        directory.mkdir(parents=True, exist_ok=True)
        if epoch is not None or not self.cfg.capture_epochs:
            for h in self.hospitals.live:
                name = Capture.file_name(f"{self.hospitals.name(h)}-received", epoch)
                torch.save(self.capture.items(h, epoch), directory / name)
        counts = self.call_live("write_capture", epoch)
        return {"dir": str(directory), "epochs": [int(e) for e in self.cfg.capture_epochs],
                "batches_per_hospital": counts}

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.trunk.state_dict().items()}, Path(directory) / "trunk.pt")
        for h in self.hospitals.live:
            path = str(Path(directory).resolve() / f"head-{self.hospitals.name(h)}.pt")
            try:  # a hospital's last L1 step surfaces here if it failed
                self.hospitals.wait(h, self.hospitals.call_async(h, "save", path))
            except HospitalFailure as failure:
                self.lose(failure, self.loop.state["steps_done"] if self.loop else 0)


class ServerParty(Party):
    """Rank 0 of a split run: drives every step through the Hospitals proxy, records, saves, and
    tells the hospitals when the run is over."""

    who = transport.SERVER
    server_class = Server  # a variant of split learning (local loss, SplitFed) builds its own Server subclass

    def __init__(self, cfg, coordinator: transport.Coordinator):
        self.cfg, self.coordinator = cfg, coordinator

    def join(self) -> None:
        self.coordinator.mark_ready()
        self.coordinator.wait_all_ready(self.cfg.setup_timeout)
        transport.start_rpc(self.cfg, 0, self.cfg.world_size)
        console.line(f"[server] pid {os.getpid()} joined; {self.cfg.hospitals} hospitals")

    def reporting(self):
        return self.coordinator.reporting(transport.SERVER)

    def setup(self, run_record: dict) -> None:
        cfg = self.cfg
        self.server = server = self.server_class(cfg, self.coordinator)
        resume_step = server.newest_checkpoint() if checkpoint.should_resume(cfg) else None
        if cfg.resume and resume_step is None:
            raise UserError(f"--resume: no step in {cfg.checkpoint_dir} has a checkpoint from every party")
        resumed = server.restore(resume_step) if resume_step is not None else None
        if resumed is None and cfg.dedup != "none":
            server.dedup_record = server.deduplicate()
        if resumed is None and cfg.l1 == "average" and cfg.l1_init == "private":
            server.call_live("average_l1")  # privately initialised L1s start equal, at a point nobody chose
        # Planned from the hospitals' sizes after deduplication (restored with a checkpoint).
        self.plan = server.epoch_plan([i["train_batches"] for i in server.info])
        server.loop = loop.Loop(cfg, self.plan, server.train_step, server.evaluate, who="server",
                                on_step_end=server.after_step, switch_phase=server.switch_phase)
        server.checkpoint_every = checkpoint.parse_every(cfg.checkpoint_every, len(self.plan))
        if resumed is not None:
            server.loop.load_state_dict(resumed["loop"])
            run_record["resumed_from_step"] = resume_step
        run_record["hospitals"] = server.info
        run_record["threads"] = {"server": torch.get_num_threads(), "hospitals": [i["threads"] for i in server.info]}

    def train(self) -> dict:
        result = self.server.loop.run()
        self.server.switch_phase("done")
        return result

    def finish(self, run_record: dict) -> None:
        server, cfg = self.server, self.cfg
        run_record["dedup"] = server.dedup_record
        run_record["lost_hospitals"] = list(server.hospitals.lost.values())
        run_record["comm"] = server.communication(len(self.plan), run_record["train_time_s"])
        if cfg.capture_dir:
            run_record["capture"] = server.write_capture()
        if cfg.nopeek:
            run_record["nopeek"] = server.call_live("privacy_stats")

    def save(self, directory: str) -> None:
        self.server.save(directory)

    def leave(self, failed: bool) -> None:
        if failed:
            transport.stop_rpc(graceful=False, timeout_s=0)
            return
        hospitals = self.server.hospitals
        self.coordinator.finish()
        self.coordinator.wait_for_acknowledgements([hospitals.name(i) for i in hospitals.live],
                                                   timeout_s=self.cfg.rpc_timeout)
        if hospitals.lost:
            # A dropped hospital may still be alive (it sent a bad message, or it hung and woke):
            # it leaves cleanly if it finds the store before this process, its host, is gone.
            self.coordinator.wait_for_acknowledgements([hospitals.name(i) for i in hospitals.lost],
                                                       timeout_s=LOST_ACK_WAIT_S)
        transport.stop_rpc(graceful=not hospitals.lost, timeout_s=self.cfg.rpc_timeout)
