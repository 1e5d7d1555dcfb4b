import math

import pytest
import torch

from splitrpc.config import parse_args
from splitrpc.optim import LRSchedule, apply_gradients, make_optimizer

STEPS_PER_EPOCH, EPOCHS = 10, 5


def schedule(*args):
    cfg = parse_args(["--epochs", str(EPOCHS), "--lr", "0.1", *args])
    return LRSchedule(cfg, STEPS_PER_EPOCH)


def torch_rates(make_scheduler, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make_scheduler(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def test_cosine_matches_torch():
    total = STEPS_PER_EPOCH * EPOCHS
    ours = [schedule("--lr-schedule", "cosine")(s) for s in range(total)]
    theirs = torch_rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total), total)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_onecycle_matches_torch():
    total = STEPS_PER_EPOCH * EPOCHS
    ours = [schedule("--lr-schedule", "onecycle")(s) for s in range(total)]
    theirs = torch_rates(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=total, cycle_momentum=False), total)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_multistep_and_constant_and_warmup():
    s = schedule("--lr-schedule", "multistep", "--milestones", "0.5,0.8", "--gamma", "0.1")
    assert [s(0), s(24), s(25), s(39), s(40)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    c = schedule("--lr-schedule", "constant", "--warmup-epochs", "1")
    assert [c(0), c(4), c(9), c(10), c(49)] == pytest.approx([0.01, 0.05, 0.1, 0.1, 0.1])
    w = schedule("--lr-schedule", "cosine", "--warmup-epochs", "1")
    assert w(9) == pytest.approx(0.1) and w(10) == pytest.approx(0.1)
    assert w(30) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))


def test_apply_gradients_matches_a_plain_step():
    cfg = parse_args(["--momentum", "0.9", "--nesterov", "--weight-decay", "1e-3"])
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    oa, ob = make_optimizer(cfg, a.parameters()), make_optimizer(cfg, b.parameters())
    for step in range(3):
        x = torch.randn(8, 4)
        a(x).pow(2).mean().backward()
        grads = {p: g for p, g in zip(b.parameters(), torch.autograd.grad(b(x).pow(2).mean(), list(b.parameters())))}
        for g in oa.param_groups:
            g["lr"] = 0.05 * (step + 1)
        oa.step()
        oa.zero_grad()
        apply_gradients(ob, grads, 0.05 * (step + 1))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_adam_takes_its_settings_from_the_config():
    cfg = parse_args(["--optimizer", "adam", "--lr", "0.001", "--beta1", "0.8", "--beta2", "0.99",
                      "--weight-decay", "1e-3"])
    ours, theirs = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = make_optimizer(cfg, [ours])
    reference = torch.optim.Adam([theirs], lr=0.001, betas=(0.8, 0.99), weight_decay=1e-3)
    for step in range(3):
        gradient = torch.tensor([0.5, -2.0]) * (step + 1)
        apply_gradients(opt, {ours: gradient}, 0.001)
        theirs.grad = gradient.clone()
        reference.step()
    assert isinstance(opt, torch.optim.Adam) and torch.equal(ours, theirs)
