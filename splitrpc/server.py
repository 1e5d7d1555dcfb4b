"""Code that runs on the server (rank 0).

The server owns the trunk (stages ``cut``.. of the model) and drives training.
It never opens a data set: from each hospital it receives L1 activations and
labels, and it sends back only the gradient of those activations (through
distributed autograd). It also drives the one optimizer path: at every step
it evaluates the learning rate once and hands it to the trunk's optimizer
and, with the step command, to each participating hospital's L1 optimizer.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.nn.functional as F

from splitrpc import comm, data, dedup, loop, record, transport
from splitrpc.errors import PeerError
from splitrpc.hospital import Hospital, label_dtype, l1_sync_numel
from splitrpc.models import activation_shape, model_for, split_model
from splitrpc.optim import apply_gradients, make_optimizer


class Hospitals:
    """RRefs to the Hospital objects, with every call bounded by --rpc-timeout and
    every failure turned into one line that names the hospital."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.names = [transport.hospital_name(i) for i in range(1, cfg.hospitals + 1)]
        self.rrefs = [rpc.remote(name, Hospital, args=(cfg, i), timeout=cfg.setup_timeout)
                      for i, name in enumerate(self.names, start=1)]

    def call_async(self, index: int, method: str, *args, timeout: float | None = None):
        """Start ``Hospital.<method>(*args)`` on hospital ``index`` (1-based); returns a future."""
        proxy = self.rrefs[index - 1].rpc_async(timeout=self.cfg.rpc_timeout if timeout is None else timeout)
        return getattr(proxy, method)(*args)

    def wait(self, index: int, future):
        try:
            return future.wait()
        except Exception as exc:
            raise PeerError(f"{self.names[index - 1]}: {transport.remote_error_summary(exc)}") from None

    def call_all(self, indices: Sequence[int], method: str, *args, timeout: float | None = None) -> list:
        futures = [self.call_async(i, method, *args, timeout=timeout) for i in indices]
        return [self.wait(i, f) for i, f in zip(indices, futures)]

    @property
    def all(self) -> list[int]:
        return list(range(1, self.cfg.hospitals + 1))


