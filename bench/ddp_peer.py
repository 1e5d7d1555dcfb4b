"""The second DDP rank of the DDP-step benchmark: steps in lockstep with the benchmark process.

Before each step both ranks all-reduce a flag (MIN): 1 to step, 0 to stop.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from bench.steps import ddp_setup, ddp_step
from splitrpc.config import parse_args


def main(argv: list[str]) -> None:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads or 1)
    dist.init_process_group("gloo", init_method="env://")
    trainer = ddp_setup(cfg, rank=1)
    flag = torch.ones(1)
    while True:
        flag.fill_(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0:
            break
        ddp_step(trainer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
