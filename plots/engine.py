"""Figures and tables of the engine's speed and of the cut-layer codecs.

``results/throughput.jsonl`` (bench/configs/throughput.toml): samples/s of every
variant side by side; ``results/codec.jsonl`` (bench/configs/codec.toml): bytes
and accuracy of float32 / bf16 / fp8 at the cut.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt

from splitrpc.record import RunRecord, relative_speed, variant

CODEC_ORDER = {"none": 0, "bf16": 1, "fp16": 2, "fp8": 3}


def _model(cfg: dict) -> str:
    width = f" x{cfg['width']:g}" if cfg.get("width", 1.0) != 1.0 else ""
    return f"{cfg['model']}{width}"


def _local_samples_per_s(records: list[dict]) -> dict:
    return {(_model(r["config"]), r["config"].get("schedule", "sequential")): r["samples_per_s"]
            for r in records if r["config"]["method"] == "local"}


def throughput_table(records: list[dict]) -> list[str]:
    local = _local_samples_per_s(records)
    lines = ["## throughput (samples/s on the same 2 cores; split against local with the same schedule)", "",
             "| model | run | threads (server / hospitals, or per process) | samples/s | vs local | "
             "requests per hospital per step | server waiting for activations (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (_model(r["config"]), variant(r["config"], "engine"))):
        cfg, comm = r["config"], r.get("comm") or {}
        reference = local.get((_model(cfg), cfg.get("schedule", "sequential"))) if cfg["method"] == "split" else None
        threads = r.get("threads")
        threads_text = (f"{threads['server']} / {', '.join(map(str, threads['hospitals']))}" if threads
                        else str(r.get("threads_per_process", "")))
        trips = comm.get("round_trips_per_step")
        waiting = (comm.get("server_time_s") or {}).get("waiting_for_activations")
        lines.append(
            f"| {_model(cfg)} | {variant(cfg, 'engine')} | {threads_text} | {r['samples_per_s']:.0f} | "
            f"{'' if not reference else format(relative_speed(r['samples_per_s'], reference), '.2f')} | "
            f"{'' if trips is None else format(trips, '.2f')} | {'' if waiting is None else format(waiting, '.1f')} |")
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
    models = sorted({_model(r["config"]) for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = sorted((variant(r["config"], "engine"), r["samples_per_s"]) for r in records
                      if _model(r["config"]) == model)
        colors = ["tab:gray" if v.startswith("local") else "tab:blue" if v.startswith("split") else "tab:orange"
                  for v, _ in rows]
        ax.barh([v for v, _ in rows], [s for _, s in rows], color=colors)
        ax.set_title(model)
        ax.set_xlabel("samples/s (2 cores, synthetic data, TCP)")
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
