"""Start a run under torchrun's elastic agent with the right number of processes.

One host (``launch/local.sh``, or ``splitrpc-train`` run directly)::

    python -m splitrpc.launch local --method split --hospitals 3 ...

starts 1 server + 3 hospitals (or N DDP ranks, or one local process) through
torch's elastic launcher (the engine behind ``torchrun``), on a free
rendezvous port unless MASTER_PORT names one.

Several hosts (``launch/multinode.sh``), one command per host::

    python -m splitrpc.launch multinode --nnodes 4 --node-rank R --master-addr HOST --master-port PORT -- <train options>

uses torchrun's static rendezvous: node ranks fix the layout. Under
``--method split`` node 0 runs the server alone (rank 0) and every other node
runs ``--nproc-per-node`` hospitals; under ``--method ddp`` every node runs
hospitals. ``--print-torchrun`` prints the equivalent torchrun command
instead of running it.

Either way a failed worker is reported in one line instead of torchrun's
error report, and a rendezvous that never completes ends with one line after
``--rdzv-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import socket
import sys
import uuid

from splitrpc import console
from splitrpc.errors import UserError, report

SHUTDOWN_GRACE_S = 5  # after one worker fails, the others get this long to exit before SIGKILL
DEFAULT_RDZV_TIMEOUT_S = 120


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"port {port} on {host} is in use ({exc.strerror}); set MASTER_PORT to a free port "
                            f"or unset it to let splitrpc pick one") from None


def _worker_environment() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # splitrpc sets torch's threads itself
    # Workers host their own store rather than sharing the agent's: after a restart the
    # new group then starts from an empty store, where RPC's rendezvous keys (which carry
    # no attempt number) cannot point at the dead processes' ports (pytorch/pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # TensorPipe logs every pipe that a failed peer closes, and the release of every
    # distributed-autograd context that can no longer reach it: consequences of a
    # failure that the workers report themselves in one line. TORCH_CPP_LOG_LEVEL=INFO
    # brings them back.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    # The agent's own log lines (closing signals, the failed worker's exit code) repeat what
    # the workers report themselves, or what this launcher says below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)


def _run_agent(config, argv: list[str], rendezvous: str) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "splitrpc.train", *argv)
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()
        if first.exitcode is None or first.exitcode < 0:
            # The first worker to fail was ended by a signal and said nothing itself (the
            # others were then stopped by the agent). A worker that exits with a code has
            # already printed its one line.
            signal_text = f" by signal {-first.exitcode}" if first.exitcode else ""
            console.line(f"splitrpc: run failed: rank {rank} was killed{signal_text}", sys.stderr)
            return 1
        return first.exitcode
    except SignalException as exc:  # Ctrl-C or a SIGTERM: the agent has stopped the workers
        console.line(f"splitrpc: stopped by signal {exc.sigval.name}", sys.stderr)
        return 128 + int(exc.sigval)
    except Exception as exc:  # the agent's own failures: rendezvous timeouts, unreachable store
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "time" in text.lower() and "out" in text.lower():
            raise UserError(f"rendezvous at {rendezvous} did not complete within --rdzv-timeout "
                            f"{config.rdzv_configs.get('timeout')} s ({text}); check that every node runs with the "
                            f"same --nnodes and can reach that address") from None
        raise UserError(f"torchrun's agent failed at rendezvous {rendezvous}: {text}") from None
    return 0


def launch(cfg, argv: list[str], max_restarts: int = 0) -> int:
    """Run ``python -m splitrpc.train <argv>`` in cfg.world_size processes on this host."""
    from torch.distributed.launcher.api import LaunchConfig

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "0"))  # 0: the store picks a free port
    if port:
        _check_port_free(host, port)
    _worker_environment()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.world_size,
        run_id=f"splitrpc-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d", rdzv_endpoint=f"{host}:{port}",
        max_restarts=max_restarts, monitor_interval=0.2, start_method="spawn",
        shutdown_timeout=SHUTDOWN_GRACE_S,
    )
    return _run_agent(config, argv, f"{host}:{port}")


# Private memory of one party, measured with bench.scale (results/scale.jsonl: split learning,
# ResNet-20 x0.25 on synthetic data, batch 8; the median hospital, rounded up): a spawned party
# imports torch itself (about 280 MB of it private with this CUDA build, docs/scale.md); forked
# parties share the zygote's import, which is counted once. A larger model or real data adds to
# this (a real-CIFAR hospital of VGG-11 x0.25 at N = 4 holds over 1 GB), so this is a floor.
PARTY_MB = {"spawn": 410, "fork": 170}
ZYGOTE_MB = 330
MEMORY_CHECK_ENV = "SPLITRPC_NO_MEMORY_CHECK"  # set to 1 to start anyway


def available_mb() -> float:
    """MemAvailable of /proc/meminfo, in MB (inf where there is no /proc/meminfo)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def memory_needed_mb(parties: int, start: str) -> float:
    return parties * PARTY_MB[start] + (ZYGOTE_MB if start == "fork" else 0)


