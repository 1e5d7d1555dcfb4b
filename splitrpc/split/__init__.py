"""Split learning (Jeon et al., 2019): the method's declaration, and its package by concern.

- ``protocol``: what both sides agree on (label dtype, what L1 averaging moves, the checks
  of every message the server receives, the two functions through which it reaches a
  hospital's endpoints);
- ``hospitals``: the server's proxy for the hospitals (timeouts, round-trip counts, failures
  named), its failure vocabulary;
- ``server``: the trunk, one step's messages top to bottom, evaluation, checkpoints, the
  server's party (rank 0);
- ``hospital``: the hospital's endpoints (L1, its optimizer, its data, defences, audits,
  deduplication, checkpoints) and its party (ranks 1..N);
- ``faults``: a hospital that misbehaves on purpose, for tests.

Rank 0 imports only ``server`` (and what it imports), ranks 1..N only ``hospital``: this
module imports neither, each process loads its own side when it learns its rank.
"""

from __future__ import annotations

from splitrpc.errors import UserError
from splitrpc.methods import CHECKPOINT_OPTIONS, Method, Party


class Split(Method):
    """Split learning's declaration: 1 server + N hospitals, the options only it reads, its checks."""

    name = "split"
    summary = "split learning: each hospital keeps its data and L1, the server the trunk (1 + N processes)"
    exchange = "activations"
    has_server = True
    options = frozenset({
        "schedule", "prefetch", "l1", "l1_sync_every", "l1_grad_scale", "l1_init", "labels", "tail", "codec",
        "topk_ratio", "topk_values", "topk_random", "topk_feedback",
        "noise", "nopeek", "label_defence", "label_defence_strength", "capture_dir", "capture_samples", "capture_epochs", "dedup", "dedup_key_file", "dedup_manifest",
        "server_threads", "hospital_threads", "on_hospital_failure", "fault", *CHECKPOINT_OPTIONS,
    })

    def world_size(self, cfg) -> int:
        return cfg.hospitals + 1

    def roles(self, cfg) -> str:
        return f"1 server + {cfg.hospitals} hospitals"

    def who(self, rank: int | None) -> str:
        from splitrpc.transport import role_name

        return role_name(rank or 0)

    def checkpoint_parties(self, cfg) -> list[str]:
        """The server's file: it writes it last, once every hospital live at that step has its own."""
        from splitrpc.transport import SERVER

        return [SERVER]

    def validate(self, cfg) -> None:
        if cfg.labels == "hospital":
            from splitrpc.models import check_tail, stage_count

            check_tail(stage_count(cfg.model), cfg.cut, cfg.tail, cfg.model)
        elif cfg.tail != 1:
            raise UserError(f"--tail {cfg.tail} sets the U-shaped tail: it needs --labels hospital")
        from splitrpc.config import FIELDS
        from splitrpc.privacy.label_defences import check as check_label_defence

        strength_given = cfg.label_defence_strength != FIELDS["label_defence_strength"].default
        check_label_defence(cfg.label_defence, cfg.label_defence_strength, strength_given)
        if cfg.label_defence != "none" and cfg.labels != "hospital":
            raise UserError(f"--label-defence {cfg.label_defence} protects the labels a U-shaped hospital keeps: it "
                            f"needs --labels hospital (with --labels server the labels travel to the server as they are)")
        if cfg.dedup == "hmac" and not cfg.dedup_key_file:
            raise UserError("--dedup hmac needs --dedup-key-file (a secret shared by the hospitals, e.g. from "
                            "`python -c 'import secrets; print(secrets.token_hex(32))'`)")
        if cfg.on_hospital_failure == "continue" and cfg.l1 == "average":
            raise UserError("--on-hospital-failure continue cannot be combined with --l1 average "
                            "(the hospitals' all-reduce group cannot lose a member)")

    def hospital(self, cfg, index: int):
        """The endpoints object hospital ``index`` serves (built there by ``endpoint.open_hospital``)."""
        from splitrpc.split.hospital import Hospital

        return Hospital(cfg, index)

    def party(self, cfg, rank, coordinator) -> Party:
        if rank == 0:
            from splitrpc.split.server import ServerParty

            return ServerParty(cfg, coordinator)
        from splitrpc.split.hospital import HospitalParty

        return HospitalParty(cfg, rank, coordinator)

    def node_processes(self, cfg, nnodes: int, node_rank: int, per_node: int) -> int:
        """The server alone on node 0, ``per_node`` hospitals on every other node."""
        expected = 1 + (nnodes - 1) * per_node
        if nnodes < 2 or expected != self.world_size(cfg):
            raise UserError(f"--nnodes {nnodes} with --nproc-per-node {per_node} gives {expected} processes (the "
                            f"server on node 0, {per_node} hospital(s) on each other node) but --hospitals "
                            f"{cfg.hospitals} needs {self.world_size(cfg)}")
        return 1 if node_rank == 0 else per_node


METHOD = Split()
