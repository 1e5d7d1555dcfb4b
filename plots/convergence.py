"""Figure and table of the long runs (bench/configs/convergence.toml, ``results/convergence.jsonl``).

Test accuracy per epoch of every method and split-learning variant, and against the
cumulative training traffic per hospital, a column per model and partition; the table gives final and best accuracy, the gap to centralized
training of the same model and partition, the training traffic per hospital and the
wall time. Everything is read from the run records.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt

from plots.engine import _model
from splitrpc.record import RunRecord, variant

MB = 1e6


def partition(cfg: dict) -> str:
    return "IID" if cfg["partition"] == "iid" else f"Dirichlet {cfg.get('alpha'):g}"


def _order(name: str) -> tuple:
    first = ("local", "ddp", "fedavg", "split (independent L1)")
    return (next((i for i, p in enumerate(first) if name.startswith(p)), len(first)), name)


def _best(record: dict) -> tuple[float, int]:
    epochs, accs = RunRecord.of(record).curve("test_acc_mean")
    best = max(range(len(accs)), key=accs.__getitem__)
    return accs[best], epochs[best]


def _cumulative_mb(record: dict) -> list[float] | None:
    """Training traffic per hospital (kernel TCP counters) at the end of each evaluated epoch, in MB."""
    run = RunRecord.of(record)
    per_epoch = run.bytes_per_epoch_per_hospital("tcp")
    if per_epoch is None:
        return None  # local training: one process, nothing crosses a network
    return [per_epoch * e / MB for e in run.curve("test_acc_mean")[0]]


def fig_convergence(records: list[dict], out_dir: Path, name: str, save) -> list[Path]:
    """Top row: test accuracy per epoch; bottom row: against training bytes per hospital (log scale)."""
    panels = defaultdict(list)
    for r in records:
        panels[(_model(r["config"]), partition(r["config"]))].append(r)
    if not panels:
        return []
    keys = sorted(panels)
    fig, axes = plt.subplots(2, len(keys), figsize=(5.4 * len(keys), 8.4), squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    names = sorted({variant(r["config"]) for r in records}, key=_order)
    for col, key in enumerate(keys):
        by_epoch, by_bytes = axes[0][col], axes[1][col]
        for r in sorted(panels[key], key=lambda r: _order(variant(r["config"]))):
            label = variant(r["config"])
            color = cmap(names.index(label) % 10)
            epochs, accs = RunRecord.of(r).curve("test_acc_mean")
            by_epoch.plot(epochs, accs, marker="o", markersize=3, color=color, label=label)
            if r["config"]["method"] == "split" and r["config"].get("l1") != "average":
                # Independent L1s: every hospital has its own model; the worst of them.
                by_epoch.plot(*RunRecord.of(r).curve("test_acc_min"), linestyle="--", color=color, alpha=0.5,
                              label=f"{label}, worst hospital")
            traffic = _cumulative_mb(r)
            if traffic is not None:
                by_bytes.plot(traffic, accs, marker="o", markersize=3, color=color, label=label)
            else:
                by_bytes.axhline(accs[-1], color=color, lw=0.8, ls=":", label=f"{label} (final; no network)")
        title = f"{key[0]}, {key[1]}, N={panels[key][0]['config']['hospitals']}"
        by_epoch.set_title(title, fontsize=9)
        by_epoch.set_xlabel("epoch")
        by_bytes.set_title(f"{title}: accuracy against communication", fontsize=9)
        by_bytes.set_xscale("log")
        by_bytes.set_xlabel("training traffic per hospital, cumulative (MB, kernel TCP counters)")
        for ax in (by_epoch, by_bytes):
            ax.set_ylabel("test accuracy (mean over hospitals)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    return save(fig, name, out_dir)


def convergence_table(records: list[dict]) -> list[str]:
    lines = ["## convergence (bench/configs/convergence.toml; settings in each record's config)", "",
             "| model | partition | variant | epochs | final acc (mean / min) | vs local (points) | best acc (epoch) "
             "| final train loss | train MB per hospital per epoch (tcp) | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    local = {(_model(r["config"]), partition(r["config"])): r["final_test_acc"]
             for r in records if r["config"]["method"] == "local"}
    for r in sorted(records, key=lambda r: (_model(r["config"]), partition(r["config"]), _order(variant(r["config"])))):
        cfg = r["config"]
        key = (_model(cfg), partition(cfg))
        gap = "" if key not in local else f"{100 * (r['final_test_acc'] - local[key]):+.2f}"
        best, best_epoch = _best(r)
        traffic = RunRecord.of(r).bytes_per_epoch_per_hospital("tcp")
        lines.append(f"| {key[0]} | {key[1]} | {variant(cfg)} | {len(r['epochs'])} | {r['final_test_acc']:.4f} / "
                     f"{r['final_test_acc_min']:.4f} | {gap} | {best:.4f} ({best_epoch}) | "
                     f"{r['epochs'][-1]['train_loss']:.4f} | {'' if traffic is None else f'{traffic / MB:.0f}'} | "
                     f"{r['wall_time_s']:.0f} |")
    return lines + [""]
