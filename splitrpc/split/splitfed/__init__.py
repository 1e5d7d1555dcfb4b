"""SplitFed (Thapa et al., AAAI 2022, "SplitFed: When Federated Learning Meets Split Learning"):
split learning whose hospitals average their L1s FedAvg-style, in two versions.

- version 1: the server keeps one trunk replica per hospital; every step runs each hospital's
  batch through its own replica (its own loss, its own optimizer) and sends it its activation
  gradient; every epoch (or every ``--splitfed-sync-every`` steps) the server averages the
  replicas and the hospitals their L1s, both weighted by shard size;
- version 2: one trunk, trained on each hospital's whole epoch in turn (hospital 1's batches,
  then hospital 2's...), the L1s averaged the same way.

Everything else (the protocol, failure handling, checkpoints, evaluation, bytes) is split
learning's: this declaration subclasses ``Split``, and the server's side
(``splitfed.server``) subclasses its ``Server``. Hospitals run split learning's own code.
"""

from __future__ import annotations

from splitrpc.errors import UserError
from splitrpc.methods import Party
from splitrpc.split import Split


class SplitFed(Split):
    """SplitFed's declaration: split learning's processes and options, the L1s always averaged, the
    schedule pinned by the version (1: parallel, 2: sequential)."""

    name = "splitfed"
    summary = ("SplitFed (Thapa et al., 2022): split learning with FedAvg-averaged L1s; version 1 keeps a trunk "
               "replica per hospital, version 2 one trunk trained on the hospitals in turn (1 + N processes)")
    # Split learning's, less the L1 options SplitFed decides itself (its L1s are always averaged, at
    # its own period, each gradient that of the hospital's own batch mean) and prefetching (which
    # averaged L1s rule out).
    options = (Split.options - {"l1", "l1_sync_every", "l1_grad_scale", "prefetch", "label_defence",
                                "label_defence_strength"}) | {
        "splitfed_version", "splitfed_sync_every"}

    def fixed_options(self, cfg) -> dict:
        return {"schedule": "parallel" if cfg.splitfed_version == "1" else "sequential", "l1": "average"}

    def validate(self, cfg) -> None:
        version = f"--method splitfed --splitfed-version {cfg.splitfed_version}"
        if cfg.on_hospital_failure == "continue":
            raise UserError(f"{version} supports --on-hospital-failure abort only (the hospitals average their L1s "
                            "in an all-reduce group that cannot lose a member)")
        if cfg.labels == "hospital":
            raise UserError(f"{version} keeps the labels at the server: it cannot be combined with --labels "
                            "hospital (U-shaped)")
        super().validate(cfg)

    def party(self, cfg, rank, coordinator) -> Party:
        if rank == 0:
            from splitrpc.split.splitfed.server import SplitFedServerParty

            return SplitFedServerParty(cfg, coordinator)
        return super().party(cfg, rank, coordinator)


METHOD = SplitFed()
