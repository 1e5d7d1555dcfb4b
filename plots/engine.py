"""Figures and tables of the engine's speed and of the cut-layer codecs.

``results/throughput.jsonl`` (bench/configs/throughput.toml): samples/s of every
variant side by side; ``results/codec.jsonl`` (bench/configs/codec.toml): bytes
and accuracy of float32 / bf16 / fp8 at the cut.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt

from splitrpc.record import RunRecord, relative_speed, variant

CODEC_ORDER = {"none": 0, "bf16": 1, "fp16": 2, "fp8": 3}
# The RPC round trips `make bench-save` timed on this machine's CPU, idle (bench/test_regression.py).
BASELINE = Path(__file__).resolve().parents[1] / "bench" / "baseline" / "baseline.json"


def _model(cfg: dict) -> str:
    width = f" x{cfg['width']:g}" if cfg.get("width", 1.0) != 1.0 else ""
    return f"{cfg['model']}{width}"


REPEAT_PREFIX = "repeat "  # bench/configs/throughput.toml tags every run of pass k "repeat k"


def _repeat(r: dict) -> str | None:
    tag = r["config"].get("tag") or ""
    return tag if tag.startswith(REPEAT_PREFIX) else None


def _spread(values: list[float], digits: int) -> str:
    """median (min-max, n) of ``values``."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n = 1)"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f}, n = {len(values)})"


def round_trip_seconds(bytes_each_way: float, baseline: Path = BASELINE) -> tuple[float, str] | None:
    """An RPC round trip carrying ``bytes_each_way`` up and as many down, interpolated linearly between
    the sizes the benchmark timed (64 KB, 1 MB, 8 MB each way; medians of 5 runs), and the CPU it was
    timed on; None without a baseline."""
    if not baseline.exists():
        return None
    saved = json.loads(baseline.read_text())
    cpu = saved["saved_on"]
    points = sorted((saved["extra_info"][name]["payload_bytes_per_call"] / 2, seconds)
                    for name, seconds in saved["absolute"][cpu].items()
                    if name.startswith("test_rpc_round_trip[") and not name.endswith("/reference"))
    # The segment holding the size, or the nearest end segment to extrapolate from.
    i = min(max(bisect.bisect_right([size for size, _ in points], bytes_each_way), 1), len(points) - 1)
    (b0, t0), (b1, t1) = points[i - 1], points[i]
    return t0 + (t1 - t0) * (bytes_each_way - b0) / (b1 - b0), cpu


def round_trip_cap(repeated: list[dict], local: dict) -> list[str]:
    """What the activation round trip alone would leave of local speed in `sequential` without prefetch:
    local step time / (local step time + one round trip of the step's activations and their gradient),
    beside the measured ratio. Issue #23 asked whether the round trip caps sequential near 0.84."""
    rows = []
    for model in sorted({_model(r["config"]) for r in repeated}):
        split = [r for r in repeated if _model(r["config"]) == model and r["config"]["method"] == "split"
                 and r["config"].get("schedule") == "sequential" and not r["config"].get("prefetch", True)
                 and r["config"].get("codec", "none") == "none"]
        locals_ = [v for (m, schedule, _), v in local.items() if m == model and schedule == "sequential"]
        if not split or not locals_:
            continue
        train = split[0]["comm"]["phases"]["train"]["payload_bytes"]
        up = sum(v["sent"] for k, v in train.items() if k.startswith("hospital")) / split[0]["steps"]
        trip = round_trip_seconds(up)
        if trip is None:
            continue
        step = split[0]["config"]["batch_size"] / statistics.median(locals_)
        measured = [relative_speed(r["samples_per_s"], local[(model, "sequential", _repeat(r))]) for r in split
                    if (model, "sequential", _repeat(r)) in local]
        rows.append(f"| {model} | {step * 1000:.1f} | {up / 2**20:.2f} | {trip[0] * 1000:.2f} | "
                    f"{step / (step + trip[0]):.2f} | {_spread(measured, 2)} |")
        cpu = trip[1]
    if not rows:
        return []
    return ["", "## the round trip's cap on `sequential` (no prefetch)", "",
            "What the activation round trip alone would leave of local speed if it were the only cost split "
            "learning added to each step: local step / (local step + RPC round trip of the step's activations "
            f"up and their gradient down, timed idle by `make bench-save` on {cpu}, "
            "`bench/baseline/baseline.json`, interpolated in size).", "",
            "| model | local step (ms, median of the passes) | activations per step (MiB) | RPC round trip (ms) | "
            "cap | measured split / local |", "|---|---|---|---|---|---|", *rows]


