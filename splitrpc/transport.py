"""Everything that touches torch.distributed: process roles, RPC start and stop,
the coordination store, liveness. Kept in one module so another transport
(c10d send/recv, say) could replace TensorPipe without touching the trainers.

Roles under ``--method split``: rank 0 is ``server``, ranks 1..N are
``hospital1``..``hospitalN``. Every process joins through torchrun's store
(``env://``).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

from splitrpc.errors import PeerError, UserError

SERVER = "server"
KEY_PREFIX = "splitrpc"
FAILURE_STORE_TIMEOUT_S = 5.0  # store calls after a failure (Coordinator.fail)
CONTEXT_CLOSE_TIMEOUT_S = 30  # releasing a context only sends notices; a peer that is gone cannot hold it up


def hospital_name(index: int) -> str:
    return f"hospital{index}"


def role_name(rank: int) -> str:
    return SERVER if rank == 0 else hospital_name(rank)


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def threads_for(cfg, rank: int | None, cores: int, local_processes: int) -> int:
    """Intra-op threads of one process: ``rank`` under torchrun (None: the local trainer).

    --threads sets every process. Otherwise, under split learning the server gets every
    core of its host and a hospital one thread when the server shares its host: L1 is a
    small share of a step's work, and it runs while the server waits or (prefetched)
    computes, so dividing the cores evenly would leave the server, which does almost
    all the work, with a fraction of them. --server-threads and --hospital-threads
    override each role. Other methods divide the host's cores among its processes.
    """
    if cfg.threads:
        return cfg.threads
    # Split learning and its variants: a server besides the hospitals (their method's world size says so;
    # asking the registry here would import it into this module, which the registry's methods import).
    if rank is not None and cfg.world_size > cfg.hospitals:
        if rank == 0:
            return cfg.server_threads or cores
        server_here = local_processes > cfg.hospitals  # one host runs every party
        return cfg.hospital_threads or (1 if server_here else max(1, cores // local_processes))
    return max(1, cores // local_processes)


def set_threads(cfg, rank: int | None = None) -> int:
    threads = threads_for(cfg, rank, os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def compute_device(cfg) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


class Coordinator:
    """Set-up, failure and finish signals through torchrun's c10d store.

    RPC cannot carry these: a party that failed while loading data never joins
    RPC, and hospitals must learn that the server finished without holding an
    RPC open for the whole run. Keys are scoped to torchrun's restart count.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                           timeout=timedelta(seconds=timeout_s)))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"{KEY_PREFIX}/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}", store)
        self.rank, self.world_size = rank, world_size
        self.store_gone = False  # set when a call to the store timed out: it is not asked again

    @contextmanager
    def reporting(self, who: str):
        """Record an exception raised inside as this process's failure, before it tears anything down,
        so that peers see the cause rather than our disappearance."""
        try:
            yield
        except BaseException as exc:
            if not getattr(exc, "consequence", False) and not hasattr(exc, "first_failure"):
                exc.first_failure = self.fail(who, str(exc) or type(exc).__name__)
            raise

    def mark_ready(self) -> None:
        self.store.add("ready", 1)

    def fail(self, who: str, message: str) -> bool:
        """Record a failure; True if it is the run's first (later ones are its consequences).

        If the store itself is gone (its host died, or a call to it timed out before), this
        process's failure is reported as first.
        """
        value = f"{who}: {message}"
        if self.store_gone:
            return True
        try:
            # After a failure no store call may wait long: the store's host may be the party that
            # stopped (its default timeout is --setup-timeout, minutes).
            self.store.set_timeout(timedelta(seconds=FAILURE_STORE_TIMEOUT_S))
            return self.store.compare_set("failure", "", value).decode() == value
        except Exception:
            self.store_gone = True
            return True

    def failure(self) -> str | None:
        if self.store.check(["failure"]):
            value = self.store.get("failure").decode()
            return value or None
        return None

    def wait_all_ready(self, timeout_s: float, poll_s: float = 0.2) -> None:
        """Block until every process prepared its data, or one reported a failure."""
        deadline = time.monotonic() + timeout_s
        while True:
            failure = self.failure()
            if failure:
                raise PeerError(f"stopping: {failure}", consequence=True)
            if int(self.store.add("ready", 0)) >= self.world_size:
                return
            if time.monotonic() > deadline:
                raise PeerError(f"not every party was ready within --setup-timeout {timeout_s:g} s "
                                f"({int(self.store.add('ready', 0))} of {self.world_size})")
            time.sleep(poll_s)

    def mark_lost(self, who: str) -> None:
        self.store.set(f"lost/{who}", "1")
        self.store.add("lost", 1)

    def lost(self) -> bool:
        return int(self.store.add("lost", 0)) > 0

    def finish(self) -> None:
        self.store.set("finished", "1")

    def finished(self) -> bool:
        return self.store.check(["finished"])

    def acknowledge_finish(self, who: str) -> None:
        self.store.set(f"finished_ack/{who}", "1")

    def wait_for_acknowledgements(self, who: list[str], timeout_s: float, poll_s: float = 0.1) -> None:
        """The server leaves last: wait (bounded) until each of ``who`` has seen the finish.

        Without torchrun's agent the server's process hosts the store, and hospitals
        still polling it must not find it gone. Each hospital acknowledges under its
        own name: a dropped hospital that wakes up after the finish (a SIGSTOP ended)
        must not stand in for a live one that has yet to look.
        """
        keys = [f"finished_ack/{name}" for name in who]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys) and time.monotonic() < deadline:
            time.sleep(poll_s)


