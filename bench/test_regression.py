"""Regression benchmarks (pytest-benchmark). `make bench-check` (bench/check.py) turns them
into relative speeds and compares those with bench/baseline/baseline.json; `make bench-save`
refreshes it.

Every timed call alternates, round by round, with its **reference**, timed in pytest-benchmark's
untimed ``setup`` of the same round: a split or DDP step with a local step of the same samples,
an RPC round trip with the same bytes' round trip over a plain TCP socket (the floor). Machine
speed on 2 shared cores drifts by 20-30 % over minutes, so a reference measured in another
benchmark a minute later moved the ratios by up to 40 % between runs; measured alternately
they move far less. The reference's times go into ``extra_info["reference_s"]``.

The pytest process is the server (rank 0) of a real RPC group whose two hospitals are
subprocesses, and rank 0 of a 2-rank DDP group whose other rank steps in lockstep. Bytes
per step go into ``extra_info``; CI checks only the bytes (tests/test_bench_bytes.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from bench.rpc_bytes import SIZES, wire_bytes
from bench.rpc_peer import echo
from bench.steps import MODELS, config, ddp_setup, ddp_step
from splitrpc import comm, transport

REPO = Path(__file__).resolve().parents[1]
# Rounds per benchmark: a split step's median over 8 rounds after 1 warm-up moved by up to 35 %
# between two runs on 2 shared cores, and its first ~5 rounds ran up to twice as slow as the
# rest (the hospitals' allocators and the connections warming up); more warm-up and more
# rounds make the ratios `make bench-check` compares steadier.
STEP_ROUNDS, PAIR_ROUNDS, WARMUP_ROUNDS = 20, 12, 6
RPC_ROUNDS = {"64KB": 400, "1MB": 200, "8MB": 60}
CORES = os.cpu_count() or 1


@pytest.fixture(autouse=True)
def intra_op_threads():
    """Each benchmark runs with the threads `splitrpc-train` gives its role on this host (the
    split server and local training every core, a hospital and a DDP rank 1), so a ratio
    compares the settings a user runs; restored afterwards so no benchmark inherits another's."""
    before = torch.get_num_threads()
    torch.set_num_threads(CORES)
    yield
    torch.set_num_threads(before)


class Reference:
    """A reference timed in each round's setup, so that it alternates with the timed call."""

    def __init__(self, benchmark, what: str, fn):
        self.benchmark, self.what, self.fn, self.seconds = benchmark, what, fn, []

    def __call__(self):
        started = time.perf_counter()
        self.fn()
        self.seconds.append(time.perf_counter() - started)

    def pedantic(self, target, rounds: int):
        result = self.benchmark.pedantic(target, setup=self, rounds=rounds, iterations=1, warmup_rounds=WARMUP_ROUNDS)
        self.benchmark.extra_info["reference"] = self.what
        self.benchmark.extra_info["reference_s"] = self.seconds[WARMUP_ROUNDS:]
        return result


def _local_steps(model: str, *extra: str, steps=(((1, 0), (2, 0)),)):
    """A local trainer of the benchmark's model and the steps of one reference call."""
    from splitrpc.local import LocalTrainer

    trainer = LocalTrainer(config(model, *_cache_args(), *extra).replace(method="local", threads=CORES))

    def run():
        before = torch.get_num_threads()  # a DDP rank steps with 1 thread; local training uses every core
        torch.set_num_threads(CORES)
        for participants in steps:
            trainer.train_step(0, 0, list(participants), 0.05)
        torch.set_num_threads(before)

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_args() -> list[str]:
    return ["--cache-dir", str(REPO / ".cache" / "bench-data")]


@pytest.fixture(scope="session")
def rpc_group():
    """This process as the server of a split group with two hospital subprocesses, over TCP."""
    port = _free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "3",
            "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "TORCH_CPP_LOG_LEVEL": "FATAL"}
    cfg = config("resnet20", *_cache_args())
    hospitals = [subprocess.Popen([sys.executable, "-m", "splitrpc.train", *_train_args("resnet20", "split")],
                                  env={**base, "RANK": str(r)}, cwd=REPO, stdout=subprocess.DEVNULL)
                 for r in (1, 2)]
    saved = {k: os.environ.get(k) for k in base}
    os.environ.update({k: base[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK",
                                            "LOCAL_WORLD_SIZE")})
    os.environ["RANK"] = "0"
    coordinator = transport.Coordinator(0, 3, cfg.setup_timeout)
    coordinator.mark_ready()
    coordinator.wait_all_ready(cfg.setup_timeout)
    transport.start_rpc(cfg, 0, 3)
    try:
        yield coordinator
    finally:
        coordinator.finish()
        coordinator.wait_for_acknowledgements([transport.hospital_name(r) for r in (1, 2)], timeout_s=30)
        transport.stop_rpc(graceful=True, timeout_s=30)
        for p in hospitals:
            p.wait(timeout=60)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.pop("RANK", None)


def _train_args(model: str, method: str) -> list[str]:
    from bench.steps import COMMON

    return [*COMMON, *MODELS[model], "--method", method, *_cache_args()]


@pytest.fixture(scope="session")
def tcp_echo():
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, "-m", "bench.rpc_peer", str(port_file)], cwd=REPO)
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        sock = socket.create_connection(("127.0.0.1", int(port_file.read_text())))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield sock
        sock.close()
        proc.kill()


def _tcp_round_trip(sock: socket.socket, nbytes: int):
    payload = bytes(nbytes)
    view = memoryview(bytearray(nbytes))

    def round_trip():
        sock.sendall(payload)
        got = 0
        while got < nbytes:
            got += sock.recv_into(view[got:])
        assert got == nbytes

    return round_trip


