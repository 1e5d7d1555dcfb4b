"""Where a party's memory goes before it trains: private memory after each import, and what a forked
child of a process that imported torch holds of its own.

    python -m bench.party_memory > results/party_memory.txt

Private memory is Private_Clean + Private_Dirty of ``/proc/self/smaps_rollup`` (pages no other
process maps); the biggest private mappings after ``import torch`` are listed by name. The forked
child then does what a small party does (threads pinned to 1, a few convolutions forward and
backward) and reports its own private memory: what ``--start fork`` costs per party before data,
model and the RPC agent (bench.scale measures whole runs).
"""

from __future__ import annotations

import collections
import os
import re
import sys

_KB = re.compile(r"^(\w+):\s+(\d+) kB")


def rollup(pid: int | str = "self") -> dict[str, float]:
    kb = {m.group(1): int(m.group(2)) for m in map(_KB.match, open(f"/proc/{pid}/smaps_rollup")) if m}
    return {"private": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024, "rss": kb["Rss"] / 1024}


def by_mapping(limit: int = 6) -> list[tuple[float, str]]:
    """Private MB per mapping name ([anon], [heap], a library's file name)."""
    totals: collections.Counter = collections.Counter()
    name = None
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
        else:
            m = re.match(r"(Private_Dirty|Private_Clean):\s+(\d+) kB", line)
            if m:
                totals[name] += int(m.group(2)) / 1024
    return [(mb, n) for n, mb in totals.most_common(limit)]


def step(label: str, before: dict | None) -> dict:
    now = rollup()
    added = f" (+{now['private'] - before['private']:.0f})" if before else ""
    print(f"{label:<34} private {now['private']:6.0f} MB{added:>8}   rss {now['rss']:6.0f} MB", flush=True)
    return now


def main() -> int:
    print(f"python {sys.version.split()[0]}, pid {os.getpid()}")
    m = step("python", None)
    import numpy  # noqa: F401

    m = step("+ numpy", m)
    import torch

    m = step(f"+ torch {torch.__version__}", m)
    print("  largest private mappings after import torch:")
    for mb, name in by_mapping():
        print(f"    {mb:6.0f} MB  {name}")
    import torch.distributed.autograd  # noqa: F401
    import torch.distributed.rpc  # noqa: F401

    m = step("+ torch.distributed.rpc, autograd", m)
    import torchvision  # noqa: F401

    m = step("+ torchvision", m)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        torch.set_num_threads(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(16, 16, 3, padding=1))
        x = torch.randn(64, 3, 32, 32)
        for _ in range(5):
            model(x).sum().backward()
        os.write(write, f"{rollup()['private']:.0f} {rollup()['rss']:.0f}".encode())
        os._exit(0)
    os.close(write)
    private, rss = os.read(read, 100).decode().split()
    os.waitpid(pid, 0)
    print(f"forked child after 5 conv steps      private {float(private):6.0f} MB            rss {float(rss):6.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