class Server:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device = transport.compute_device(cfg)
        self.ledger = comm.Ledger(transport.SERVER)
        model = model_for(cfg)
        self.activation_shape = activation_shape(model, cfg.cut)
        self.l1_numel = l1_sync_numel(split_model(model, cfg.cut)[0])
        _, self.trunk = split_model(model, cfg.cut)
        self.trunk.to(self.device)
        self.optimizer = make_optimizer(cfg, self.trunk.parameters())
        self.hospitals = Hospitals(cfg)
        # Construction on a hospital loads its shard; a failure there surfaces here.
        self.info = self.hospitals.call_all(self.hospitals.all, "describe", timeout=cfg.setup_timeout)
        self.element_size = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
        # Where the server's training time goes (seconds).
        self.time = defaultdict(float)
        self.steps_done: list[list[tuple[int, int]]] = []
        self.l1_syncs = 0
        self.evaluations = 0

    def switch_phase(self, phase: str) -> None:
        """Close the current accounting phase on every party at (nearly) the same moment."""
        self.ledger.switch(phase)
        self.hospitals.call_all(self.hospitals.all, "switch_phase", phase)

    def deduplicate(self) -> dict:
        """Before training: keep exactly one copy of every record that several hospitals hold.

        The server sees keyed tokens (or, keyless, doubly blinded group values)
        and decides which copies go; it never sees an identity, a pixel or a key.
        """
        cfg, hospitals, ids = self.cfg, self.hospitals, self.hospitals.all
        started = time.perf_counter()
        self.switch_phase("dedup")
        before = [i["train_samples"] for i in self.info]

        def call(h, method, *args):
            # Bounded by --setup-timeout: tokens for a large shard take a while to compute.
            self.ledger.add(hospitals.names[h - 1], "sent", comm.pickled_bytes(args))
            reply = hospitals.wait(h, hospitals.call_async(h, method, *args, timeout=cfg.setup_timeout))
            self.ledger.add(hospitals.names[h - 1], "received", comm.pickled_bytes(reply))
            return reply

        if cfg.dedup == "hmac":
            futures = {h: hospitals.call_async(h, "dedup_message", timeout=cfg.setup_timeout) for h in ids}
            messages = {h: hospitals.wait(h, f) for h, f in futures.items()}
            for h, message in messages.items():
                self.ledger.add(hospitals.names[h - 1], "received", comm.pickled_bytes(message))
            drops, stats = dedup.server_plan(messages)
        else:
            firsts = {h: call(h, "psi_first") for h in ids}
            tokens = dedup.psi_server_tokens(firsts, {h: (lambda values, h=h: call(h, "psi_reblind", values))
                                                      for h in ids})
            drops, stats = dedup.plan_removals(tokens)
        self.info = [call(h, "dedup_drop", drops.get(h, [])) for h in ids]
        self.switch_phase("setup")
        numel = 1
        for d in self.activation_shape:
            numel *= d
        label = torch.empty((), dtype=label_dtype(cfg.num_classes)).element_size()
        per_sample = 2 * numel * self.element_size + label  # activation and label up, gradient down
        dropped = sum(before) - sum(i["train_samples"] for i in self.info)
        return {
            "mode": cfg.dedup,
            "identity": "manifest" if cfg.dedup_manifest else "pixels",
            "records_before": before,
            "records_after": [i["train_samples"] for i in self.info],
            "dropped": dropped,
            "stats": stats,
            "seconds": time.perf_counter() - started,
            "training_bytes_saved_per_epoch": dropped * per_sample,
        }

    def _receive(self, hospital: int, activations: torch.Tensor, labels: torch.Tensor) -> None:
        name = self.hospitals.names[hospital - 1]
        self.ledger.add(name, "received", comm.tensor_bytes(activations, labels))
        if activations.requires_grad:  # the gradient distributed autograd will send back
            activations.register_hook(lambda grad: self.ledger.add(name, "sent", comm.tensor_bytes(grad)))

    def train_step(self, epoch: int, index: int, participants: Sequence[tuple[int, int]], lr: float) -> tuple[float, int]:
        """One optimizer step over the batches of ``participants`` [(hospital, batch), ...]."""
        hospitals, clock = self.hospitals, self.time
        with dist_autograd.context() as context_id:
            t0 = time.perf_counter()
            # Every participating hospital computes its L1 activations at once.
            futures = [hospitals.call_async(h, "forward", epoch, b) for h, b in participants]
            received = [hospitals.wait(h, f) for (h, _), f in zip(participants, futures)]
            t1 = time.perf_counter()
            for (h, _), (activations, labels) in zip(participants, received):
                self._receive(h, activations, labels)
            activations = torch.cat([a for a, _ in received]) if len(received) > 1 else received[0][0]
            labels = torch.cat([y for _, y in received]).long()
            logits = self.trunk(activations.to(self.device))
            loss = F.cross_entropy(logits, labels.to(self.device))
            t2 = time.perf_counter()
            try:
                dist_autograd.backward(context_id, [loss])  # sends each hospital its activation gradient
            except Exception as exc:
                names = ", ".join(hospitals.names[h - 1] for h, _ in participants)
                raise PeerError(f"backward pass to {names} failed: {transport.remote_error_summary(exc)}") from None
            t3 = time.perf_counter()
            # The concatenated loss averages over every participant's samples; scaling a
            # hospital's L1 gradient by the number of participants makes it the gradient of
            # that hospital's own batch mean, as in a sequential step.
            scale = float(len(participants))
            futures = [hospitals.call_async(h, "step", context_id, lr, scale) for h, _ in participants]
            apply_gradients(self.optimizer, dist_autograd.get_gradients(context_id), lr)
            t4 = time.perf_counter()
            for (h, _), f in zip(participants, futures):
                hospitals.wait(h, f)
            t5 = time.perf_counter()
        clock["waiting_for_activations"] += t1 - t0
        clock["trunk_forward"] += t2 - t1
        clock["backward_incl_hospitals"] += t3 - t2
        clock["trunk_optimizer"] += t4 - t3
        clock["waiting_for_hospital_steps"] += t5 - t4
        self.steps_done.append(list(participants))
        return loss.item(), len(labels)

    def after_step(self, global_step: int) -> None:
        if self.cfg.l1 == "average" and (global_step + 1) % self.cfg.l1_sync_every == 0:
            self.hospitals.call_all(self.hospitals.all, "average_l1")
            self.l1_syncs += 1

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Each hospital's model (its L1 + the trunk) on the test set, forward only."""
        self.trunk.eval()
        accuracies = []
        try:
            for h, info in zip(self.hospitals.all, self.info):
                correct, seen = 0, 0
                pending = self.hospitals.call_async(h, "eval_forward", 0)
                for b in range(info["test_batches"]):
                    activations, labels = self.hospitals.wait(h, pending)
                    self._receive(h, activations, labels)
                    if b + 1 < info["test_batches"]:  # the next batch travels while this one is scored
                        pending = self.hospitals.call_async(h, "eval_forward", b + 1)
                    predictions = self.trunk(activations.to(self.device)).argmax(1).cpu()
                    correct += (predictions == labels.long()).sum().item()
                    seen += len(labels)
                accuracies.append(correct / seen)
        finally:
            self.trunk.train()
        self.evaluations += 1
        return accuracies

    def analytic(self) -> dict[str, dict]:
        """Bytes implied by shapes alone, for the steps and evaluations that ran."""
        cfg = self.cfg
        numel = 1
        for d in self.activation_shape:
            numel *= d
        element = self.element_size
        label = torch.empty((), dtype=label_dtype(cfg.num_classes)).element_size()
        up, down = comm.split_step_bytes(cfg.batch_size, numel, element, label)
        tables = {"train": defaultdict(lambda: defaultdict(float)), "eval": defaultdict(lambda: defaultdict(float))}
        for table in tables.values():
            for name in [transport.SERVER, *self.hospitals.names]:  # every party, even one that never took part
                table[name]["sent"] += 0
        train = tables["train"]
        for participants in self.steps_done:
            for h, _ in participants:
                name = self.hospitals.names[h - 1]
                train[name]["sent"] += up
                train[name]["received"] += down
                train["server"]["received"] += up
                train["server"]["sent"] += down
        if self.l1_syncs:
            ring = comm.ring_allreduce_bytes(self.l1_numel * element, cfg.hospitals)
            for name in self.hospitals.names:
                train[name]["sent"] += self.l1_syncs * ring
                train[name]["received"] += self.l1_syncs * ring
        for name, info in zip(self.hospitals.names, self.info):
            per_eval = info["test_samples"] * (numel * element + label)
            tables["eval"][name]["sent"] += self.evaluations * per_eval
            tables["eval"]["server"]["received"] += self.evaluations * per_eval
        return {phase: comm.party_table(t) for phase, t in tables.items()}

    def communication(self, steps_per_epoch: int, train_seconds: float) -> dict:
        reports = [self.ledger.report()] + self.hospitals.call_all(self.hospitals.all, "comm_report")
        analytic = self.analytic()
        phases = {}
        for phase in comm.PHASES:
            payload, tcp, store = comm.phase_tables(reports, phase)
            phases[phase] = {
                "seconds": self.ledger.seconds.get(phase, 0.0),
                "analytic_bytes": analytic.get(phase),
                "payload_bytes": payload,
                "tcp_bytes": tcp,
                "tcp_store_bytes": store,
                "tcp_over_payload": comm.ratio(tcp and tcp["total"], payload["total"]),
            }
        steps = len(self.steps_done)

        def per_epoch(table):
            """Training bytes per epoch: measured over the steps that ran, scaled to a full epoch."""
            if table is None or not steps:
                return None
            scale = steps_per_epoch / steps
            per_hospital = [table[n]["sent"] + table[n]["received"] for n in self.hospitals.names]
            return {"total": table["total"] * scale, "per_hospital": sum(per_hospital) / len(per_hospital) * scale}

        waiting = self.time["waiting_for_activations"] + self.time["waiting_for_hospital_steps"]
        return {
            "method": "split",
            "transport": self.cfg.transport,
            "phases": phases,
            "measured_steps": steps,
            "steps_per_epoch": steps_per_epoch,
            "extrapolated": steps % steps_per_epoch != 0,
            "per_epoch": {kind: per_epoch(phases["train"][f"{kind}_bytes"]) for kind in ("analytic", "payload", "tcp")},
            "server_time_s": dict(self.time),
            # Time the server sat waiting for hospitals (their compute and the network), as a share of training.
            "wait_share": waiting / train_seconds if train_seconds else None,
        }

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.trunk.state_dict().items()}, Path(directory) / "trunk.pt")
        paths = [str(Path(directory).resolve() / f"head-{name}.pt") for name in self.hospitals.names]
        for h, path in zip(self.hospitals.all, paths):
            self.hospitals.wait(h, self.hospitals.call_async(h, "save", path))