def init_hospital_group(cfg, rank: int) -> torch.device:
    """The process group of the data-parallel methods (DDP, FedAvg): the hospitals as ranks 0..N-1.

    Tensors of a CUDA model go over NCCL on a GPU; the small CPU tensors of the loss and
    evaluation bookkeeping always over gloo. A dead or hung rank fails the others'
    collectives after --rpc-timeout, not gloo's 30 minutes. Returns the compute device.
    """
    device = compute_device(cfg)
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=cfg.hospitals,
                            timeout=timedelta(seconds=cfg.rpc_timeout))
    return device


def rpc_options(cfg) -> rpc.TensorPipeRpcBackendOptions:
    kwargs = {}
    if cfg.transport == "tcp":
        # On one host TensorPipe would pick shared memory and cross-memory attach,
        # and no byte would cross a socket; force the TCP transport and the basic
        # channel so every byte is carried (and counted) by the kernel's TCP stack.
        kwargs = {"_transports": ["uv"], "_channels": ["basic"]}
    return rpc.TensorPipeRpcBackendOptions(num_worker_threads=cfg.rpc_threads, rpc_timeout=cfg.rpc_timeout,
                                           init_method="env://", **kwargs)


def start_rpc(cfg, rank: int, world_size: int) -> None:
    rpc.init_rpc(role_name(rank), rank=rank, world_size=world_size, rpc_backend_options=rpc_options(cfg))


LOCAL_SHUTDOWN_WAIT_S = 5.0


def stop_rpc(graceful: bool, timeout_s: float) -> None:
    """rpc.shutdown, never without a bound: a graceful stop that overruns falls back to a local one,
    and a local one is given ``LOCAL_SHUTDOWN_WAIT_S``.

    A local shutdown waits for every RPC handler running here to return. A hospital
    the server dropped while it hung can hold one that never will: a forward request
    that reached it after the server had released its RRef finds no object and waits
    for one to be created (``OwnerRRef::getValue``; seen with py-spy in
    tests/test_faults.py's hung-hospital run, about 1 in 10). So the shutdown runs on a
    thread of its own and the caller goes on after the bound; the server and the
    hospitals then leave without finalization (``splitrpc.train.leave_worker``), which
    ends that thread too. ``tests/test_exit.py`` shows the wait and the bound.
    """
    if graceful:
        try:
            rpc.shutdown(graceful=True, timeout=timeout_s)
            return
        except Exception:
            pass

    def local():
        try:
            rpc.shutdown(graceful=False)
        except Exception:
            pass

    stopping = threading.Thread(target=local, name="rpc-local-shutdown", daemon=True)
    stopping.start()
    stopping.join(LOCAL_SHUTDOWN_WAIT_S)


class StepContext:
    """A distributed-autograd context that lives on a thread of its own until ``close()``.

    A context belongs to the thread that opened it (torch has no call that hands one
    over), yet the forward requests of step k+1 must leave inside step k+1's context
    while step k runs in its own. So each step's context is opened on a short-lived
    thread, which sends the step's requests inside it (``send()``, whose result is
    ``sent``) and then holds the context open. The backward pass and the gradients
    take the context's ``id`` and work from any thread.
    """

    def __init__(self, send):
        self._opened: Future = Future()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(send,), name="autograd-context", daemon=True)
        self._thread.start()
        self.id, self.sent = self._opened.result()

    def _hold(self, send) -> None:
        try:
            with dist_autograd.context() as context_id:
                self._opened.set_result((context_id, send()))
                self._closing.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits
            if not self._opened.done():
                self._opened.set_exception(exc)

    def close(self) -> None:
        """Release the context (its gradients, here and on every peer it reached)."""
        self._closing.set()
        self._thread.join(timeout=CONTEXT_CLOSE_TIMEOUT_S)


def all_reduce_mean_(tensors: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Average ``tensors`` in place over the default process group, as one flat CPU buffer; returns the buffer."""
    flat = torch.cat([t.detach().reshape(-1).cpu() for t in tensors])
    dist.all_reduce(flat)
    flat /= group_size
    return _unflatten_into(flat, tensors)


def all_reduce_weighted_(tensors: list[torch.Tensor], weight: float) -> torch.Tensor:
    """Replace ``tensors`` in place by the sum over the default process group of each rank's
    ``weight * tensors`` (a weighted mean when the weights sum to 1), as one flat CPU buffer."""
    flat = torch.cat([t.detach().reshape(-1).cpu() for t in tensors]) * weight
    dist.all_reduce(flat)
    return _unflatten_into(flat, tensors)


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Copy consecutive slices of ``flat`` back into ``tensors``; returns ``flat``."""
    offset = 0
    for t in tensors:
        with torch.no_grad():
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return flat


def heartbeat() -> int:
    """Called by hospitals on the server over RPC to tell that it is alive."""
    return os.getpid()


def remote_error_summary(exc: BaseException) -> str:
    """One line from an exception that crossed RPC (which appends the remote traceback)."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "On WorkerInfo(" in line and i + 1 < len(lines):
            return lines[i + 1]
    for line in lines:
        if "timeout" in line.lower() or "timed out" in line.lower():
            return line
    return lines[0] if lines else type(exc).__name__
