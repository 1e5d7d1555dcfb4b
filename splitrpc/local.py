"""Centralized training in one process: the ceiling, and the reference for equivalence.

The same model, the same partition into hospital shards, the same order of
batches (a step concatenates the batches of its participants, as the server
concatenates their activations), the same augmentation and the same
optimizer and schedule as split learning, with no network in between.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from splitrpc import data, transport
from splitrpc.methods import CHECKPOINT_OPTIONS, Method, Party
from splitrpc.models import model_for, split_model
from splitrpc.optim import apply_gradients, make_optimizer
from splitrpc.resumable import Resumable


class LocalTrainer:
    """The whole model trained on the hospitals' concatenated batches in one process."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = transport.compute_device(cfg)
        self.shards, self.test = data.load_all(cfg)
        self.model = model_for(cfg).to(self.device)
        split_model(self.model, cfg.cut)  # the same --cut check as split learning
        self.optimizer = make_optimizer(cfg, self.model.parameters())

    def train_step(self, epoch: int, index: int, participants, lr: float) -> tuple[float, int]:
        batches = [self.shards[h - 1].batch(epoch, b) for h, b in participants]
        images = torch.cat([x for x, _ in batches]).to(self.device)
        labels = torch.cat([y for _, y in batches]).to(self.device)
        loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        apply_gradients(self.optimizer, None, lr)
        return loss.item(), len(labels)

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        self.model.eval()
        correct = 0
        for b in range(self.test.num_batches):
            images, labels = self.test.batch(b)
            correct += (self.model(images.to(self.device)).argmax(1).cpu() == labels).sum().item()
        self.model.train()
        return [correct / len(self.test.labels)]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, directory: str) -> None:
        """The same files as a split run: the head as hospital1's, the trunk as the server's."""
        head, trunk = split_model(self.model, self.cfg.cut)
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in trunk.state_dict().items()}, Path(directory) / "trunk.pt")
        torch.save({k: v.cpu() for k, v in head.state_dict().items()}, Path(directory) / "head-local.pt")


class LocalParty(Resumable, Party):
    """The only process of a one-process run: trains, evaluates, checkpoints and saves in place.
    ``split-local`` subclasses it with its own trainer."""

    who = "local"

    def __init__(self, cfg):
        self.cfg = cfg

    def make_trainer(self):
        return LocalTrainer(self.cfg)

    def shard_name(self, index: int) -> str:
        return f"shard{index}"

    def loop_options(self) -> dict:
        return {}

    def join(self) -> None:
        transport.set_threads(self.cfg)

    def setup(self, run_record: dict) -> None:
        self.trainer = self.make_trainer()
        run_record["hospitals"] = [{"name": self.shard_name(i), "train_samples": len(s), "train_batches": s.num_batches}
                                   for i, s in enumerate(self.trainer.shards, start=1)]
        self.plan = data.epoch_plan([s.num_batches for s in self.trainer.shards], self.cfg.schedule)
        self.start_loop(run_record, **self.loop_options())

    def checkpoint_party(self) -> str:
        return self.who

    def train(self) -> dict:
        return self.loop.run()

    def save(self, directory: str) -> None:
        self.trainer.save(directory)


class Local(Method):
    """Centralized training's declaration: one process, no network."""

    name = "local"
    summary = "centralized training in one process: the ceiling, and the reference for equivalence"
    one_process = True
    options = frozenset({"schedule", *CHECKPOINT_OPTIONS})

    def party(self, cfg, rank, coordinator) -> Party:
        return LocalParty(cfg)


METHOD = Local()
