"""Hospitals on slow links: seconds per epoch against link rate, split learning vs DDP.

    python -m plots    # also draws plots/wan/wan_epoch_vs_rate.{png,pdf} when results/wan.jsonl exists

Points: shaped runs (bench.wan), seconds per step measured x steps per epoch.
Lines: the time model (bench/timemodel.py) from each setting's unshaped run:
compute + bytes / rate, and dashed with a projected RTT of 50 ms (no delay
can be emulated here), DDP's transfer at the goodput of a link busy both ways
(results/link_duplex.json, when present). Every number comes from those files.

Time to accuracy (plots/wan/time_to_accuracy.{png,pdf}, when results/wan_tta.jsonl
and results/convergence.jsonl exist): the 15-epoch accuracy curves on the clock
of bench/time_to_accuracy.py at several link rates, the shaped first epochs
of bench/configs/wan_tta.toml as measured points, and the whole schedules of
bench/configs/wan_tta_full.toml (results/wan_tta_full.jsonl) as measured curves;
a row of panels for N = 2 from bench/configs/wan_tta_n2.toml when its results exist.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench import time_to_accuracy as tta  # noqa: E402
from bench import timemodel  # noqa: E402
from plots.convergence import partition as partition_name  # noqa: E402
from plots.figures import METHOD_LABEL, METHOD_STYLE, REPO, save  # noqa: E402
from splitrpc import record  # noqa: E402

RESULTS = "wan.jsonl"
TTA_RESULTS = "wan_tta.jsonl"  # bench/configs/wan_tta.toml
TTA_FULL_RESULTS = "wan_tta_full.jsonl"  # bench/configs/wan_tta_full.toml
TTA_N2_RESULTS = "wan_tta_n2.jsonl"  # bench/configs/wan_tta_n2.toml
TTA_FEDAVG_ROUNDS = "wan_fedavg_rounds.jsonl"  # bench/configs/wan_fedavg_rounds.toml: FedAvg at 1 Gbit/s again
CURVES = "convergence.jsonl"  # bench/configs/convergence.toml
TTA_RATES_BIT_S = (1e9, 100e6, 20e6)
CODEC_COLOURS = {"fp8": "tab:cyan", "bf16": "tab:purple", "fp16": "tab:olive"}
DUPLEX = "link_duplex.json"  # DDP's goodput with both directions busy, when measured
PROJECTED_RTT_S = 0.05
RATES = np.logspace(6, 10, 60)  # 1 Mbit/s .. 10 Gbit/s


def load(results_dir: Path) -> list[dict]:
    path = results_dir / RESULTS
    if not path.exists():
        return []
    return [r for r in timemodel.load(str(path)) if r.get("status") == "ok" and r.get("wan")]


def settings(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{(model, hospitals): {method: unshaped reference record}}."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if timemodel.is_reference(r):
            cfg = r["config"]
            out.setdefault((cfg["model"], cfg["hospitals"]), {})[record.variant(cfg, "codec")] = r
    return dict(sorted(out.items()))


def duplex(results_dir: Path):
    """The committed duplex calibration (bench.link_duplex) that results/wan_model.json was computed with."""
    path = results_dir / DUPLEX
    return timemodel.load_duplex(str(path)) if path.exists() else None


def fig_epoch_vs_rate(records: list[dict], out_dir: Path, name: str, calibration=None) -> list[Path]:
    groups = settings(records)
    if not groups:
        return []
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False)
    for ax, ((model, n), refs) in zip(axes[0], groups.items()):
        for variant, ref in sorted(refs.items()):
            method, _, codec = variant.partition("+")
            color, marker = METHOD_STYLE[method]
            if codec:  # a codec's line: split learning's marker, its own colour
                color = CODEC_COLOURS.get(codec, "tab:brown")
            label = METHOD_LABEL[method] + (f" ({codec} cut)" if codec else "")
            steps = ref["steps_per_epoch"]
            ax.plot(RATES / 1e6, [timemodel.at_rate(ref, r, 0.0, calibration) * steps for r in RATES], color=color,
                    label=f"{label}: model")
            ax.plot(RATES / 1e6, [timemodel.at_rate(ref, r, PROJECTED_RTT_S, calibration) * steps for r in RATES],
                    color=color,
                    ls="--", lw=1, label=f"{label}: model + RTT {PROJECTED_RTT_S * 1000:g} ms (projected)")
            shaped = [r for r in records if not timemodel.is_reference(r) and timemodel.setting(r) == timemodel.setting(ref)]
            ax.plot([r["wan"]["rate_bit_s"] / 1e6 for r in shaped],
                    [r["train_time_s"] / r["steps"] * steps for r in shaped], marker, color=color, ls="none",
                    label=f"{label}: measured")
        if "split" in refs and "ddp" in refs:
            cross = timemodel.crossover(refs["split"], refs["ddp"], duplex=calibration)
            if cross["rate_bit_s"]:
                ax.axvline(cross["rate_bit_s"] / 1e6, color="gray", lw=0.8, ls=":")
                side = "below" if cross["split_faster_below"] else "above"
                ax.annotate(f"split faster {side} {cross['rate_bit_s'] / 1e6:.0f} Mbit/s",
                            (cross["rate_bit_s"] / 1e6, 0.95),
                            xycoords=("data", "axes fraction"), fontsize=7, ha="left")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate per hospital (Mbit/s, both directions)")
        ax.set_ylabel("seconds per epoch")
        ax.set_title(f"{model}, N = {n}, cut 1, batch 128/hospital", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Hospitals on shaped links (network namespaces + tbf; server link unshaped)", fontsize=9)
    fig.tight_layout()
    paths = save(fig, name, out_dir)
    plt.close(fig)
    return paths


def fig_time_to_accuracy(curves: list[dict], shaped: list[dict], out_dir: Path, name: str,
                         calibration=None, full=()) -> list[Path]:
    refs = tta.compute_references(shaped)
    rows = tta.project(curves, refs, rates=TTA_RATES_BIT_S, duplex=calibration)
    if not rows:
        return []
    # One row of panels per data split and number of hospitals: IID at N = 4 first, as in the README.
    parts = sorted({(r["partition"], r["alpha"], r["hospitals"]) for r in rows}, key=lambda p: (p[0] != "iid", -p[2]))
    fig, axes = plt.subplots(len(parts), len(TTA_RATES_BIT_S), figsize=(4.6 * len(TTA_RATES_BIT_S), 3.6 * len(parts)),
                             squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    names = sorted({r["variant"] for r in rows})
    measured = [c for c in tta.checks(curves, shaped, refs, calibration) if "epoch1" in c]
    whole = tta.full_checks(curves, list(full), refs, calibration)
    for i, (part, alpha, hospitals) in enumerate(parts):
        for j, rate in enumerate(TTA_RATES_BIT_S):
            ax = axes[i][j]
            for row in (r for r in rows if (r["partition"], r["alpha"], r["hospitals"]) == (part, alpha, hospitals)):
                points = row["rates"][tta.rate_name(rate)]["curve"]
                ax.plot([p["hours"] for p in points], [p["acc"] for p in points], marker="o", markersize=2.5,
                        color=cmap(names.index(row["variant"]) % 10), label=row["variant"])
            if part == "iid":
                for c in (c for c in measured if (c["rate_bit_s"], c["hospitals"]) == (rate, hospitals)):
                    ax.plot(c["epoch1"]["measured_s"] / 3600, c["epoch1"]["acc_shaped"], "kx", markersize=7,
                            label=f"measured epoch 1 over the link ({c['method']})")
                for c in (c for c in whole if (c["rate_bit_s"], c["hospitals"]) == (rate, hospitals)):
                    points = c["measured_curve"]
                    colour = cmap(names.index(c["variant"]) % 10) if c["variant"] in names else "k"
                    ax.plot([p["hours"] for p in points], [p["acc"] for p in points], ":", color=colour, linewidth=1.2,
                            label=f"measured over the link, all epochs ({c['variant']})")
                    evaluated = [p for p in points if p["evaluated"]]
                    ax.plot([p["hours"] for p in evaluated], [p["acc"] for p in evaluated], "s", color=colour,
                            markerfacecolor="none", markersize=5)
            ax.set_xscale("log")
            ax.set_title(f"{partition_name({'partition': part, 'alpha': alpha})}, N = {hospitals}, hospital links at "
                         f"{rate / 1e6:g} Mbit/s", fontsize=9)
            ax.set_xlabel("training hours (compute measured + bytes / rate; RTT 0)")
            ax.set_ylabel("test accuracy (mean over hospitals)")
            ax.grid(True, which="both", alpha=0.3)
            # The IID curves rise steeply late: their lower right stays clear; the Dirichlet ones' upper left does.
            ax.legend(fontsize=5.5, loc="lower right" if part == "iid" else "upper left")
    fig.suptitle("Time to accuracy: VGG-11 x0.25, 15 epochs (results/convergence.jsonl, N = 2: wan_tta_n2.jsonl) "
                 "on the clock of bench/time_to_accuracy.py", fontsize=9)
    paths = save(fig, name, out_dir)
    plt.close(fig)
    return paths


def load_tta(results_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(curves, one-epoch runs, whole schedules) as bench.time_to_accuracy's README command reads them:
    wan_tta_n2 holds N = 2's curves, compute references, shaped first epochs and whole schedules together."""
    def ok(*names):
        return tta.load_ok(*[str(results_dir / n) for n in names if (results_dir / n).exists()])

    if not ((results_dir / TTA_RESULTS).exists() and (results_dir / CURVES).exists()):
        return [], [], []
    return (ok(CURVES, TTA_N2_RESULTS), ok(TTA_RESULTS, TTA_N2_RESULTS),
            ok(TTA_FULL_RESULTS, TTA_N2_RESULTS, TTA_FEDAVG_ROUNDS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plots (wan)", add_help=False)
    parser.add_argument("--results-dir", default=str(REPO / "results"))
    # A folder of its own: plots/figures holds exactly what plots.figures draws (tests/test_plots.py).
    parser.add_argument("--wan-out-dir", default=str(REPO / "plots" / "wan"))
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    results = Path(args.results_dir)
    written = fig_epoch_vs_rate(load(results), Path(args.wan_out_dir), "wan_epoch_vs_rate", duplex(results))
    curves, shaped, full = load_tta(results)
    written += fig_time_to_accuracy(curves, shaped, Path(args.wan_out_dir), "time_to_accuracy", duplex(results), full)
    for path in written:
        print(f"plots: wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0
