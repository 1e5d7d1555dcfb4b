"""Does knowing L1's initial weights let the server invert what it receives? (--l1-init shared vs private)

    python -m bench.shared_init                  # trains, captures, attacks -> results/shared_init.jsonl

Under ``--l1-init shared`` every party builds the whole model from ``--seed``, so
the server can rebuild L1's *initial* weights (``model_for(cfg, seed)`` then
``split_model``); it never holds the trained L1. This bench measures what that
buys it: short split-learning runs (1 hospital, VGG-11 x0.25, CIFAR-10 JPEG) stop
after 1, 25 and 100 steps (``--max-steps``, one trajectory:
runs are deterministic) and keep the last batch the server received
(``--capture-dir``) and the final weights (``--save-dir``). Each capture is
inverted (optimisation-based white-box inversion, splitrpc.privacy) through

* ``initial``: the L1 the server rebuilds from the seed: what it can know;
* ``trained``: the true L1 saved at the end of the run (one SGD step after the
  captured forward): the upper bound of the README's privacy table, which the
  server never holds;

for ``--l1-init shared`` and ``--l1-init private`` (each hospital's L1 from its
own randomness, so the server's rebuilt guess is wrong). The hospital computed
the activations in train mode, with BatchNorm over the batch; the attacker, who
lacks the running statistics of L1 anyway, inverts the whole batch through its
head in train mode too (``batch_statistics=True``), then restores the per-channel
offset and scale that normalisation over the batch erased, from the moments of
public images augmented as training batches are (``psnr``, ``ssim``); rescaled
with the batch's own moments instead (``*_true_moments``) it is an auditor's
bound on that calibration. ``floor`` is the score of answering the mean image (0
in normalised space) for every input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from splitrpc import data
from splitrpc.privacy import image_metrics, inversion
from splitrpc.config import from_dict
from splitrpc.errors import UserError, report
from splitrpc.models import model_for, split_model
from splitrpc.record import append_jsonl, git_commit

WHITE_BOX_STEPS = 300
MOMENT_SAMPLES = 5000  # public images whose moments calibrate the batch-statistics inversion
ATTACKER_SEED = 12345
RUN_TIMEOUT_S = 1200
TRAIN = ["--method", "split", "--hospitals", "1", "--model", "vgg11", "--width", "0.25",
         "--dataset", "imagefolder", "--data-dir", "../shared/data/cifar10-jpeg.tar.gz", "--epochs", "1",
         "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--nesterov",
         "--lr-schedule", "onecycle", "--capture-samples", "128", "--limit-test", "1000", "--seed", "0"]


def train(directory: Path, init: str, steps: int, runs_out: str) -> dict:
    """One split-learning run stopped after ``steps`` steps, with its capture and weights under ``directory``."""
    if not (directory / "hospital1-received.pt").exists():
        command = [sys.executable, "-m", "splitrpc.train", *TRAIN, "--l1-init", init, "--max-steps", str(steps),
                   "--capture-dir", str(directory), "--save-dir", str(directory / "model"), "--out", runs_out,
                   "--run-key", f"shared-init-{init}-{steps}"]
        print(f"[shared-init] training: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, timeout=RUN_TIMEOUT_S, env=os.environ.copy())
        if done.returncode != 0:
            raise UserError(f"training run {init}/{steps} failed with exit code {done.returncode}")
    records = [json.loads(line) for line in Path(runs_out).read_text().splitlines() if line.strip()]
    mine = [r for r in records if r["config"]["run_key"] == f"shared-init-{init}-{steps}" and r["status"] == "ok"]
    if not mine:
        raise UserError(f"{runs_out}: no record of run shared-init-{init}-{steps}")
    return mine[-1]


def public_moments(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of public images (the test split) normalised and augmented as training batches are.

    Zero-padded random crops darken a training batch (normalised mean about -0.2),
    and the attacker knows the augmentation from the code.
    """
    test = data.load_split(cfg.replace(limit_test=0), "test")
    count = min(MOMENT_SAMPLES, len(test.labels))
    images = torch.from_numpy(test.images.take(np.arange(count))).permute(0, 3, 1, 2)
    if cfg.augment:
        images = data.augment(images, torch.Generator().manual_seed(ATTACKER_SEED))
    images = data.Normalizer(cfg)(images)
    return images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))


