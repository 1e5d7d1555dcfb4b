"""The epoch/step loop shared by the split-learning server, the local trainer
and the DDP baseline. What a step or an evaluation does is theirs; the order
of steps, the learning rate, stopping, evaluation cadence and the per-epoch
record are decided here, once.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

from splitrpc.optim import LRSchedule
from splitrpc.record import Progress, summarize_epoch

# train_step(epoch, step_in_epoch, participants, lr) -> (loss, samples); loss None: nothing to train on
TrainStep = Callable[[int, int, Sequence, float], tuple[float | None, int]]
# evaluate() -> test accuracy per hospital (one entry for a single model; None for a lost hospital)
Evaluate = Callable[[], list]


def _nothing(*_):
    return None


class Loop:
    """Train for cfg.epochs over ``plan`` (the steps of one epoch).

    ``on_step_end(steps_done)`` runs after every step (L1 averaging,
    checkpoints); ``switch_phase("train" | "eval")`` marks where
    communication accounting changes phase; ``reduce_losses`` turns each
    step's local loss into the global one after an epoch (DDP ranks see only
    their own batch). ``state_dict``/``load_state_dict`` let a run resume at
    any step with the same history; work done ``off_the_clock()`` (writing a
    checkpoint) is not training time.
    """

    def __init__(self, cfg, plan: list, train_step: TrainStep, evaluate: Evaluate, who: str,
                 lr_schedule: LRSchedule | None = None, on_step_end: Callable[[int], None] = _nothing,
                 switch_phase: Callable[[str], None] = _nothing,
                 reduce_losses: Callable[[list[float], list[int]], list[float]] | None = None, quiet: bool = False):
        self.cfg, self.plan, self.who = cfg, plan, who
        self.train_step, self.evaluate = train_step, evaluate
        self.schedule = lr_schedule or LRSchedule(cfg, len(plan))
        self.on_step_end, self.switch_phase, self.reduce_losses = on_step_end, switch_phase, reduce_losses
        self.progress = Progress(cfg, self.total_steps_of(cfg, len(plan)), who, quiet)
        self.state = {
            "steps_done": 0, "epochs": [], "step_losses": [], "train_seconds": 0.0, "samples": 0,
            # the epoch in progress
            "losses": [], "counts": [], "epoch_samples": 0, "epoch_seconds": 0.0,
        }
        self._untimed = 0.0  # seconds of the current step spent off the clock

    @contextlib.contextmanager
    def off_the_clock(self):
        """Time spent inside is not training time: a run with checkpoints measures the same
        samples/s as one without (its wall time still includes them)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._untimed += time.perf_counter() - started

    def state_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}
        self.progress.print(f"resumed at step {self.state['steps_done']}")

    @staticmethod
    def total_steps_of(cfg, steps_per_epoch: int) -> int:
        total = steps_per_epoch * cfg.epochs
        return min(total, cfg.max_steps) if cfg.max_steps else total

    @property
    def total_steps(self) -> int:
        return self.total_steps_of(self.cfg, len(self.plan))

    def upcoming(self) -> tuple | None:
        """(epoch, index, participants, lr) of the step after the one running now, if it belongs to the
        same epoch (an epoch ends with its evaluation) and to this run; else None."""
        steps_per_epoch, now = len(self.plan), self.state["steps_done"]
        following = now + 1
        epoch, index = divmod(following, steps_per_epoch)
        if following >= self.total_steps or epoch != now // steps_per_epoch:
            return None
        return epoch, index, self.plan[index], self.schedule(following)

    def run(self) -> dict:
        state, steps_per_epoch = self.state, len(self.plan)
        lr = self.schedule(max(0, state["steps_done"] - 1))
        done = state["steps_done"]
        if state["counts"] and (done % steps_per_epoch == 0 or done >= self.total_steps):
            # Resumed from a checkpoint taken at the last step of an epoch (or of the run),
            # before that epoch's evaluation.
            self._end_epoch((done - 1) // steps_per_epoch, lr)
        while state["steps_done"] < self.total_steps:
            epoch, first = divmod(state["steps_done"], steps_per_epoch)
            self.switch_phase("train")
            t0 = time.perf_counter()
            for index in range(first, steps_per_epoch):
                step = state["steps_done"]
                lr = self.schedule(step)
                loss, n = self.train_step(epoch, index, self.plan[index], lr)
                state["steps_done"] += 1
                if loss is not None:
                    state["losses"].append(loss)
                    state["counts"].append(n)
                    state["epoch_samples"] += n
                    self.progress.step(step, epoch, loss, n, lr)
                self.on_step_end(state["steps_done"])
                state["epoch_seconds"] += time.perf_counter() - t0 - self._untimed
                t0, self._untimed = time.perf_counter(), 0.0
                if state["steps_done"] >= self.total_steps:
                    break
            self._end_epoch(epoch, lr)
        return self.result()

    def _end_epoch(self, epoch: int, lr: float) -> None:
        state, cfg = self.state, self.cfg
        self.switch_phase("eval")
        losses = state["losses"]
        if self.reduce_losses is not None:
            losses = self.reduce_losses(losses, state["counts"])
        stopped = state["steps_done"] >= self.total_steps
        last = stopped or epoch + 1 == cfg.epochs
        accuracies = self.evaluate() if last or (epoch + 1) % cfg.eval_every == 0 else None
        entry = summarize_epoch(epoch, losses, state["epoch_samples"], state["epoch_seconds"], lr, accuracies)
        state["epochs"].append(entry)
        state["step_losses"].extend(losses)
        state["train_seconds"] += state["epoch_seconds"]
        state["samples"] += state["epoch_samples"]
        state.update(losses=[], counts=[], epoch_samples=0, epoch_seconds=0.0)
        message = f"epoch {epoch + 1} done: train loss {entry['train_loss']:.4f}"
        if accuracies is not None:
            message += f", test acc mean {entry['test_acc_mean']:.4f} min {entry['test_acc_min']:.4f}"
        self.progress.print(message)

    def result(self) -> dict:
        state = self.state
        last = state["epochs"][-1] if state["epochs"] else {}
        result = {
            "steps_per_epoch": len(self.plan),
            "steps": state["steps_done"],
            "stopped_early": state["steps_done"] < len(self.plan) * self.cfg.epochs,
            "epochs": state["epochs"],
            "train_time_s": state["train_seconds"],
            "samples": state["samples"],
            "samples_per_s": state["samples"] / state["train_seconds"] if state["train_seconds"] else None,
            "final_test_acc": last.get("test_acc_mean"),
            "final_test_acc_min": last.get("test_acc_min"),
        }
        if self.cfg.record_step_losses:
            result["step_losses"] = state["step_losses"]
        return result


def run(cfg, plan: list, train_step: TrainStep, evaluate: Evaluate, who: str, **options) -> dict:
    """A whole run in one call (for trainers that neither checkpoint nor resume)."""
    return Loop(cfg, plan, train_step, evaluate, who, **options).run()
