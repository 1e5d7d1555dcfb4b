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
        drawn = set()
        for r in sorted(panels[key], key=lambda r: (_order(variant(r["config"])), r["config"].get("seed", 0))):
            label = variant(r["config"])
            color = cmap(names.index(label) % 10)
            epochs, accs = RunRecord.of(r).curve("test_acc_mean")
            repeat = label in drawn  # another seed of a variant drawn already: the same colour, one legend entry
            drawn.add(label)
            by_epoch.plot(epochs, accs, marker="o", markersize=3, color=color, label="_" + label if repeat else label)
            if repeat:
                traffic = _cumulative_mb(r)
                if traffic is not None:
                    by_bytes.plot(traffic, accs, marker="o", markersize=3, color=color)
                continue
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


def _setting(cfg: dict) -> tuple[str, str, int]:
    return _model(cfg), partition(cfg), cfg.get("epochs", 0)


def by_variant(records: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """{(model, partition, epochs): {variant: its runs (every seed)}} of the whole-schedule runs."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if RunRecord.of(r).whole_schedule:
            groups[_setting(r["config"])][variant(r["config"])].append(r)
    return groups


def _summary(runs: list[dict]) -> dict:
    accs = [r["final_test_acc"] for r in runs]
    traffic = [RunRecord.of(r).bytes_per_epoch_per_hospital("tcp") for r in runs]
    return {"n": len(runs), "mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs),
            "seeds": sorted(r["config"].get("seed", 0) for r in runs),
            "bytes": None if traffic[0] is None else sum(traffic) / len(traffic)}


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (bytes, accuracy, name) points that no other point beats in both (fewer bytes, higher accuracy)."""
    front, best = [], float("-inf")
    for b, acc, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((b, acc, name))
            best = acc
    return front


def fig_pareto(records: list[dict], out_dir: Path, name: str, save) -> list[Path]:
    """Final accuracy (mean over seeds, bar: min to max) against training bytes per hospital per epoch, with
    the Pareto front; methods that move no bytes (local) as a horizontal line. A panel per setting."""
    groups = {k: v for k, v in by_variant(records).items() if k[2] >= 15}
    if not groups:
        return []
    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 5.2), squeeze=False, constrained_layout=True)
    for ax, key in zip(axes[0], keys):
        points = []
        for label, runs in sorted(groups[key].items(), key=lambda kv: _order(kv[0])):
            s = _summary(runs)
            if s["bytes"] is None:
                ax.axhline(s["mean"], color="grey", lw=0.8, ls=":")
                ax.annotate(f"{label} (no network)", (0.01, s["mean"]), xycoords=("axes fraction", "data"),
                            fontsize=7, va="bottom", color="grey")
                continue
            points.append((s["bytes"] / MB, s["mean"], label))
            ax.errorbar([s["bytes"] / MB], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]],
                        fmt="o", ms=4, capsize=2)
            ax.annotate(f"{label}" + (f" (n={s['n']})" if s["n"] > 1 else ""), (s["bytes"] / MB, s["mean"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto(points)
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C3", lw=1,
                    label="Pareto front (fewer bytes, higher accuracy)")
            ax.legend(fontsize=7, loc="best")
        ax.margins(y=0.08)  # a point at the edge of the range stays clear of the frame
        ax.set_xscale("log")
        ax.set_xlabel("training traffic per hospital per epoch (MB, kernel TCP counters)")
        ax.set_ylabel(f"final test accuracy after {key[2]} epochs (mean over seeds)")
        ax.set_title(f"{key[0]}, {key[1]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    return save(fig, name, out_dir)


def variants_table(records: list[dict]) -> list[str]:
    """One row per variant over its seeds: final accuracy mean (min-max, n), bytes per hospital per epoch and
    how many times fewer than float32 split learning with the same L1 handling, and whether it is on the
    Pareto front."""
    lines = ["## accuracy at convergence by variant, over seeds (whole schedules only)", "",
             "| model | partition | epochs | variant | final acc mean (min-max, n) | seeds | MB per hospital per epoch "
             "(tcp) | x fewer bytes than float32 split | Pareto front |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, variants in sorted(by_variant(records).items()):
        summaries = {label: _summary(runs) for label, runs in variants.items()}
        front = {p[2] for p in pareto([(s["bytes"], s["mean"], label) for label, s in summaries.items()
                                       if s["bytes"] is not None])}
        for label, s in sorted(summaries.items(), key=lambda kv: _order(kv[0])):
            plain = summaries.get(_float32_split(label))
            fewer = "" if s["bytes"] is None or plain is None or plain["bytes"] is None \
                else f"{plain['bytes'] / s['bytes']:.1f}"
            mb = "" if s["bytes"] is None else f"{s['bytes'] / MB:.0f}"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {label} | {s['mean']:.4f} ({s['min']:.4f}-{s['max']:.4f}, "
                         f"{s['n']}) | {', '.join(map(str, s['seeds']))} | {mb} | {fewer} | "
                         f"{'yes' if label in front else ''} |")
    return lines + [""]


def _float32_split(label: str) -> str | None:
    """The float32 split variant with the same L1 handling and cut as ``label`` (a codec or bottleneck dropped;
    local loss and SplitFed: split learning with independent L1s at the same cut), or None."""
    method, _, rest = label.partition(" (")
    if method not in ("split", "split-localloss", "splitfed"):
        return None
    parts = [p for p in rest.rstrip(")").split(", ") if p
             and not (p.startswith(("top-k", "random ", "bottleneck", "V", "averaged every"))
                      or p in ("fp8", "bf16", "fp16", "feedback"))]
    if method != "split":
        parts = ["independent L1", *parts]
    return f"split ({', '.join(parts)})"


def convergence_table(records: list[dict], name: str = "convergence") -> list[str]:
    """The variants over seeds, then every run, of one config (convergence.toml, premise.toml)."""
    return variants_table(records) + runs_table(records, name)


def runs_table(records: list[dict], name: str = "convergence") -> list[str]:
    lines = [f"## {name} (bench/configs/{name}.toml; every run, settings in each record's config)", "",
             "| model | partition | variant | seed | epochs | final acc (mean / min) | vs local (points) | best acc (epoch) "
             "| final train loss | train MB per hospital per epoch (tcp) | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    # Each run against local training of the same model (a GroupNorm run against GroupNorm's local).
    local = {(_model(r["config"]), partition(r["config"]), r["config"].get("norm", "batch")): r["final_test_acc"]
             for r in records if r["config"]["method"] == "local" and r["config"].get("seed", 0) == 0}
    for r in sorted(records, key=lambda r: (_model(r["config"]), partition(r["config"]), _order(variant(r["config"])))):
        cfg = r["config"]
        key = (_model(cfg), partition(cfg), cfg.get("norm", "batch"))
        gap = "" if key not in local else f"{100 * (r['final_test_acc'] - local[key]):+.2f}"
        best, best_epoch = _best(r)
        traffic = RunRecord.of(r).bytes_per_epoch_per_hospital("tcp")
        lines.append(f"| {key[0]} | {key[1]} | {variant(cfg)} | {cfg.get('seed', 0)} | {len(r['epochs'])} | "
                     f"{r['final_test_acc']:.4f} / "
                     f"{r['final_test_acc_min']:.4f} | {gap} | {best:.4f} ({best_epoch}) | "
                     f"{r['epochs'][-1]['train_loss']:.4f} | {'' if traffic is None else f'{traffic / MB:.0f}'} | "
                     f"{_wall(r)} |")
    return lines + [""]


def _wall(r: dict) -> str:
    """A resumed run's record times only what ran after the resume, so say so rather than
    let it read as the whole run's wall time."""
    resumed = r.get("resumed_from_step")
    return f"{r['wall_time_s']:.0f}" + (f" (resumed at step {resumed})" if resumed else "")
