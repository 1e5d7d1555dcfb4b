"""Split learning's arithmetic in one process: the exact reference for ``--method split``.

``--method split-local`` keeps N copies of L1 (one per hospital) and one
trunk, and replays the batches of a split run step for step: each
participant's L1 runs on that hospital's batch alone (so its BatchNorm sees
only its own samples, as at the hospital), the activations are concatenated
for one trunk pass, as the server does, and every L1 takes its own optimizer
step with the gradient scale the server sends (``--l1-grad-scale``).
``--l1 average`` averages L1 weights and BatchNorm statistics every
``--l1-sync-every`` steps, as the hospitals' all-reduce does. There is no
RPC, no network and no concurrency, so a disagreement with ``--method split``
is a bug in one of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from splitrpc import data, transport
from splitrpc.errors import UserError
from splitrpc.local import LocalParty
from splitrpc.methods import CHECKPOINT_OPTIONS, Method, Party
from splitrpc.models import model_for, split_model
from splitrpc.optim import apply_gradients, make_optimizer
from splitrpc.split.protocol import l1_sync_tensors


def l1_gradient_scale(cfg, participants: int) -> float:
    """What the server multiplies each participant's L1 gradient by (``--l1-grad-scale``).

    The concatenated loss averages over every participant's samples, so each
    L1 receives 1/participants of its own batch mean's gradient; ``participants``
    undoes that, ``none`` keeps it.
    """
    return float(participants) if cfg.l1_grad_scale == "participants" else 1.0


class SplitReference:
    """N L1 copies and one trunk, stepped exactly as split learning steps them, in one process."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = transport.compute_device(cfg)
        self.shards, self.test = data.load_all(cfg)
        # Every party of a split run builds the full model from --seed and keeps its part.
        _, self.trunk = split_model(model_for(cfg), cfg.cut)
        self.trunk.to(self.device)
        self.heads = [split_model(model_for(cfg), cfg.cut)[0].to(self.device) for _ in range(cfg.hospitals)]
        self.trunk_optimizer = make_optimizer(cfg, self.trunk.parameters())
        self.head_optimizers = [make_optimizer(cfg, head.parameters()) for head in self.heads]
        self.l1_syncs = 0

    def train_step(self, epoch: int, index: int, participants, lr: float) -> tuple[float, int]:
        activations, labels = [], []
        for h, b in participants:
            images, y = self.shards[h - 1].batch(epoch, b)
            activations.append(self.heads[h - 1](images.to(self.device)))
            labels.append(y)
        joined = torch.cat(activations) if len(activations) > 1 else activations[0]
        labels = torch.cat(labels).long().to(self.device)
        loss = F.cross_entropy(self.trunk(joined), labels)
        loss.backward()
        scale = l1_gradient_scale(self.cfg, len(participants))
        for h, _ in participants:
            apply_gradients(self.head_optimizers[h - 1], None, lr, scale)
        apply_gradients(self.trunk_optimizer, None, lr)
        return loss.item(), len(labels)

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        if self.cfg.l1 == "average" and steps_done % self.cfg.l1_sync_every == 0:
            copies = [l1_sync_tensors(head) for head in self.heads]
            for tensors in zip(*copies):
                mean = torch.stack([t.detach() for t in tensors]).sum(0) / len(tensors)
                for t in tensors:
                    t.copy_(mean)
            self.l1_syncs += 1

    def state_dict(self) -> dict:
        return {"trunk": self.trunk.state_dict(), "trunk_optimizer": self.trunk_optimizer.state_dict(),
                "heads": [head.state_dict() for head in self.heads],
                "head_optimizers": [o.state_dict() for o in self.head_optimizers], "l1_syncs": self.l1_syncs}

    def load_state_dict(self, state: dict) -> None:
        self.trunk.load_state_dict(state["trunk"])
        self.trunk_optimizer.load_state_dict(state["trunk_optimizer"])
        for head, optimizer, head_state, optimizer_state in zip(self.heads, self.head_optimizers, state["heads"],
                                                                state["head_optimizers"]):
            head.load_state_dict(head_state)
            optimizer.load_state_dict(optimizer_state)
        self.l1_syncs = state["l1_syncs"]

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Each hospital's model (its L1 + the trunk) on the test set, as the server evaluates them."""
        self.trunk.eval()
        accuracies = []
        for head in self.heads:
            head.eval()
            correct = 0
            for b in range(self.test.num_batches):
                images, labels = self.test.batch(b)
                predictions = self.trunk(head(images.to(self.device))).argmax(1).cpu()
                correct += (predictions == labels).sum().item()
            head.train()
            accuracies.append(correct / len(self.test.labels))
        self.trunk.train()
        return accuracies

    def save(self, directory: str) -> None:
        """The files of a split run: the server's trunk and every hospital's L1."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.trunk.state_dict().items()}, Path(directory) / "trunk.pt")
        for h, head in enumerate(self.heads, start=1):
            torch.save({k: v.cpu() for k, v in head.state_dict().items()},
                       Path(directory) / f"head-{transport.hospital_name(h)}.pt")


class SplitLocalParty(LocalParty):
    """The only process of a split-local run: N L1 copies and one trunk, stepped as split learning steps."""

    who = "split-local"

    def make_trainer(self) -> SplitReference:
        return SplitReference(self.cfg)

    def shard_name(self, index: int) -> str:
        return transport.hospital_name(index)

    def loop_options(self) -> dict:
        return {"on_step_end": self.trainer.after_step}

    def finish(self, run_record: dict) -> None:
        run_record["l1_syncs"] = self.trainer.l1_syncs


class SplitLocal(Method):
    """split-local's declaration: one process, the options of split learning's arithmetic."""

    name = "split-local"
    summary = ("split learning's arithmetic in one process (N L1 copies + one trunk), the exact reference for "
               "--method split")
    one_process = True
    options = frozenset({"schedule", "l1", "l1_sync_every", "l1_grad_scale", "l1_init", *CHECKPOINT_OPTIONS})

    def validate(self, cfg) -> None:
        if cfg.l1_init == "private":
            raise UserError("--method split-local reproduces --l1-init shared only (private L1s come from each "
                            "hospital's own randomness)")

    def party(self, cfg, rank, coordinator) -> Party:
        return SplitLocalParty(cfg)


METHOD = SplitLocal()
