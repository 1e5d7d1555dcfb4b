"""Many hospitals on one machine: what a party costs in memory and start-up, and how the server's
throughput grows with N.

    python -m bench.scale --hospitals 2,4,8,16,32,64 --start fork --out results/scale.jsonl [-- <training options>]
    python -m bench.scale --table results/scale.jsonl

Each setting is one real run (``python -m splitrpc.train`` with ``--log-every 1``, the options
below unless given after ``--``) whose parties are sampled every ``SAMPLE_S`` seconds from
``/proc/<pid>/smaps_rollup``: private memory (Private_Clean + Private_Dirty: what the party alone
holds), resident size and proportional size (Pss: shared pages split among their users, so the
sum over processes is the run's footprint). A party is a process with RANK in its environment
(``--start spawn``) or named ``splitrpc-r<rank>`` (``--start fork``).
The line appended to ``--out`` per run: the per-party peak private and resident memory (median
and max over parties, server apart), the run's peak summed Pss and the machine's peak use
(MemTotal - MemAvailable, minus what was used before), the seconds from launch to the first
step's line, and from the run's record its set-up time, seconds per step, samples/s and payload
bytes per hospital per step. Runs whose launch fails are recorded with their error and the
matrix goes on. Runs resume: a setting already in ``--out`` with status ok is skipped.
``--heap fixed`` runs the parties with ``--heap fixed`` (``splitrpc/heap.py``) to measure what it saves;
the record says which heap it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import descendants
from splitrpc.errors import UserError, report
from splitrpc.record import append_jsonl

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.5
DEFAULT_OPTIONS = ["--dataset", "synthetic", "--synthetic-train", "8192", "--synthetic-test", "256", "--model",
                   "resnet20", "--width", "0.25", "--batch-size", "8", "--eval-batch-size", "64",
                   "--schedule", "parallel", "--max-steps", "20", "--threads", "1", "--rpc-timeout", "120"]
_KB = re.compile(r"^(\w+):\s+(\d+) kB")


def memory_of(pid: int) -> dict[str, float] | None:
    """MB: private (clean + dirty), rss, pss and anonymous of one process; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kb = {m.group(1): int(m.group(2)) for m in map(_KB.match, text.splitlines()) if m}
    return {"private": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024, "rss": kb.get("Rss", 0) / 1024,
            "pss": kb.get("Pss", 0) / 1024, "anon": kb.get("Anonymous", 0) / 1024}


