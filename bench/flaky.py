"""Run the distributed test files K times in a row and report every failure (issue 23, flakiness).

    python -m bench.flaky                      # K = 5, the distributed test files
    python -m bench.flaky -k 10 tests/test_faults.py --json results/flaky.json

Each repeat is one ``pytest`` process over the files, its outcome per test read from its JUnit
XML, so one crash does not hide the others. The report lists every test that failed in any
repeat, how often, and the first line of each distinct error; the JSON keeps every repeat's
outcomes and durations, with the commit and the machine. Exit 1 if any test failed once.
A test that fails 1 time in K is a bug to find, not noise to rerun away.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from splitrpc.errors import UserError, report

REPO = Path(__file__).resolve().parents[1]
# The test files that start processes (torchrun groups, RPC, gloo, namespaces): where races live.
DISTRIBUTED = ("test_split.py", "test_faults.py", "test_ushape.py", "test_fedavg.py", "test_ddp_buckets.py",
               "test_dedup_runtime.py", "test_exit.py", "test_launch.py", "test_localloss.py", "test_splitfed.py",
               "test_resume.py", "test_topk.py", "test_wan.py", "test_chaos.py")


def outcomes(junit: Path) -> dict[str, dict]:
    """{test id: {"outcome": passed|failed|error|skipped, "seconds", "message"}} from a JUnit XML file."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "failed" if kind == "failure" else kind
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:300] if \
                    (node.get("message") or node.text) else ""
                break
        found[test] = {"outcome": outcome, "seconds": float(case.get("time") or 0), "message": message}
    return found


def run_once(files: list[str], timeout: float) -> tuple[dict[str, dict], float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   f"--junitxml={junit}", *files], cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -1  # the whole repeat hung past the bound: a failure of its own
        seconds = time.monotonic() - start
        found = outcomes(junit) if junit.exists() else {}
        if code == -1:
            found["<repeat>"] = {"outcome": "error", "seconds": seconds, "message": f"pytest ran past {timeout:.0f} s"}
        elif code not in (0, 1) and not found:
            found["<repeat>"] = {"outcome": "error", "seconds": seconds, "message": f"pytest exited {code}, no report"}
        return found, seconds, code


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except UserError as exc:
        return report(exc, "flaky")  # one line, exit 2


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flaky", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="test files (default: the distributed ones)")
    parser.add_argument("-k", "--repeats", type=int, default=5, help="repeats (default 5)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one repeat may take (default 3600)")
    parser.add_argument("--json", help="write every repeat's outcomes here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    files = args.files or [f"tests/{name}" for name in DISTRIBUTED if (REPO / "tests" / name).exists()]
    missing = [f for f in files if not (REPO / f).exists() and not Path(f).exists()]
    if missing:
        raise UserError(f"no such test file: {missing[0]}")
    repeats = []
    for i in range(1, args.repeats + 1):
        found, seconds, code = run_once(files, args.timeout)
        failed = sorted(t for t, o in found.items() if o["outcome"] in ("failed", "error"))
        print(f"[flaky] repeat {i}/{args.repeats}: {len(found)} tests, {len(failed)} failed, {seconds:.0f} s", flush=True)
        repeats.append({"repeat": i, "seconds": seconds, "exit_code": code, "tests": found})
    failures: dict[str, list] = defaultdict(list)
    for r in repeats:
        for test, o in r["tests"].items():
            if o["outcome"] in ("failed", "error"):
                failures[test].append((r["repeat"], o["message"]))
    print(f"[flaky] {len(files)} files x {args.repeats} repeats: "
          f"{sum(len(r['tests']) for r in repeats)} test runs, {sum(len(v) for v in failures.values())} failures")
    for test, hits in sorted(failures.items()):
        print(f"  {test}: failed {len(hits)}/{args.repeats} (repeats {', '.join(str(h[0]) for h in hits)})")
        for message in dict.fromkeys(m for _, m in hits):
            print(f"      {message}")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
            "host": platform.node(), "cpus": os.cpu_count(), "files": files, "repeats": repeats,
            "failures": {t: [h[0] for h in hits] for t, hits in failures.items()}}, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
