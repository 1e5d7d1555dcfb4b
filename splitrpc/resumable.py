"""Checkpoints and resumption for the methods whose every process holds its whole state: local and
split-local (one process), DDP and FedAvg (every rank). Split learning's server and hospitals have
their own (``splitrpc.split.checkpoints``): there the server decides, and a hospital's state never
leaves it.

Each process saves its own file, ``<checkpoint-dir>/step-<n>/<party>.pt``, with its trainer's
``state_dict()`` (weights, optimizer state, whatever else a step changes) and the loop's position
and history, at the steps ``--checkpoint-every`` names and after the last one. A checkpoint is
the state right after a step's training and *before* the method's own end-of-step work (FedAvg's
round average, split-local's L1 average): that work depends on where the run ends (a run cut
short by --max-steps averages at its end), so a resumed run redoes it, knowing its own end, and
continues exactly as an uninterrupted run would. DDP ranks each write their own file, although
their parameters agree: their BatchNorm statistics differ between evaluations (DDP does not
broadcast buffers here).
"""

from __future__ import annotations

from typing import Callable

from splitrpc import checkpoint, loop
from splitrpc.errors import UserError


class Resumable:
    """Mixed into a ``Party`` that has ``cfg``, ``who``, ``plan`` and ``trainer`` (with ``train_step``,
    ``evaluate``, ``state_dict`` and ``load_state_dict``) before it calls ``start_loop``."""

    def checkpoint_party(self) -> str:
        """This process's file name in a step's directory."""
        raise NotImplementedError

    def gather(self, value) -> list:
        """``value`` from every process of the run (one process: just this one)."""
        return [value]

    def start_loop(self, run_record: dict, on_step_end: Callable[[int], None] | None = None, **options) -> None:
        """``self.loop`` over ``self.plan``, resumed from the newest step every process has a checkpoint of
        when --resume asks for it (or torchrun restarted the group)."""
        cfg = self.cfg
        self.method_step_end = on_step_end
        self.loop = loop.Loop(cfg, self.plan, self.trainer.train_step, self.trainer.evaluate, who=self.who,
                              on_step_end=self._after_step, **options)
        self.checkpoint_every = checkpoint.parse_every(cfg.checkpoint_every, len(self.plan))
        step = self._resume_step()
        if step is None:
            return
        state = checkpoint.load(cfg.checkpoint_dir, step, self.checkpoint_party(), cfg)
        self.trainer.load_state_dict(state["trainer"])
        self.loop.load_state_dict(state["loop"])
        if self.method_step_end is not None:
            self.method_step_end(step)  # the checkpoint was taken before it
        run_record["resumed_from_step"] = step

    def _resume_step(self) -> int | None:
        if not checkpoint.should_resume(self.cfg):
            return None
        mine = checkpoint.available_steps(self.cfg.checkpoint_dir, self.checkpoint_party())
        step = checkpoint.newest_common(self.gather(mine))
        if step is None and self.cfg.resume:
            raise UserError(f"--resume: no step in {self.cfg.checkpoint_dir} has a checkpoint from every party")
        return step

    def _after_step(self, steps_done: int) -> None:
        if self.cfg.checkpoint_dir and checkpoint.due(self.checkpoint_every, steps_done, self.loop.total_steps):
            with self.loop.off_the_clock():
                self._save(steps_done)
        if self.method_step_end is not None:
            self.method_step_end(steps_done)

    def _save(self, step: int) -> None:
        party = self.checkpoint_party()
        state = {**checkpoint.identity(self.cfg), "step": step, "party": party,
                 "trainer": self.trainer.state_dict(), "loop": self.loop.state_dict()}
        checkpoint.save(self.cfg.checkpoint_dir, step, party, state)
        checkpoint.prune(self.cfg.checkpoint_dir, party, self.cfg.checkpoint_keep)
