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
PREMISE_CURVES = "premise.jsonl"  # bench/configs/premise.toml: VGG-11 x0.5 cut 2, where the paper's premise holds
TTA_PREMISE_RESULTS = "wan_tta_premise.jsonl"  # bench/configs/wan_tta_premise.toml: their compute and checks
TTA_PREMISE_MACHINE = "wan_tta_premise_machine.jsonl"  # their references again on the machine of the newer curves
TTA_MACHINE = "wan_tta_machine.jsonl"  # wan_tta's references again (every variant's) on the current machine: x0.25's clock
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
    # One row of panels per model, data split and number of hospitals: the CPU-scale model first, IID at
    # N = 4 first within it, as in the README.
    def part_of(r):
        return r["model"], r["width"], r["partition"], r["alpha"], r["hospitals"]

    parts = sorted({part_of(r) for r in rows}, key=lambda p: (p[1], p[2] != "iid", -p[4]))
    fig, axes = plt.subplots(len(parts), len(TTA_RATES_BIT_S), figsize=(4.6 * len(TTA_RATES_BIT_S) + 3.2, 3.6 * len(parts)),
                             squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("tab20")  # more variants than tab10's colours
    names = sorted({r["variant"] for r in rows})

    def colour(variant):
        return cmap(names.index(variant) % 20) if variant in names else "k"

    measured = [c for c in tta.checks(curves, shaped, refs, calibration) if "epoch1" in c]
    whole = tta.full_checks(curves, list(full), refs, calibration, shaped)
    for i, (model, width, part, alpha, hospitals) in enumerate(parts):
        def here(c):  # a check of this row's setting (checks have no partition: they are all IID)
            return (c["model"], c["width"], c["hospitals"]) == (model, width, hospitals)

        for j, rate in enumerate(TTA_RATES_BIT_S):
            ax = axes[i][j]
            drawn = set()  # a variant's first seed is labelled and drawn full; its other seeds thin, unlabelled
            for row in sorted((r for r in rows if part_of(r) == (model, width, part, alpha, hospitals)),
                              key=lambda r: (r["variant"], r.get("seed", 0))):
                points = row["rates"][tta.rate_name(rate)]["curve"]
                first = row["variant"] not in drawn
                drawn.add(row["variant"])
                ax.plot([p["hours"] for p in points], [p["acc"] for p in points], marker="o" if first else None,
                        markersize=2.5, linewidth=1.5 if first else 0.8, alpha=1.0 if first else 0.5,
                        color=colour(row["variant"]), label=row["variant"] if first else None)
            if part == "iid":
                for k, c in enumerate(c for c in measured if c["rate_bit_s"] == rate and here(c)):
                    ax.plot(c["epoch1"]["measured_s"] / 3600, c["epoch1"]["acc_shaped"], "x",
                            color=colour(c["variant"]), markersize=7,
                            label="measured epoch 1 over the link (x)" if k == 0 else None)
                for k, c in enumerate(c for c in whole if c["rate_bit_s"] == rate and here(c)):
                    points = c["measured_curve"]
                    ax.plot([p["hours"] for p in points], [p["acc"] for p in points], ":", color=colour(c["variant"]),
                            linewidth=1.2, label="measured over the link, all epochs (dotted)" if k == 0 else None)
                    evaluated = [p for p in points if p["evaluated"]]
                    ax.plot([p["hours"] for p in evaluated], [p["acc"] for p in evaluated], "s",
                            color=colour(c["variant"]), markerfacecolor="none", markersize=5)
            ax.set_xscale("log")
            ax.set_title(f"{model} x{width:g}, {partition_name({'partition': part, 'alpha': alpha})}, N = {hospitals}, "
                         f"links at {rate / 1e6:g} Mbit/s", fontsize=9)
            ax.set_xlabel("training hours (compute measured + bytes / rate; RTT 0)")
            ax.set_ylabel("test accuracy (mean over hospitals)")
            ax.grid(True, which="both", alpha=0.3)
        # One legend a row, beside its last panel: colours are the same in every panel of the figure.
        axes[i][-1].legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("Time to accuracy, 15 epochs (VGG-11 x0.25: results/convergence.jsonl, N = 2: wan_tta_n2.jsonl; "
                 "x0.5 cut 2: premise.jsonl) on the clock of bench/time_to_accuracy.py", fontsize=9)
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
    return (ok(CURVES, TTA_N2_RESULTS, PREMISE_CURVES), ok(TTA_RESULTS, TTA_N2_RESULTS, TTA_PREMISE_RESULTS, TTA_PREMISE_MACHINE,
                                                                   TTA_MACHINE),
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
