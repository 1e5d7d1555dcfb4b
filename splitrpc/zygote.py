"""``--start fork``: the parties of a one-host run, forked from one process that imported torch once.

    python -m splitrpc.zygote <world size> <master port> -- <training options>   (started by splitrpc.launch)

Why: a process that imports this torch build holds about 280 MB of private memory before it
trains anything (``/proc/<pid>/smaps_rollup`` after ``import torch``: some 150 MB of anonymous
maps and 110 MB of heap, the static data of the CUDA libraries the wheel loads even on a CPU
machine). Spawned, N parties cost N times that, and 64 hospitals do not fit in 24 GiB. Forked
from one process that has imported torch and nothing more (no thread started, no tensor op run,
so nothing that fork would leave half-copied), the parties share those pages copy-on-write and
each holds only what it writes itself. The measured cost per party: docs/scale.md.

The zygote then does what torchrun's agent does for a one-host group, minus restarts: it gives
every child its rank's environment (rank 0 hosts the coordination store, as when each party is
started on its own site), waits, and when a party fails it gives the others
``QUIET_EXIT_DELAY_S`` to leave on their own (each names the failure it saw), then stops them
(SIGTERM, SIGKILL after ``STOP_GRACE_S``) and exits with the first failure's code. SIGTERM or
SIGINT to the zygote reach every party. ``--max-restarts`` needs torchrun (``--start spawn``).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from splitrpc import console

QUIET_EXIT_DELAY_S = 5.0
STOP_GRACE_S = 5.0


def _child(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                       "MASTER_PORT": str(port)})
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _name(f"splitrpc-r{rank}")
    from splitrpc import train

    sys.argv = ["splitrpc-train", *argv]
    train.worker_main()  # leaves with os._exit
    os._exit(1)


def _name(name: str) -> None:
    """The process's name in ps/top and /proc/<pid>/comm: a forked party's environment in /proc still
    reads the zygote's (no exec), so this is how tools (bench.scale) tell its rank."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _stop(children: dict[int, int], sig: int) -> None:
    for pid in children:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reap(children: dict[int, int], codes: dict[int, int], block: bool) -> None:
    """Collect exited children into ``codes`` (rank -> exit code, negative for a signal)."""
    while children:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        rank = children.pop(pid, None)
        if rank is not None:
            codes[rank] = os.waitstatus_to_exitcode(status)
        block = False


def supervise(children: dict[int, int]) -> int:
    """Wait for every party; the first failure ends the others. Returns the run's exit code."""
    codes: dict[int, int] = {}
    order: list[int] = []
    failed_at = None
    while children:
        before = set(codes)
        try:
            _reap(children, codes, block=False)
        except KeyboardInterrupt:
            _stop(children, signal.SIGTERM)
            continue
        order += [r for r in codes if r not in before]
        if failed_at is None and any(codes[r] != 0 for r in order):
            failed_at = time.monotonic()
        if failed_at is not None and children:
            waited = time.monotonic() - failed_at
            if waited > QUIET_EXIT_DELAY_S + STOP_GRACE_S:
                _stop(children, signal.SIGKILL)
            elif waited > QUIET_EXIT_DELAY_S:
                _stop(children, signal.SIGTERM)
        time.sleep(0.05)
    first = next((r for r in order if codes[r] != 0), None)
    if first is None:
        return 0
    code = codes[first]
    if code < 0:
        # Killed by a signal: it said nothing itself (a party that exits with a code has printed its line).
        console.line(f"splitrpc: run failed: rank {first} was killed by signal {-code}", sys.stderr)
        return 1
    return code


def main(argv: list[str]) -> int:
    world, port = int(argv[0]), int(argv[1])
    train_argv = argv[3:] if argv[2:3] == ["--"] else argv[2:]
    # What every party imports, imported once here; nothing may run a tensor op or start a thread before
    # the fork (torch's thread pools would be copied half-made).
    import torch  # noqa: F401
    import torch.distributed.autograd  # noqa: F401
    import torch.distributed.rpc  # noqa: F401

    from splitrpc import train  # noqa: F401  (the method's own modules are small: each party imports its own)

    # A thread alive at fork is not copied and may hold a lock its copy never releases. With
    # OMP_NUM_THREADS=1 (the launcher's environment) these imports start none; numpy's OpenBLAS
    # would start its thread server otherwise (seen with gdb: blas_thread_server).
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:
        console.line(f"splitrpc: warning: the zygote runs {threads} threads before forking the parties; "
                     f"set OMP_NUM_THREADS=1", sys.stderr)

    children: dict[int, int] = {}

    def forward(signum, frame):
        _stop(children, signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            _child(rank, world, port, train_argv)
        children[pid] = rank
    return supervise(children)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