def run(cfg, coordinator: transport.Coordinator) -> int:
    """Main thread of the server process."""
    started = time.perf_counter()
    run_record = record.new_record(cfg)
    coordinator.mark_ready()
    coordinator.wait_all_ready(cfg.setup_timeout)
    transport.start_rpc(cfg, 0, cfg.world_size)
    print(f"[server] pid {os.getpid()} joined; {cfg.hospitals} hospitals", flush=True)
    try:
        server = Server(cfg)
        if cfg.dedup != "none":
            run_record["dedup"] = server.deduplicate()
        run_record["hospitals"] = server.info
        plan = data.epoch_plan([i["train_batches"] for i in server.info], cfg.schedule)
        run_record["setup_time_s"] = time.perf_counter() - started
        run_record.update(loop.run(cfg, plan, server.train_step, server.evaluate, who="server",
                                   on_step_end=server.after_step, switch_phase=server.switch_phase))
        server.switch_phase("done")
        run_record["comm"] = server.communication(len(plan), run_record["train_time_s"])
        if cfg.save_dir:
            server.save(cfg.save_dir)
    except BaseException as exc:
        if not getattr(exc, "consequence", False):
            # Before tearing down, so that hospitals see the cause rather than our disappearance.
            exc.first_failure = coordinator.fail(transport.SERVER, str(exc) or type(exc).__name__)
        transport.stop_rpc(graceful=False, timeout_s=0)
        raise
    run_record["status"] = "ok"
    run_record["wall_time_s"] = time.perf_counter() - started
    record.append_jsonl(cfg.out, run_record)
    record.print_summary(run_record, "server")
    coordinator.finish()
    transport.stop_rpc(graceful=True, timeout_s=cfg.rpc_timeout)
    return 0