def throughput_table(records: list[dict]) -> list[str]:
    """Medians and spreads over the repeated passes (every run of a pass alternates with the other methods,
    and a split run's "vs local" is taken against the local run of the same schedule in the same pass);
    then the earlier single runs, listed as they were, so that no run is left out."""
    ok = [r for r in records if r.get("status", "ok") == "ok"]
    repeated = [r for r in ok if _repeat(r)]
    local = {(_model(r["config"]), r["config"].get("schedule", "sequential"), _repeat(r)): r["samples_per_s"]
             for r in repeated if r["config"]["method"] == "local"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in repeated:
        groups[(_model(r["config"]), variant(r["config"], "engine"))].append(r)
    lines = ["## throughput (samples/s on the same 2 cores, median (min-max, n) over the repeated passes; a split "
             "run against local training with the same schedule in the same pass)", "",
             "| model | run | threads (server / hospitals, or per process) | samples/s | vs local | "
             "requests per hospital per step | server waiting for activations (s) |",
             "|---|---|---|---|---|---|---|"]
    for (model, name), runs in sorted(groups.items()):
        cfg = runs[0]["config"]
        threads = runs[0].get("threads")
        threads_text = (f"{threads['server']} / {', '.join(map(str, threads['hospitals']))}" if threads
                        else str(runs[0].get("threads_per_process", "")))
        ratios = [relative_speed(r["samples_per_s"], local[(model, cfg.get("schedule", "sequential"), _repeat(r))])
                  for r in runs if cfg["method"] == "split"
                  and (model, cfg.get("schedule", "sequential"), _repeat(r)) in local]
        trips = [(r.get("comm") or {}).get("round_trips_per_step") for r in runs]
        waiting = [((r.get("comm") or {}).get("server_time_s") or {}).get("waiting_for_activations") for r in runs]
        lines.append(
            f"| {model} | {name} | {threads_text} | {_spread([r['samples_per_s'] for r in runs], 0)} | "
            f"{_spread(ratios, 2) if ratios else ''} | "
            f"{'' if None in trips else format(statistics.median(trips), '.2f')} | "
            f"{'' if None in waiting else format(statistics.median(waiting), '.1f')} |")
    lines += round_trip_cap(repeated, local)
    earlier = [r for r in ok if not _repeat(r)]
    if earlier:
        lines += ["", "## throughput, earlier single runs (one pass, older code: see each record's git commit)", "",
                  "| model | run | samples/s | commit |", "|---|---|---|---|"]
        for r in sorted(earlier, key=lambda r: (_model(r["config"]), variant(r["config"], "engine"))):
            lines.append(f"| {_model(r['config'])} | {variant(r['config'], 'engine')} | {r['samples_per_s']:.0f} | "
                         f"{(r.get('git_commit') or '')[:8]} |")
    return lines + [""]


def codec_table(records: list[dict]) -> list[str]:
    baseline = {(_model(r["config"]), r["config"]["hospitals"]): r for r in records
                if r["config"].get("codec", "none") == "none"}
    lines = ["## codec (activations and gradients at the cut, same seed and steps as float32)", "",
             "| model | N | codec | final acc (mean / min) | vs float32 (points) | payload MB per hospital per epoch | "
             "vs float32 | tcp/payload |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (_model(r["config"]), r["config"]["hospitals"],
                                            CODEC_ORDER[r["config"].get("codec", "none")])):
        cfg = r["config"]
        base = baseline.get((_model(cfg), cfg["hospitals"]))
        per_hospital = RunRecord.of(r).bytes_per_epoch_per_hospital("payload")
        gap = bytes_ratio = ""
        if base is not None:
            gap = f"{100 * (r['final_test_acc'] - base['final_test_acc']):+.2f}"
            bytes_ratio = f"{per_hospital / RunRecord.of(base).bytes_per_epoch_per_hospital('payload'):.3f}"
        ratio = r["comm"]["phases"]["train"]["tcp_over_payload"]
        lines.append(
            f"| {_model(cfg)} | {cfg['hospitals']} | {cfg.get('codec', 'none')} | "
            f"{r['final_test_acc']:.4f} / {r['final_test_acc_min']:.4f} | {gap} | {per_hospital / 1e6:.0f} | "
            f"{bytes_ratio} | {'' if ratio is None else f'{ratio:.4f}'} |")
    return lines + [""]


def fig_throughput(records: list[dict], out_dir: Path, name: str, save) -> list[Path]:
    """Median samples/s of every variant over the repeated passes, the whiskers their min and max (the
    earlier single runs when there are no repeated ones)."""
    ok = [r for r in records if r.get("status", "ok") == "ok"]
    shown = [r for r in ok if _repeat(r)] or ok
    models = sorted({_model(r["config"]) for r in shown})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        groups: dict[str, list[float]] = defaultdict(list)
        for r in shown:
            if _model(r["config"]) == model:
                groups[variant(r["config"], "engine")].append(r["samples_per_s"])
        names = sorted(groups)
        medians = [statistics.median(groups[n]) for n in names]
        errors = [[m - min(groups[n]) for n, m in zip(names, medians)], [max(groups[n]) - m for n, m in zip(names, medians)]]
        colors = ["tab:gray" if v.startswith("local") else "tab:blue" if v.startswith("split") else "tab:orange"
                  for v in names]
        ax.barh(names, medians, xerr=errors, color=colors, capsize=3)
        ax.set_title(model)
        ax.set_xlabel("samples/s (2 cores, synthetic data, TCP; median, min-max)")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return save(fig, name, out_dir)


def fig_codec(records: list[dict], out_dir: Path, name: str, save) -> list[Path]:
    panels = defaultdict(list)
    for r in records:
        cfg = r["config"]
        panels[(_model(cfg), cfg["hospitals"])].append(
            (cfg.get("codec", "none"), RunRecord.of(r).bytes_per_epoch_per_hospital("payload") / 1e9,
             r["final_test_acc"]))
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for codec, gb, acc in sorted(panels[key], key=lambda p: CODEC_ORDER[p[0]]):
            ax.scatter(gb, acc, s=30)
            ax.annotate("float32" if codec == "none" else codec, (gb, acc), fontsize=8, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_title(f"{key[0]}, N={key[1]}", fontsize=9)
        ax.set_xlabel("GB per hospital per epoch")
        ax.set_xscale("log")
    axes[0][0].set_ylabel("final test accuracy")
    fig.tight_layout()
    return save(fig, name, out_dir)
