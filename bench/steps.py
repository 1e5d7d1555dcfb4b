"""The configurations of the regression benchmarks, and the DDP step their two ranks take in lockstep."""

from __future__ import annotations

from splitrpc.config import parse_args

# The CPU benchmark models (as in bench/configs/cpu.toml), 2 hospitals, 128 samples per hospital.
MODELS = {"vgg11": ["--model", "vgg11", "--width", "0.25"], "resnet20": ["--model", "resnet20", "--width", "0.5"]}
COMMON = ["--dataset", "synthetic", "--synthetic-train", "1024", "--synthetic-test", "64", "--hospitals", "2",
          "--batch-size", "128", "--schedule", "parallel", "--threads", "1", "--log-every", "100000"]


def config(model: str, *extra: str):
    return parse_args([*COMMON, *MODELS[model], *extra])


def ddp_setup(cfg, rank: int):
    from splitrpc.ddp import DdpTrainer

    return DdpTrainer(cfg, rank)


def ddp_step(trainer) -> None:
    plan_step = [(1, 0), (2, 0)]
    trainer.train_step(0, 0, plan_step, trainer.cfg.lr)
