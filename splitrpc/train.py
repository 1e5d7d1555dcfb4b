"""Entry point: ``python -m splitrpc.train`` (console script ``splitrpc-train``).

Under torchrun each process finds its role from its rank. Run directly,
``--method local`` trains in this process and the distributed methods
start their own torchrun group on this host (see ``splitrpc.launch``).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings

from splitrpc import console, heap, lifecycle, methods, transport
from splitrpc.config import parse_args
from splitrpc.errors import PeerError, UserError, report


QUIET_EXIT_DELAY_S = 2.0
# More than two of a hospital's store polls (hospital.FINISH_POLL_S), with room for a busy machine.
STORE_HOST_LINGER_S = 1.0


def _quiet_library_warnings() -> None:
    # Deprecation chatter from torch.distributed that users cannot act on.
    warnings.filterwarnings("ignore", message=".*Backend.*as a ProcessGroup.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def run_worker(cfg) -> int:
    """One process of a torchrun group: its rank's party of the method (server or hospital, a rank)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    method = methods.get(cfg.method)
    if world_size != method.world_size(cfg):
        raise UserError(f"torchrun started {world_size} processes but --method {cfg.method} --hospitals "
                        f"{cfg.hospitals} needs {method.world_size(cfg)} ({method.roles(cfg)}); use --nproc-per-node "
                        f"{method.world_size(cfg)}")
    transport.set_threads(cfg, rank)
    coordinator = transport.Coordinator(rank, world_size, cfg.setup_timeout)
    return lifecycle.run(cfg, rank, coordinator)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_library_warnings()
    distributed = transport.under_torchrun()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    multinode = os.environ.get("LOCAL_WORLD_SIZE", "1") != os.environ.get("WORLD_SIZE", "1")
    who = transport.role_name(rank) if distributed else ""
    try:
        cfg = parse_args(argv)
        heap.apply(cfg.heap)  # before the run's tensors (torch's import has made a few)
        method = methods.get(cfg.method)
        if distributed:
            who = method.who(rank)
        if method.one_process:
            if distributed and int(os.environ["WORLD_SIZE"]) != 1:
                raise UserError(f"--method {cfg.method} runs in one process; do not start it with several torchrun "
                                "processes")
            return lifecycle.run(cfg)
        if not distributed:
            from splitrpc import data, launch

            # Every process of a one-host run reads the same source: decode it (or
            # fail with one line) here, before any process starts; likewise the
            # hospitals' deduplication key and manifest (read here, not by the server).
            launch.check_memory(cfg)  # before decoding anything
            data.prepare(cfg)
            if cfg.dedup == "hmac":
                from splitrpc.dedup.hmac_tokens import load_key
                from splitrpc.split.protocol import key_file

                for index in range(1, cfg.hospitals + 1):
                    load_key(key_file(cfg, index))
            if cfg.dedup_manifest:
                from splitrpc.dedup.identities import read_manifest

                read_manifest(cfg.dedup_manifest)
            if cfg.start == "fork":
                return launch.forked(cfg, argv)
            return launch.launch(cfg, argv, max_restarts=cfg.max_restarts)
        return run_worker(cfg)
    except (UserError, PeerError) as exc:
        # Input errors are the same on every process: one report per host. A
        # failure is reported by the process where it happened (the first one),
        # and repeated by rank 0 when that process may be on another host.
        original = getattr(exc, "first_failure", not getattr(exc, "consequence", False))
        if isinstance(exc, UserError) and not hasattr(exc, "first_failure"):
            original = local_rank == 0
        if original or (rank == 0 and multinode):
            report(exc, who)
        elif distributed:
            # torchrun tears the group down at the first exit; let the reporting process speak first.
            time.sleep(QUIET_EXIT_DELAY_S)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def leave_worker(code: int) -> None:
    """End a torchrun worker process now, without Python's finalization.

    Distributed autograd runs the part of a peer's backward pass that lives here (the
    hospital's gradient hook, in Python) on a C++ thread that ``rpc.shutdown`` does not
    stop. A hospital that hung and was dropped by the server can still be running one
    when it leaves; if the interpreter finalizes meanwhile, that thread's call into
    Python aborts the process (SIGABRT, "terminate called without an active exception"),
    and a run that ended well reports a killed worker. Everything worth keeping is
    written by now (records and checkpoints are closed files); only the streams need
    flushing. ``tests/test_exit.py`` shows the abort and this way out.

    Rank 0 hosts the coordination store (``launch`` has the workers host their own).
    After a failure it stays a moment, so that every peer polling the store reads the
    failure and leaves quietly as its consequence instead of reporting a lost server.
    """
    if code != 0 and int(os.environ.get("RANK", "-1")) == 0:
        time.sleep(STORE_HOST_LINGER_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def worker_main() -> None:
    """``python -m splitrpc.train``: under torchrun every way out goes through ``leave_worker``."""
    if not transport.under_torchrun():
        sys.exit(main())
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            console.line(exc.code, sys.stderr)
    except BaseException:  # noqa: BLE001 - an unexpected error still prints its traceback, then leaves
        traceback.print_exc()
        code = 1
    leave_worker(code)


if __name__ == "__main__":
    worker_main()
