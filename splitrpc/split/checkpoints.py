"""Checkpoints, both sides: every party saves its own state for a step on its own disk, and a run
resumes from the newest step for which every party live at that step has a file.

``ServerCheckpoints`` and ``HospitalCheckpoints`` are mixed into ``Server`` and ``Hospital``
(whose trunk, L1s, optimizers, loop and shards they save); nothing of a hospital's crosses the
network, the server only says which step.
"""

from __future__ import annotations

from splitrpc import checkpoint, transport
from splitrpc.split.protocol import HospitalFailure


class ServerCheckpoints:
    """The server's side: it triggers every save, writes its own file last, and finds the step to resume."""

    def save_checkpoint(self, steps_done: int) -> None:
        """Every live party saves its own state for this step, on its own disk, at once.

        The server writes its file last, once every hospital has confirmed its own:
        a server checkpoint at a step therefore marks a complete set.
        """
        self.call_live("save_checkpoint", steps_done, timeout=self.cfg.setup_timeout)
        state = {
            **checkpoint.identity(self.cfg), "step": steps_done, "party": transport.SERVER,
            **self.trunk_state(),
            "loop": self.loop.state_dict(), "lost": dict(self.hospitals.lost), "dedup": self.dedup_record,
        }
        checkpoint.save(self.cfg.checkpoint_dir, steps_done, transport.SERVER, state)
        checkpoint.prune(self.cfg.checkpoint_dir, transport.SERVER, self.cfg.checkpoint_keep)

    def trunk_state(self) -> dict:
        """What the server's checkpoint holds of its models (SplitFed's adds every trunk replica)."""
        return {"trunk": self.trunk.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_trunk_state(self, state: dict) -> None:
        self.trunk.load_state_dict(state["trunk"])
        self.optimizer.load_state_dict(state["optimizer"])

    def newest_checkpoint(self) -> int | None:
        """The newest step for which the server and every hospital live at that step have a file."""
        if not self.cfg.checkpoint_dir:
            return None
        cache: dict[int, list[int]] = {}
        for step in reversed(checkpoint.available_steps(self.cfg.checkpoint_dir, transport.SERVER)):
            state = checkpoint.load(self.cfg.checkpoint_dir, step, transport.SERVER, self.cfg)
            needed = [h for h in range(1, self.cfg.hospitals + 1) if h not in state["lost"]]
            ok = True
            for h in needed:
                if h not in cache:
                    try:
                        cache[h] = self.hospitals.wait(h, self.hospitals.call_async(h, "checkpoint_steps"))
                    except HospitalFailure:
                        cache[h] = []
                ok = ok and step in cache[h]
            if ok:
                return step
        return None

    def restore(self, step: int) -> dict:
        """Every party back to its state after ``step`` steps; returns the server's checkpoint (with the
        loop's position and history, which the caller restores once the step plan is rebuilt)."""
        state = checkpoint.load(self.cfg.checkpoint_dir, step, transport.SERVER, self.cfg)
        self.load_trunk_state(state)
        self.hospitals.lost = {int(k): v for k, v in state["lost"].items()}
        for lost in self.hospitals.lost.values():
            self.coordinator.mark_lost(lost["name"])
        self.dedup_record = state["dedup"]
        # Each hospital restores its L1 and the records deduplication dropped; its sizes plan the steps.
        restored = iter(self.hospitals.call_all("load_checkpoint", step, timeout=self.cfg.setup_timeout))
        self.info = [next(restored) if h not in self.hospitals.lost else old
                     for h, old in zip(range(1, self.cfg.hospitals + 1), self.info)]
        return state


class HospitalCheckpoints:
    """A hospital's side: L1 (and U-shaped, the tail), their optimizers, and what deduplication dropped."""

    def extra_state(self) -> dict:
        """What a variant's hospital adds to its checkpoint (local loss: the auxiliary head and its optimizer)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` saved (called under the hospital's lock)."""

    def checkpoint_steps(self) -> list[int]:
        return checkpoint.available_steps(self.cfg.checkpoint_dir, transport.hospital_name(self.index))

    def save_checkpoint(self, step: int) -> None:
        """This hospital's state after ``step`` steps, on this hospital's disk; nothing crosses the network."""
        name = transport.hospital_name(self.index)
        self.settle()
        with self.lock:
            state = {
                **checkpoint.identity(self.cfg), "step": step, "party": name,
                "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "dropped": self.dropped, "codec": self.codec.state_dict(),
            }
            if self.tail is not None:
                state.update(tail=self.tail.state_dict(), tail_optimizer=self.tail_optimizer.state_dict())
            state.update(self.extra_state())
            checkpoint.save(self.cfg.checkpoint_dir, step, name, state)
        checkpoint.prune(self.cfg.checkpoint_dir, name, self.cfg.checkpoint_keep)

    def load_checkpoint(self, step: int) -> dict:
        """Restore L1, its optimizer and the deduplicated shard; the data order follows from the step."""
        name = transport.hospital_name(self.index)
        state = checkpoint.load(self.cfg.checkpoint_dir, step, name, self.cfg)
        with self.lock:
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.codec.load_state_dict(state["codec"])
            if self.tail is not None:
                self.tail.load_state_dict(state["tail"])
                self.tail_optimizer.load_state_dict(state["tail_optimizer"])
            self.load_extra_state(state)
            if state["dropped"]:
                self.shard.drop(state["dropped"])
                self.dropped = list(state["dropped"])
        return self.describe()
