"""Where a split-learning step spends its time: sample the server and a hospital with py-spy.

    pip install py-spy   # a sampling profiler; not needed for anything else
    python -m bench.profile_split [--model resnet20 --width 0.5 ...] > results/profile_split.txt

Runs split learning with 2 hospitals on synthetic data (the throughput
configuration), samples the server and hospital1 for ``--seconds`` in the
middle of training, native frames included (TensorPipe, the autograd engine),
and prints for each process the share of samples per thread and the functions
that hold the most samples (by self time). The server's own breakdown
(``comm.server_time_s`` in the record) says the same thing from the inside.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP_FUNCTIONS = 15


def summarize(raw: Path) -> tuple[collections.Counter, collections.Counter, int]:
    """(samples per thread, self samples per function, total) from py-spy's collapsed-stack output."""
    threads, functions, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        threads[frames[0]] += n
        leaf = re.sub(r"\s*\(.*?\)$", "", frames[-1]) if frames else "?"
        functions[leaf] += n
    return threads, functions, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    args, train = parser.parse_known_args(argv)
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        print("profile_split: error: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    options = ["--method", "split", "--hospitals", "2", "--model", "resnet20", "--width", "0.5", "--dataset",
               "synthetic", "--synthetic-train", "20000", "--synthetic-test", "256", "--batch-size", "128",
               "--schedule", "parallel", "--max-steps", "120", "--log-every", "20", *train]
    run = subprocess.Popen([sys.executable, "-m", "splitrpc.train", *options], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pids, lines = {}, []

    def pump():
        for line in run.stdout:
            lines.append(line)
            m = re.match(r"\[(server|hospital1)\] pid (\d+)", line)
            if m:
                pids[m.group(1)] = int(m.group(2))

    threading.Thread(target=pump, daemon=True).start()
    while not any("step 20/" in ln for ln in lines) and run.poll() is None:
        time.sleep(0.2)
    with tempfile.TemporaryDirectory() as tmp:
        raws = {who: Path(tmp) / f"{who}.txt" for who in pids}
        spies = [subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate",
                                   "200", "--native", "--threads", "--nonblocking", "--format", "raw", "--output",
                                   str(raws[who])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for who, pid in pids.items()]
        for spy in spies:
            spy.wait()
        run.wait()
        print(f"# split learning profile: {' '.join(options)}; {args.seconds} s sampled at 200 Hz per process\n")
        for who, raw in sorted(raws.items()):
            if not raw.exists():
                print(f"## {who}: no samples\n")
                continue
            threads, functions, total = summarize(raw)
            print(f"## {who} ({total} samples)\n\nthreads:")
            for thread, n in threads.most_common(8):
                print(f"  {100 * n / total:5.1f}%  {thread}")
            print("\nfunctions by self time:")
            for function, n in functions.most_common(TOP_FUNCTIONS):
                print(f"  {100 * n / total:5.1f}%  {function}")
            print()
    record = [ln for ln in lines if "training traffic" in ln or "final test" in ln]
    print("".join(record))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
