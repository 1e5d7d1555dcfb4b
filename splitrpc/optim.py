"""Optimizers and the learning-rate schedule, shared by every party.

DistributedOptimizer has no scheduler hook, so no party keeps a scheduler of
its own: the driver (the server, or the local/DDP trainer) evaluates
``lr_at(step)`` once per step and hands the number to every optimizer it
drives, with the gradients. The same function and the same step counter give
every party the same rate by construction.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_PCT = 25.0, 1e4, 0.3  # torch.optim.lr_scheduler.OneCycleLR defaults


def make_optimizer(cfg, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


class LRSchedule:
    """lr(step) for a run of ``total_steps`` optimizer steps, ``steps_per_epoch`` of them per epoch."""

    def __init__(self, cfg, steps_per_epoch: int, peak_lr: float | None = None):
        self.kind = cfg.lr_schedule
        self.peak = cfg.lr if peak_lr is None else peak_lr
        self.total = max(1, steps_per_epoch * cfg.epochs)
        self.warmup = min(self.total, int(round(cfg.warmup_epochs * steps_per_epoch)))
        self.milestones = [int(round(m * self.total)) for m in cfg.milestones]
        self.gamma = cfg.gamma

    def __call__(self, step: int) -> float:
        if self.kind == "onecycle":
            return self._onecycle(step)
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return self.peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if self.kind == "multistep":
            return self.peak * self.gamma ** sum(step >= m for m in self.milestones)
        return self.peak

    def _onecycle(self, step: int) -> float:
        # Cosine ramp up, then cosine anneal down, exactly as torch's OneCycleLR; the
        # ramp lasts --warmup-epochs if given, else 30% of training.
        peak_step = (self.warmup if self.warmup else ONECYCLE_PCT * self.total) - 1
        start, end = self.peak / ONECYCLE_DIV, self.peak / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
        if step <= peak_step:
            frac, lo, hi = step / max(peak_step, 1e-9), start, self.peak
        else:
            frac, lo, hi = (step - peak_step) / max(self.total - 1 - peak_step, 1e-9), self.peak, end
        frac = min(1.0, frac)
        return hi + (lo - hi) * 0.5 * (1 + math.cos(math.pi * frac))


def apply_gradients(optimizer: torch.optim.Optimizer, grads: Mapping[torch.Tensor, torch.Tensor] | None,
                    lr: float, scale: float = 1.0, extra: Mapping[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One optimizer step at rate ``lr``.

    ``grads`` maps parameters to gradients (what ``dist_autograd.get_gradients``
    returns); ``None`` means the gradients are already in ``param.grad``.
    ``scale`` multiplies the gradients first; ``extra`` gradients (a local
    penalty's) are then added. Parameters without a gradient are skipped, as a
    local optimizer skips ``grad is None``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
        if grads is not None:
            for p in group["params"]:
                p.grad = grads.get(p)
        if scale != 1.0:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = p.grad * scale
        if extra:
            for p in group["params"]:
                if p in extra:
                    p.grad = extra[p] if p.grad is None else p.grad + extra[p]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
