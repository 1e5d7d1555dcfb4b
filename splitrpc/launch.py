"""Start a one-host run under torchrun's elastic agent, with the right number of processes.

``splitrpc-train --method split --hospitals 3 ...`` run outside torchrun
comes here: it starts 1 server + 3 hospitals (or N DDP ranks) on this host
through torch's elastic launcher, on a free rendezvous port unless
MASTER_PORT names one, and turns a failed worker into one line instead of
torchrun's error report.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid

from splitrpc.errors import UserError

SHUTDOWN_GRACE_S = 5  # after one worker fails, the others get this long to exit before SIGKILL


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"port {port} on {host} is in use ({exc.strerror}); set MASTER_PORT to a free port "
                            f"or unset it to let splitrpc pick one") from None


def launch(cfg, argv: list[str], max_restarts: int = 0) -> int:
    """Run ``python -m splitrpc.train <argv>`` in cfg.world_size processes on this host."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "0"))  # 0: the store picks a free port
    if port:
        _check_port_free(host, port)
    # The agent's own log lines (closing signals, the failed worker's exit code) repeat what
    # the workers report themselves, or what this launcher says below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.world_size,
        run_id=f"splitrpc-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d", rdzv_endpoint=f"{host}:{port}",
        max_restarts=max_restarts, monitor_interval=0.2, start_method="spawn",
        shutdown_timeout=SHUTDOWN_GRACE_S,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # splitrpc sets torch's threads itself
    # TensorPipe warns on every pipe a failed peer closes; its errors still show.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "splitrpc.train", *argv)
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()
        if first.exitcode is None or first.exitcode < 0:
            # The first worker to fail was ended by a signal and said nothing itself (the
            # others were then stopped by the agent). A worker that exits with a code has
            # already printed its one line.
            signal_text = f" by signal {-first.exitcode}" if first.exitcode else ""
            print(f"splitrpc: run failed: rank {rank} was killed{signal_text}", file=sys.stderr, flush=True)
            return 1
        return first.exitcode
    return 0