def check_memory(cfg, available: float | None = None) -> None:
    """Refuse, in one line, a one-host run whose parties cannot fit in this machine's memory (the kernel's
    out-of-memory killer would end one of them half-way, after every other had started)."""
    if os.environ.get(MEMORY_CHECK_ENV) == "1":
        return
    available = available_mb() if available is None else available
    parties = cfg.world_size
    needed = memory_needed_mb(parties, cfg.start)
    if needed <= available:
        return
    hint = ""
    if cfg.start == "spawn" and memory_needed_mb(parties, "fork") <= available:
        hint = (f"; --start fork shares torch among them (about {PARTY_MB['fork']} MB each, "
                f"{memory_needed_mb(parties, 'fork') / 1024:.1f} GiB)")
    raise UserError(f"{parties} parties need at least {needed / 1024:.1f} GiB of memory (about "
                    f"{PARTY_MB[cfg.start]} MB each with --start {cfg.start}) but {available / 1024:.1f} GiB is "
                    f"available{hint}; or run fewer hospitals per host (docs/scale.md; {MEMORY_CHECK_ENV}=1 "
                    f"starts anyway)")


def forked(cfg, argv: list[str]) -> int:
    """``--start fork``: ``python -m splitrpc.zygote`` forks cfg.world_size parties from one torch import."""
    import subprocess

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "0"))
    if port:
        _check_port_free(host, port)
    else:
        with socket.socket() as s:  # rank 0's store binds it a moment later
            s.bind((host, 0))
            port = s.getsockname()[1]
    _worker_environment()
    # Fewer malloc arenas: each thread that allocates (the RPC agent's 16 and more) would get its own,
    # touching pages of its own; measured with bench.scale at N = 4: 166 instead of 188 MB a hospital.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    proc = subprocess.Popen([sys.executable, "-m", "splitrpc.zygote", str(cfg.world_size), str(port), "--", *argv])
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the parties got the terminal's SIGINT too; the zygote collects them
        return proc.wait()


def node_processes(cfg, nnodes: int, node_rank: int, per_node: int) -> int:
    """Processes this node starts: the server alone on node 0 under split, else ``per_node`` hospitals."""
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank {node_rank} is outside 0..{nnodes - 1}")
    from splitrpc import methods

    return methods.get(cfg.method).node_processes(cfg, nnodes, node_rank, per_node)


def multinode(args, train_argv: list[str]) -> int:
    from splitrpc.config import parse_args

    cfg = parse_args(train_argv)
    if cfg.max_restarts:
        raise UserError("--max-restarts works on one host only (launch/local.sh); across hosts rerun every node "
                        "with --resume")
    nproc = node_processes(cfg, args.nnodes, args.node_rank, args.nproc_per_node)
    endpoint = f"{args.master_addr}:{args.master_port}"
    torchrun = ["torchrun", "--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank),
                "--nproc-per-node", str(nproc), "--rdzv-backend", "static", "--rdzv-endpoint", endpoint,
                "--rdzv-id", args.run_id, "--rdzv-conf", f"timeout={args.rdzv_timeout}",
                "-m", "splitrpc.train", *train_argv]
    if args.print_torchrun:
        console.line(shlex.join(torchrun))
        return 0
    from torch.distributed.launcher.api import LaunchConfig

    _worker_environment()
    config = LaunchConfig(
        min_nodes=args.nnodes, max_nodes=args.nnodes, nproc_per_node=nproc, run_id=args.run_id,
        rdzv_backend="static", rdzv_endpoint=endpoint,
        rdzv_configs={"rank": args.node_rank, "timeout": args.rdzv_timeout},
        max_restarts=0, monitor_interval=0.2, start_method="spawn", shutdown_timeout=SHUTDOWN_GRACE_S,
        local_addr=args.local_addr,
    )
    return _run_agent(config, train_argv, endpoint)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _worker_environment()  # before torch is imported: its C++ logging reads the level once
    parser = argparse.ArgumentParser(prog="python -m splitrpc.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("local", help="one host; every other argument goes to splitrpc-train", add_help=False)
    sub.add_parser("world-size", help="print the processes a run needs", add_help=False)
    node = sub.add_parser("multinode", help="one node of a multi-host run")
    node.add_argument("--nnodes", type=int, required=True)
    node.add_argument("--node-rank", type=int, required=True)
    node.add_argument("--nproc-per-node", type=int, default=1, help="hospitals on this node (not node 0 under split)")
    node.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", ""))
    node.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    node.add_argument("--rdzv-endpoint", default="", help="HOST:PORT, instead of --master-addr/--master-port")
    node.add_argument("--rdzv-timeout", type=int, default=DEFAULT_RDZV_TIMEOUT_S)
    node.add_argument("--run-id", default="splitrpc", help="the same on every node")
    node.add_argument("--local-addr", default=None, help="this node's address as the others reach it")
    node.add_argument("--print-torchrun", action="store_true", help="print the torchrun command instead")
    if argv and argv[0] in ("local", "world-size"):
        mode, rest = argv[0], argv[1:]
    else:
        if "--" in argv:
            split = argv.index("--")
            ours, rest = argv[:split], argv[split + 1:]
        else:
            ours, rest = argv, []
        args = parser.parse_args(ours)
        mode = args.mode
    try:
        from splitrpc.config import parse_args

        if mode == "world-size":
            console.line(str(parse_args(rest).world_size))
            return 0
        if mode == "local":
            # Exactly `python -m splitrpc.train <options>`, which starts the one-host group itself
            # (exec'd rather than imported: train hands multi-process runs to this module).
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", "splitrpc.train", *rest])
        if args.rdzv_endpoint:
            host, _, port = args.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise UserError(f"--rdzv-endpoint: expected HOST:PORT, got {args.rdzv_endpoint!r}")
            args.master_addr, args.master_port = host, int(port)
        if not args.master_addr:
            raise UserError("give --master-addr (node 0's address, reachable from every node) or --rdzv-endpoint")
        return multinode(args, rest)
    except UserError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
