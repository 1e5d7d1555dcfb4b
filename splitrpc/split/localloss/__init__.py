"""Local-loss split learning (Han et al., 2021, "Accelerating Federated Learning with Split Learning on
Locally Generated Losses"): the method's declaration.

Each hospital puts a small auxiliary head on L1's output and steps L1 (and the head) from its own
cross-entropy loss on its own labels, right after its forward pass; it sends the detached
activations (through the codec) and the labels up. The server trains the trunk on what it
receives and sends no gradient back. Because no gradient comes back, a hospital's L1 trajectory
depends only on its own data, so a hospital may run ahead of the server (``--run-ahead k``).

- ``server``: the step (forward, the trunk's loss, the trunk's step, no distributed autograd) and
  the window of forward requests in flight;
- ``hospital``: the auxiliary head, its loss and L1's step inside ``forward``.

Everything else (failure policy, checkpoints, evaluation, deduplication, the hospitals proxy,
the byte ledgers) is split learning's (``splitrpc.split``).
"""

from __future__ import annotations

from splitrpc.errors import UserError
from splitrpc.methods import Party
from splitrpc.split import Split


class LocalLossSplit(Split):
    """Split learning with a local loss at each hospital: activations and labels up, nothing down."""

    name = "split-localloss"
    summary = ("local-loss split learning: each hospital steps L1 from its own auxiliary head's loss; activations "
               "and labels go up, no gradient comes down (1 + N processes)")
    # Not read: the U-shape (the server needs the labels for the trunk's loss, and a hospital already has
    # its own loss), NoPeek (its penalty's gradient joins a gradient from the server, which never comes),
    # the L1 gradient scale (L1's gradient is that of its own batch mean already) and --prefetch
    # (--run-ahead is its deeper form). Given, each is a one-line error (methods.check_options).
    options = (Split.options - {"labels", "tail", "label_defence", "label_defence_strength", "nopeek", "l1_grad_scale", "prefetch"}) | {"run_ahead"}

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if cfg.run_ahead and cfg.l1 == "average":
            raise UserError("--run-ahead cannot be combined with --l1 average (averaging after a step must "
                            "precede the next forward pass)")
        if (cfg.run_ahead + 1) * 2 > cfg.rpc_threads:
            raise UserError(f"--run-ahead {cfg.run_ahead} keeps {cfg.run_ahead + 1} requests waiting on each hospital's "
                            f"RPC threads: it needs --rpc-threads of at least {(cfg.run_ahead + 1) * 2}")

    def hospital(self, cfg, index: int):
        from splitrpc.split.localloss.hospital import LocalLossHospital

        return LocalLossHospital(cfg, index)

    def party(self, cfg, rank, coordinator) -> Party:
        if rank == 0:
            from splitrpc.split.localloss.server import LocalLossServerParty

            return LocalLossServerParty(cfg, coordinator)
        return super().party(cfg, rank, coordinator)


METHOD = LocalLossSplit()