def attack(record: dict, directory: Path) -> list[dict]:
    cfg = from_dict(record["config"])
    mean, std = public_moments(cfg)
    received = torch.load(directory / "hospital1-received.pt")
    inputs = {(b["epoch"], b["batch"]): b["inputs"] for b in torch.load(directory / "hospital1-inputs.pt")}
    batch = received[-1]  # the last batch the server received: one training batch, BatchNorm over it
    activations, images = batch["activations"], inputs[(batch["epoch"], batch["batch"])]
    initial, _ = split_model(model_for(cfg, cfg.seed), cfg.cut)  # all the server can rebuild
    trained, _ = split_model(model_for(cfg, cfg.seed), cfg.cut)
    trained.load_state_dict(torch.load(directory / "model" / "head-hospital1.pt"))
    originals = image_metrics.denormalize(images, cfg.dataset).clamp(0, 1)
    floor = image_metrics.denormalize(torch.zeros_like(images), cfg.dataset).clamp(0, 1)
    rows = []
    for name, head in (("initial", initial), ("trained", trained)):
        started = time.perf_counter()
        raw = inversion.invert_white_box(head, activations, steps=WHITE_BOX_STEPS, seed=ATTACKER_SEED,
                                       batch_statistics=True)
        pixels = image_metrics.denormalize(inversion.match_batch_moments(raw, mean, std), cfg.dataset).clamp(0, 1)
        # an auditor's bound: the same inversion rescaled with the batch's own moments
        bound = image_metrics.denormalize(inversion.match_batch_moments(raw, images.mean(dim=(0, 2, 3)),
                                                                images.std(dim=(0, 2, 3))), cfg.dataset).clamp(0, 1)
        with torch.no_grad():
            gap = [(p_init - p_now).norm().item() / p_init.norm().item()
                   for p_init, p_now in zip(initial.parameters(), trained.parameters())
                   if p_init.dim() > 1]  # the convolution's weights
        rows.append({"head": name, "psnr": image_metrics.psnr(pixels, originals, data_range=1.0),
                     "ssim": image_metrics.ssim(pixels, originals, data_range=1.0),
                     "psnr_true_moments": image_metrics.psnr(bound, originals, data_range=1.0),
                     "ssim_true_moments": image_metrics.ssim(bound, originals, data_range=1.0),
                     "floor_psnr": image_metrics.psnr(floor, originals, data_range=1.0),
                     "floor_ssim": image_metrics.ssim(floor, originals, data_range=1.0),
                     # relative distance of the true L1's convolution from the seed-rebuilt one
                     "l1_weight_change": gap[0], "seconds": time.perf_counter() - started})
    return rows


def table(path: str) -> str:
    """The README's table from a results file: PSNR / SSIM per initialisation, training point and head."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    lines = ["| --l1-init | after step | true L1 vs seed-rebuilt | test acc | through the seed-rebuilt initial L1 "
             "(what the server knows) | through the true L1 (never held by the server) | mean image |",
             "|---|---|---|---|---|---|---|"]
    for init in ("shared", "private"):
        for n in sorted({r["steps"] for r in rows if r["l1_init"] == init}):
            by_head = {r["head"]: r for r in rows if r["l1_init"] == init and r["steps"] == n}
            if set(by_head) != {"initial", "trained"}:
                continue
            first = by_head["initial"]
            lines.append(f"| {init} | {n} | {first['l1_weight_change']:.3f} | {first['test_acc']:.3f} | "
                         + " | ".join(f"{by_head[h]['psnr']:.2f} dB / {by_head[h]['ssim']:.3f} "
                                      f"({by_head[h]['psnr_true_moments']:.2f} dB / "
                                      f"{by_head[h]['ssim_true_moments']:.3f})" for h in ("initial", "trained"))
                         + f" | {first['floor_psnr']:.2f} dB / {first['floor_ssim']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shared_init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,25,100", help="training steps at which the runs stop")
    parser.add_argument("--inits", default="shared,private")
    parser.add_argument("--captures", default="results/captures/shared-init", help="where runs keep captures")
    parser.add_argument("--runs-out", default="results/captures/shared-init/runs.jsonl")
    parser.add_argument("--out", default="results/shared_init.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only print the README's table from --out")
    args = parser.parse_args(argv)
    try:
        if args.table:
            if not Path(args.out).exists():
                raise UserError(f"{args.out}: no results yet (python -m bench.shared_init)")
            print(table(args.out))
            return 0
        try:
            steps = [int(s) for s in args.steps.split(",")]
        except ValueError:
            raise UserError(f"--steps expects comma-separated integers, got {args.steps!r}") from None
        inits = args.inits.split(",")
        if any(i not in ("shared", "private") for i in inits) or any(s < 1 for s in steps):
            raise UserError("--inits takes shared and/or private, --steps positive integers")
        torch.set_num_threads(args.threads)
        Path(args.runs_out).parent.mkdir(parents=True, exist_ok=True)
        for init in inits:
            for n in steps:
                directory = Path(args.captures) / f"{init}-{n}"
                record = train(directory, init, n, args.runs_out)
                for row in attack(record, directory):
                    result = {"record_version": 1, "git_commit": git_commit(), "l1_init": init, "steps": n,
                              "model": record["config"]["model"], "width": record["config"]["width"],
                              "cut": record["config"]["cut"], "samples": 128, "white_box_steps": WHITE_BOX_STEPS,
                              "test_acc": record["final_test_acc"],
                              "command": "python -m bench.shared_init " + " ".join(
                                  argv if argv is not None else sys.argv[1:]), **row}
                    append_jsonl(args.out, result)
                    print(f"[shared-init] {init} after {n} steps, {row['head']} L1: PSNR {row['psnr']:.2f} dB "
                          f"SSIM {row['ssim']:.3f} (floor {row['floor_psnr']:.2f} / {row['floor_ssim']:.3f}); "
                          f"L1 moved {row['l1_weight_change']:.3f} from its initial weights", flush=True)
        return 0
    except UserError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