@pytest.mark.parametrize("size", list(SIZES))
def test_rpc_round_trip(benchmark, rpc_group, tcp_echo, size):
    """An RPC round trip of a tensor, alternating with the same bytes' round trip over plain TCP."""
    tensor = torch.zeros(SIZES[size] // 4)
    benchmark.extra_info["payload_bytes_per_call"] = 2 * comm.tensor_bytes(tensor)
    calls = 0

    def call():
        nonlocal calls
        calls += 1
        return rpc.rpc_sync("hospital1", echo, args=(tensor,))

    before = wire_bytes(comm.store_port())
    result = Reference(benchmark, "tcp round trip", _tcp_round_trip(tcp_echo, SIZES[size])).pedantic(
        call, rounds=RPC_ROUNDS[size])
    after = wire_bytes(comm.store_port())
    assert result.shape == tensor.shape
    if before and after:  # the kernel's count (heartbeats of the group included), beside the payload
        benchmark.extra_info["tcp_bytes_per_call"] = (after[0] - before[0] + after[1] - before[1]) / calls


def _bytes_per_step(benchmark, server, steps: int) -> None:
    train = server.ledger.payload["train"]
    benchmark.extra_info["server_bytes_per_step"] = {"sent": sum(d["sent"] for d in train.values()) / steps,
                                                     "received": sum(d["received"] for d in train.values()) / steps}


@pytest.mark.parametrize("model", list(MODELS))
def test_split_step(benchmark, rpc_group, model):
    """One parallel step of split learning (2 hospitals), alternating with a local step of the same samples."""
    from splitrpc.split.server import Server

    server = Server(config(model, *_cache_args()), rpc_group)
    server.ledger.switch("train")
    steps = 0

    def step():
        nonlocal steps
        steps += 1  # warm-up rounds send bytes too, so count every call
        server.train_step(0, 0, [(1, 0), (2, 0)], 0.05)

    Reference(benchmark, "local step", _local_steps(model)).pedantic(step, rounds=STEP_ROUNDS)
    _bytes_per_step(benchmark, server, steps)
    benchmark.extra_info["samples_per_step"] = 256


@pytest.fixture(scope="module")
def ddp_group():
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": "1",
           "LOCAL_RANK": "0", "TORCH_CPP_LOG_LEVEL": "FATAL"}
    yield port, env


@pytest.mark.parametrize("model", list(MODELS))
def test_ddp_step(benchmark, ddp_group, model):
    port, env = ddp_group
    cfg = config(model, *_cache_args())
    peer = subprocess.Popen([sys.executable, "-m", "bench.ddp_peer", *_train_args(model, "ddp")], env=env, cwd=REPO)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    try:
        trainer = ddp_setup(cfg.replace(method="ddp"), rank=0)
        torch.set_num_threads(cfg.threads)  # as bench/ddp_peer.py sets the other rank
        flag = torch.ones(1)

        def step():
            flag.fill_(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ddp_step(trainer)

        # The peer waits in the all-reduce of the flag while rank 0 takes its local reference step.
        Reference(benchmark, "local step", _local_steps(model)).pedantic(step, rounds=STEP_ROUNDS)
        benchmark.extra_info["bucket_bytes_per_step"] = trainer.hook_state.bucket_bytes / trainer.steps
        benchmark.extra_info["samples_per_step"] = 256
        flag.fill_(0)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    finally:
        dist.destroy_process_group()
        peer.wait(timeout=60)


def _two_sequential_steps(server, cfg):
    """The server's side of two sequential steps (hospital1, then hospital2), as the loop takes them."""
    from splitrpc import data, loop

    plan = data.epoch_plan([i["train_batches"] for i in server.info], cfg.schedule)
    server.loop = loop.Loop(cfg, plan, server.train_step, server.evaluate, who="server", quiet=True)
    server.ledger.switch("train")

    def two_steps():
        state = server.loop.state
        for _ in range(2):
            epoch, index = divmod(state["steps_done"], len(plan))
            server.train_step(epoch, index, plan[index], 0.05)
            state["steps_done"] += 1

    return two_steps


# Local training of the same two sequential steps (one 128-sample batch each).
LOCAL_SEQUENTIAL = (((1, 0),), ((2, 0),))


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no_prefetch"])
def test_split_steps_sequential(benchmark, rpc_group, prefetch):
    """Two sequential steps; with prefetch the second one's activations are computed and sent
    while the first runs (the default engine's overlap). Each pair alternates with two local steps."""
    from splitrpc.split.server import Server

    cfg = config("resnet20", *_cache_args(), "--schedule", "sequential", "--epochs", "1000",
                 *([] if prefetch else ["--no-prefetch"]))
    server = Server(cfg, rpc_group)
    reference = _local_steps("resnet20", "--schedule", "sequential", steps=LOCAL_SEQUENTIAL)
    Reference(benchmark, "two local sequential steps", reference).pedantic(_two_sequential_steps(server, cfg),
                                                                           rounds=PAIR_ROUNDS)
    benchmark.extra_info["prefetched_steps"] = server.log.prefetched
    benchmark.extra_info["samples_per_call"] = 256


def test_split_step_fp8(benchmark, rpc_group):
    """One parallel step with float8 activations and gradients at the cut, alternating with a local step."""
    from splitrpc.split.server import Server

    server = Server(config("resnet20", *_cache_args(), "--codec", "fp8"), rpc_group)
    server.ledger.switch("train")
    steps = 0

    def step():
        nonlocal steps
        steps += 1
        server.train_step(0, 0, [(1, 0), (2, 0)], 0.05)

    Reference(benchmark, "local step", _local_steps("resnet20")).pedantic(step, rounds=STEP_ROUNDS)
    _bytes_per_step(benchmark, server, steps)
    benchmark.extra_info["samples_per_step"] = 256