def rank_of(pid: int) -> int | None:
    """A party's rank: a forked party names itself splitrpc-r<rank> (its /proc environment is the
    zygote's); a spawned one has RANK in its environment."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    if comm.startswith("splitrpc-r") and comm[10:].isdigit():
        return int(comm[10:])
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def machine_used_mb() -> float:
    info = {m.group(1): int(m.group(2)) for m in map(_KB.match, Path("/proc/meminfo").read_text().splitlines()) if m}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def run_one(method: str, hospitals: int, start: str, options: list[str], timeout_s: float,
            heap: str = "dynamic") -> dict:
    out = Path(tempfile.mkdtemp(prefix="splitrpc-scale-")) / "run.jsonl"
    argv = ["--method", method, "--hospitals", str(hospitals), "--start", start, *options, "--log-every", "1",
            "--out", str(out)]
    baseline = machine_used_mb()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "splitrpc.train", *argv, "--heap", heap], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
    lines: list[str] = []
    first_step: list[float] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if not first_step and re.search(r"\bstep 1/\d+", line):
                first_step.append(time.monotonic() - t0)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    peak: dict[int, dict[str, float]] = {}  # rank -> peak of each measure
    run_pss, machine = 0.0, 0.0
    while proc.poll() is None and time.monotonic() - t0 < timeout_s:
        pids = [proc.pid, *descendants(proc.pid)]
        total = 0.0
        for pid in pids:
            mem = memory_of(pid)
            if mem is None:
                continue
            total += mem["pss"]
            rank = rank_of(pid)
            if rank is not None:
                mine = peak.setdefault(rank, {k: 0.0 for k in mem})
                for k, v in mem.items():
                    mine[k] = max(mine[k], v)
        run_pss = max(run_pss, total)
        machine = max(machine, machine_used_mb() - baseline)
        time.sleep(SAMPLE_S)
    if proc.poll() is None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.wait()
        reader.join(timeout=5)
        return {"status": "timeout", "error": f"ran past {timeout_s:g} s", "tail": "".join(lines[-5:])}
    reader.join(timeout=5)
    result = {"launch_to_first_step_s": first_step[0] if first_step else None, "wall_s": time.monotonic() - t0,
              "parties_sampled": len(peak), "run_pss_peak_mb": run_pss, "machine_used_peak_mb": machine}
    server_rank = 0 if method.startswith("split") else None
    hospitals_mem = [m for r, m in peak.items() if r != server_rank]
    for key in ("private", "rss", "pss", "anon"):
        values = [m[key] for m in hospitals_mem]
        if values:
            result[f"hospital_{key}_mb_median"] = statistics.median(values)
            result[f"hospital_{key}_mb_max"] = max(values)
        if server_rank is not None and server_rank in peak:
            result[f"server_{key}_mb"] = peak[server_rank][key]
    if proc.returncode != 0:
        errors = [ln.strip() for ln in lines if ln.startswith("splitrpc")]
        return {**result, "status": "failed", "returncode": proc.returncode,
                "error": (errors or [ln.strip() for ln in lines[-1:]] or [""])[-1]}
    record = json.loads(out.read_text().splitlines()[-1])
    train = record["comm"]["phases"]["train"] if record.get("comm") else None
    payload = None
    if train and train.get("payload_bytes"):
        per = [v["sent"] + v["received"] for k, v in train["payload_bytes"].items() if k.startswith("hospital")]
        payload = sum(per) / len(per) / record["steps"] if per and record["steps"] else None
    return {**result, "status": "ok", "setup_time_s": record["setup_time_s"], "train_time_s": record["train_time_s"],
            "steps": record["steps"], "seconds_per_step": record["train_time_s"] / record["steps"],
            "samples_per_s": record["samples_per_s"], "payload_bytes_per_hospital_step": payload,
            "git_commit": record.get("git_commit"), "torch_version": record.get("torch_version")}


def key_of(r: dict) -> tuple:
    return (r["method"], r["hospitals"], r["start"], r.get("repeat", 0), tuple(r["options"]), heap_of(r))


def heap_of(r: dict) -> str:
    """Records from before --heap ran with glibc's dynamic threshold, today's default."""
    return r.get("heap", "dynamic")


def table(path: str) -> str:
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]

    def f(v, d=0):
        return "" if v is None else f"{v:.{d}f}"

    from splitrpc.config import Config

    defaults = {"--dataset": Config.dataset, "--model": Config.model, "--width": Config.width,
                "--batch-size": Config.batch_size, "--data-dir": Config.data_dir}

    def option(opts: list, name: str) -> str:
        return opts[opts.index(name) + 1] if name in opts else str(defaults[name])

    lines = ["| method | setting | start | N | status | launch to first step (s) | hospital private MB (median / max) | "
             "hospital RSS MB | server private MB | run PSS peak (GB) | machine peak (GB) | s/step | samples/s | "
             "payload KB per hospital per step |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = r.get("options", [])
        method = series_name(r)
        method += ", --heap fixed" if heap_of(r) == "fixed" else ""
        dataset = option(opts, "--dataset")
        if dataset == "imagefolder":  # name it by its source: cifar10-jpeg.tar.gz reads "cifar10-jpeg"
            dataset = Path(option(opts, "--data-dir")).name.split(".")[0] or dataset
        setting = (f"{dataset}, "
                   f"{option(opts, '--model')} x{option(opts, '--width')}, batch {option(opts, '--batch-size')}")
        lines.append(
            f"| {method} | {setting} | {r['start']} | {r['hospitals']} | {r['status']} | {f(r.get('launch_to_first_step_s'), 1)} | "
            f"{f(r.get('hospital_private_mb_median'))} / {f(r.get('hospital_private_mb_max'))} | "
            f"{f(r.get('hospital_rss_mb_median'))} | {f(r.get('server_private_mb'))} | "
            f"{f((r.get('run_pss_peak_mb') or 0) / 1024, 2)} | {f((r.get('machine_used_peak_mb') or 0) / 1024, 2)} | "
            f"{f(r.get('seconds_per_step'), 3)} | {f(r.get('samples_per_s'))} | "
            f"{f((r.get('payload_bytes_per_hospital_step') or 0) / 1024, 1)} |"
            + (f" {r.get('error', '')}" if r["status"] != "ok" else ""))
    return "\n".join(lines)


def series_name(r: dict) -> str:
    """A run's method, with the schedule for split learning's: the one it passed, else the training default
    (a run without --schedule ran Config's, not parallel)."""
    from splitrpc.config import Config

    opts = r.get("options", [])
    schedule = opts[opts.index("--schedule") + 1] if "--schedule" in opts else Config.schedule
    return r["method"] + (f" ({schedule})" if r["method"].startswith("split") else "")


def figure(path: str, out_dir: Path, name: str, save) -> list[Path]:
    """Per party private memory, launch to first step and server samples/s against N, one line per
    (method, start); runs that did not finish are left out (the table lists them)."""
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("status") == "ok"]
    if not rows:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    def series(r):
        return series_name(r), r["start"]

    for (method, start) in sorted({series(r) for r in rows}):
        mine = sorted((r for r in rows if series(r) == (method, start)), key=lambda r: r["hospitals"])
        n = [r["hospitals"] for r in mine]
        label = f"{method}, --start {start}"
        axes[0].plot(n, [r.get("hospital_private_mb_median") for r in mine], "o-", label=label)
        axes[1].plot(n, [r.get("launch_to_first_step_s") for r in mine], "o-", label=label)
        axes[2].plot(n, [r.get("samples_per_s") for r in mine], "o-", label=label)
    for ax, title in zip(axes, ("hospital private memory (MB, median)", "launch to first step (s)",
                                "server samples/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hospitals")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].axhline(250, color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.suptitle("Many hospitals on one 2-core, 24 GiB machine (bench.scale; ResNet-20 x0.25, synthetic data, "
                 "batch 8)", fontsize=10)
    return save(fig, name, out_dir)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", default="2,4,8,16,32,64")
    parser.add_argument("--methods", default="split")
    parser.add_argument("--start", default="fork", help="spawn, fork, or both as 'spawn,fork'")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--heap", choices=("dynamic", "fixed"), default="dynamic",
                        help="the runs' --heap (glibc's mmap threshold in every party: splitrpc/heap.py)")
    parser.add_argument("--out", default="")
    parser.add_argument("--table", default="")
    args = parser.parse_args(own)
    try:
        if args.table:
            print(table(args.table))
            return 0
        counts = [int(x) for x in args.hospitals.split(",")]
        if any(n < 1 for n in counts):
            raise UserError("--hospitals: counts must be at least 1")
        options = extra or DEFAULT_OPTIONS
        if "--heap" in options or any(o.startswith("--heap=") for o in options):
            raise UserError("give --heap before '--' (bench.scale passes it to every run and keys records by it)")
        done = set()
        if args.out and Path(args.out).exists():
            done = {key_of(r) for r in map(json.loads, Path(args.out).read_text().splitlines()) if r.get("status") == "ok"}
        for repeat in range(args.repeats):
            for n in counts:
                for method in args.methods.split(","):
                    for start in args.start.split(","):
                        setting = {"kind": "scale_run", "method": method, "hospitals": n, "start": start,
                                   "repeat": repeat, "options": options, "heap": args.heap}
                        if key_of(setting) in done:
                            continue
                        print(f"[scale] {method} N={n} --start {start} (repeat {repeat})", flush=True)
                        result = {**setting, **run_one(method, n, start, options, args.timeout, args.heap),
                                  "cpus": os.cpu_count(), "mem_total_gb": os.sysconf("SC_PHYS_PAGES")
                                  * os.sysconf("SC_PAGE_SIZE") / 2**30}
                        print(f"[scale]   {result['status']}: first step after "
                              f"{result.get('launch_to_first_step_s') or 0:.1f} s, hospital private "
                              f"{result.get('hospital_private_mb_median') or 0:.0f} MB (max "
                              f"{result.get('hospital_private_mb_max') or 0:.0f}), run PSS "
                              f"{(result.get('run_pss_peak_mb') or 0) / 1024:.2f} GB"
                              f"{'; ' + result['error'] if result.get('error') else ''}", flush=True)
                        if args.out:
                            append_jsonl(args.out, result)
        return 0
    except UserError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
