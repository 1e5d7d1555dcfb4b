"""Figures and the summary table, from the committed raw results only.

    python -m plots            # (make plots) results/*.jsonl -> plots/figures/*.{png,pdf}, plots/summary.md
                               # (and, by plots.wan and plots.docs, plots/wan/ and docs/options.md, docs/results/)

Every number drawn here is read from a run record; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from plots import convergence, engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHOD_STYLE = {"local": ("tab:gray", "s"), "split": ("tab:blue", "o"), "ddp": ("tab:orange", "^"),
                "fedavg": ("tab:green", "D"), "split-local": ("tab:purple", "x")}
METHOD_LABEL = {"local": "local (centralized)", "split": "split learning", "ddp": "DDP (sync. SGD)",
                "fedavg": "FedAvg", "split-local": "split (one-process reference)"}
GB = 1e9


# --------------------------------------------------------------------------- loading
def load_results(results_dir: Path) -> dict[str, list[dict]]:
    """{experiment name: [successful run records]}; failed runs and torn lines are skipped."""
    experiments = {}
    for path in sorted(results_dir.glob("*.jsonl")):
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            # Records with a "kind" are not training runs (bench.chaos trials, bench.scale runs): their
            # own modules make their tables.
            if record.get("status") == "ok" and "kind" not in record:
                records.append(record)
        if records:
            experiments[path.stem] = records
    return experiments


def model_label(cfg: dict) -> str:
    width = f" x{cfg['width']:g}" if cfg.get("width", 1.0) != 1.0 else ""
    data = {"imagefolder": "CIFAR-10 (JPEG)", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(
        cfg["dataset"], f"{cfg['num_classes']} classes (synthetic data)")
    return f"{cfg['model']}{width}, {data}"


def train_bytes_per_hospital_epoch(record: dict, kind: str = "tcp") -> float | None:
    comm = record.get("comm")
    if not comm:
        return None
    entry = comm["per_epoch"].get(kind)
    return entry and entry["per_hospital"]


# No date and no matplotlib version in the files: `make plots` on the committed results must
# leave a clean tree (tests/test_plots.py compares bytes).
REPRODUCIBLE_METADATA = {".pdf": {"CreationDate": None, "Creator": None, "Producer": None},
                         ".png": {"Software": None}}


def save(fig, name: str, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight", metadata=REPRODUCIBLE_METADATA[p.suffix])
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- figures
def setup_note(records: list[dict]) -> str:
    """What the runs of a figure share, read from their configs."""
    effective = sorted({r["config"]["hospitals"] * r["config"]["batch_size"] for r in records})
    per_hospital = sorted({r["config"]["batch_size"] for r in records})
    epochs = sorted({r["config"]["epochs"] for r in records})
    return (f"batch per hospital {', '.join(map(str, per_hospital))}; effective batch per step "
            f"{', '.join(map(str, effective))}; {', '.join(map(str, epochs))} epoch(s).")


def fig_comm_vs_hospitals(records: list[dict], out_dir: Path, name: str, note: str) -> list[Path]:
    """Training bytes per hospital per epoch vs number of hospitals, split vs DDP, a panel per model."""
    panels = defaultdict(lambda: defaultdict(list))
    for r in records:
        cfg = r["config"]
        if cfg["method"] in ("split", "ddp") and r.get("comm"):
            panels[model_label(cfg)][cfg["method"]].append(r)
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False,
                             constrained_layout=True)
    extrapolated = False
    for ax, (label, methods) in zip(axes[0], sorted(panels.items())):
        for method, runs in sorted(methods.items()):
            runs = sorted(runs, key=lambda r: r["config"]["hospitals"])
            n = [r["config"]["hospitals"] for r in runs]
            color, marker = METHOD_STYLE[method]
            for kind, style in (("tcp", dict(marker=marker)), ("analytic", dict(linestyle=":"))):
                points = [(k, train_bytes_per_hospital_epoch(r, kind)) for k, r in zip(n, runs)]
                points = [(k, b / GB) for k, b in points if b is not None]  # no TCP counts where `ss` was missing
                if points:
                    ax.plot(*zip(*points), color=color, **style,
                            label=f"{METHOD_LABEL[method]}, {'TCP measured' if kind == 'tcp' else 'analytic'}")
            extrapolated |= any(r["comm"]["extrapolated"] for r in runs)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["config"]["hospitals"] for rs in methods.values() for r in rs}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_yaxis().set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.get_yaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.get_yaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("hospitals N")
        ax.set_ylabel("training traffic per hospital per epoch (GB)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    caption = f"{note} {setup_note(records)}" + (" Per-epoch bytes extrapolated from the steps measured (bytes "
                                                "do not depend on image content)." if extrapolated else "")
    fig.supxlabel(caption, fontsize=8)
    return save(fig, name, out_dir)


def _grid(keys):
    models = sorted({k[0] for k in keys})
    ns = sorted({k[1] for k in keys})
    return models, ns


def fig_accuracy_vs_epoch(records: list[dict], out_dir: Path, name: str) -> list[Path]:
    runs = defaultdict(dict)
    for r in records:
        cfg = r["config"]
        runs[(model_label(cfg), cfg["hospitals"])][cfg["method"]] = r
    if not runs:
        return []
    models, ns = _grid(runs)
    fig, axes = plt.subplots(len(models), len(ns), figsize=(4 * len(ns), 3.2 * len(models)), squeeze=False,
                             constrained_layout=True)
    for i, model in enumerate(models):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            for method, r in sorted(runs.get((model, n), {}).items()):
                epochs = [e for e in r["epochs"] if "test_acc_mean" in e]
                color, marker = METHOD_STYLE[method]
                ax.plot([e["epoch"] for e in epochs], [e["test_acc_mean"] for e in epochs], marker=marker,
                        color=color, label=METHOD_LABEL[method])
                if method == "split":  # the worst hospital's model, for split learning's independent L1s
                    ax.plot([e["epoch"] for e in epochs], [e["test_acc_min"] for e in epochs], linestyle="--",
                            color=color, alpha=0.6, label="split, worst hospital")
            ax.set_title(f"{model}, N={n}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy")
            ax.grid(True, alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    return save(fig, name, out_dir)


def fig_accuracy_vs_bytes(records: list[dict], out_dir: Path, name: str) -> list[Path]:
    """Test accuracy against cumulative training bytes on the wire (epochs x measured bytes per epoch)."""
    panels = defaultdict(list)
    for r in records:
        if r["config"]["method"] in ("split", "ddp") and r.get("comm"):
            panels[model_label(r["config"])].append(r)
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False,
                             constrained_layout=True)
    for ax, (label, runs) in zip(axes[0], sorted(panels.items())):
        for r in sorted(runs, key=lambda r: (r["config"]["method"], r["config"]["hospitals"])):
            cfg = r["config"]
            per_epoch = r["comm"]["per_epoch"]["tcp"]["total"]
            epochs = [e for e in r["epochs"] if "test_acc_mean" in e]
            color, marker = METHOD_STYLE[cfg["method"]]
            alpha = {2: 1.0, 4: 0.7, 8: 0.45}.get(cfg["hospitals"], 0.3)
            ax.plot([e["epoch"] * per_epoch / GB for e in epochs], [e["test_acc_mean"] for e in epochs],
                    marker=marker, color=color, alpha=alpha, label=f"{cfg['method']} N={cfg['hospitals']}")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative training traffic, all parties (GB, TCP)")
        ax.set_ylabel("test accuracy")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return save(fig, name, out_dir)


def fig_three_ways(experiments: dict[str, list[dict]], out_dir: Path, name: str) -> list[Path]:
    """TCP-measured and payload bytes of the training phase, relative to the analytic count."""
    rows = []
    for experiment, r in ((e, r) for e, records in experiments.items() for r in records):
        phases = (r.get("comm") or {}).get("phases", {})
        train = phases.get("train", {})
        if train.get("analytic_bytes") and train.get("tcp_bytes"):
            cfg = r["config"]
            a = train["analytic_bytes"]["total"]
            rows.append((f"{cfg['method']} {model_label(cfg).split(',')[0]} N={cfg['hospitals']} ({experiment})",
                         train["payload_bytes"]["total"] / a, train["tcp_bytes"]["total"] / a))
    if not rows:
        return []
    rows.sort()
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(rows)), 4.5), constrained_layout=True)
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], width=0.4, label="payload: our code's own count (bookkeeping) / analytic")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], width=0.4, label="kernel TCP bytes (independent measurement) / analytic")
    ax.axhline(1.0, color="k", linewidth=0.8)
    lo = min(min(r[1], r[2]) for r in rows)
    hi = max(max(r[1], r[2]) for r in rows)
    ax.set_ylim(min(0.99, lo - 0.005), hi + 0.01)
    ax.set_xticks(list(x))
    ax.set_xticklabels([r[0] for r in rows], rotation=75, ha="right", fontsize=6)
    ax.set_ylabel("ratio to analytic bytes (training phase)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return save(fig, name, out_dir)


def fig_dedup(records: list[dict], out_dir: Path, name: str) -> list[Path]:
    """Training bytes, time per epoch and accuracy against overlap, with and without deduplication."""
    series = defaultdict(list)
    for r in records:
        series[r["config"]["dedup"]].append(r)
    if not series:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    for mode, runs in sorted(series.items()):
        runs.sort(key=lambda r: r["config"]["overlap"])
        x = [100 * r["config"]["overlap"] for r in runs]
        label = "no deduplication" if mode == "none" else f"deduplicated ({mode})"
        style = dict(marker="o" if mode == "none" else "s", label=label)
        axes[0].plot(x, [r["comm"]["per_epoch"]["tcp"]["total"] / GB for r in runs], **style)
        axes[1].plot(x, [r["train_time_s"] / len(r["epochs"]) for r in runs], **style)
        axes[2].plot(x, [r["final_test_acc"] for r in runs], **style)
    for ax, ylabel in zip(axes, ("training traffic per epoch, all parties (GB, TCP)", "training time per epoch (s)",
                                 "final test accuracy (mean over hospitals)")):
        ax.set_xlabel("overlap: records copied to another hospital (%)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    return save(fig, name, out_dir)


def defence_label(d: dict) -> str:
    parts = [f"cut {d['cut']}"]
    if d.get("method", "split") != "split":  # rows from before the cut designs have no such key
        parts.append(d["method"].replace("split-", ""))
    if d.get("bottleneck", 1) > 1:
        parts.append(f"bottleneck {d['bottleneck']}")
    if d["noise"]:
        parts.append(f"noise {d['noise']:g}")
    if d["nopeek"]:
        parts.append(f"NoPeek {d['nopeek']:g}")
    if d.get("codec", "none") != "none":  # rows from before the codecs have no such key
        parts.append(f"top-k 1/{d['topk_ratio']}" if d["codec"] == "topk" else d["codec"])
    if d.get("labels") == "hospital":
        parts.append(f"U-shaped, tail {d['tail']}")
    return ", ".join(parts)


def fig_privacy(attacks: list[dict], out_dir: Path, name: str) -> list[Path]:
    """Privacy, utility and communication of each defence in one plot."""
    if not attacks:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), constrained_layout=True)
    mb = [a["train_bytes_per_hospital_per_epoch"] / 1e6 for a in attacks]
    for ax, metric, label in ((axes[0], "ssim", "reconstruction SSIM"), (axes[1], "psnr", "reconstruction PSNR (dB)")):
        points = ax.scatter([a["black_box"][metric] for a in attacks], [a["test_acc"] for a in attacks], c=mb,
                            cmap="viridis", s=70, label="black box (server without L1's weights)", zorder=3)
        ax.scatter([a["white_box"][metric] for a in attacks], [a["test_acc"] for a in attacks], c=mb, cmap="viridis",
                   s=70, marker="^", edgecolors="k", label="white box (L1's weights known)", zorder=3)
        for a in attacks:
            ax.annotate(defence_label(a["defence"]), (a["black_box"][metric], a["test_acc"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"{label} (higher = more leakage)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Reconstructing hospital images from the activations the server received, against test accuracy",
                 fontsize=10)
    fig.colorbar(points, ax=axes, label="training traffic per hospital per epoch (MB)")
    return save(fig, name, out_dir)


def fig_privacy_grid(attacks: list[dict], grids_dir: Path, out_dir: Path, name: str) -> list[Path]:
    import numpy as np

    rows, labels = [], []
    for a in attacks:
        path = grids_dir / f"{a['run_key']}.npz"
        if not path.exists():
            continue
        grid = np.load(path)
        if not rows:
            rows.append(grid["original"])
            labels.append("original")
        rows += [grid["black_box"], grid["white_box"]]
        labels += [f"{defence_label(a['defence'])}\nblack box", f"{defence_label(a['defence'])}\nwhite box"]
    if not rows:
        return []
    columns = min(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns + 1.6, 1.1 * len(rows)), squeeze=False)
    for i, (images, label) in enumerate(zip(rows, labels)):
        for j in range(columns):
            axes[i][j].imshow(images[j].transpose(1, 2, 0), interpolation="nearest")
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    return save(fig, name, out_dir)


# --------------------------------------------------------------------------- summary
def _gb(x):
    return "" if x is None else f"{x / GB:.3f}"


def privacy_table(attacks: list[dict]) -> list[str]:
    lines = ["## privacy (attacks on what the server received)", "",
             "| defence | test acc (mean / min) | activation shape | train MB per hospital per epoch | dCor | "
             "dCor R* (bias-corrected) | black-box PSNR (dB) | black-box SSIM | white-box PSNR (dB) | white-box SSIM | "
             "label inference acc (chance) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in sorted(attacks, key=lambda a: (a["defence"]["cut"], a["defence"]["noise"], a["defence"]["nopeek"],
                                             a["defence"].get("codec", "none"), a["defence"].get("tail", 0))):
        lines.append(
            f"| {defence_label(a['defence'])} | {a['test_acc']:.4f} / {a['test_acc_min']:.4f} | "
            f"{'x'.join(map(str, a['activation_shape']))} | {a['train_bytes_per_hospital_per_epoch'] / 1e6:.1f} | "
            f"{a['dcor']:.3f} | {a['dcor_bias_corrected']:.3f} | {a['black_box']['psnr']:.2f} | "
            f"{a['black_box']['ssim']:.3f} | {a['white_box']['psnr']:.2f} | {a['white_box']['ssim']:.3f} | "
            f"{label_leak_text(a.get('labels'))} |")
    return lines + [""]


def label_leak_text(labels: dict | None) -> str:
    """Rows attacked before the label attacks existed have none: the server held the labels there."""
    if labels is None or labels.get("server_has_labels", True):
        return "1 (holds them)"
    return f"{labels['direction_mean_acc']:.3f} ({labels['chance']:.2f})"


def dedup_table(records: list[dict]) -> list[str]:
    lines = ["## dedup (duplicated records and their removal)", "",
             "| overlap | dedup | records before | records after | dropped | protocol bytes (TCP) | protocol time (s) | "
             "train GB per epoch, all (tcp) | train time per epoch (s) | final acc (mean / min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["config"]["overlap"], r["config"]["dedup"])):
        cfg, dedup = r["config"], r.get("dedup") or {}
        protocol = r["comm"]["phases"].get("dedup") or {}
        tcp = (protocol.get("tcp_bytes") or {}).get("total")
        before = dedup.get("records_before") or [h["train_samples"] for h in r.get("hospitals", [])]
        after = dedup.get("records_after") or before
        lines.append(
            f"| {100 * cfg['overlap']:.0f} % | {cfg['dedup']} | {sum(before)} | {sum(after)} | "
            f"{dedup.get('dropped', 0)} | {'' if not tcp else f'{tcp / 1e6:.2f} MB'} | "
            f"{'' if not dedup else format(dedup['seconds'], '.2f')} | {_gb(r['comm']['per_epoch']['tcp']['total'])} | "
            f"{r['train_time_s'] / len(r['epochs']):.0f} | {r['final_test_acc']:.4f} / {r['final_test_acc_min']:.4f} |")
    return lines + [""]


# These have tables of their own (variants and codecs, not methods side by side).
OWN_TABLES = {"throughput": engine.throughput_table, "codec": engine.codec_table,
              "convergence": convergence.convergence_table,
              "premise": lambda records: convergence.convergence_table(records, "premise")}


def method_table(name: str, records: list[dict]) -> list[str]:
    """The methods of one experiment side by side: one row per run."""
    lines = [f"## {name}", "",
             "| method | model | N | batch/hospital | epochs | steps | final acc (mean / min) | "
             "train GB per hospital per epoch (tcp) | train GB per epoch, all (tcp) | tcp/payload | "
             "wall time (s) | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (model_label(r["config"]), r["config"]["hospitals"],
                                            r["config"]["method"])):
        cfg, comm = r["config"], r.get("comm") or {}
        per_epoch = (comm.get("per_epoch") or {}).get("tcp") or {}
        train = (comm.get("phases") or {}).get("train") or {}
        acc = r.get("final_test_acc")
        acc_text = "" if acc is None else f"{acc:.4f} / {r.get('final_test_acc_min', acc):.4f}"
        ratio = train.get("tcp_over_payload")
        extrapolated = " (extrapolated)" if comm.get("extrapolated") else ""
        lines.append(
            f"| {cfg['method']} | {model_label(cfg)} | {cfg['hospitals']} | {cfg['batch_size']} | "
            f"{cfg['epochs']} | {r.get('steps')} | {acc_text} | {_gb(per_epoch.get('per_hospital'))}{extrapolated} | "
            f"{_gb(per_epoch.get('total'))} | {'' if ratio is None else f'{ratio:.4f}'} | "
            f"{r.get('wall_time_s', 0):.0f} | {r.get('samples_per_s') or 0:.0f} |")
    return lines + [""]


def experiment_table(name: str, records: list[dict]) -> list[str]:
    """The table of one experiment (one results/<name>.jsonl) in plots/summary.md and docs/results/."""
    return OWN_TABLES[name](records) if name in OWN_TABLES else method_table(name, records)


def summary_table(experiments: dict[str, list[dict]]) -> str:
    lines = ["# Results summary", "",
             "Generated by `make plots` from `results/*.jsonl`; do not edit by hand.", ""]
    experiments = dict(experiments)
    attacks = experiments.pop("privacy_attacks", None)
    for name, records in sorted(experiments.items()):
        lines += experiment_table(name, records)
    if experiments.get("dedup"):
        lines += dedup_table(experiments["dedup"])
    if attacks:
        lines += privacy_table(attacks)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=str(REPO / "results"))
    parser.add_argument("--out-dir", default=str(REPO / "plots" / "figures"))
    parser.add_argument("--summary", default=str(REPO / "plots" / "summary.md"))
    args = parser.parse_args(argv)
    experiments = load_results(Path(args.results_dir))
    if not experiments:
        print(f"plots: error: no successful runs in {args.results_dir}/*.jsonl", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    written = []
    if "cpu" in experiments:
        cpu = experiments["cpu"]
        written += fig_accuracy_vs_epoch(cpu, out, "accuracy_vs_epoch")
        written += fig_accuracy_vs_bytes(cpu, out, "accuracy_vs_bytes")
        written += fig_comm_vs_hospitals(cpu, out, "comm_vs_hospitals_cpu", "CPU runs: narrow models, CIFAR-10 JPEG;")
    if "paper_comm" in experiments:
        written += fig_comm_vs_hospitals(experiments["paper_comm"], out, "comm_vs_hospitals",
                                         "Paper scale: full-width models over TCP;")
    if "dedup" in experiments:
        written += fig_dedup(experiments["dedup"], out, "dedup")
    if "throughput" in experiments:
        written += engine.fig_throughput(experiments["throughput"], out, "throughput", save)
    if "codec" in experiments:
        written += engine.fig_codec(experiments["codec"], out, "codec_accuracy_vs_bytes", save)
    if "convergence" in experiments:
        written += convergence.fig_convergence(experiments["convergence"], out, "convergence", save)
        # premise.toml's model (x0.5 cut 2) is a panel of its own beside convergence.toml's settings.
        written += convergence.fig_pareto(experiments["convergence"] + experiments.get("premise", []), out,
                                          "accuracy_bytes_pareto", save)
    if "premise" in experiments:
        written += convergence.fig_convergence(experiments["premise"], out, "premise", save)
    if "privacy_attacks" in experiments:
        attacks = experiments["privacy_attacks"]
        written += fig_privacy(attacks, out, "privacy_utility_communication")
        written += fig_privacy_grid(attacks, Path(args.results_dir) / "privacy", out, "privacy_reconstructions")
    if (Path(args.results_dir) / "scale.jsonl").exists():
        from bench import scale

        written += scale.figure(str(Path(args.results_dir) / "scale.jsonl"), out, "scale", save)
    if (Path(args.results_dir) / "label_defences_attacks.jsonl").exists():
        from bench import label_defences

        written += label_defences.figure(str(Path(args.results_dir) / "label_defences_attacks.jsonl"), out,
                                         "label_defences", save)
    written += fig_three_ways({k: v for k, v in experiments.items() if k != "privacy_attacks"}, out,
                              "bytes_three_ways")
    Path(args.summary).write_text(summary_table(experiments))
    for path in written:
        print(f"plots: wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    print(f"plots: wrote {args.summary}")
    return 0
