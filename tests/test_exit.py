"""A worker whose part of a backward pass is still running when it leaves exits cleanly.

Seen in CI: a hospital stopped by SIGSTOP and dropped by the server resumed after the
run had finished and aborted at exit ("terminate called without an active exception"),
so a run that ended well reported a killed worker. ``tests/exit_peer.py`` reproduces it
deterministically: the hospital leaves while distributed autograd's thread runs its hook.

Seen later (test_faults' hung-hospital run, about 1 in 10): the woken hospital's local RPC
shutdown waited forever for a request handler that never returns. ``tests/stuck_peer.py``
holds such a handler open; ``transport.stop_rpc`` gives the local shutdown a bound.
"""

import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from splitrpc.transport import LOCAL_SHUTDOWN_WAIT_S

pytestmark = pytest.mark.distributed


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_pair(tmp_path, mode: str) -> int:
    port, flag = _free_port(), str(tmp_path / f"hook-started-{mode}")
    peer = str(REPO / "tests" / "exit_peer.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_CPP_LOG_LEVEL": "FATAL"}
    server = subprocess.Popen([sys.executable, peer, "0", port, flag, mode], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hospital = subprocess.run([sys.executable, peer, "1", port, flag, mode], env=env, capture_output=True,
                              text=True, timeout=60)
    server.wait(timeout=60)
    return hospital.returncode


def test_leaving_with_a_backward_hook_still_running_aborts_without_leave_worker(tmp_path):
    # The hazard itself, so that the test below can fail for its reason: finalizing the
    # interpreter under distributed autograd's running hook kills the process.
    assert run_pair(tmp_path, "return") < 0


def test_leave_worker_exits_cleanly_with_a_backward_hook_still_running(tmp_path):
    assert run_pair(tmp_path, "leave") == 0


def stuck_pair(tmp_path, mode: str, timeout: float):
    """Rank 1's seconds in its local RPC shutdown with a handler that never returns (None: still in it)."""
    port, flag = _free_port(), str(tmp_path / f"handler-started-{mode}")
    peer = str(REPO / "tests" / "stuck_peer.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_CPP_LOG_LEVEL": "FATAL"}
    server = subprocess.Popen([sys.executable, peer, "0", port, flag, mode], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hospital = subprocess.Popen([sys.executable, peer, "1", port, flag, mode], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = hospital.communicate(timeout=timeout)
        assert hospital.returncode == 0
        return float(out.strip())
    except subprocess.TimeoutExpired:
        hospital.kill()
        hospital.wait()
        return None
    finally:
        server.kill()
        server.wait()


def test_a_handler_that_never_returns_holds_a_local_rpc_shutdown(tmp_path):
    # The hazard, so that the test below can fail for its reason: still shutting down after 15 s.
    assert stuck_pair(tmp_path, "unbounded", timeout=15) is None


def test_stop_rpc_leaves_a_handler_that_never_returns_behind_within_its_bound(tmp_path):
    seconds = stuck_pair(tmp_path, "bounded", timeout=60)
    assert seconds is not None and LOCAL_SHUTDOWN_WAIT_S - 0.5 <= seconds <= LOCAL_SHUTDOWN_WAIT_S + 5
