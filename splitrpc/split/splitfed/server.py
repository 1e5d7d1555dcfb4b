"""SplitFed's server (rank 0): split learning's ``Server`` with FedAvg-style synchronisation.

Version 1 holds one trunk replica per hospital, each with its own optimizer: a step runs each
participant's activations through its own replica (the loss on that hospital's labels), one
backward pass sends every participant the gradient of its own loss, and each replica steps.
Every ``--splitfed-sync-every`` steps (0: at the end of every epoch), at the end of every epoch
and of the run, ``self.trunk`` becomes the shard-weighted mean of the replicas (on this process:
no bytes on any wire) and every replica restarts from it; in the same breath the hospitals
average their L1s, weighted the same way, in their own all-reduce. ``self.trunk`` is therefore
what evaluation and ``trunk.pt`` see, and since every epoch ends with a sync, evaluations see
the averaged trunk.

Optimizer state after a sync: each replica keeps its own (SGD momentum, Adam's moments). That is
what this project's FedAvg does, and it keeps the arithmetic linear: with SGD, equal shards and a
sync after every step, the mean of the replicas' updates is one update with the mean gradient,
momentum included (the mean of the replicas' momentum buffers evolves as the single trunk's
would), so version 1 then equals parallel split learning with L1s averaged every step (tested
with group norm in float64). Resetting momentum at every sync would break that equality;
averaging it would not change the SGD trunk (only the mean buffer enters the mean update) but
would cost a second average for nothing.

Version 2 is the one trunk of split learning, trained in the order ``epoch_plan`` gives (every
batch of hospital 1, then of hospital 2, ...), with the same L1 synchronisation.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from splitrpc.optim import apply_gradients, make_optimizer
from splitrpc.split.server import Server, ServerParty


@torch.no_grad()
def average_replicas(target: torch.nn.Module, replicas: Sequence[torch.nn.Module], weights: Sequence[float]) -> None:
    """``target``'s parameters and floating-point buffers (BatchNorm statistics) become the weighted
    sum of the replicas' (a weighted mean: the weights sum to 1). Integer buffers (BatchNorm's
    batch counts, unused with its default momentum) take the largest replica's count."""
    states = [dict(r.state_dict()) for r in replicas]
    for name, tensor in target.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(sum(w * s[name] for w, s in zip(weights, states)))
        else:
            tensor.copy_(max((s[name] for s in states), key=lambda t: int(t.max())))


def hospital_by_hospital(batches_per_hospital: list[int]) -> list[list[tuple[int, int]]]:
    """Version 2's epoch: every batch of hospital 1, then every batch of hospital 2, ..."""
    return [[(h, b)] for h, n in enumerate(batches_per_hospital, start=1) for b in range(n)]


class SplitFedServer(Server):
    """Split learning's server with SplitFed's synchronisation and, in version 1, a trunk replica per hospital."""

    def __init__(self, cfg, coordinator):
        super().__init__(cfg, coordinator)
        self.version = int(cfg.splitfed_version)
        self.replicas: dict[int, torch.nn.Module] = {}
        self.replica_optimizers: dict[int, torch.optim.Optimizer] = {}
        self.trunk_syncs = 0  # in this process (a resumed run counts from its restart)
        if self.version == 1:
            for h in range(1, cfg.hospitals + 1):
                self.replicas[h] = copy.deepcopy(self.trunk)
                self.replica_optimizers[h] = make_optimizer(cfg, self.replicas[h].parameters())

    def weights(self) -> dict[int, float]:
        """FedAvg's weights: each live hospital's share of the samples (shard sizes after deduplication)."""
        sizes = {h: self.info[h - 1]["train_samples"] for h in self.hospitals.live}
        total = sum(sizes.values())
        return {h: n / total for h, n in sizes.items()}

    # --- the step's hooks ---------------------------------------------------------------------
    def epoch_plan(self, batches_per_hospital: list[int]) -> list[list[tuple[int, int]]]:
        if self.version == 2:
            return hospital_by_hospital(batches_per_hospital)
        return super().epoch_plan(batches_per_hospital)

    def _l1_grad_scale(self, participants) -> float:
        # Version 1: each activation gradient is already that of its hospital's own batch mean
        # (its replica's loss); version 2 has one participant per step.
        return 1.0

    def _server_loss(self, participants, inputs, labels):
        if self.version == 2:
            return super()._server_loss(participants, inputs, labels)
        # Each participant's batch through its own replica, the loss on its own labels. The objective
        # is their sum: replicas share no parameter, so each replica's gradient, and each hospital's
        # activation gradient, is that of its own loss alone. The step's loss is their mean (over
        # every sample: the batches are equal).
        losses = [F.cross_entropy(self.replicas[h](x.to(self.device)), y.long().to(self.device))
                  for (h, _), x, y in zip(participants, inputs, labels)]
        stacked = torch.stack(losses)
        return stacked.mean(), stacked.sum()

    def _step_trunk(self, participants, gradients: dict, lr: float) -> None:
        if self.version == 2:
            return super()._step_trunk(participants, gradients, lr)
        for h, _ in participants:
            apply_gradients(self.replica_optimizers[h], gradients, lr)

    def average(self, steps_done: int) -> None:
        """Every --splitfed-sync-every steps of an epoch (0: never but at its end), at the end of every
        epoch and of the run: the replicas' weighted mean becomes the trunk (version 1) and the
        hospitals average their L1s with the same weights."""
        steps_per_epoch, every = len(self.loop.plan), self.cfg.splitfed_sync_every
        in_epoch = (steps_done - 1) % steps_per_epoch + 1
        if not (every and in_epoch % every == 0 or in_epoch == steps_per_epoch or steps_done == self.loop.total_steps):
            return
        weights = self.weights()
        if self.version == 1:
            average_replicas(self.trunk, [self.replicas[h] for h in weights], list(weights.values()))
            for replica in self.replicas.values():
                replica.load_state_dict(self.trunk.state_dict())
            self.trunk_syncs += 1
        calls = [(h, self.hospitals.call_async(h, "average_l1", weights[h])) for h in weights]
        for h, call in calls:
            self.hospitals.wait(h, call)
        self.log.l1_syncs += 1

    # --- checkpoints -------------------------------------------------------------------------------
    def trunk_state(self) -> dict:
        state = super().trunk_state()
        if self.version == 1:
            state["replicas"] = {h: r.state_dict() for h, r in self.replicas.items()}
            state["replica_optimizers"] = {h: o.state_dict() for h, o in self.replica_optimizers.items()}
        return state

    def load_trunk_state(self, state: dict) -> None:
        super().load_trunk_state(state)
        for h, replica in self.replicas.items():
            replica.load_state_dict(state["replicas"][h])
            self.replica_optimizers[h].load_state_dict(state["replica_optimizers"][h])


class SplitFedServerParty(ServerParty):
    """Rank 0 of a SplitFed run: split learning's server party, building SplitFed's server."""

    server_class = SplitFedServer

    def finish(self, run_record: dict) -> None:
        super().finish(run_record)
        server = self.server
        run_record["splitfed"] = {"version": server.version, "weights": {server.hospitals.name(h): w for h, w
                                                                        in server.weights().items()},
                                  "trunk_syncs": server.trunk_syncs, "l1_syncs": server.log.l1_syncs}
