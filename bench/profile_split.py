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
# Native frames need py-spy to pause the process for each sample (no --nonblocking),
# which slows it slightly; 100 Hz keeps that small.
RATE = 100


# Where a sample's time goes, judged from its stack (leaf first): the first rule that matches wins.
CATEGORIES = (
    ("waiting (sleep, locks, condition variables, polling)",
     ("clock_nanosleep", "nanosleep", "futex", "pthread_cond", "epoll_wait", "poll", "select", "sem_wait",
      "__lll_lock_wait", "sched_yield"), "leaf"),
    ("network I/O (socket system calls)", ("send", "recv", "writev", "readv", "sendmsg", "recvmsg", "write", "read"),
     "leaf"),
    ("serialization (RPC pickling, tensor copies into messages)", ("pickle", "serialize", "Pickler", "wireSerialize",
                                                                  "wireDeserialize"), "stack"),
    ("TensorPipe and RPC bookkeeping", ("tensorpipe", "torch::distributed::rpc", "torch::distributed::autograd"),
     "stack"),
    ("compute kernels (convolutions, GEMM, elementwise)", ("at::native", "dnnl", "mkl", "function_ref", "brgemm",
                                                           "at::vec", "sgemm", "TensorIterator", "jit_avx",
                                                           "at::internal"), "stack"),
)


def categorize(frames: list[str]) -> str:
    names = [re.sub(r" \([^()]*\)$", "", f) for f in frames]
    for label, needles, where in CATEGORIES:
        if where == "leaf":
            leaf = names[-1] if names else ""
            if leaf in needles or leaf.startswith(tuple(f"__{n}" for n in needles)):
                return label
        elif any(n in name for name in names for n in needles):
            return label
    if frames and ".py:" in frames[-1]:
        return "Python code (the leaf frame is a .py line)"
    return "other (allocator, autograd engine, interpreter internals)"


def summarize(raw: Path) -> tuple[collections.Counter, collections.Counter, collections.Counter, int]:
    """(samples per thread, self samples per function, samples per category, total) from py-spy raw output."""
    threads, functions, categories, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        threads[frames[0]] += n
        functions[re.sub(r" \([^()]*\)$", "", frames[-1])[:110]] += n
        categories[categorize(frames[1:])] += n
    return threads, functions, categories, total


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
        errors = {who: open(Path(tmp) / f"{who}.err", "w") for who in pids}
        spies = [subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate",
                                   str(RATE), "--native", "--threads", "--format", "raw", "--output", str(raws[who])],
                                  stdout=subprocess.DEVNULL, stderr=errors[who])
                 for who, pid in pids.items()]
        for spy in spies:
            spy.wait()
        for who, handle in errors.items():
            handle.close()
            if not raws[who].exists():
                print(f"profile_split: error: py-spy recorded nothing for {who}: "
                      f"{(Path(tmp) / f'{who}.err').read_text().strip().splitlines()[-1:]}", file=sys.stderr)
        run.wait()
        print(f"# split learning profile: {' '.join(options)}; {args.seconds} s sampled at {RATE} Hz per process\n")
        for who, raw in sorted(raws.items()):
            if not raw.exists():
                print(f"## {who}: no samples\n")
                continue
            threads, functions, categories, total = summarize(raw)
            print(f"## {who} ({total} samples of busy threads)\n\nwhere the time goes:")
            for category, n in categories.most_common():
                print(f"  {100 * n / total:5.1f}%  {category}")
            print("\nthreads:")
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
