"""The epoch/step loop shared by the split-learning server, the local trainer
and the DDP baseline. What a step or an evaluation does is theirs; the order
of steps, the learning rate, stopping, evaluation cadence and the per-epoch
record are decided here, once.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from splitrpc.optim import LRSchedule
from splitrpc.record import Progress, summarize_epoch

# train_step(epoch, step_in_epoch, participants, lr) -> (loss, samples)
TrainStep = Callable[[int, int, Sequence, float], tuple[float, int]]
# evaluate() -> test accuracy per hospital (one entry for a single model)
Evaluate = Callable[[], list]


def _nothing(*_):
    return None


def run(cfg, plan: list, train_step: TrainStep, evaluate: Evaluate, who: str,
        lr_schedule: LRSchedule | None = None, on_step_end: Callable[[int], None] = _nothing,
        switch_phase: Callable[[str], None] = _nothing,
        reduce_losses: Callable[[list[float], list[int]], list[float]] | None = None, quiet: bool = False) -> dict:
    """Train for cfg.epochs over ``plan`` (the steps of one epoch); return the record's training part.

    ``switch_phase("train" | "eval")`` marks where communication accounting
    changes phase; ``reduce_losses`` turns each step's local loss into the
    global one (DDP ranks see only their own batch), after the epoch.
    """
    schedule = lr_schedule or LRSchedule(cfg, len(plan))
    progress = Progress(cfg, len(plan), who, quiet)
    epochs, step_losses = [], []
    global_step, train_seconds, samples_total = 0, 0.0, 0
    stopped = False
    lr = schedule(0)
    for epoch in range(cfg.epochs):
        switch_phase("train")
        losses, counts, samples, t0 = [], [], 0, time.perf_counter()
        for index, participants in enumerate(plan):
            lr = schedule(global_step)
            loss, n = train_step(epoch, index, participants, lr)
            losses.append(loss)
            counts.append(n)
            samples += n
            on_step_end(global_step)
            progress.step(global_step, epoch, loss, n, lr)
            global_step += 1
            if cfg.max_steps and global_step >= cfg.max_steps:
                stopped = True
                break
        seconds = time.perf_counter() - t0
        switch_phase("eval")
        if reduce_losses is not None:
            losses = reduce_losses(losses, counts)
        train_seconds += seconds
        samples_total += samples
        step_losses.extend(losses)
        last = stopped or epoch + 1 == cfg.epochs
        accuracies = evaluate() if last or (epoch + 1) % cfg.eval_every == 0 else None
        entry = summarize_epoch(epoch, losses, samples, seconds, lr, accuracies)
        epochs.append(entry)
        message = f"epoch {epoch + 1} done: train loss {entry['train_loss']:.4f}"
        if accuracies is not None:
            message += (f", test acc mean {entry['test_acc_mean']:.4f} min {entry['test_acc_min']:.4f}")
        progress.print(message)
        if stopped:
            break
    result = {
        "steps_per_epoch": len(plan),
        "steps": global_step,
        "stopped_early": stopped,
        "epochs": epochs,
        "train_time_s": train_seconds,
        "samples": samples_total,
        "samples_per_s": samples_total / train_seconds if train_seconds else None,
        "final_test_acc": epochs[-1].get("test_acc_mean"),
        "final_test_acc_min": epochs[-1].get("test_acc_min"),
    }
    if cfg.record_step_losses:
        result["step_losses"] = step_losses
    return result
