"""What an honest-but-curious server learns about the labels, emulated in one process.

    python -m bench.label_leakage                    # -> results/label_leakage.jsonl

In vanilla split learning the server computes the loss, so it receives every label
(label-inference accuracy 1.0: one row says so). In U-shaped split learning the
hospital keeps L1 *and* the last ``tail`` stages with the loss; the server holds
the stages between and receives, for each sample, the gradient of the loss with
respect to what its trunk sent down. splitrpc runs that mode for real
(``--labels hospital``; ``bench.privacy`` attacks what such a server kept); this
bench emulates it in one process, so that attacks and defences can be swept
quickly: it trains the model locally as head | trunk | tail (``split_model``
twice) and records exactly that gradient: the batched gradient of the mean
cross-entropy wrt the trunk's output, as the tail's backward pass would return it
(BatchNorm in a deeper tail couples the samples of a batch, as it would there).
A defence is applied to that gradient before it flows into the trunk, so the
accuracy it costs is the accuracy of training through it.

At the start, middle and end of training, the gradients of ``--window``
consecutive batches are attacked (splitrpc.privacy.label_leakage.label_leakage_report): norm
scoring and Li et al.'s cosine scoring (one-vs-rest leak AUC), nearest class
direction from a few known labels per class and spherical k-means named by those
labels (10-class accuracy), and k-means named by Hungarian matching to the true
labels or by the majority of the true labels (oracle bounds). Settings: tail =
classifier, Gaussian noise, max norm, deeper tails; and Li et al.'s binary setting
(one rare class against the rest), where the norm attack applies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from splitrpc import data
from splitrpc.privacy import label_leakage
from splitrpc.config import from_dict
from splitrpc.errors import UserError, report
from splitrpc.models import model_for, split_model, stage_count
from splitrpc.optim import LRSchedule, apply_gradients, make_optimizer
from splitrpc.record import append_jsonl, git_commit

KNOWN_PER_CLASS = 5  # labels the server knows per class (e.g. its own test records, or a few guessed ones)
ATTACK_SEED = 12345
NOISE_RATIOS = (1.0, 4.0)  # Gaussian noise of about this many times the batch's largest gradient norm
# Li et al.'s setting, where the norm attack works: a binary task whose positive class is
# rare (one class of ten against the rest, 10 % positives). CIFAR-10 class 3 is "cat".
BINARY_POSITIVE_CLASS = 3

BASE = {
    "method": "local", "hospitals": 1, "model": "vgg11", "width": 0.25, "dataset": "imagefolder",
    "data_dir": "../shared/data/cifar10-jpeg.tar.gz", "batch_size": 128, "epochs": 1,
    "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
    "lr_schedule": "onecycle", "cut": 1, "seed": 0, "limit_test": 2000,
}


def settings(deeper_tails: list[int]) -> list[dict]:
    return ([{"task": "10-class", "tail": 1, "defence": "none"}]
            + [{"task": "10-class", "tail": 1, "defence": "noise", "noise_ratio": r} for r in NOISE_RATIOS]
            + [{"task": "10-class", "tail": 1, "defence": "max_norm"}]
            + [{"task": "10-class", "tail": t, "defence": "none"} for t in deeper_tails]
            + [{"task": "binary", "tail": 1, "defence": d} for d in ("none", "max_norm")])


def task_labels(labels: torch.Tensor, setting: dict) -> torch.Tensor:
    return (labels == BINARY_POSITIVE_CLASS).long() if setting["task"] == "binary" else labels


def check_tail(stages: int, cut: int, tail: int) -> None:
    if tail < 1 or cut + tail >= stages:
        raise UserError(f"a tail of {tail} with --cut {cut} leaves the server no stage of the {stages}: "
                        f"choose a tail of 1..{stages - cut - 1}")


def split_three(model: torch.nn.Sequential, cut: int, tail: int):
    """(head, trunk, tail): the first ``cut`` stages, the middle, the last ``tail`` stages."""
    check_tail(len(model), cut, tail)
    head, rest = split_model(model, cut)
    trunk, tail_stages = split_model(rest, len(rest) - tail)
    return head, trunk, tail_stages


def defend(gradients: torch.Tensor, setting: dict, generator: torch.Generator) -> torch.Tensor:
    if setting["defence"] == "noise":
        return label_leakage.gaussian_noise_defence(gradients, setting["noise_ratio"], generator)
    if setting["defence"] == "max_norm":
        return label_leakage.max_norm_defence(gradients, generator)
    return gradients


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: data.TestSet, setting: dict) -> float:
    model.eval()
    correct = sum((model(test.batch(b)[0]).argmax(1) == task_labels(test.batch(b)[1], setting)).sum().item()
                  for b in range(test.num_batches))
    model.train()
    return correct / len(test.labels)


def run_setting(cfg, setting: dict, steps: int, window: int, shard: data.Shard, test: data.TestSet) -> dict:
    started = time.perf_counter()
    if setting["task"] == "binary":
        cfg = cfg.replace(num_classes=2)
    model = model_for(cfg)
    head, trunk, tail = split_three(model, cfg.cut, setting["tail"])
    optimizer = make_optimizer(cfg, model.parameters())
    schedule = LRSchedule(cfg.replace(epochs=1), steps)
    generator = torch.Generator().manual_seed(ATTACK_SEED)
    starts = sorted({0, max(0, steps // 2 - window // 2), max(0, steps - window)})
    collected: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in starts}
    losses = []
    for step in range(steps):
        epoch, index = divmod(step, shard.num_batches)
        images, labels = shard.batch(epoch, index)
        labels = task_labels(labels, setting)
        sent_down = trunk(head(images))
        received = sent_down.detach().requires_grad_(True)  # the hospital's copy of the trunk's output
        loss = F.cross_entropy(tail(received), labels)
        loss.backward()  # the tail's parameters, and the gradient the hospital returns
        returned = defend(received.grad, setting, generator)
        sent_down.backward(returned)
        apply_gradients(optimizer, None, schedule(step))
        losses.append(loss.item())
        for s in starts:
            if s <= step < s + window:
                collected[s].append((returned.detach().clone(), labels.clone()))
    points = []
    for s in starts:
        gradients = torch.cat([g for g, _ in collected[s]])
        labels = torch.cat([y for _, y in collected[s]])
        result = label_leakage.label_leakage_report(gradients, labels, cfg.num_classes, KNOWN_PER_CLASS, ATTACK_SEED)
        points.append({"steps": [s + 1, s + len(collected[s])], **result})
    return {"test_acc": evaluate(model, test, setting), "final_loss": sum(losses[-window:]) / min(window, len(losses)),
            "points": points, "seconds": time.perf_counter() - started,
            "gradient_shape": list(received.shape[1:])}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(path: str) -> str:
    """The README's table from a results file: each setting's attacks at the first and the last point."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    lines = ["| server receives | task | test acc | norm AUC | cosine AUC | direction acc | k-means acc "
             "(oracle) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "vanilla":
            lines.append("| labels (vanilla split) | 10-class | = local | 1 | 1 | 1.000 | 1.000 |")
            continue
        what = {"none": "gradient", "noise": f"gradient + noise x{r.get('noise_ratio')}",
                "max_norm": "gradient, max norm"}[r["defence"]]
        what += f", tail {r['tail']}"
        cells = []
        for key in ("norm_auc", "cosine_auc", "direction_mean_acc"):
            if key == "norm_auc" and r["task"] == "binary":
                values = [p["norm_auc_per_class"][1] for p in r["points"]]  # the rare positive class
            else:
                values = [p[key] for p in r["points"]]
            cells.append(f"{_fmt(values[0])} -> {_fmt(values[-1])}")
        first, last = r["points"][0], r["points"][-1]
        cells.append(f"{_fmt(first['cluster_known_acc'])} ({_fmt(first['cluster_oracle_acc'])}) -> "
                     f"{_fmt(last['cluster_known_acc'])} ({_fmt(last['cluster_oracle_acc'])})")
        lines.append(f"| {what} | {r['task']} | {r['test_acc']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.label_leakage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per setting")
    parser.add_argument("--window", type=int, default=4, help="consecutive batches attacked at each point")
    parser.add_argument("--deeper-tails", default="2,4", help="stages the hospital keeps in the deeper settings")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="override a training option of the emulation, e.g. --set dataset=synthetic")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/label_leakage.jsonl")
    parser.add_argument("--table", action="store_true", help="only print the README's table from --out")
    args = parser.parse_args(argv)
    try:
        if args.table:
            if not Path(args.out).exists():
                raise UserError(f"{args.out}: no results yet (python -m bench.label_leakage)")
            print(table(args.out))
            return 0
        try:
            deeper_tails = [int(t) for t in args.deeper_tails.split(",") if t]
        except ValueError:
            raise UserError(f"--deeper-tails expects comma-separated integers, got {args.deeper_tails!r}") from None
        if args.steps < 1 or args.window < 1 or args.window > args.steps:
            raise UserError(f"need 1 <= --window <= --steps, got --window {args.window} --steps {args.steps}")
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"--set expects OPTION=VALUE, got {item!r}")
            overrides[key.replace("-", "_")] = value
        cfg = from_dict({**BASE, **overrides})
        for setting in settings(deeper_tails):  # every bad tail is reported before any training
            check_tail(stage_count(cfg.model), cfg.cut, setting["tail"])
        torch.set_num_threads(args.threads)
        shard, test = data.load_shard(cfg, 1), data.load_test(cfg)
        common = {"record_version": 1, "git_commit": git_commit(), "model": cfg.model, "width": cfg.width,
                  "dataset": cfg.dataset, "cut": cfg.cut, "steps": args.steps, "batch_size": cfg.batch_size,
                  "known_per_class": KNOWN_PER_CLASS, "command": "python -m bench.label_leakage "
                  + " ".join(argv if argv is not None else sys.argv[1:])}
        append_jsonl(args.out, {**common, "mode": "vanilla", "tail": 0, "defence": "none",
                                "label_inference_acc": 1.0, "leak_auc": 1.0,
                                "note": "the server computes the loss: it receives every label"})
        for setting in settings(deeper_tails):
            print(f"[label-leakage] {setting}", flush=True)
            result = run_setting(cfg, setting, args.steps, args.window, shard, test)
            append_jsonl(args.out, {**common, "mode": "u-shaped (emulated)", **setting, **result})
            for p in result["points"]:
                norm_auc = p["norm_auc_per_class"][1] if setting["task"] == "binary" else p["norm_auc"]
                print(f"[label-leakage]   steps {p['steps']}: norm AUC {_fmt(norm_auc)}, cosine AUC "
                      f"{_fmt(p['cosine_auc'])}, direction acc {_fmt(p['direction_mean_acc'])}, k-means acc "
                      f"{_fmt(p['cluster_known_acc'])} (oracle {_fmt(p['cluster_oracle_acc'])})", flush=True)
            print(f"[label-leakage]   test acc {result['test_acc']:.3f}, {result['seconds']:.0f}s", flush=True)
        return 0
    except UserError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
