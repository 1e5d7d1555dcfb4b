"""The server's bookkeeping of a split run: what ran, what its messages weigh, and the record's ``comm``.

Kept apart from ``server.py`` so that a step's messages read in one place there;
this module only counts. ``StepLog`` is what the server notes as it goes,
``SplitBytes`` the analytic layer (bytes from shapes and the codec alone),
``split_record`` the ``comm`` object of the run record.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from splitrpc import codec, comm, transport

CORRECT_COUNT_BYTES = 8  # U-shaped evaluation: a hospital's count of correct predictions, one int64


@dataclass
class StepLog:
    """What the server did, as it did it."""

    steps: list[list[tuple[int, int]]] = field(default_factory=list)  # participants of every step that ran here
    gradient_pushes: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # per hospital
    prefetched: int = 0
    l1_syncs: int = 0
    evaluations: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # where the server's time goes


class SplitBytes:
    """Bytes of a split run's messages, from shapes and the codec alone."""

    def __init__(self, cfg, activation_shape: tuple, output_shape: tuple | None, l1_numel: int,
                 gradients: bool = True):
        self.cfg, self.activation_shape, self.output_shape, self.l1_numel = cfg, activation_shape, output_shape, l1_numel
        self.gradients = gradients  # False: local-loss split learning sends no activation gradient down
        self.dtype = getattr(torch, cfg.dtype)
        self.codec = codec.for_config(cfg)
        self.element_size = torch.empty((), dtype=self.dtype).element_size()
        from splitrpc.split.protocol import label_dtype

        self.label_size = torch.empty((), dtype=label_dtype(cfg.num_classes)).element_size()

    def batch(self, batch: int, training: bool = True) -> tuple[int, int]:
        """(up, down) bytes of one hospital batch of a training step (or of an evaluation).

        Vanilla: activations and labels up, the activation gradient down (local loss: nothing
        down, the hospital steps L1 from its own loss). U-shaped:
        activations, the gradient of the trunk's output and the loss up; the trunk's
        output and the activation gradient down; in evaluation the hospital returns
        how many it classified correctly.
        """
        shape = (batch, *self.activation_shape)
        activations = codec.wire_bytes(self.codec, shape, self.dtype)
        if self.output_shape is None:
            down = codec.gradient_bytes(self.codec, shape, self.dtype) if training and self.gradients else 0
            return activations + batch * self.label_size, down
        output = codec.wire_bytes(self.cfg.codec, (batch, *self.output_shape), self.dtype)
        if training:
            return activations + output + self.element_size, activations + output
        return activations + CORRECT_COUNT_BYTES, output

    def tables(self, log: StepLog, names: dict[int, str], info: list[dict], lost: dict) -> dict[str, dict]:
        """{phase: party table} for the steps and evaluations in ``log``; lost hospitals' rows left out."""
        cfg = self.cfg
        up, down = self.batch(cfg.batch_size)
        tables = {"train": defaultdict(lambda: defaultdict(float)), "eval": defaultdict(lambda: defaultdict(float))}
        for table in tables.values():
            for name in [transport.SERVER, *names.values()]:  # every party, even one that never took part
                table[name]["sent"] += 0
        train = tables["train"]
        for participants in log.steps:
            for h, _ in participants:
                train[names[h]]["sent"] += up
                train[names[h]]["received"] += down
                train[transport.SERVER]["received"] += up
                train[transport.SERVER]["sent"] += down
        if log.l1_syncs:
            ring = comm.ring_allreduce_bytes(self.l1_numel * self.element_size, cfg.hospitals)
            for name in names.values():
                train[name]["sent"] += log.l1_syncs * ring
                train[name]["received"] += log.l1_syncs * ring
        for h, hospital in zip(range(1, cfg.hospitals + 1), info):
            if h in lost:
                continue  # a lost hospital's evaluations are not counted (they may have been cut short)
            size, test = cfg.eval_batch_size, hospital["test_samples"]
            batches = [self.batch(min(size, test - start), training=False) for start in range(0, test, size)]
            up_eval, down_eval = sum(u for u, _ in batches), sum(d for _, d in batches)
            evaluation = tables["eval"]
            evaluation[names[h]]["sent"] += log.evaluations * up_eval
            evaluation[names[h]]["received"] += log.evaluations * down_eval
            evaluation[transport.SERVER]["received"] += log.evaluations * up_eval
            evaluation[transport.SERVER]["sent"] += log.evaluations * down_eval
        for table in tables.values():
            for gone in lost.values():
                table.pop(gone["name"], None)  # a lost hospital reports nothing; its row is left out everywhere
        return {phase: comm.party_table(t) for phase, t in tables.items()}


def split_record(cfg, reports: list[dict], analytic: dict, log: StepLog, steps_per_epoch: int, train_seconds: float,
                 names: dict[int, str], hospitals) -> dict:
    """The record's ``comm``: three layers per phase, per-epoch bytes, round trips and the server's time."""
    phases = {}
    for phase in comm.PHASES:
        payload, tcp, store = comm.phase_tables(reports, phase)
        seconds = next((r["seconds"].get(phase, 0.0) for r in reports if r["party"] == transport.SERVER), 0.0)
        phases[phase] = {
            "seconds": seconds,
            "analytic_bytes": analytic.get(phase),
            "payload_bytes": payload,
            "tcp_bytes": tcp,
            "tcp_store_bytes": store,
            "tcp_over_payload": comm.ratio(tcp and tcp["total"], payload["total"]),
            "tcp_delivered_over_payload": comm.ratio(tcp and tcp["total"] - tcp["retransmitted"], payload["total"]),
        }
    steps = len(log.steps)
    live = [names[h] for h in hospitals.live]

    def per_epoch(table):
        """Training bytes per epoch: measured over the steps that ran, scaled to a full epoch."""
        if table is None or not steps:
            return None
        scale = steps_per_epoch / steps
        per_hospital = [table.get(n, {}).get("sent", 0) + table.get(n, {}).get("received", 0) for n in live]
        return {"total": table["total"] * scale, "per_hospital": sum(per_hospital) / len(per_hospital) * scale}

    participations = sum(len(p) for p in log.steps)
    return {
        "method": cfg.method,  # split, or a variant of it (splitfed)
        "transport": cfg.transport,
        "phases": phases,
        "measured_steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "extrapolated": steps % steps_per_epoch != 0,
        "per_epoch": {kind: per_epoch(phases["train"][f"{kind}_bytes"]) for kind in ("analytic", "payload", "tcp")},
        "lost_hospitals": [gone["name"] for gone in hospitals.lost.values()],
        "server_time_s": dict(log.seconds),
        # Requests the server sent per hospital per step it took part in (the forward, the U-shaped
        # tail's, and any L1 averaging or checkpoint calls), and the gradient messages that
        # distributed autograd sent down.
        "round_trips_per_step": comm.ratio(sum(hospitals.requests["train"].values()), participations),
        "gradient_pushes_per_step": comm.ratio(sum(log.gradient_pushes.values()), participations),
        "prefetched_steps": log.prefetched,
        "codec": cfg.codec,
        # Time the server sat waiting for hospitals (their compute and the network), as a share of training.
        "wait_share": log.seconds["waiting_for_activations"] / train_seconds if train_seconds else None,
    }
