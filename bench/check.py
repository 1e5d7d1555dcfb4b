"""`make bench-check` and `make bench-save`: regression checks that mean something on any machine.

A step of split learning that takes 115 ms says as much about the CPU as about
the engine: the same code is 30-50 % slower on one AMD EPYC than on another.
What carries across machines is what the engine adds over a reference measured
in the same run, on the same cores, minutes apart. So the check compares
**relative speeds** (``splitrpc.record.relative_speed``, the ratio the
throughput benchmark reports as "vs local"):

* split step / local step (parallel for both models, fp8 at the cut, and the
  sequential schedule with prefetch), DDP step / local step;
* the sequential pair with prefetch / the same pair without it (each against
  its own local reference);
* an RPC round trip / the same bytes' round trip over a plain TCP socket.

Each reference is timed alternately with its benchmark, round by round (see
bench/test_regression.py), so that the machine's drift over minutes cancels.

Each has a committed value and a tolerance set from its spread over repeated
runs of the benchmarks on this kind of machine (``make bench-save``; see
``tolerance``). A quantity below its value by more than its tolerance is
measured once more (its two benchmarks only) and fails only if the rerun is
out too. Absolute medians are compared only with a baseline saved on the same
CPU (vendor, family, model, stepping and core count) and are otherwise printed
for information.

Exit status: 0 within tolerance, 1 regressed (one table row per quantity),
2 when nothing can be compared (no baseline, a file that is not ours, the
benchmarks did not run). Never a traceback: pytest's own output goes to a log.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from splitrpc import record
from splitrpc.record import relative_speed

REPO = Path(__file__).resolve().parents[1]
BENCH_FILE = "bench/test_regression.py"
BASELINE = REPO / "bench" / "baseline" / "baseline.json"
LOG_DIR = REPO / ".cache" / "bench-check"
FORMAT = "splitrpc-bench-baseline/1"
# Absolute medians on the same CPU: the budget the README promised before ratios existed.
ABSOLUTE_TOLERANCE = 0.25
# No ratio is trusted to better than this, however tight its repeats were.
MIN_TOLERANCE = 0.10
SAVE_REPEATS = 5


class CheckError(Exception):
    """Nothing can be compared; the message is the one line the user sees."""


REFERENCE = "/reference"  # a benchmark's reference, timed alternately with it (extra_info["reference_s"])


@dataclass(frozen=True)
class Quantity:
    """One relative speed: benchmark ``subject`` against the reference timed alternately with it
    (the same samples or bytes per call). With ``over``, the ratio of two such speeds: how much
    faster one engine setting is than another, each measured against its own reference."""

    name: str
    subject: str
    over: str | None = None

    def value(self, medians: dict[str, float]) -> float:
        speed = relative_speed(1 / medians[self.subject], 1 / medians[self.subject + REFERENCE])
        if self.over is None:
            return speed
        return speed / relative_speed(1 / medians[self.over], 1 / medians[self.over + REFERENCE])

    @property
    def benchmarks(self) -> list[str]:
        """The test ids to run again when this quantity is out of tolerance."""
        return [self.subject] + ([self.over] if self.over else [])

    def measured_by(self, medians: dict[str, float]) -> bool:
        return all(b in medians and b + REFERENCE in medians for b in self.benchmarks)


def _quantities() -> list[Quantity]:
    from bench.rpc_bytes import SIZES  # the round trips' parametrization ids

    q = []
    for model in ("vgg11", "resnet20"):
        q.append(Quantity(f"split/local parallel [{model}]", f"test_split_step[{model}]"))
        q.append(Quantity(f"ddp/local [{model}]", f"test_ddp_step[{model}]"))
    q.append(Quantity("split fp8/local parallel [resnet20]", "test_split_step_fp8"))
    q.append(Quantity("split/local sequential, prefetch [resnet20]", "test_split_steps_sequential[prefetch]"))
    q.append(Quantity("prefetch/no prefetch sequential [resnet20]", "test_split_steps_sequential[prefetch]",
                      over="test_split_steps_sequential[no_prefetch]"))
    for size in SIZES:
        q.append(Quantity(f"rpc/tcp round trip [{size}]", f"test_rpc_round_trip[{size}]"))
    return q


QUANTITIES = _quantities()


def cpu_key() -> str:
    """vendor-family-model-stepping-cores (``splitrpc.record.cpu``, which every run record carries too)."""
    return record.cpu()["key"]


def tolerance(values: list[float]) -> float:
    """Twice the largest relative deviation of a repeat from the repeats' median, at least
    MIN_TOLERANCE, rounded up to a whole percent. With the rerun before failing, a quantity
    that only wanders as it did while the baseline was saved does not fail."""
    m = statistics.median(values)
    worst = max(abs(v - m) / m for v in values)
    return max(MIN_TOLERANCE, math.ceil(round(200 * worst, 6)) / 100)  # round: 0.1 must not become 21 %


# -- running the benchmarks ---------------------------------------------------------------------

def run_benchmarks(tests: list[str] | None, label: str) -> dict:
    """One pytest-benchmark run of BENCH_FILE (or only ``tests``): medians (s), extra info, machine.

    pytest's output goes to a log file; a failed run is one line naming that file."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{label}.log"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        targets = [f"{BENCH_FILE}::{t}" for t in tests] if tests else [BENCH_FILE]
        cmd = [sys.executable, "-m", "pytest", *targets, "--benchmark-only", f"--benchmark-json={out}", "-q",
               "-p", "no:cacheprovider", "--benchmark-disable-gc"]
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0 or not out.exists():
            last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
            raise CheckError(f"the benchmarks did not run (pytest exit {rc}: {last[0][:160]}); see {log}")
        data = json.loads(out.read_text())
    return {"medians": medians_of(data["benchmarks"]), "extra_info": {b["name"]: b["extra_info"] for b in data["benchmarks"]}}


def medians_of(benchmarks: list[dict]) -> dict[str, float]:
    """Each benchmark's median, and its alternately timed reference's as ``<name>/reference``."""
    medians = {}
    for b in benchmarks:
        medians[b["name"]] = b["stats"]["median"]
        if b["extra_info"].get("reference_s"):
            medians[b["name"] + REFERENCE] = statistics.median(b["extra_info"]["reference_s"])
    return medians


def ratios(medians: dict[str, float]) -> dict[str, float]:
    return {q.name: q.value(medians) for q in QUANTITIES if q.measured_by(medians)}


# -- the baseline -------------------------------------------------------------------------------

def load_baseline(path: Path) -> dict:
    if not path.exists():
        raise CheckError(f"no baseline at {_rel(path)}: run `make bench-save` on a quiet machine first")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckError(f"{_rel(path)} is not a readable JSON baseline ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckError(f"{_rel(path)} is not a bench-check baseline (format {data.get('format') if isinstance(data, dict) else None!r}, "
                         f"expected {FORMAT!r}): run `make bench-save`")
    missing = [q.name for q in QUANTITIES if q.name not in data.get("ratios", {})]
    if missing:
        raise CheckError(f"{_rel(path)} has no value for {', '.join(missing)}: run `make bench-save`")
    return data


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def build_baseline(repeats: list[dict], cpu: str, previous: dict | None) -> dict:
    """The file `make bench-save` writes: every repeat's ratios (kept), their medians and
    tolerances, and this CPU's absolute medians beside any other CPU's already there."""
    per_quantity = {q.name: [ratios(r["medians"])[q.name] for r in repeats] for q in QUANTITIES}
    absolute = dict((previous or {}).get("absolute", {}))
    absolute[cpu] = {name: statistics.median(r["medians"][name] for r in repeats) for name in repeats[0]["medians"]}
    return {
        "format": FORMAT,
        "how": (f"medians of {len(repeats)} runs of {BENCH_FILE}; tolerance = max({MIN_TOLERANCE:.0%}, "
                "2 x the largest relative deviation of a run from the median), rounded up to a whole percent"),
        "saved_on": cpu,
        "ratios": {name: {"value": statistics.median(v), "tolerance": tolerance(v), "repeats": v}
                   for name, v in per_quantity.items()},
        "absolute": absolute,
        "extra_info": repeats[-1]["extra_info"],
    }


# -- the comparison -----------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    baseline: float
    now: float
    tolerance: float
    rerun: float | None = None

    @property
    def change(self) -> float:
        return (self.final - self.baseline) / self.baseline

    @property
    def final(self) -> float:
        return self.now if self.rerun is None else self.rerun

    @property
    def regressed(self) -> bool:
        return self.change < -self.tolerance


def compare_ratios(base: dict, now: dict[str, float]) -> list[Row]:
    return [Row(name, base["ratios"][name]["value"], now[name], base["ratios"][name]["tolerance"])
            for name in (q.name for q in QUANTITIES) if name in now]


def compare_absolute(base: dict, cpu: str, medians: dict[str, float]) -> list[Row] | None:
    """Slower is a regression here (a time, not a speed), so rows carry speeds: 1 / median."""
    saved = base.get("absolute", {}).get(cpu)
    if saved is None:
        return None
    return [Row(name, 1 / saved[name], 1 / medians[name], ABSOLUTE_TOLERANCE)
            for name in sorted(medians) if name in saved]


def ratio_table(rows: list[Row]) -> list[str]:
    lines = [f"{'relative speed (higher is faster)':46} {'baseline':>8} {'now':>7} {'rerun':>7} {'change':>7} "
             f"{'tolerance':>9}  verdict"]
    for r in rows:
        rerun = "" if r.rerun is None else f"{r.rerun:.3f}"
        lines.append(f"{r.name:46} {r.baseline:8.3f} {r.now:7.3f} {rerun:>7} {r.change:+7.1%} "
                     f"{r.tolerance:>8.0%}  {'REGRESSED' if r.regressed else 'ok'}")
    return lines


def absolute_table(rows: list[Row] | None, cpu: str, medians: dict[str, float], base: dict) -> list[str]:
    if rows is None:
        known = ", ".join(sorted(base.get("absolute", {}))) or "none"
        lines = [f"absolute medians (information only: no baseline for this CPU {cpu}; saved for: {known})"]
        lines += [f"  {name:46} {1000 * medians[name]:9.2f} ms" for name in sorted(medians)]
        return lines
    lines = [f"absolute medians on this CPU ({cpu}), ms        baseline       now  change  tolerance  verdict"]
    for r in rows:
        lines.append(f"  {r.name:46} {1000 / r.baseline:9.2f} {1000 / r.now:9.2f} {-r.change:+7.1%} "
                     f"{r.tolerance:>8.0%}  {'SLOWER' if r.regressed else 'ok'}")
    return lines


def check(baseline_path: Path, runner=run_benchmarks, cpu: str | None = None, out=print) -> int:
    base = load_baseline(baseline_path)
    cpu = cpu or cpu_key()
    out(f"bench-check: running {BENCH_FILE} (a few minutes; pytest's output goes to {_rel(LOG_DIR)}/)")
    run = runner(None, "check")
    rows = compare_ratios(base, ratios(run["medians"]))
    out_of_tolerance = [r for r in rows if r.regressed]
    if out_of_tolerance:
        tests = sorted({t for q in QUANTITIES if q.name in {r.name for r in out_of_tolerance} for t in q.benchmarks})
        out(f"bench-check: {len(out_of_tolerance)} quantit{'y' if len(out_of_tolerance) == 1 else 'ies'} out of "
            f"tolerance; measuring {len(tests)} benchmarks once more")
        again = ratios(runner(tests, "rerun")["medians"])
        for r in out_of_tolerance:
            r.rerun = again[r.name]
    absolute = compare_absolute(base, cpu, run["medians"])
    out("")
    for line in ratio_table(rows) + [""] + absolute_table(absolute, cpu, run["medians"], base):
        out(line)
    failed = [r for r in rows if r.regressed] + [r for r in (absolute or []) if r.regressed]
    out("")
    if failed:
        out(f"bench-check: FAILED, {len(failed)} regressed: "
            + "; ".join(f"{r.name} {r.change:+.1%} (tolerance {r.tolerance:.0%})" for r in failed))
        return 1
    out(f"bench-check: passed ({len(rows)} relative speeds within tolerance"
        + (", absolute medians too)" if absolute is not None else "; absolute medians not compared)"))
    return 0


def save(baseline_path: Path, repeats: int, runner=run_benchmarks, cpu: str | None = None, out=print) -> int:
    cpu = cpu or cpu_key()
    previous = None
    if baseline_path.exists():
        try:
            previous = load_baseline(baseline_path)
        except CheckError:
            previous = None  # a foreign or stale file is replaced, not merged
    runs = []
    for i in range(repeats):
        out(f"bench-save: run {i + 1}/{repeats} of {BENCH_FILE}")
        runs.append(runner(None, f"save-{i + 1}"))
    data = build_baseline(runs, cpu, previous)
    baseline_path.parent.mkdir(parents=True, exist_ok=True)
    baseline_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    for name, r in data["ratios"].items():
        out(f"  {name:46} {r['value']:.3f}  tolerance {r['tolerance']:.0%}  repeats "
            + " ".join(f"{v:.3f}" for v in r["repeats"]))
    out(f"bench-save: wrote {_rel(baseline_path)} (absolute medians for {cpu})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", action="store_true", help="measure and write the baseline instead of checking")
    parser.add_argument("--repeats", type=int, default=SAVE_REPEATS,
                        help=f"--save: runs of the benchmarks the tolerances come from (default {SAVE_REPEATS}, at least 3)")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="the baseline file (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.save and args.repeats < 3:
            raise CheckError(f"--repeats must be at least 3, got {args.repeats} (a tolerance comes from the spread "
                             "of the repeats)")
        if args.save:
            return save(args.baseline, args.repeats)
        return check(args.baseline)
    except CheckError as e:
        print(f"bench-check: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench-check: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
